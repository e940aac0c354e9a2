"""End to end on real chest X-rays: manifest -> featcache extract -> probes knn/logreg/fewshot -> report.

Uses the NIH ChestX-ray14 64 px sample (527 images, 15 labels, patient-level splits) and a
subsample of PneumoniaMNIST (no patient ids; its source val split serves as the test split and
validation is carved from train). A random-init DINOv2 ViT-S/14 at 56 px keeps the extraction
to seconds on a CPU; the AUROCs of random features are near 0.5, so what is checked is that every
label gets a well-formed result, not accuracy.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import featcache, probes
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import write_manifest
from probes.results import read_jsonl

pytestmark = pytest.mark.slow

MODEL = "random:dinov2-vits14"
RES = 56
NIH_LABELS = [
    "no_finding", "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
    "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia",
]  # fmt: skip


def _nih_manifest(src: Path, out: Path) -> Path:
    rows = list(csv.DictReader(open(src / "labels.csv", newline="")))
    cols: dict[str, list] = {
        "path": [r["image_path"] for r in rows],
        "patient_id": [r["patient_id"] for r in rows],
        "split": [r["split"] for r in rows],
    }
    for name in NIH_LABELS:
        cols[name] = [r[name] for r in rows]
    for name in rows[0]:
        if name not in cols and name not in NIH_LABELS and name != "image_path":
            cols[f"meta_{name}"] = [r[name] for r in rows]
    return write_manifest(out, cols)


def _pneumonia_manifest(src: Path, out: Path, n_train: int = 450, n_test: int = 150) -> Path:
    rows = list(csv.DictReader(open(src / "labels.csv", newline="")))
    rng = np.random.default_rng(0)
    # no patient ids: each image is its own patient, so any subsample keeps patients whole
    train = [
        rows[i]
        for i in sorted(
            rng.choice([i for i, r in enumerate(rows) if r["split"] == "train"], n_train, replace=False)
        )
    ]
    test = [
        rows[i]
        for i in sorted(
            rng.choice([i for i, r in enumerate(rows) if r["split"] == "val"], n_test, replace=False)
        )
    ]
    chosen = train + test
    return write_manifest(
        out,
        {
            "path": [r["image_path"] for r in chosen],
            "split": ["train"] * n_train + ["test"] * n_test,  # the source val split is held out as test
            "label": [r["label_name"] for r in chosen],
            "meta_source_array": [r["source_array"] for r in chosen],
            "meta_source_index": [r["source_index"] for r in chosen],
        },
    )


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def test_extract_probe_report_on_real_chest_xrays(shared_data, tmp_path):
    nih_src, pneu_src = shared_data / "nih_cxr14_tiny64", shared_data / "pneumoniamnist_subset"
    manifests = {
        "nih": (_nih_manifest(nih_src, tmp_path / "nih.csv"), nih_src),
        "pneumoniamnist": (_pneumonia_manifest(pneu_src, tmp_path / "pneumoniamnist.csv"), pneu_src),
    }
    cache = tmp_path / "cache"
    runner = CliRunner()
    for manifest, root in manifests.values():
        args = ["extract", "--model", MODEL, "--res", RES, "--data", manifest, "--root", root, "--out", cache,
                "--workers", 0, "--batch-size", 64, "--device", "cpu", "--quiet"]  # fmt: skip
        _ok(runner.invoke(featcache, [str(a) for a in args]))
    assert "ok" in _ok(runner.invoke(featcache, ["verify", str(cache)]))
    store = FeatureStore(cache)
    sets = {name: f"{name}/random-dinov2-vits14/{RES}" for name in manifests}
    assert store.list_sets() == sorted(sets.values())

    results = tmp_path / "results.jsonl"
    for set_name in sets.values():
        common = ["--cache", str(cache), "--set", set_name, "--out", str(results)]
        _ok(runner.invoke(probes, ["knn", *common, "--bootstrap", "100"]))
        # a short C grid keeps the suite fast; selection and refit are checked against scikit-learn elsewhere
        _ok(runner.invoke(probes, ["logreg", *common, "--bootstrap", "100", "--C-grid", "0.01,1"]))
        out = _ok(runner.invoke(probes, ["fewshot", *common, "--shots", "1..2", "--seeds", "2"]))
        assert "episodes saved to" in out
    rows = read_jsonl(results)

    for dataset, set_name in sets.items():
        fs = store.open_set(set_name)
        test = fs.ok & (fs.splits == "test")
        if fs.task == "multilabel":
            names = fs.label_names
            Y = fs.labels[test]
            both = {n: bool((Y[:, j] == 1).any() and (Y[:, j] == 0).any()) for j, n in enumerate(names)}
        else:
            names = fs.class_names
            classes = fs.classes[test]
            both = {n: bool((classes == n).any() and (classes != n).any()) for n in names}
        assert (dataset, len(names)) in (("nih", 15), ("pneumoniamnist", 2))
        mine = [r for r in rows if r["store_set"] == set_name and r["metric"] == "auroc"]
        for probe in ("knn", "logreg", "fewshot"):
            per_label = {r["label"]: r for r in mine if r["probe"] == probe}
            assert set(per_label) == {*names, "mean"}, (set_name, probe)
            for name in names:
                values = [r["value"] for r in mine if r["probe"] == probe and r["label"] == name]
                if both[name]:
                    defined = [v for v in values if v is not None]
                    # few-shot may skip a label at a K it has too few patients for (said in params)
                    assert defined or probe == "fewshot", (set_name, probe, name)
                    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in defined)
                else:
                    assert all(v is None for v in values), (set_name, probe, name)
            means = [r["value"] for r in mine if r["probe"] == probe and r["label"] == "mean"]
            assert means and all(v is not None and 0.0 <= v <= 1.0 for v in means)
        logreg_mean = next(r for r in mine if r["probe"] == "logreg" and r["label"] == "mean")
        assert logreg_mean["ci_low"] <= logreg_mean["value"] <= logreg_mean["ci_high"]
        assert logreg_mean["params"]["val_carved"] is (dataset == "pneumoniamnist")
    episodes = [p for p in tmp_path.iterdir() if p.name.endswith(".episodes.json")]
    assert episodes == [tmp_path / "results.jsonl.episodes.json"]
    runs = json.loads(episodes[0].read_text())["runs"]
    assert [r["store_set"] for r in runs] == list(sets.values())  # one record per set, none overwritten

    report = _ok(runner.invoke(probes, ["report", str(results), "--by", "model,res", "--columns", "dataset"]))
    tables = [t for t in report.split("## ") if t.strip()]
    assert any(t.startswith("logreg") for t in tables) and any(t.startswith("knn") for t in tables)
    for t in tables:
        lines = [ln for ln in t.splitlines() if ln.startswith("| random:")]
        assert len(lines) == 1 and lines[0].startswith(f"| {MODEL} | {RES} |"), t  # one line per model
    logreg_table = next(t for t in tables if t.startswith("logreg"))
    assert "| model | res | nih | pneumoniamnist |" in logreg_table
