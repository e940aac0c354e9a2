"""The offline demo runs end to end and its synthetic findings are learnable."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cli import featcache
from featcache.demo import FINDINGS, make_demo_dataset, synth_chest
from featcache.store.check import verify
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import read_manifest
from probes.results import read_jsonl


def test_dataset_is_deterministic_and_valid(tmp_path):
    a = read_manifest(make_demo_dataset(tmp_path / "a", n_patients=10, seed=3))
    b = read_manifest(make_demo_dataset(tmp_path / "b", n_patients=10, seed=3))
    assert a.digest() == b.digest()
    assert a.label_names == list(FINDINGS) and set(a.splits) == {"train", "val", "test"}
    img = np.asarray(Image.open(a.abspath(0)))
    assert np.array_equal(img, np.asarray(Image.open(b.abspath(0))))
    mask = np.asarray(Image.open(a.root / a.masks[0]))
    assert set(np.unique(mask)) == {0, 255}


def test_findings_are_drawn():
    rng = np.random.default_rng(0)
    normal, _ = synth_chest(np.random.default_rng(1), 96, {})
    big_heart, _ = synth_chest(np.random.default_rng(1), 96, {"cardiomegaly": True})
    assert big_heart.mean() > normal.mean()  # a wider heart shadow is brighter on average
    img, lungs = synth_chest(rng, 96, {"nodule": True})
    assert lungs.sum() > 0.1 * lungs.size


def test_demo_command_end_to_end(tmp_path):
    result = CliRunner().invoke(
        featcache, ["demo", "--out", str(tmp_path), "--res", "64", "--patients", "20"]
    )
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "logreg" in result.output
    fs = FeatureStore(tmp_path / "cache").open_set()
    assert verify(fs) == [] and fs.n == 40 and "patch" in fs.arrays()
    rows = read_jsonl(tmp_path / "results.jsonl")
    assert {r["probe"] for r in rows} >= {"knn", "logreg", "fewshot"}
    means = [
        r["value"] for r in rows if r["probe"] == "logreg" and r["metric"] == "auroc" and r["label"] == "mean"
    ]
    assert len(means) == 1 and 0.0 <= means[0] <= 1.0
    assert (tmp_path / "report.md").read_text().startswith("## ")
    html = (tmp_path / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "data:image/png;base64," in html
