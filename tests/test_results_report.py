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


# --- result key and re-runs -------------------------------------------------------------------

PROV = {"store_set": "nih/dinov3-vitb16/512", "manifest_digest": "abc123"}


def test_result_key_separates_settings_not_outcomes():
    from probes.results import result_key

    base = _row(**PROV, value=0.8, seed=0, params={"uncertain": "ignore", "temperature": 0.07})
    same = [
        {**base, "value": 0.81, "timestamp": "2026-01-02T00:00:00+00:00"},  # a re-run
        {**base, "params": {**base["params"], "threshold": 0.4, "ci": "no CI", "labels_in_mean": ["a"]}},
        {**base, "C": 0.5, "params": {**base["params"], "C_from": "val", "C_grid": [0.1, 1.0]}},
    ]
    same.append({**same[2], "C": 2.0})  # a C selected on val is an outcome: same result
    differ = [
        {**base, "seed": 1},
        {**base, "k": 20},
        {**base, "store_set": "nih/dinov3-vitb16/224"},
        {**base, "manifest_digest": "def456"},
        {**base, "params": {**base["params"], "temperature": 0.1}},
        {**base, "C": 0.5},  # a given C is a setting
        {**base, "label": "Effusion"},
        {**base, "metric": "f1"},
    ]
    assert result_key(same[0]) == result_key(base) == result_key(same[1])
    assert result_key(same[2]) == result_key(same[3]) != result_key(base)  # C_grid is a setting
    keys = [result_key(r) for r in [base, *differ]]
    assert len(set(keys)) == len(keys)


def test_drop_duplicates_keeps_the_newest():
    from probes.results import drop_duplicates

    old = _row(value=0.70, seed=0, timestamp="2026-01-01T10:00:00+00:00")
    new = _row(value=0.72, seed=0, timestamp="2026-01-01T11:00:00+00:00")
    other = _row(value=0.9, seed=1)
    kept, dropped = drop_duplicates([old, other, new])
    assert dropped == 1 and [r["value"] for r in kept] == [0.72, 0.9]
    # a row appended later that says it is older does not replace the newer one
    kept, dropped = drop_duplicates([new, old])
    assert dropped == 1 and [r["value"] for r in kept] == [0.72]
    # without timestamps the row read last wins
    assert drop_duplicates([_row(value=0.1), _row(value=0.2)])[0][0]["value"] == 0.2


def test_rerun_keeps_the_ci_and_seeds_still_average(tmp_path):
    from probes.run import run_report

    run = _row(**PROV, value=0.517, ci_low=0.409, ci_high=0.630, seed=0, label="mean")
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{**run, "timestamp": "2026-01-01T10:00:00+00:00"}])
    append_jsonl(path, [{**run, "timestamp": "2026-01-02T10:00:00+00:00"}])  # the same run again
    notes = []
    text = run_report(path, notes=notes)
    assert "0.517 [0.409, 0.630]" in text and "±" not in text
    assert notes == [next(n for n in notes if n.startswith("dropped 1 duplicate row:"))]
    append_jsonl(path, [{**run, "seed": 1, "value": 0.537}])  # a distinct seed: mean ± SD
    text = run_report(path)
    assert "0.527 ± 0.014" in text and text.count("dropped 1 duplicate row") == 1


# --- per-label tables and numeric records ------------------------------------------------------


def _label_rows():
    rows = []
    auc = {  # (model, res) -> label -> AUROC; CIs value ± 0.05
        ("dinov3-vitb16", 224): {"Effusion": 0.80, "Nodule": 0.70},
        ("dinov3-vitb16", 512): {"Effusion": 0.85, "Nodule": 0.75},
        ("rad-dino", 518): {"Effusion": 0.88, "Nodule": 0.72},
    }
    for (model, res), by_label in auc.items():
        mean = float(np.mean(list(by_label.values())))
        # the mean row comes first in the file: it must still be the last line of the table
        for lab, v in [("mean", mean), *by_label.items()]:
            rows.append(
                _row(
                    model=model, res=res, label=lab, value=v, ci_low=v - 0.05, ci_high=v + 0.05, seed=0,
                    params={"labels_in_mean": ["Effusion", "Nodule"]} if lab == "mean" else {},
                )
            )  # fmt: skip
    return rows


def test_per_label_table_labels_by_backbones_mean_last():
    tab = R.per_label_table(_label_rows())
    assert tab == [
        ["label", "dinov3-vitb16/224", "dinov3-vitb16/512", "rad-dino/518"],
        ["Effusion", "0.800 [0.750, 0.850]", "0.850 [0.800, 0.900]", "0.880 [0.830, 0.930]"],
        ["Nodule", "0.700 [0.650, 0.750]", "0.750 [0.700, 0.800]", "0.720 [0.670, 0.770]"],
        ["mean", "0.750 [0.700, 0.800]", "0.800 [0.750, 0.850]", "0.800 [0.750, 0.850]"],
    ]
    one_res = [r for r in _label_rows() if r["res"] == 512]
    assert R.per_label_table(one_res)[0] == ["label", "dinov3-vitb16"]  # res named only when several


