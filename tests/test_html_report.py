"""The self-contained HTML report: every figure embedded and decodable, nothing fetched from outside,
provenance and label sets present; rendered in a headless Chromium when one is installed."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.errors import FeatcacheError
from probes.results import append_jsonl

LABELS = ("Effusion", "Nodule", "Cardiomegaly")


def _results(path):
    """Rows as the probes write them: kNN at two k, logreg, few-shot over seeds, a comparison."""
    rows = []
    for model, res, shift in [("dinov3-vitb16", 512, 0.0), ("rad-dino", 518, 0.03)]:
        prov = {
            "dataset": "nih", "model": model, "res": res, "features": "cls",
            "store_set": f"nih/{model}/{res}", "manifest_digest": "d1g357", "weights": f"{model}@rev42",
            "preprocessing": {"resize": "squash", "mean": [0.5] * 3}, "featcache_version": "0.1.0",
        }  # fmt: skip
        for probe, ks in [("knn", (10, 20)), ("logreg", (None,))]:
            for k in ks:
                vals = [0.7 + shift + 0.05 * j + (0.01 * k if k else 0.02) for j in range(len(LABELS))]
                for lab, v in [*zip(LABELS, vals), ("mean", float(np.mean(vals)))]:
                    row = {**prov, "probe": probe, "metric": "auroc", "label": lab, "value": v, "seed": 0,
                           "ci_low": v - 0.04, "ci_high": v + 0.04}  # fmt: skip
                    if k:
                        row["k"] = k
                    if lab == "mean":
                        row["params"] = {"labels_in_mean": list(LABELS)}
                    rows.append(row)
        for shots in (1, 2, 4, 8, 16):
            for seed in range(3):
                v = 0.6 + shift + 0.01 * shots + 0.005 * seed
                rows.append({**prov, "probe": "fewshot", "head": "logreg", "metric": "auroc", "label": "mean",
                             "value": v, "shots": shots, "seed": seed,
                             "params": {"labels_in_mean": list(LABELS[:2])}})  # fmt: skip
    for lab, v in [*zip(LABELS, (-0.03, -0.02, 0.01)), ("mean", -0.0133)]:
        rows.append({"dataset": "nih", "model": "dinov3-vitb16", "res": 512, "features": "cls", "probe": "compare",
                     "metric": "auroc_diff", "label": lab, "value": v, "ci_low": v - 0.03, "ci_high": v + 0.03,
                     "vs": "nih/rad-dino/518", "store_set": "nih/dinov3-vitb16/512", "seed": 0, "p": 0.3})  # fmt: skip
    append_jsonl(path, rows)
    append_jsonl(path, rows[:4])  # a re-run of part of one kNN run
    return path


def _images(text):
    from PIL import Image

    uris = re.findall(r'<img[^>]*src="([^"]*)"', text)
    out = []
    for uri in uris:
        assert uri.startswith("data:image/png;base64,"), uri[:40]
        im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
        im.load()
        out.append(np.asarray(im.convert("RGB"), dtype=float))
    return out


def test_html_report_is_self_contained(tmp_path):
    pytest.importorskip("matplotlib")
    from probes.run import run_report

    res = _results(tmp_path / "r.jsonl")
    notes = []
    text = run_report(res, html=tmp_path / "out" / "report.html", notes=notes)
    assert f"html report: {tmp_path / 'out' / 'report.html'}" in text
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing to fetch: no scripts, stylesheets, or addresses outside the file
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)|url\(", page)
    images = _images(page)
    # forest (kNN, logreg), compare, few-shot curves, kNN against k
    assert len(images) == 5
    assert all(px.std() > 10 for px in images)
    for needle in (
        "Summary tables", "Per-label tables", "d1g357", "rad-dino@rev42", "squash", "nih/rad-dino/518",
        "Effusion, Nodule, Cardiomegaly", "Effusion, Nodule", "dropped 4 duplicate rows",
    ):  # fmt: skip
        assert needle in page, needle
    assert notes and notes[0].startswith("dropped 4 duplicate rows")


def test_html_report_shows_roc_curves_of_rows_that_carry_them(tmp_path):
    pytest.importorskip("matplotlib")
    from probes.report.roc import roc_curve_params
    from probes.run import run_report

    res = tmp_path / "r.jsonl"
    rng = np.random.default_rng(0)
    rows = []
    for model, shift in (("dinov3-vitb16", 1.0), ("rad-dino", 1.5)):
        for lab in LABELS:
            y = (rng.random(120) < 0.3).astype(float)
            s = rng.normal(size=120) + shift * y
            rows.append({"dataset": "nih", "model": model, "res": 512, "features": "cls", "probe": "logreg",
                         "metric": "auroc", "label": lab, "value": 0.8, "seed": 1,
                         "params": {"roc": roc_curve_params(y, s)}})  # fmt: skip
    append_jsonl(res, rows)
    run_report(res, html=tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "ROC curves (test rows): dataset=nih, probe=logreg, features=cls" in page
    images = _images(page)
    assert len(images) == 2 and all(px.std() > 10 for px in images)  # the forest plot and the ROC grid
    assert images[1].shape[1] == 3 * 480  # one panel per label


def test_html_from_the_cli_and_errors_are_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    from cli import probes

    res = _results(tmp_path / "r.jsonl")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(probes, ["report", str(res), "--table", "both", "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "| label | dinov3-vitb16/512 k=10 |" in result.output and "note: dropped 4 duplicate" in result.output
    )
    assert len(_images(out.read_text())) == 5
    bad = CliRunner().invoke(probes, ["report", str(res), "--parquet", str(tmp_path / "r.parquet")])
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        assert bad.exit_code != 0 and "pip install pandas pyarrow" in bad.output
        assert len(bad.output.strip().splitlines()) == 1
    else:  # pragma: no cover - only where pandas and pyarrow are installed
        assert bad.exit_code == 0 and (tmp_path / "r.parquet").stat().st_size > 0


def test_parquet_without_pandas_says_what_to_install(tmp_path, monkeypatch):
    from probes.report.run import write_parquet

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(FeatcacheError, match=r"pip install pandas pyarrow"):
        write_parquet([{"value": 0.5}], tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_html_report_renders_in_a_headless_browser(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from probes.run import run_report

    page = tmp_path / "report.html"
    run_report(_results(tmp_path / "r.jsonl"), html=page)
    shot = tmp_path / "shot.png"
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
        page.as_uri(),
    ]  # fmt: skip
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 120 s")
    if not shot.exists():
        pytest.skip("chromium wrote no screenshot here")
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.shape[:2] == (2000, 1200)
    assert px.std() > 10  # text, tables and figures, not a blank page
    rows_with_ink = (px.min(axis=2) < 128).any(axis=1).mean()
    assert rows_with_ink > 0.2
