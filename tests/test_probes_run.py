"""probes.run: the numbers in the result rows against independent computations.

References: scikit-learn (roc_auc_score, roc_curve, LogisticRegression, StandardScaler,
accuracy_score), a numpy brute-force cosine kNN, a numpy patient bootstrap and a hand Holm step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score, roc_curve
from sklearn.preprocessing import StandardScaler
from test_probes_data import LABELS, build_store, relabel

from featcache.errors import FeatcacheError
from probes.data import load_probe_data
from probes.results import read_jsonl
from probes.run import run_compare, run_fewshot, run_knn, run_logreg, run_report


def _pick(rows, **kv):
    out = [r for r in rows if all(r.get(k) == v for k, v in kv.items())]
    assert len(out) == 1, (kv, len(out))
    return out[0]


def _knn_reference(X_train, Y_train, X_query, k, kmax=None, T=0.07):
    """dinov2/eval/knn.py KnnModule.forward in numpy: top-kmax cosine neighbours, softmax(sims / T)
    over those kmax once, score at k = sum of the first k weighted votes. Multi-label: the 0/1 label
    vector in place of the one-hot; a neighbour missing the label gives its weight to the known ones
    of the first k in proportion (identical to dinov2 when nothing is missing)."""
    kmax = k if kmax is None else kmax
    a = X_train / np.linalg.norm(X_train, axis=1, keepdims=True)
    q = X_query / np.linalg.norm(X_query, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ a.T.astype(np.float64)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :kmax]
    s = np.take_along_axis(sims, top, axis=1) / T
    w = np.exp(s - s.max(1, keepdims=True))
    w = (w / w.sum(1, keepdims=True))[:, :k]
    if Y_train.ndim == 1:  # multi-class: weighted one-hot sums
        C = int(Y_train.max()) + 1
        return (w[..., None] * np.eye(C)[Y_train[top[:, :k]]]).sum(1)
    Yn = Y_train[top[:, :k]]  # [n, k, L]
    known = ~np.isnan(Yn)
    num = (w[..., None] * np.where(known, Yn, 0)).sum(1)
    return num * w.sum(1, keepdims=True) / (w[..., None] * known).sum(1)


def _index(d):
    """The rows kNN indexes and a fixed-C fit uses: train then val."""
    return (
        np.concatenate([d.train.X, d.val.X]),
        np.concatenate([d.train.y, d.val.y]),
        np.concatenate([d.train.patients, d.val.patients]),
    )


def _patient_bootstrap_auroc(y, s, patients, n_boot, seed):
    """Percentile interval of roc_auc_score over patient resamples (the documented draw protocol)."""
    uniq = np.unique(patients)
    draws = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    values = []
    for d in draws:
        idx = np.concatenate([np.flatnonzero(patients == uniq[p]) for p in d])
        if len(np.unique(y[idx])) == 2:
            values.append(roc_auc_score(y[idx], s[idx]))
    return np.percentile(values, [2.5, 97.5])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return build_store(root, n_patients=50, signal=1.0, dim=6, uncertain_rows=(1,))


def test_knn_auroc_matches_dinov2_arithmetic_and_sklearn(store, tmp_path):
    out = tmp_path / "r.jsonl"
    rows = run_knn(store["cache"], k=(5, 10), n_boot=50, out=out)
    d = load_probe_data(store["cache"])
    X, Y, _ = _index(d)
    for k in (5, 10):
        S = _knn_reference(X, Y, d.test.X, k, kmax=10)  # one softmax over the largest k asked
        per_label = []
        for j, name in enumerate(LABELS):
            known = ~np.isnan(d.test.y[:, j])
            want = roc_auc_score(d.test.y[known, j], S[known, j])
            per_label.append(want)
            r = _pick(rows, k=k, label=name, metric="auroc")
            assert r["value"] == pytest.approx(want, abs=1e-12)
            assert r["n_train"] == len(X) and r["params"]["fit_rows"] == "train+val"
        assert _pick(rows, k=k, label="mean", metric="auroc")["value"] == pytest.approx(np.mean(per_label))
    assert all(r["params"]["softmax_k"] == 10 and r["params"]["val_carved"] is False for r in rows)
    # every row was appended, as JSON
    assert read_jsonl(out) == json.loads(json.dumps(rows))
    assert {r["probe"] for r in rows} == {"knn"}
    assert all(
        r["store_set"] == store["name"] and r["model"] == "random:tiny" and r["res"] == 32 for r in rows
    )


def test_auroc_ci_is_a_patient_bootstrap_that_brackets_the_value(store):
    rows = run_knn(store["cache"], k=(10,), n_boot=200, seed=7)
    d = load_probe_data(store["cache"])
    X, Y, _ = _index(d)
    S = _knn_reference(X, Y, d.test.X, 10)
    y, s, pids = d.test.y[:, 1], S[:, 1], d.test.patients
    lo, hi = _patient_bootstrap_auroc(y, s, pids, 200, 7)
    r = _pick(rows, label=LABELS[1], metric="auroc")
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert r["n_boot"] == 200 and r["n_patients_test"] == len(np.unique(pids))
    for r in rows:
        if r["metric"] == "auroc" and r["value"] is not None:
            assert r["ci_low"] <= r["value"] <= r["ci_high"]


def test_patient_folds_keep_patients_whole_and_balanced():
    from probes.fit import patient_folds

    patients = np.repeat([f"p{i}" for i in range(23)], np.arange(23) % 3 + 1)
    folds = patient_folds(patients, 5, seed=3)
    for p in np.unique(patients):
        assert len(set(folds[patients == p])) == 1
    per_fold = [len(set(patients[folds == f])) for f in range(5)]
    assert sorted(per_fold) == [4, 4, 5, 5, 5]
    np.testing.assert_array_equal(folds, patient_folds(patients, 5, seed=3))


def test_youden_threshold_comes_from_out_of_fold_scores_and_is_applied_to_test(store):
    from probes.fit import patient_folds

    rows = run_knn(store["cache"], k=(10,), n_boot=20, seed=4)
    d = load_probe_data(store["cache"])
    X, Y, P = _index(d)
    j = 0
    folds = patient_folds(P, 5, seed=4)
    oof = np.full(len(X), np.nan)
    for f in range(5):
        held = folds == f
        oof[held] = _knn_reference(X[~held], Y[~held], X[held], 10)[:, j]
    St = _knn_reference(X, Y, d.test.X, 10)[:, j]
    yv, yt = Y[:, j], d.test.y[:, j]
    kv, kt = ~np.isnan(yv) & ~np.isnan(oof), ~np.isnan(yt)
    fpr, tpr, thr = roc_curve(yv[kv], oof[kv])
    t = thr[np.flatnonzero((tpr - fpr) == (tpr - fpr).max())[0]]  # the highest threshold among the best
    pred = St[kt] >= t
    y = yt[kt] == 1
    sens, spec = pred[y].mean(), (~pred[~y]).mean()
    name = LABELS[j]
    r = _pick(rows, label=name, metric="sensitivity@youden")
    assert r["value"] == pytest.approx(sens) and r["params"]["threshold"] == pytest.approx(t)
    assert r["params"]["threshold_from"] == "oof5"
    assert _pick(rows, label=name, metric="specificity@youden")["value"] == pytest.approx(spec)
    pred5 = St[kt] >= 0.5
    f1 = 2 * (pred5 & y).sum() / (2 * (pred5 & y).sum() + (pred5 & ~y).sum() + (~pred5 & y).sum())
    assert _pick(rows, label=name, metric="f1@0.5")["value"] == pytest.approx(f1)


def test_logreg_fixed_C_matches_sklearn_on_train_and_val(store):
    rows = run_logreg(store["cache"], C=0.5, n_boot=20)
    d = load_probe_data(store["cache"])
    X, Y, _ = _index(d)
    scaler = StandardScaler().fit(X)
    for j, name in enumerate(LABELS):
        tr, te = ~np.isnan(Y[:, j]), ~np.isnan(d.test.y[:, j])
        # newton-cholesky reaches the optimum here; lbfgs stops 4e-5 short of it on this label and
        # flips a near-tie of two test scores
        clf = LogisticRegression(C=0.5, solver="newton-cholesky", tol=1e-12, max_iter=10000)
        clf.fit(scaler.transform(X[tr]), Y[tr, j])
        want = roc_auc_score(d.test.y[te, j], clf.decision_function(scaler.transform(d.test.X[te])))
        r = _pick(rows, label=name, metric="auroc")
        assert r["value"] == pytest.approx(want, abs=1e-9)
        assert r["C"] == 0.5 and r["params"]["C_from"] == "given" and r["params"]["val_carved"] is False


def test_logreg_C_is_selected_on_val_then_refit_on_train_and_val(store):
    grid = (1e-3, 1e-1, 10.0)
    rows = run_logreg(store["cache"], C_grid=grid, n_boot=20)
    d = load_probe_data(store["cache"])
    scaler = StandardScaler().fit(d.train.X)
    X, Y, _ = _index(d)
    scaler_all = StandardScaler().fit(X)
    for j, name in enumerate(LABELS):
        tr, va = ~np.isnan(d.train.y[:, j]), ~np.isnan(d.val.y[:, j])
        val_auc = []
        for c in grid:
            clf = LogisticRegression(C=c, tol=1e-10, max_iter=10000)
            clf.fit(scaler.transform(d.train.X[tr]), d.train.y[tr, j])
            val_auc.append(
                roc_auc_score(d.val.y[va, j], clf.decision_function(scaler.transform(d.val.X[va])))
            )
        best = grid[int(np.argmax(np.round(val_auc, 12)))]  # first maximum: ties go to the smaller C
        r = _pick(rows, label=name, metric="auroc")
        assert r["C"] == best and r["params"]["C_from"] == "val"
        # the final model is the train + val fit at the chosen C (dinov2 log_regression.py)
        known, te = ~np.isnan(Y[:, j]), ~np.isnan(d.test.y[:, j])
        final = LogisticRegression(C=best, tol=1e-10, max_iter=10000)
        final.fit(scaler_all.transform(X[known]), Y[known, j])
        want = roc_auc_score(d.test.y[te, j], final.decision_function(scaler_all.transform(d.test.X[te])))
        assert r["value"] == pytest.approx(want, abs=1e-6) and r["params"]["fit_rows"] == "train+val"
    assert _pick(rows, label="mean", metric="auroc")["params"]["C_grid"] == list(grid)


def test_logreg_grid_without_val_carves_and_says_so(tmp_path):
    s = build_store(tmp_path, n_patients=40, signal=1.0, with_val=False)
    rows = run_logreg(s["cache"], C_grid=(0.01, 1.0), n_boot=20, val_fraction=0.25, seed=3)
    r = _pick(rows, label="mean", metric="auroc")
    assert r["params"]["val_carved"] is True and r["params"]["val_fraction"] == 0.25
    assert r["params"]["threshold_from"] == "carved val"
    fixed = run_logreg(s["cache"], C=1.0, n_boot=20)  # nothing selected: nothing carved
    assert all(x["params"]["val_carved"] is False for x in fixed)


def test_logreg_labels_that_cannot_be_fitted_or_tuned(tmp_path):
    s = build_store(tmp_path, n_patients=30)
    # make 'nodule' one-class in val (C cannot be selected there) by rewriting the stored labels
    from featcache.store.feature_store import FeatureStore

    fs = FeatureStore(s["cache"], mode="a").open_set()
    labels = fs.labels
    labels[fs.splits == "val", 1] = 0
    relabel(s, labels)
    rows = run_logreg(s["cache"], C_grid=(0.01, 1.0), n_boot=20)
    nodule = _pick(rows, label="nodule", metric="auroc")
    effusion = _pick(rows, label="effusion", metric="auroc")
    assert nodule["params"]["C_from"] == "shared" and nodule["value"] is not None
    assert effusion["params"]["C_from"] == "val"

    labels[fs.splits == "train", 1] = 1  # one class in train: no fit possible, said so
    relabel(s, labels)
    rows = run_logreg(s["cache"], C_grid=(0.01, 1.0), n_boot=20)
    nodule = _pick(rows, label="nodule", metric="auroc")
    assert nodule["value"] is None and "positives" in nodule["params"]["skipped"]
    assert _pick(rows, label="mean", metric="auroc")["params"]["labels_in_mean"] == ["effusion"]


def test_multiclass_knn_and_logreg(tmp_path):
    s = build_store(tmp_path, task="multiclass", n_patients=45, signal=1.5)
    rows = run_knn(s["cache"], k=(7,), n_boot=30)
    d = load_probe_data(s["cache"])
    X, Y, _ = _index(d)
    P = _knn_reference(X, Y, d.test.X, 7)
    assert _pick(rows, label="mean", metric="auroc")["value"] == pytest.approx(
        roc_auc_score(d.test.y, P, multi_class="ovr", average="macro")
    )
    for c, name in enumerate(d.label_names):
        assert _pick(rows, label=name, metric="auroc")["value"] == pytest.approx(
            roc_auc_score(d.test.y == c, P[:, c])
        )
    acc = _pick(rows, label="mean", metric="accuracy")
    assert acc["value"] == pytest.approx(accuracy_score(d.test.y, P.argmax(1)))
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    bal = _pick(rows, label="mean", metric="balanced_accuracy")
    assert bal["value"] == pytest.approx(balanced_accuracy_score(d.test.y, P.argmax(1)))

    rows = run_logreg(s["cache"], C=1.0, n_boot=20)
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(scaler.transform(X), Y)
    proba = clf.predict_proba(scaler.transform(d.test.X))
    assert _pick(rows, label="mean", metric="auroc")["value"] == pytest.approx(
        roc_auc_score(d.test.y, proba, multi_class="ovr"), abs=1e-6
    )
    assert _pick(rows, label="mean", metric="accuracy")["value"] == pytest.approx(
        accuracy_score(d.test.y, proba.argmax(1))
    )


def _cl2n(X, center):
    Z = X - center
    return Z / np.linalg.norm(Z, axis=1, keepdims=True)


def test_fewshot_rows_episodes_file_and_rerun(store, tmp_path):
    out = tmp_path / "few.jsonl"
    rows = run_fewshot(store["cache"], shots=[1, 3], seeds=2, head="prototype", out=out)
    saved = tmp_path / "few.jsonl.episodes.json"
    doc = json.loads(saved.read_text())["runs"][0]
    assert doc["store_set"] == store["name"] and len(doc["episodes"]) == 2 * 2 * len(LABELS)
    d = load_probe_data(store["cache"], val_fraction=0)
    pool_ids = np.concatenate([d.train.ids, d.val.ids])
    pool_X = np.concatenate([d.train.X, d.val.X])
    pool_Y = np.concatenate([d.train.y, d.val.y])
    pool_P = np.concatenate([d.train.patients, d.val.patients])
    where = {rid: i for i, rid in enumerate(pool_ids)}
    center = pool_X.mean(0)
    for e in doc["episodes"]:
        idx = np.array([where[i] for i in e["support_ids"]])
        j = LABELS.index(e["label"])
        k = e["shots"]
        # K positives and K negatives, each from a different train/val patient, none a test patient
        np.testing.assert_array_equal(pool_Y[idx, j], e["targets"])
        assert sorted(e["targets"]) == [0] * k + [1] * k
        assert len(set(pool_P[idx])) == 2 * k and not set(pool_P[idx]) & set(d.test.patients)
        # SimpleShot on centred, L2-normalised features, scored on the whole test split
        Z = _cl2n(pool_X[idx], center)
        t = np.array(e["targets"])
        mu = [v / np.linalg.norm(v) for v in (Z[t == 0].mean(0), Z[t == 1].mean(0))]
        Q = _cl2n(d.test.X, center)
        score = Q @ mu[1] - Q @ mu[0]
        known = ~np.isnan(d.test.y[:, j])
        want = roc_auc_score(d.test.y[known, j], score[known])
        r = _pick(rows, shots=k, seed=e["seed"], label=e["label"], metric="auroc")
        assert r["value"] == pytest.approx(want, abs=1e-6)
    for k in (1, 3):
        for seed in (0, 1):
            labels = [_pick(rows, shots=k, seed=seed, label=n, metric="auroc")["value"] for n in LABELS]
            mean = _pick(rows, shots=k, seed=seed, label="mean", metric="auroc")
            assert mean["value"] == pytest.approx(np.mean(labels))
            assert mean["head"] == "prototype" and mean["n_train"] == 2 * k
    assert read_jsonl(out) == json.loads(json.dumps(rows))

    # the same call draws the same episodes; re-running the saved ones gives the same values
    again = tmp_path / "again.jsonl"
    rows2 = run_fewshot(store["cache"], shots=[1, 3], seeds=2, head="prototype", out=again)
    assert json.loads((tmp_path / "again.jsonl.episodes.json").read_text())["runs"][0] == doc
    rerun = run_fewshot(store["cache"], head="prototype", episodes_from=saved)
    for a, b, c in zip(rows, rows2, rerun):
        assert a["value"] == b["value"] == c["value"] and a["label"] == c["label"]


def test_fewshot_reports_labels_without_enough_patients(store):
    d = load_probe_data(store["cache"], val_fraction=0)
    pool_Y = np.concatenate([d.train.y, d.val.y])[:, 0]
    pool_P = np.concatenate([d.train.patients, d.val.patients])
    n_pos = len(set(pool_P[pool_Y == 1]))
    n_neg = len(set(pool_P[pool_Y == 0]) - set(pool_P[pool_Y == 1]))
    too_many = min(n_pos, n_neg) + 1
    rows = run_fewshot(store["cache"], shots=[1, too_many], seeds=1, head="prototype")
    r = _pick(rows, shots=too_many, seed=0, label=LABELS[0], metric="auroc")
    assert r["value"] is None and f"{too_many} shots need {too_many}" in r["params"]["skipped"]
    assert _pick(rows, shots=1, seed=0, label=LABELS[0], metric="auroc")["value"] is not None


def test_compare_with_itself_gives_zero_and_p_one(store):
    rows = run_compare(store["cache"], [store["name"], store["name"]], probe="knn", k=10, n_boot=50)
    for r in rows:
        assert r["metric"] == "auroc_diff" and r["value"] == 0.0
        assert r["ci_low"] == 0.0 and r["ci_high"] == 0.0
        assert r["p"] == 1.0
    assert all(_pick(rows, label=n)["p_holm"] == 1.0 for n in LABELS)


def test_compare_two_backbones(tmp_path):
    s = build_store(tmp_path, n_patients=50, signal=1.0)
    build_store(tmp_path, name="toy/weak/32", model="random:weak", n_patients=50, signal=0.3)
    a_rows = run_logreg(s["cache"], s["name"], C=1.0, n_boot=20)
    b_rows = run_logreg(s["cache"], "toy/weak/32", C=1.0, n_boot=20)
    rows = run_compare(s["cache"], [s["name"], "toy/weak/32"], probe="logreg", C=1.0, n_boot=100)
    p = []
    for name in LABELS:
        r = _pick(rows, label=name)
        a = _pick(a_rows, label=name, metric="auroc")["value"]
        b = _pick(b_rows, label=name, metric="auroc")["value"]
        assert r["value"] == pytest.approx(a - b)
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
        assert r["vs"] == "toy/weak/32" and r["store_set"] == s["name"]
        p.append(r["p"])
    # Holm with two labels, by hand: smallest p doubled, the other kept, then made monotone
    small, large = sorted(p)
    adj_small = min(1.0, 2 * small)
    want = {small: adj_small, large: max(adj_small, min(1.0, large))}
    for name in LABELS:
        r = _pick(rows, label=name)
        assert r["p_holm"] == pytest.approx(want[r["p"]])
    mean = _pick(rows, label="mean")
    assert mean["value"] == pytest.approx(
        _pick(a_rows, label="mean", metric="auroc")["value"]
        - _pick(b_rows, label="mean", metric="auroc")["value"]
    )


def test_compare_refuses_different_test_patients(tmp_path):
    s = build_store(tmp_path)
    build_store(tmp_path, name="toy/shifted/32", seed=5, manifest_name="shifted.csv")
    with pytest.raises(FeatcacheError, match="different manifests"):
        run_compare(s["cache"], [s["name"], "toy/shifted/32"], n_boot=10)
    test_row = int(np.flatnonzero(s["splits"] == "test")[0])
    build_store(tmp_path, name="toy/failed/32", failed=(test_row,))
    with pytest.raises(FeatcacheError, match="differ in test rows"):
        run_compare(s["cache"], [s["name"], "toy/failed/32"], probe="knn", n_boot=10)


def test_report_has_one_line_per_model_and_splits_settings(tmp_path):
    s = build_store(tmp_path)
    build_store(tmp_path, name="toy/other/32", model="random:other")
    out = tmp_path / "r.jsonl"
    for name in (s["name"], "toy/other/32"):
        run_knn(s["cache"], name, k=(5, 10), n_boot=20, out=out)
        run_logreg(s["cache"], name, C=1.0, n_boot=20, out=out)
    text = run_report(out)
    assert text.count("## knn features=cls") == 1 and "| model | res | toy k=5 | toy k=10 |" in text
    logreg = text.split("## logreg")[1]
    lines = [ln for ln in logreg.splitlines() if ln.startswith("| random:")]
    assert sorted(ln.split("|")[1].strip() for ln in lines) == ["random:other", "random:tiny"]
    want = _pick(read_jsonl(out), store_set="toy/other/32", probe="logreg", label="mean", metric="auroc")
    assert f"{want['value']:.3f}" in [ln for ln in lines if "random:other" in ln][0]
    only_k5 = run_report(out, where=["k=5"], fmt="csv")
    assert "k=10" not in only_k5 and "logreg" in only_k5
    with pytest.raises(FeatcacheError, match="no rows with metric='dice'"):
        run_report(out, metric="dice")


def test_episodes_file_merges_runs_and_reruns_on_another_backbone(tmp_path):
    s = build_store(tmp_path, n_patients=40)
    build_store(tmp_path, name="toy/other/32", model="random:other", n_patients=40, signal=0.5)
    out = tmp_path / "r.jsonl"
    first = run_fewshot(s["cache"], s["name"], shots=[1], seeds=2, head="prototype", out=out)
    run_fewshot(s["cache"], s["name"], shots=[2], seeds=2, head="prototype", out=out)
    run_fewshot(s["cache"], "toy/other/32", shots=[1], seeds=2, head="prototype", out=out)
    runs = json.loads((tmp_path / "r.jsonl.episodes.json").read_text())["runs"]
    assert [r["store_set"] for r in runs] == [s["name"], "toy/other/32"]
    assert sorted({e["shots"] for e in runs[0]["episodes"]}) == [1, 2]  # the second run was merged in
    # the same manifest gives the same episodes whichever backbone's set they are drawn on
    one_shot = [e for e in runs[0]["episodes"] if e["shots"] == 1]
    assert one_shot == runs[1]["episodes"]

    # re-running the first set's 1-shot episodes reproduces its rows; a subset of shots can be chosen
    rerun = run_fewshot(
        s["cache"], s["name"], shots=[1], head="prototype", episodes_from=tmp_path / "r.jsonl.episodes.json"
    )
    assert [r["value"] for r in rerun] == [r["value"] for r in first]

    # episodes whose targets no longer match the labels here (drawn under another uncertain policy)
    # are refused: an episodes file whose recorded targets disagree with the set's labels
    path = tmp_path / "r.jsonl.episodes.json"
    doc = json.loads(path.read_text())
    ep = doc["runs"][0]["episodes"][0]
    ep["targets"][0] = 1 - ep["targets"][0]
    path.write_text(json.dumps(doc))
    with pytest.raises(FeatcacheError, match="--uncertain policy"):
        run_fewshot(s["cache"], s["name"], episodes_from=path)


def test_compare_headline_p_is_patient_level(tmp_path):
    """Two images per patient: the headline p is the clustered DeLong test on the two sets' scores."""
    from probes.evaluation.stats import clustered_delong, holm

    s = build_store(tmp_path, n_patients=50, signal=1.0)
    build_store(tmp_path, name="toy/weak/32", model="random:weak", n_patients=50, signal=0.3)
    rows = run_compare(s["cache"], [s["name"], "toy/weak/32"], probe="knn", k=10, n_boot=50)
    d = [load_probe_data(s["cache"], n) for n in (s["name"], "toy/weak/32")]
    scores = []
    for dd in d:
        X, Y, _ = _index(dd)
        scores.append(_knn_reference(X, Y, dd.test.X, 10))
    ps = []
    for j, name in enumerate(LABELS):
        known = ~np.isnan(d[0].test.y[:, j])
        want = clustered_delong(
            d[0].test.y[known, j], scores[0][known, j], scores[1][known, j], d[0].test.patients[known]
        )
        r = _pick(rows, label=name)
        assert r["params"]["p_method"] == "clustered_delong"
        assert r["p"] == pytest.approx(want.p, abs=1e-9)
        ps.append(want.p)
    adjusted = holm(np.array(ps))
    for j, name in enumerate(LABELS):
        assert _pick(rows, label=name)["p_holm"] == pytest.approx(adjusted[j], abs=1e-9)


