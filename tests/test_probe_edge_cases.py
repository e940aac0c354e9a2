"""Labels or classes a probe cannot learn are reported as such, never as a chance-level score."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cli import probes
from featcache.errors import FeatcacheError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest
from probes.run import run_compare, run_knn, run_logreg


def _store(tmp_path, columns: dict, X: np.ndarray, name: str = "toy/m/32"):
    n = len(X)
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    cols = {"path": [f"{i}.png" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)], **columns}
    manifest = read_manifest(write_manifest(tmp_path / "m.csv", cols))
    fs = FeatureStore(tmp_path / "cache", mode="a").create_set(
        name,
        manifest,
        {"cls": ArraySpec((X.shape[1],)), "pooled": ArraySpec((X.shape[1],))},
        {"config": {}, "model": "m", "res": 32},
    )
    fs.write_shard(0, {"cls": X, "pooled": X}, {})
    return tmp_path / "cache"


def test_knn_skips_a_label_without_train_values(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    split = np.array(["train"] * 24 + ["val"] * 6 + ["test"] * 10)
    eff = (np.arange(n) % 2).astype(float)
    nod = ((np.arange(n) // 2) % 2).astype(float)
    nod[split != "test"] = np.nan  # nodule never annotated in train or val (the rows a probe fits)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X[:, 0] += 3 * eff
    cache = _store(tmp_path, {"split": split, "effusion": eff, "nodule": nod}, X)
    for rows in (run_knn(cache, k=(5,), n_boot=20), run_logreg(cache, C=1.0, n_boot=20)):
        auc = {r["label"]: r for r in rows if r["metric"] == "auroc"}
        assert auc["nodule"]["value"] is None and "skipped" in auc["nodule"]["params"]
        assert auc["mean"]["value"] == pytest.approx(auc["effusion"]["value"])  # mean over learnable labels
    rows = run_compare(cache, ["toy/m/32", "toy/m/32"], probe="knn", k=5, n_boot=20)
    labels = {r["label"] for r in rows if r.get("value") is not None}
    assert "nodule" not in labels


def test_multiclass_class_absent_from_train_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    cls = np.array(["a", "b"] * 10 + ["c"] * 4)
    split = np.array(["train"] * 20 + ["test"] * 4)
    split[16:20] = "test"
    cache = _store(tmp_path, {"split": split, "label": cls}, rng.normal(size=(24, 4)).astype(np.float32))
    with pytest.raises(FeatcacheError, match=r"classes \['c'\] have no train rows.*--labels a,b"):
        run_knn(cache, n_boot=10)
    rows = run_knn(cache, labels=["a", "b"], k=(3,), n_boot=10)
    assert {r["label"] for r in rows if r["metric"] == "auroc"} >= {"a", "b", "mean"}


def test_repeated_labels_count_once(tmp_path):
    rng = np.random.default_rng(1)
    eff = (np.arange(30) % 2).astype(float)
    split = np.array(["train"] * 20 + ["test"] * 10)
    cache = _store(tmp_path, {"split": split, "effusion": eff}, rng.normal(size=(30, 3)).astype(np.float32))
    rows = run_knn(cache, labels=["effusion", "effusion"], k=(3,), n_boot=10)
    assert [r["label"] for r in rows if r["metric"] == "auroc"].count("effusion") == 1


@pytest.mark.parametrize("opt", [["--bootstrap", "0"]])
def test_bad_counts_are_usage_errors(tmp_path, opt):
    r = CliRunner().invoke(probes, ["knn", "--cache", str(tmp_path), *opt])
    assert r.exit_code == 2 and "Traceback" not in r.output


def _one_positive_patient_store(tmp_path):
    rng = np.random.default_rng(2)
    n = 40
    split = np.array(["train"] * 24 + ["val"] * 6 + ["test"] * 10)
    eff = (np.arange(n) % 2).astype(float)
    mass = np.zeros(n)
    mass[[0, 2, 4, 6, 8, 10, 12, 35]] = 1  # 7 positive train patients, one in test (row 35)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X[:, 0] += 3 * eff
    X[:, 1] += 3 * mass
    return _store(tmp_path, {"split": split, "effusion": eff, "mass": mass}, X)


def test_no_ci_from_a_single_positive_test_patient(tmp_path):
    cache = _one_positive_patient_store(tmp_path)
    rows = run_knn(cache, k=(5,), n_boot=50)
    auc = {r["label"]: r for r in rows if r["metric"] == "auroc"}
    assert auc["mass"]["value"] is not None and auc["mass"].get("ci_low") is None
    assert auc["mass"]["params"]["ci"].startswith("no CI (1 positive patient, 9 negative patients in test")
    assert auc["effusion"]["ci_low"] is not None and auc["mean"]["ci_low"] is not None
    r = CliRunner().invoke(probes, ["knn", "--cache", str(cache), "--k", "5", "--bootstrap", "50"])
    assert r.exit_code == 0 and "note: mass: no CI (1 positive patient," in r.output


def test_fewshot_mean_uses_the_same_labels_at_every_shots(tmp_path):
    from probes.run import run_fewshot

    cache = _one_positive_patient_store(tmp_path)  # 7 positive train+val patients for mass
    rows = run_fewshot(cache, shots=[2, 8], seeds=2)
    means = [r for r in rows if r["label"] == "mean" and r["metric"] == "auroc"]
    assert {tuple(r["params"]["labels_in_mean"]) for r in means} == {("effusion",)}
    assert all(r["params"]["labels_not_at_every_shots"] == ["mass"] for r in means)


def test_k_larger_than_train_is_capped_once(tmp_path):
    rng = np.random.default_rng(3)
    eff = (np.arange(30) % 2).astype(float)
    split = np.array(["train"] * 12 + ["val"] * 6 + ["test"] * 12)
    cache = _store(tmp_path, {"split": split, "effusion": eff}, rng.normal(size=(30, 3)).astype(np.float32))
    rows = run_knn(cache, k=(5, 50, 500), n_boot=10)
    ks = sorted({r["k"] for r in rows})  # train + val rows are indexed: 18
    assert ks == [5, 18] and rows[0]["params"]["k_requested"] == [5, 50, 500]


def test_fewshot_shots_nobody_can_sample_do_not_empty_the_mean(tmp_path):
    from probes.run import run_fewshot

    cache = _one_positive_patient_store(tmp_path)
    rows = run_fewshot(cache, shots=[2, 50], seeds=1)  # 50 shots: no label has enough patients
    means = {r["shots"]: r for r in rows if r["label"] == "mean" and r["metric"] == "auroc"}
    assert means[2]["params"]["labels_in_mean"] == ["effusion", "mass"] and means[2]["value"] is not None
    assert means[50]["value"] is None
