"""Result rows (JSON lines) and report tables/plots on hand-made rows."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import struct
import sys

import numpy as np
import pytest

from featcache import __version__
from featcache.errors import FeatcacheError
from probes import report as R
from probes.results import RESULT_FIELDS, append_jsonl, make_rows, read_jsonl, validate_row

CTX = {"dataset": "nih", "model": "dinov3-vitb16", "res": 512, "features": "cls", "probe": "logreg"}


def _row(**kw):
    return {**CTX, "metric": "auroc", "label": "mean", **kw}


# --- results ----------------------------------------------------------------------------------


def test_make_rows_fills_provenance_and_plain_types():
    ctx = {**CTX, "seed": 0, "preprocessing": {"resize": "bicubic", "mean": np.array([0.5, 0.5])}}
    rows = make_rows(
        ctx,
        [
            {"metric": "auroc", "label": "mean", "value": np.float32(0.75), "ci_low": 0.7, "ci_high": 0.8},
            {
                "metric": "auroc",
                "label": "Hernia",
                "value": float("nan"),
                "seed": np.int64(3),
                "n_test": np.int64(9),
            },
        ],
    )
    assert [r["label"] for r in rows] == ["mean", "Hernia"]
    assert rows[0]["value"] == pytest.approx(0.75) and type(rows[0]["value"]) is float
    assert rows[1]["value"] is None  # undefined metric
    assert rows[0]["seed"] == 0 and rows[1]["seed"] == 3  # entry overrides context
    assert type(rows[1]["n_test"]) is int
    assert rows[0]["preprocessing"]["mean"] == [0.5, 0.5]
    assert rows[0]["featcache_version"] == __version__ and rows[0]["timestamp"].endswith("+00:00")
    assert list(rows[0]) == [f for f in RESULT_FIELDS if f in rows[0]]  # schema order
    json.dumps(rows, allow_nan=False)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"value": 0.5, "label": "mean"}, "missing field 'metric'"),
        (_row(value=0.5, res="512"), "'res' should be int"),
        (_row(value=0.5, tempreature=0.07), "unknown field 'tempreature'"),
        (_row(value="high"), "'value' should be"),
    ],
)
def test_validation_names_the_field(bad, message):
    with pytest.raises(FeatcacheError, match=message):
        validate_row({**CTX, **bad} if "dataset" not in bad else bad)


def test_jsonl_round_trip_and_append(tmp_path):
    path = tmp_path / "deep" / "er" / "results.jsonl"
    first = make_rows(
        CTX, [{"metric": "auroc", "label": "mean", "value": 0.81, "params": {"temperature": 0.07}}]
    )
    second = make_rows(
        CTX, [{"metric": "f1", "label": "Effusion", "value": float("nan"), "weights": {"seed": 0}}]
    )
    assert append_jsonl(path, first) == 1
    assert append_jsonl(path, second) == 1
    assert read_jsonl(path) == first + second
    assert path.read_text().count("\n") == 2


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = json.dumps(_row(value=0.8))
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    with pytest.raises(FeatcacheError, match=r"results\.jsonl, line 3: not valid JSON"):
        read_jsonl(path)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(FeatcacheError, match="line 2: not a result row"):
        read_jsonl(path)
    path.write_text(json.dumps({"dataset": "nih"}) + "\n")
    with pytest.raises(FeatcacheError, match="line 1: .*missing field 'model'"):
        read_jsonl(path)
    with pytest.raises(FeatcacheError, match="not found"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_append_after_a_cut_line_keeps_new_rows_apart(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(_row(value=0.8)) + "\n" + '{"dataset": "ni')  # a crash mid-line
    append_jsonl(path, [_row(value=0.9)])
    lines = path.read_text().splitlines()
    assert json.loads(lines[2])["value"] == 0.9
    with pytest.raises(FeatcacheError, match="line 2"):
        read_jsonl(path)


def _append_many(path, worker):
    for i in range(40):
        append_jsonl(path, [_row(value=0.5, seed=worker, n_test=i, label=f"L{j}") for j in range(3)])


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_concurrent_appenders_never_interleave(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = read_jsonl(path)
    assert len(rows) == 4 * 40 * 3
    # the three rows of one call are contiguous
    for k in range(0, len(rows), 3):
        block = rows[k : k + 3]
        assert [r["label"] for r in block] == ["L0", "L1", "L2"]
        assert len({(r["seed"], r["n_test"]) for r in block}) == 1


# --- tables -----------------------------------------------------------------------------------


def _rows():
    rows = []
    # dinov3 @512 on nih: three seeds 0.80, 0.82, 0.84 -> mean 0.82, sample std 0.02
    for seed, v in enumerate([0.80, 0.82, 0.84]):
        rows.append(_row(value=v, seed=seed))
    # dinov3 @512 on chexpert: one run with a CI
    rows.append(_row(dataset="chexpert", value=0.8124, ci_low=0.7901, ci_high=0.8339))
    # dinov3 @224 on nih, listed after 512: two seeds 0.70, 0.75 -> 0.725 ± 0.0354
    rows += [_row(res=224, value=0.70, seed=0), _row(res=224, value=0.75, seed=1)]
    # rad-dino @512 on nih: undefined metric; recorded twice for seed 0, the later row wins
    rows += [_row(model="rad-dino", value=0.99, seed=0), _row(model="rad-dino", value=None, seed=0)]
    # a different label and metric must not leak in
    rows += [_row(label="Hernia", value=0.1), _row(metric="f1", value=0.2)]
    return rows


def test_table_aggregates_seeds_and_shows_ci():
    tab = R.table(_rows())
    assert tab == [
        ["model", "res", "nih", "chexpert"],
        ["dinov3-vitb16", "224", "0.725 ± 0.035", "-"],  # numbers sorted, names in first-seen order
        ["dinov3-vitb16", "512", "0.820 ± 0.020", "0.812 [0.790, 0.834]"],
        ["rad-dino", "512", "n/a", "-"],
    ]


def test_table_numeric_columns_sorted_and_labelled():
    rows = [_row(res=r, value=v) for r, v in [(1024, 0.83), (224, 0.78), (512, 0.85)]]
    tab = R.table(rows, by="model", columns="res", digits=2)
    assert tab == [["model", "res=224", "res=512", "res=1024"], ["dinov3-vitb16", "0.78", "0.85", "0.83"]]


def test_table_refuses_to_average_different_settings():
    rows = [_row(probe="knn", k=10, value=0.7), _row(probe="knn", k=20, value=0.72)]
    with pytest.raises(FeatcacheError, match="differ in k: 10, 20"):
        R.table(rows)
    assert R.table(rows, where={"k": 20})[1][-1] == "0.720"
    assert R.table(rows, by=("model", "k"))[1:] == [
        ["dinov3-vitb16", "10", "0.700"],
        ["dinov3-vitb16", "20", "0.720"],
    ]
    with pytest.raises(FeatcacheError, match="no result rows"):
        R.table(rows, metric="dice")


def _fewshot_rows():
    rows = []
    values = {
        "dinov2-vitl14": {1: [0.60, 0.64], 4: [0.70, 0.72]},
        "rad-dino": {1: [0.66, 0.70], 4: [0.75, 0.79]},
    }
    for model, by_shots in values.items():
        for shots, vs in by_shots.items():
            for seed, v in enumerate(vs):
                rows.append(
                    _row(
                        model=model, res=224, probe="fewshot", head="logreg", shots=shots, seed=seed, value=v
                    )
                )
    return rows


def test_fewshot_table_mean_std_per_shots():
    tab = R.fewshot_table([*_fewshot_rows(), _row(value=0.9)])  # the non-few-shot row is ignored
    # std of two values a, b (ddof=1) = |a - b| / sqrt(2)
    assert tab == [
        ["model", "shots=1", "shots=4"],
        ["dinov2-vitl14", "0.620 ± 0.028", "0.710 ± 0.014"],
        ["rad-dino", "0.680 ± 0.028", "0.770 ± 0.028"],
    ]


def test_markdown_and_csv_renderers():
    tab = [["model", "nih"], ["a|b", "0.820 ± 0.020"]]
    assert R.to_markdown(tab) == "| model | nih |\n|---|---|\n| a\\|b | 0.820 ± 0.020 |\n"
    assert list(csv.reader(io.StringIO(R.to_csv(R.table(_rows()))))) == R.table(_rows())


# --- plots ------------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_fewshot_and_resolution_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = R.plot_fewshot(_fewshot_rows(), tmp_path / "plots" / "fewshot.png")
    assert _png_size(out) == (960, 660)
    rows = [
        _row(model=m, res=r, value=v, ci_low=v - 0.02, ci_high=v + 0.02)
        for m in ("a", "b")
        for r, v in [(224, 0.7), (512, 0.75)]
    ]
    out = R.plot_resolution(rows, tmp_path / "res.png")
    assert _png_size(out) == (960, 660)


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(FeatcacheError, match=r"pip install featcache\[plot\]"):
        R.plot_fewshot(_fewshot_rows(), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_curves_never_join_two_datasets():
    rows = [
        _row(model="a", dataset="nih", res=112, value=0.5),
        _row(model="a", dataset="pmn", res=64, value=0.9),
    ]
    series, _ = R._series(rows, "res", ("model",), "auroc", "mean", None, None)
    assert sorted(series) == [("a", "nih"), ("a", "pmn")]
    assert all(len(points) == 1 for points in series.values())