def test_knn_method_mlknn_scores_train_and_val_with_ml_knn(store):
    """probes knn --method mlknn: ML-kNN (checked against the paper's equations in test_mlknn.py)
    fitted on train + val; rows say probe=mlknn."""
    from probes.estimators.mlknn import MLkNNProbe

    rows = run_knn(store["cache"], k=(5,), method="mlknn", n_boot=20)
    d = load_probe_data(store["cache"])
    X, Y, _ = _index(d)
    P = MLkNNProbe(k=5, s=1.0).fit(X, Y).predict_proba(d.test.X)
    for j, name in enumerate(LABELS):
        known = ~np.isnan(d.test.y[:, j])
        r = _pick(rows, label=name, metric="auroc")
        assert r["probe"] == "mlknn" and r["params"]["s"] == 1.0
        assert r["value"] == pytest.approx(roc_auc_score(d.test.y[known, j], P[known, j]), abs=1e-12)


def test_logreg_dinov2_protocol_selects_on_val_over_45_C_then_refits_unstandardised(store):
    """--protocol dinov2: 10**linspace(-6, 5, 45), raw features, selection on val, refit on train + val."""
    rows = run_logreg(store["cache"], protocol="dinov2", n_boot=20)
    d = load_probe_data(store["cache"])
    X, Y, _ = _index(d)
    grid = 10.0 ** np.linspace(-6, 5, 45)
    for j, name in enumerate(LABELS):
        tr, va, te = (~np.isnan(s.y[:, j]) for s in (d.train, d.val, d.test))
        val_auc = []
        for c in grid:
            clf = LogisticRegression(C=c, solver="newton-cholesky", tol=1e-12, max_iter=1000)
            clf.fit(d.train.X[tr], d.train.y[tr, j])
            val_auc.append(roc_auc_score(d.val.y[va, j], clf.decision_function(d.val.X[va])))
        best = grid[int(np.argmax(np.round(val_auc, 9)))]
        r = _pick(rows, label=name, metric="auroc")
        assert r["C"] == pytest.approx(best, rel=1e-12)
        assert r["params"]["protocol"] == "dinov2" and r["params"]["standardize"] is False
        known = ~np.isnan(Y[:, j])
        final = LogisticRegression(C=best, solver="newton-cholesky", tol=1e-12, max_iter=1000)
        final.fit(X[known], Y[known, j])
        want = roc_auc_score(d.test.y[te, j], final.decision_function(d.test.X[te]))
        assert r["value"] == pytest.approx(want, abs=1e-6)


