"""Few-shot logistic regression: all episodes in one batched solve vs a per-episode scikit-learn loop.

Sweep: shots 1..16 x 10 seeds x 14 labels (2,240 binary episodes), 20k test rows, d = 768, synthetic
features with a low-rank signal and patient effects (1-3 images per patient). Both sides use the
same episodes, the same centred + L2-normalised features and C = 1.0; both fit and score every
episode on the full test set. The scikit-learn loop is timed on a random subset of episodes and
extrapolated to all (the output says so), once as a plain loop and once with BLAS limited to one
thread (its fastest form for tiny fits).

Targets: speed ratio >= 20x against the plain loop; max |AUROC difference| <= 0.002.

Run: python benchmarks/bench_fewshot.py [--subset 0.05] [--json bench-out/bench_fewshot.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from probes._linalg import auroc, l2_normalize
from probes.fewshot import _logreg_head, fewshot_scores, sample_episodes


def make_data(n_train: int, n_test: int, d: int, n_labels: int, seed: int = 0):
    """Synthetic features float32 [n, d], labels float32 [n, L] and patient ids for the train rows."""
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
    Xtr, Ytr = rows(n_train, train_patients)
    Xte, Yte = rows(n_test, rng.integers(0, n_test, n_test))
    return Xtr, Ytr, np.array([f"p{p}" for p in train_patients]), Xte, Yte


def sklearn_loop(A, B, episodes, one_thread: bool):
    """Per-episode scikit-learn fits; returns (fit seconds, total seconds, scores [n, n_test])."""
    scores = np.empty((len(episodes), B.shape[0]))
    fit_s = 0.0
    t0 = time.perf_counter()
    with threadpool_limits(limits=1 if one_thread else None, user_api="blas"):
        for i, e in enumerate(episodes):
            t = time.perf_counter()
            clf = LogisticRegression(C=1.0).fit(A[e.support], e.targets)
            fit_s += time.perf_counter() - t
            scores[i] = clf.predict_proba(B)[:, 1]
    return fit_s, time.perf_counter() - t0, scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--shots", type=int, default=16, help="shots 1..SHOTS")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument(
        "--subset", type=float, default=0.05, help="fraction of episodes run through scikit-learn"
    )
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the batched run (median reported)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/bench_fewshot.json"))
    args = ap.parse_args()

    Xtr, Ytr, pids, Xte, Yte = make_data(args.n_train, args.n_test, args.dim, args.labels)
    t = time.perf_counter()
    episodes = sample_episodes(pids, Ytr, shots=range(1, args.shots + 1), seeds=args.seeds)
    sample_s = time.perf_counter() - t
    E = len(episodes)

    # Shared machines are noisy: the batched side is short, so repeat it and keep the medians.
    center = Xtr.mean(0, dtype=np.float64).astype(np.float32)
    totals, solves = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        S = fewshot_scores(Xtr, episodes, Xte, head="logreg", C=1.0)
        totals.append(time.perf_counter() - t)
        # The solve alone (the scoring is one product per test block on top of it).
        t = time.perf_counter()
        _logreg_head(Xtr, episodes, center, 1.0, 1000, True, 2)
        solves.append(time.perf_counter() - t)
    batched_s, solve_s = float(np.median(totals)), float(np.median(solves))

    rng = np.random.default_rng(1)
    subset = np.sort(rng.choice(E, max(1, int(round(args.subset * E))), replace=False))
    A = l2_normalize(Xtr, center).astype(np.float64)
    B = l2_normalize(Xte, center).astype(np.float64)
    sub_eps = [episodes[i] for i in subset]
    plain_fit, plain_total, ref = sklearn_loop(A, B, sub_eps, one_thread=False)
    one_fit, one_total, _ = sklearn_loop(A, B, sub_eps, one_thread=True)
    scale = E / len(subset)

    diffs = np.array(
        [
            abs(auroc(Yte[:, e.label], S[i]) - auroc(Yte[:, e.label], r))
            for i, e, r in zip(subset, sub_eps, ref)
        ]
    )
    by_shots = {}
    for i, e in enumerate(episodes):
        by_shots.setdefault(e.shots, []).append(auroc(Yte[:, e.label], S[i]))

    out = {
        "episodes": E,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "dim": args.dim,
        "threads": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "sample_s": sample_s,
        "batched_total_s": batched_s,
        "batched_solve_s": solve_s,
        "sklearn_subset_episodes": len(subset),
        "sklearn_plain_total_s_extrapolated": plain_total * scale,
        "sklearn_plain_fit_s_extrapolated": plain_fit * scale,
        "sklearn_1thread_total_s_extrapolated": one_total * scale,
        "sklearn_1thread_fit_s_extrapolated": one_fit * scale,
        "speedup_vs_plain": plain_total * scale / batched_s,
        "speedup_vs_1thread": one_total * scale / batched_s,
        "solve_speedup_vs_plain_fit": plain_fit * scale / solve_s,
        "max_abs_auroc_diff": float(diffs.max()),
        "mean_auroc_by_shots": {k: float(np.nanmean(v)) for k, v in sorted(by_shots.items())},
    }
    print(
        f"few-shot logreg, {E} episodes (shots 1..{args.shots} x {args.seeds} seeds x {args.labels} labels), "
        f"{args.n_test} test rows, d={args.dim}"
    )
    print(
        f"batched: median of {args.repeats} runs; scikit-learn timed on {len(subset)} random episodes "
        f"and extrapolated x{scale:.1f} to all {E}"
    )
    print(f"{'method':<34}{'fit s':>10}{'fit+score s':>14}{'ratio':>9}")
    print(f"{'batched (fewshot_scores)':<34}{solve_s:>10.2f}{batched_s:>14.2f}{1.0:>9.1f}")
    print(
        f"{'scikit-learn loop, plain':<34}{plain_fit * scale:>10.2f}{plain_total * scale:>14.2f}"
        f"{out['speedup_vs_plain']:>9.1f}"
    )
    print(
        f"{'scikit-learn loop, 1 BLAS thread':<34}{one_fit * scale:>10.2f}{one_total * scale:>14.2f}"
        f"{out['speedup_vs_1thread']:>9.1f}"
    )
    print(f"max |AUROC batched - scikit-learn| over {len(subset)} episodes: {out['max_abs_auroc_diff']:.2e}")
    print(f"episode sampling: {sample_s:.2f} s")
    print("mean AUROC by shots: " + ", ".join(f"{k}:{v:.3f}" for k, v in out["mean_auroc_by_shots"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
