"""probes.external: a probe fitted on set A, scored on set B, against scikit-learn fitted by hand."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from test_subgroups import make_set

from cli import probes
from featcache.errors import FeatcacheError
from probes.external import run_external
from probes.results import read_jsonl


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    a = make_set(root, "nih/random-tiny/32", labels=("effusion", "nodule", "hernia"), n_patients=70, seed=1)
    b = make_set(
        root, "chexpert/random-tiny/32", labels=("effusion", "nodule", "edema"), n_patients=50, seed=2,
        shift=0.3, splits=(0.4, 0.2),
    )  # fmt: skip
    return a, b


def _pick(rows, metric, label, **kv):
    out = [
        r
        for r in rows
        if r["metric"] == metric and r["label"] == label and "subgroup" not in r["params"]
        and all(r.get(k) == v for k, v in kv.items())
    ]  # fmt: skip
    assert len(out) == 1, (metric, label, len(out))
    return out[0]


def _sklearn_scores(a, b, test_rows, C):
    """StandardScaler + LogisticRegression fitted on A's train + val per label, scored on B's rows."""
    fit = np.isin(a["splits"], ["train", "val"])
    scaler = StandardScaler().fit(a["X"][fit])
    out = {}
    for j, lab in enumerate(("effusion", "nodule")):
        clf = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(
            scaler.transform(a["X"][fit]), a["Y"][fit, j]
        )
        out[lab] = clf.predict_proba(scaler.transform(b["X"][test_rows]))[:, 1]
    return out


@pytest.mark.parametrize("split", ["test", "all"])
def test_external_logreg_equals_sklearn_fitted_on_a_scored_on_b(two, split):
    a, b = two
    rows = run_external(a["cache"], a["name"], b["name"], probe="logreg", C=0.5, n_boot=30, test_split=split)
    test_rows = b["splits"] == "test" if split == "test" else np.ones(len(b["splits"]), bool)
    want = _sklearn_scores(a, b, test_rows, 0.5)
    for j, lab in enumerate(("effusion", "nodule")):
        y = b["Y"][test_rows, j]
        r = _pick(rows, "auroc", lab)
        assert r["value"] == pytest.approx(roc_auc_score(y, want[lab]), abs=1e-6)
        assert r["n_test"] == test_rows.sum() and r["n_train"] == np.isin(a["splits"], ["train", "val"]).sum()
        assert _pick(rows, "auprc", lab)["value"] == pytest.approx(
            average_precision_score(y, want[lab]), abs=1e-6
        )
        # probabilities agree to the solvers' tolerance (the ranks, hence AUROC and AUPRC, exactly)
        assert _pick(rows, "brier", lab)["value"] == pytest.approx(np.mean((want[lab] - y) ** 2), abs=2e-5)
    r = _pick(rows, "auroc", "mean")
    assert r["dataset"] == "chexpert" and r["store_set"] == b["name"] and r["probe"] == "logreg"
    ext = r["params"]["external"]
    assert ext["train_set"] == a["name"] and ext["test_set"] == b["name"] and ext["test_split"] == split
    assert ext["labels"] == ["effusion", "nodule"]
    assert ext["left_out"] == {"only_in_train_set": ["hernia"], "only_in_test_set": ["edema"]}
    assert {x["label"] for x in rows} == {"effusion", "nodule", "mean"}


def test_external_knn_equals_numpy_neighbours_from_a(two):
    a, b = two
    rows = run_external(
        a["cache"], a["name"], b["name"], probe="knn", k=(5,), method="renormalized", n_boot=20
    )
    fit = np.isin(a["splits"], ["train", "val"])
    test = b["splits"] == "test"
    A = a["X"][fit] / np.linalg.norm(a["X"][fit], axis=1, keepdims=True)
    Q = b["X"][test] / np.linalg.norm(b["X"][test], axis=1, keepdims=True)
    sims = Q.astype(np.float64) @ A.T.astype(np.float64)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    w = np.exp(
        np.take_along_axis(sims, top, 1) / 0.07
        - (np.take_along_axis(sims, top, 1) / 0.07).max(1, keepdims=True)
    )
    w /= w.sum(1, keepdims=True)
    for j, lab in enumerate(("effusion", "nodule")):
        score = np.round((w * a["Y"][fit, j][top]).sum(1), 9)  # all-positive neighbourhoods tie at 1
        r = _pick(rows, "auroc", lab, k=5)
        assert r["value"] == pytest.approx(roc_auc_score(b["Y"][test, j], score), abs=1e-9)
        assert _pick(rows, "ece", lab, k=5)["params"]["calibration_of"] == "probability"


def test_external_subgroups_are_those_of_the_external_set(two):
    a, b = two
    rows = run_external(a["cache"], a["name"], b["name"], C=0.5, n_boot=20, by="meta_sex")
    test = b["splits"] == "test"
    want = _sklearn_scores(a, b, test, 0.5)
    sex = b["sex"][test]
    for g in ("F", "M"):
        m = sex == g
        r = [x for x in rows if x["metric"] == "auroc" and x["label"] == "effusion"
             and x["params"].get("subgroup") == {"meta_sex": g}]  # fmt: skip
        assert len(r) == 1
        assert r[0]["value"] == pytest.approx(
            roc_auc_score(b["Y"][test][m, 0], want["effusion"][m]), abs=1e-6
        )


def test_different_backbones_or_no_shared_label_are_refused(tmp_path):
    a = make_set(tmp_path, "nih/m/32", n_patients=30, seed=1)
    for attrs, what in (
        ({"model": "random:other"}, "model"),
        ({"res": 64}, "resolution"),
        ({"provenance": {"weights": "random-init seed 1"}}, "weights"),
        ({"preprocessing": {"resize": "crop", "mean": [0.5] * 3, "std": [0.5] * 3}}, "preprocessing"),
    ):
        name = f"b{what}/m/32"
        make_set(tmp_path, name, n_patients=20, seed=2, attrs=attrs)
        with pytest.raises(FeatcacheError, match=f"differ in {what}"):
            run_external(a["cache"], a["name"], name, C=1.0, n_boot=5)
    make_set(tmp_path, "c/m/32", labels=("edema",), n_patients=20, seed=3)
    with pytest.raises(FeatcacheError, match="share 0 label"):
        run_external(a["cache"], a["name"], "c/m/32", C=1.0, n_boot=5)
    with pytest.raises(FeatcacheError, match=r"edema \(not in 'nih/m/32'\)"):
        run_external(a["cache"], a["name"], "c/m/32", labels=["edema"], C=1.0, n_boot=5)
    with pytest.raises(FeatcacheError, match="both 'nih/m/32'"):
        run_external(a["cache"], a["name"], a["name"], C=1.0, n_boot=5)


def test_cli_external_prints_labels_and_writes_rows(two, tmp_path):
    a, b = two
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(
        probes,
        ["external", "--cache", a["cache"], "--train-set", a["name"], "--test-set", b["name"], "--C", "0.5",
         "--bootstrap", "20", "--by", "meta_sex", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "labels (shared): effusion, nodule" in res.output
    assert (
        "only in nih/random-tiny/32: hernia" in res.output
        and "only in chexpert/random-tiny/32: edema" in res.output
    )
    assert "meta_sex" in res.output
    rows = read_jsonl(out)
    assert all(r["params"]["external"]["test_set"] == b["name"] for r in rows)
    bad = CliRunner().invoke(
        probes, ["external", "--cache", a["cache"], "--train-set", a["name"], "--test-set", "nope/x/1"]
    )
    assert bad.exit_code != 0 and "nope/x/1" in bad.output and "Traceback" not in bad.output