def test_knn_bf16_search_gives_the_flat_search_numbers(store):
    flat = run_knn(store["cache"], k=(5, 10), n_boot=20)
    bf16 = run_knn(store["cache"], k=(5, 10), n_boot=20, search="bf16")
    for a, b in zip(flat, bf16):
        assert (a["label"], a["metric"], a["k"]) == (b["label"], b["metric"], b["k"])
        assert (
            a["value"] == pytest.approx(b["value"], abs=1e-6)
            if a["value"] is not None
            else b["value"] is None
        )
    assert bf16[0]["params"]["search"] == "bf16"


def test_knn_streamed_from_the_store_gives_the_in_memory_numbers(store):
    """--search stream: train + val features read shard by shard from the store, never all at once."""
    flat = run_knn(store["cache"], k=(5, 10), n_boot=20)
    streamed = run_knn(store["cache"], k=(5, 10), n_boot=20, search="stream", memory_cap=32 << 20)
    auc = lambda rows: {(r["k"], r["label"]): r["value"] for r in rows if r["metric"] == "auroc"}  # noqa: E731
    a, b = auc(flat), auc(streamed)
    assert a.keys() == b.keys() and all(a[key] == pytest.approx(b[key], abs=1e-9) for key in a)
    r = _pick(streamed, k=10, label="mean", metric="auroc")
    assert r["params"]["search"] == "stream" and r["params"]["threshold_from"] is None
    assert _pick(streamed, k=10, label=LABELS[0], metric="sensitivity@youden")["params"]["skipped"]
