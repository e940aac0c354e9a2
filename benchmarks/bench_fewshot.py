"""The whole ``probes fewshot`` command against a naive per-episode scikit-learn loop, on one store.

Sweep: shots 1..16 x 10 seeds x 14 labels (2,240 binary episodes), logreg head, C = 1.0. A synthetic
feature store (default 6k train + val rows, 20k test rows, d = 768, a low-rank signal with patient
effects, 1-3 images per patient, label prevalence 2-30%) is written once to a temporary folder.

- Command: ``probes fewshot --cache ... --shots 1..16 --seeds 10 --out ...`` run as a subprocess,
  exactly as a user runs it: Python start-up, imports, reading the store, sampling, fitting,
  scoring, AUROCs, rows written. Median of ``--repeats`` runs.
- Naive loop: read the same store (``load_probe_data``), the same episodes (the command's
  ``.episodes.json``), the same centred + L2-normalised features; per episode one scikit-learn
  ``LogisticRegression(C=1.0)`` fit, ``predict_proba`` on the whole test split and
  ``roc_auc_score`` on the test rows that know the label. It is timed on a random subset of the
  episodes and extrapolated to all (the output says so); loading is timed once and added.

Targets: command >= 20x faster than the naive loop; max |AUROC command - naive| <= 0.002.

Run: python benchmarks/bench_fewshot.py [--subset 0.1] [--json bench-out/bench_fewshot.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(n_train: int, n_test: int, d: int, n_labels: int, seed: int = 0):
    """Synthetic features float32 [n, d], labels float32 [n, L] and patient ids (train, then test rows)."""
    rng = np.random.default_rng(seed)
    rank = 64
    mix = rng.normal(size=(rank, d)) / np.sqrt(rank)
    offset = rng.normal(size=d)
    w = rng.normal(size=(rank, n_labels))
    prevalence = np.linspace(0.02, 0.3, n_labels)

    def rows(n, patients):
        patient_effect = rng.normal(size=(patients.max() + 1, rank))[patients]
        z = 0.6 * patient_effect + 0.8 * rng.normal(size=(n, rank))
        X = z @ mix + 1.5 * rng.normal(size=(n, d)) + offset
        logit = z @ w / np.sqrt(rank) * 3 + rng.normal(size=(n, n_labels))
        Y = (logit > np.diag(np.quantile(logit, 1 - prevalence, axis=0))).astype(np.float32)
        return X.astype(np.float32), Y

    train_patients = np.sort(rng.integers(0, n_train // 2, n_train))
    test_patients = np.sort(rng.integers(0, n_test // 2, n_test))
    Xtr, Ytr = rows(n_train, train_patients)
    Xte, Yte = rows(n_test, test_patients)
    pids = [f"tr{p:06d}" for p in train_patients] + [f"te{p:06d}" for p in test_patients]
    return np.concatenate([Xtr, Xte]), np.concatenate([Ytr, Yte]), np.array(pids), n_train


def write_store(root: Path, X, Y, pids, n_train: int) -> tuple[Path, str]:
    """A feature store with one set (``bench/synthetic/224``) holding X, labels Y; returns (cache, set)."""
    from featcache.store.feature_store import ArraySpec, FeatureStore
    from featcache.store.manifest import read_manifest, write_manifest

    n = len(X)
    split = np.array(["train"] * n_train + ["test"] * (n - n_train))
    names = [f"finding_{j:02d}" for j in range(Y.shape[1])]
    cols = {"path": [f"{i}.png" for i in range(n)], "patient_id": list(pids), "split": list(split)}
    cols.update({name: Y[:, j] for j, name in enumerate(names)})
    manifest = read_manifest(write_manifest(root / "m.csv", cols), check_files=False)
    set_name = "bench/synthetic/224"
    fs = FeatureStore(root / "cache", mode="a").create_set(
        set_name, manifest, {"cls": ArraySpec((X.shape[1],))}, {"config": {}, "model": "synthetic", "res": 224},
        shard_rows=n,
    )  # fmt: skip
    fs.write_shard(0, {"cls": X}, {})
    return root / "cache", set_name


def run_command(cache: Path, set_name: str, shots: int, seeds: int, out: Path) -> tuple[float, str]:
    """Seconds and standard output of one ``probes fewshot`` subprocess (output files removed first)."""
    for p in (out, Path(str(out) + ".episodes.json")):
        p.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-c", "import sys; from cli import probes; sys.exit(probes())",
        "fewshot", "--cache", str(cache), "--set", set_name, "--shots", f"1..{shots}", "--seeds", str(seeds),
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"probes fewshot failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def naive_loop(cache: Path, set_name: str, episodes_file: Path, fraction: float, one_thread: bool = False):
    """Per-episode scikit-learn on the same store and episodes; returns timings and AUROCs.

    ``one_thread`` limits BLAS to one thread (the fastest form of the loop for tiny fits).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from probes.data import load_probe_data

    t = time.perf_counter()
    d = load_probe_data(cache, set_name, val_fraction=0.0)
    X = np.concatenate([d.train.X, d.val.X]).astype(np.float64)
    ids = np.concatenate([d.train.ids, d.val.ids])
    center = X.mean(0)
    A = X - center
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    B = d.test.X.astype(np.float64) - center
    B /= np.linalg.norm(B, axis=1, keepdims=True)
    where = {rid: i for i, rid in enumerate(ids.tolist())}
    load_s = time.perf_counter() - t

    episodes = json.loads(episodes_file.read_text())["runs"][0]["episodes"]
    rng = np.random.default_rng(1)
    subset = np.sort(rng.choice(len(episodes), max(1, int(round(fraction * len(episodes)))), replace=False))
    aucs = {}
    t = time.perf_counter()
    with threadpool_limits(limits=1 if one_thread else None, user_api="blas"):
        for i in subset:
            e = episodes[i]
            j = d.label_names.index(e["label"])
            support = [where[r] for r in e["support_ids"]]
            p = LogisticRegression(C=1.0).fit(A[support], e["targets"]).predict_proba(B)[:, 1]
            known = ~np.isnan(d.test.y[:, j])
            aucs[(e["label"], e["shots"], e["seed"])] = roc_auc_score(d.test.y[known, j], p[known])
    loop_s = time.perf_counter() - t
    return load_s, loop_s, len(subset), len(episodes), aucs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--shots", type=int, default=16, help="shots 1..SHOTS")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--subset", type=float, default=0.1, help="fraction of episodes run through scikit-learn")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the command (median reported)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/bench_fewshot.json"))
    args = ap.parse_args()

    X, Y, pids, n_train = make_data(args.n_train, args.n_test, args.dim, args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache, set_name = write_store(root, X, Y, pids, n_train)
        out = root / "few.jsonl"
        runs = [run_command(cache, set_name, args.shots, args.seeds, out) for _ in range(args.repeats)]
        command_s = float(np.median([s for s, _ in runs]))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        episodes_file = Path(str(out) + ".episodes.json")
        load_s, loop_s, n_sub, n_eps, ref = naive_loop(cache, set_name, episodes_file, args.subset)
        _, one_s, _, _, _ = naive_loop(cache, set_name, episodes_file, args.subset, one_thread=True)
    scale = n_eps / n_sub
    naive_s = load_s + loop_s * scale
    naive_one_s = load_s + one_s * scale
    got = {
        (r["label"], r["shots"], r["seed"]): r["value"]
        for r in rows
        if r["metric"] == "auroc" and r["label"] != "mean" and r["value"] is not None
    }
    diffs = np.array([abs(got[key] - v) for key, v in ref.items()])
    means = {r["shots"]: [] for r in rows}
    for r in rows:
        if r["label"] == "mean" and r["metric"] == "auroc" and r["value"] is not None:
            means[r["shots"]].append(r["value"])
    result = {
        "episodes": n_eps,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "dim": args.dim,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "command_s_median": command_s,
        "command_s_runs": [s for s, _ in runs],
        "naive_load_s": load_s,
        "naive_subset_episodes": n_sub,
        "naive_loop_s_extrapolated": loop_s * scale,
        "naive_total_s": naive_s,
        "naive_1thread_total_s": naive_one_s,
        "speedup": naive_s / command_s,
        "speedup_vs_1thread": naive_one_s / command_s,
        "max_abs_auroc_diff": float(diffs.max()),
        "mean_auroc_by_shots": {k: float(np.mean(v)) for k, v in sorted(means.items()) if v},
    }
    print(
        f"probes fewshot, {n_eps} episodes (shots 1..{args.shots} x {args.seeds} seeds x {args.labels} labels), "
        f"{args.n_train} train / {args.n_test} test rows, d={args.dim}, {os.cpu_count()} CPUs"
    )
    print(f"command (subprocess, median of {args.repeats}): {command_s:.2f} s  runs: "
          + ", ".join(f"{s:.2f}" for s, _ in runs))  # fmt: skip
    print(
        f"naive loop: load {load_s:.2f} s + {loop_s:.2f} s for {n_sub} random episodes, extrapolated "
        f"x{scale:.1f} to all: {naive_s:.2f} s"
    )
    print(f"naive loop with one BLAS thread, extrapolated: {naive_one_s:.2f} s")
    print(
        f"speed-up of the command: {result['speedup']:.1f}x (target >= 20x); "
        f"{result['speedup_vs_1thread']:.1f}x against the one-thread loop"
    )
    print(
        f"max |AUROC command - naive| over {n_sub} episodes: {result['max_abs_auroc_diff']:.2e} (target <= 0.002)"
    )
    print(
        "mean AUROC by shots: " + ", ".join(f"{k}:{v:.3f}" for k, v in result["mean_auroc_by_shots"].items())
    )
    print("command output (last run):\n" + runs[-1][1])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