def test_csv_records_are_numeric_one_row_per_cell(tmp_path):
    from probes.run import run_report

    path = tmp_path / "r.jsonl"
    append_jsonl(path, _label_rows())
    got = list(csv.DictReader(io.StringIO(run_report(path, table="per-label", fmt="csv"))))
    assert len(got) == 9 and not any("[" in v for r in got for v in r.values())
    for src in _label_rows():
        rec = next(
            r
            for r in got
            if (r["model"], int(r["res"]), r["label"]) == (src["model"], src["res"], src["label"])
        )
        assert float(rec["value"]) == pytest.approx(src["value"])
        assert float(rec["ci_low"]) == pytest.approx(src["ci_low"]) and float(
            rec["ci_high"]
        ) == pytest.approx(src["ci_high"])
        assert rec["n_seeds"] == "1" and rec["sd"] == ""
    lines = run_report(path, table="summary", fmt="json").splitlines()
    recs = [json.loads(x) for x in lines]
    assert {(r["model"], r["res"]): r["value"] for r in recs} == {
        ("dinov3-vitb16", 224): pytest.approx(0.75),
        ("dinov3-vitb16", 512): pytest.approx(0.80),
        ("rad-dino", 518): pytest.approx(0.80),
    }


def test_knn_k_is_one_table_with_a_column_per_k(tmp_path):
    from probes.run import run_report

    path = tmp_path / "r.jsonl"
    append_jsonl(path, [_row(probe="knn", k=k, value=v, seed=0) for k, v in [(10, 0.7), (20, 0.72)]])
    text = run_report(path)
    assert text.count("## knn") == 1 and "| model | res | nih k=10 | nih k=20 |" in text
    assert "| dinov3-vitb16 | 512 | 0.700 | 0.720 |" in text
    picked = run_report(path, k=20)
    assert "## knn features=cls k=20" in picked and "0.700" not in picked


# --- new plots --------------------------------------------------------------------------------


def _png_pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()  # a well-formed PNG
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"), dtype=float)
    return px


def _assert_real_plot(path):
    px = _png_pixels(path)
    assert px.shape[1] == 960 and px.shape[0] >= 300
    assert px.std() > 10  # not a blank canvas
    # lines and markers in colour, not only black text on white
    colourful = (px.max(axis=2) - px.min(axis=2)) > 60
    assert colourful.mean() > 0.001


def test_forest_compare_and_k_plots_are_real_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    _assert_real_plot(R.plot_forest(_label_rows(), tmp_path / "forest.png"))
    diffs = [
        _row(probe="compare", metric="auroc_diff", vs="nih/rad-dino/518", store_set="nih/dinov3-vitb16/512",
             label=lab, value=v, ci_low=v - 0.04, ci_high=v + 0.04, p=0.2)
        for lab, v in [("Effusion", -0.03), ("Nodule", 0.03), ("mean", 0.0)]
    ]  # fmt: skip
    _assert_real_plot(R.plot_compare(diffs, tmp_path / "deep" / "compare.png"))
    knn = [
        _row(probe="knn", model=m, k=k, value=v + 0.001 * k, ci_low=v - 0.03, ci_high=v + 0.05)
        for m, v in [("a", 0.7), ("b", 0.75)]
        for k in (10, 20, 50, 100, 200)
    ]
    _assert_real_plot(R.plot_k([*knn, _row(value=0.9)], tmp_path / "k.png"))  # the logreg row is left out
    with pytest.raises(FeatcacheError, match="no result rows with metric='auroc_diff'"):
        R.plot_compare(knn, tmp_path / "none.png")


def test_tick_labels_thinned_so_they_never_overlap():
    # log2 axis 1..16: the labels from 9 to 15 crowd; hand-checked gaps of >= 7% of log2(16) = 0.28
    keep = R.thin_ticks(list(range(1, 17)), log=True)
    kept = [x for x, k in zip(range(1, 17), keep) if k]
    assert kept[:4] == [1, 2, 3, 4] and kept[-1] == 16
    assert all(np.log2(b) - np.log2(a) >= 0.07 * 4 - 1e-9 for a, b in zip(kept, kept[1:]))
    assert R.thin_ticks([1, 2, 4, 8, 16], log=True) == [True] * 5  # evenly spaced: all kept


def test_fewshot_plot_ticks_readable_and_title_names_the_mean(tmp_path):
    pytest.importorskip("matplotlib")
    from probes.report import plots

    rows = [
        _row(probe="fewshot", head="logreg", shots=s, seed=seed, value=0.6 + 0.01 * s + 0.01 * seed,
             params={"labels_in_mean": ["Effusion", "Nodule"]})
        for s in range(1, 17)
        for seed in range(2)
    ]  # fmt: skip
    series, runs = plots.series(rows, "shots", ("model",), "auroc", "mean", None, None)
    fig = plots._curves(series, "K", "AUROC", "t" + plots._mean_note(runs, "mean"), True, True)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_title().endswith("mean over Effusion, Nodule")
    boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
    assert len(boxes) >= 5
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))  # left to right, none overlapping
    _assert_real_plot(R.plot_fewshot(rows, tmp_path / "few.png"))
