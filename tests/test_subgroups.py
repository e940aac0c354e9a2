"""probes.subgroups: metrics per meta_* group and the gaps between groups, against scikit-learn and a
numpy patient bootstrap.

``make_set`` (a feature set with meta columns: sex per patient, age per patient, view per image) is
reused by test_external.py and test_calibration.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from featcache.errors import FeatcacheError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest
from probes.data import load_probe_data
from probes.fit import logreg_scores
from probes.run import run_knn, run_logreg
from probes.subgroups import parse_by


def make_set(
    root: Path,
    name: str = "toy/random-tiny/32",
    *,
    labels: tuple[str, ...] = ("effusion", "nodule"),
    n_patients: int = 60,
    per_patient: int = 2,
    dim: int = 8,
    seed: int = 0,
    signal: float = 1.5,
    shift: float = 0.0,
    splits: tuple[float, float] = (0.6, 0.2),
    attrs: dict | None = None,
    cache: str = "cache",
) -> dict:
    """A multi-label feature set whose feature j carries label j (plus noise and a ``shift``).

    Meta columns: ``meta_sex`` (F/M per patient), ``meta_age`` (20..89 per patient), ``meta_view``
    (PA for a patient's first image, AP for the others). Patients split train/val/test by ``splits``.

    Returns:
        dict with ``cache``, ``name``, ``X`` float32 [N, D], ``Y`` float [N, L], ``patients``,
        ``splits``, ``sex``, ``age``, ``view``.
    """
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    pid = np.array([f"{name.split('/')[0]}-p{p:03d}" for p in range(n_patients)])
    patients = np.repeat(pid, per_patient)
    order = rng.permutation(n_patients)
    n_tr, n_va = int(splits[0] * n_patients), int(splits[1] * n_patients)
    split_of = np.where(order < n_tr, "train", np.where(order < n_tr + n_va, "val", "test"))
    split = np.repeat(split_of, per_patient)
    sex = np.repeat(rng.choice(["F", "M"], n_patients), per_patient)
    age = np.repeat(rng.integers(20, 90, n_patients), per_patient)
    view = np.tile(["PA"] + ["AP"] * (per_patient - 1), n_patients)
    Y = np.repeat((rng.random((n_patients, len(labels))) < 0.4).astype(np.float32), per_patient, axis=0)
    X = rng.normal(size=(n, dim)).astype(np.float32) + shift
    X[:, : len(labels)] += signal * Y
    ids = np.array([f"{name.split('/')[0]}-{i:04d}" for i in range(n)])
    cols = {
        "path": [f"images/{i}.png" for i in ids],
        "id": ids,
        "patient_id": patients,
        "split": split,
        "meta_sex": sex,
        "meta_age": age.astype(str),
        "meta_view": view,
    }
    for j, lab in enumerate(labels):
        cols[lab] = Y[:, j]
    folder = root / name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(write_manifest(folder / "manifest.csv", cols), check_files=False)
    store = FeatureStore(root / cache, mode="a")
    a = {
        "config": {"model": "random:tiny", "weights": "random-init seed 0", "res": 32},
        "model": "random:tiny",
        "res": 32,
        "preprocessing": {"resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3},
        "provenance": {"weights": "random-init seed 0"},
        "layers": [],
        "versions": {"featcache": "0.1.0"},
    }
    a.update(attrs or {})
    fs = store.create_set(
        name, manifest, {"cls": ArraySpec((dim,)), "pooled": ArraySpec((dim,))}, a, shard_rows=32
    )
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        fs.write_shard(s, {"cls": X[lo:hi], "pooled": -X[lo:hi]}, {})
    return {
        "cache": str(root / cache),
        "name": name,
        "X": X,
        "Y": Y,
        "patients": patients,
        "splits": split,
        "sex": sex,
        "age": age,
        "view": view,
    }


def _pick(rows, metric, label, sub=None, **kv):
    out = [
        r
        for r in rows
        if r["metric"] == metric
        and r["label"] == label
        and r["params"].get("subgroup") == sub
        and all(r.get(k) == v for k, v in kv.items())
    ]
    assert len(out) == 1, (metric, label, sub, len(out))
    return out[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("sub"), n_patients=80)


def _scores(toy):
    """The run's test scores, from the fit the runner uses (the subgroup code only slices them)."""
    data = load_probe_data(toy["cache"])
    sc, _ = logreg_scores(data, 1.0, ())
    return data, sc.test


def _test_meta(toy, key, data):
    return toy[key][data.test.rows]


def test_parse_by_bands_and_errors():
    assert parse_by("meta_sex,meta_age:0,40,60,80,view") == [
        ("meta_sex", None),
        ("meta_age", [0.0, 40.0, 60.0, 80.0]),
        ("meta_view", None),
    ]
    for bad, msg in (("meta_age:0", "two or more"), ("meta_age:5,1", "increasing"), ("3", "not a column"),
                     ("meta_a,meta_a", "twice"), ("meta_age:x", "not a number")):  # fmt: skip
        with pytest.raises(FeatcacheError, match=msg):
            parse_by(bad)


def test_per_group_auroc_auprc_equal_sklearn_on_the_group_rows(toy):
    rows = run_logreg(toy["cache"], C=1.0, n_boot=30, by="meta_sex,meta_view")
    data, S = _scores(toy)
    Y = data.test.y
    for key, col in (("sex", "meta_sex"), ("view", "meta_view")):
        g = _test_meta(toy, key, data)
        for value in np.unique(g):
            m = g == value
            for j, lab in enumerate(("effusion", "nodule")):
                r = _pick(rows, "auroc", lab, {col: value})
                assert r["value"] == pytest.approx(roc_auc_score(Y[m, j], S[m, j]), abs=1e-12)
                assert r["n_test"] == m.sum() and r["n_patients_test"] == len(
                    np.unique(data.test.patients[m])
                )
                ap = _pick(rows, "auprc", lab, {col: value})
                assert ap["value"] == pytest.approx(average_precision_score(Y[m, j], S[m, j]), abs=1e-12)
                assert ap["params"]["subgroup_by"] == col
            want = np.mean([roc_auc_score(Y[m, j], S[m, j]) for j in range(2)])
            assert _pick(rows, "auroc", "mean", {col: value})["value"] == pytest.approx(want, abs=1e-12)
    # the whole-test rows are still there, unchanged
    assert _pick(rows, "auroc", "effusion")["value"] == pytest.approx(
        roc_auc_score(Y[:, 0], S[:, 0]), abs=1e-12
    )


def test_two_group_gap_and_its_ci_from_a_numpy_patient_bootstrap(toy):
    n_boot, seed = 40, 3
    rows = run_logreg(toy["cache"], C=1.0, n_boot=n_boot, seed=seed, by="meta_sex")
    data, S = _scores(toy)
    Y, pat = data.test.y, data.test.patients
    g = _test_meta(toy, "sex", data)
    r = _pick(rows, "auroc_gap", "effusion")
    a = roc_auc_score(Y[g == "F", 0], S[g == "F", 0])
    b = roc_auc_score(Y[g == "M", 0], S[g == "M", 0])
    assert r["value"] == pytest.approx(a - b, abs=1e-12)
    assert r["params"]["gap"] == "F - M" and r["params"]["groups"] == ["F", "M"]
    # brute force: the same draws over all test patients, each group's rows materialised
    uniq = np.unique(pat)
    draws = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    diffs = []
    for d in draws:
        idx = np.concatenate([np.flatnonzero(pat == uniq[p]) for p in d])
        vals = []
        for sex in ("F", "M"):
            k = idx[g[idx] == sex]
            vals.append(roc_auc_score(Y[k, 0], S[k, 0]) if len(np.unique(Y[k, 0])) == 2 else np.nan)
        diffs.append(vals[0] - vals[1])
    diffs = np.array(diffs)
    ok = diffs[~np.isnan(diffs)]
    assert [r["ci_low"], r["ci_high"]] == pytest.approx(np.percentile(ok, [2.5, 97.5]), abs=1e-12)
    assert r["n_boot_skipped"] == int(np.isnan(diffs).sum())
    p = min(1.0, 2 * (min((ok <= 0).sum(), (ok >= 0).sum()) + 1) / (len(ok) + 1))
    assert r["p"] == pytest.approx(p)
    brier = _pick(rows, "brier_gap", "nodule")
    want = np.mean((S[g == "F", 1] - Y[g == "F", 1]) ** 2) - np.mean((S[g == "M", 1] - Y[g == "M", 1]) ** 2)
    assert brier["value"] == pytest.approx(want, abs=1e-12)


def test_true_positive_rate_gap_at_the_runs_youden_threshold_from_a_numpy_bootstrap(toy):
    from sklearn.metrics import recall_score

    n_boot, seed = 40, 3
    rows = run_logreg(toy["cache"], C=1.0, n_boot=n_boot, seed=seed, by="meta_sex")
    data, S = _scores(toy)
    Y, pat = data.test.y, data.test.patients
    g = _test_meta(toy, "sex", data)
    t = _pick(rows, "sensitivity@youden", "effusion")["params"]["threshold"]  # the whole run's
    r = _pick(rows, "sensitivity@youden_gap", "effusion")

    def tpr(k):
        return recall_score(Y[k, 0], S[k, 0] >= t, zero_division=np.nan) if (Y[k, 0] == 1).any() else np.nan

    assert r["value"] == pytest.approx(tpr(g == "F") - tpr(g == "M"), abs=1e-12)
    assert r["params"]["group_values"] == pytest.approx({"F": tpr(g == "F"), "M": tpr(g == "M")})
    uniq = np.unique(pat)
    draws = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    diffs = []
    for d in draws:
        idx = np.concatenate([np.flatnonzero(pat == uniq[p]) for p in d])
        diffs.append(tpr(idx[g[idx] == "F"]) - tpr(idx[g[idx] == "M"]))
    diffs = np.array(diffs, dtype=float)
    ok = diffs[~np.isnan(diffs)]
    assert [r["ci_low"], r["ci_high"]] == pytest.approx(np.percentile(ok, [2.5, 97.5]), abs=1e-12)
    spec = _pick(rows, "specificity@youden_gap", "mean")
    assert spec["params"]["labels_in_mean"] and spec["value"] is not None


def test_numeric_column_banded_by_quartiles_or_given_edges(toy):
    rows = run_knn(toy["cache"], k=(10,), n_boot=20, by="meta_age,meta_sex")
    data = load_probe_data(toy["cache"])
    age = _test_meta(toy, "age", data).astype(float)
    edges = np.unique(np.percentile(age, [0, 25, 50, 75, 100]))
    groups = {
        r["params"]["subgroup"]["meta_age"] for r in rows if "meta_age" in (r["params"].get("subgroup") or {})
    }
    assert len(groups) == len(edges) - 1
    r = next(r for r in rows if (r["params"].get("subgroup") or {}).get("meta_age", "").startswith("["))
    assert (
        r["params"]["subgroup_bands"] == pytest.approx(edges)
        and r["params"]["subgroup_banding"] == "quartiles"
    )
    first = f"[{edges[0]:g}, {edges[1]:g})"
    n_first = int(((age >= edges[0]) & (age < edges[1])).sum())
    assert _pick(rows, "auroc", "mean", {"meta_age": first}, k=10)["n_test"] == n_first
    gaps = {
        r["params"]["subgroup_by"]: r for r in rows if r["metric"] == "auroc_gap" and r["label"] == "mean"
    }
    assert gaps["meta_age"]["params"]["gap"] == "max - min" and gaps["meta_sex"]["params"]["gap"] == "F - M"
    # given edges: rows outside them belong to no group, counted
    rows = run_knn(toy["cache"], k=(10,), n_boot=20, by="meta_age:30,60")
    outside = int(((age < 30) | (age > 60)).sum())
    r = _pick(rows, "auroc", "mean", {"meta_age": "[30, 60]"}, k=10)
    assert r["n_test"] == len(age) - outside and r["params"]["subgroup_left_out"] == outside
    assert not [x for x in rows if x["metric"] == "auroc_gap"]  # one group: no gap


def test_more_than_two_groups_gap_is_max_minus_min(toy):
    rows = run_logreg(toy["cache"], C=1.0, n_boot=20, by="meta_age:20,40,60,90")
    data, S = _scores(toy)
    age = _test_meta(toy, "age", data)
    vals = []
    for lo, hi, last in ((20, 40, False), (40, 60, False), (60, 90, True)):
        m = (age >= lo) & ((age <= hi) if last else (age < hi))
        vals.append(roc_auc_score(data.test.y[m, 0], S[m, 0]))
    r = _pick(rows, "auroc_gap", "effusion")
    assert r["value"] == pytest.approx(max(vals) - min(vals), abs=1e-12)
    assert r["params"]["gap"] == "max - min" and "p" not in r
    assert list(r["params"]["group_values"].values()) == pytest.approx(vals)


def test_unknown_column_is_refused_with_the_columns_named(toy):
    with pytest.raises(FeatcacheError, match="no column meta_site.*meta_age, meta_sex, meta_view"):
        run_logreg(toy["cache"], C=1.0, n_boot=5, by="meta_site")
