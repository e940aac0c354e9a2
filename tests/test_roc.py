"""ROC curves on auroc rows (params.roc) against sklearn, and the ROC grid plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from featcache.errors import FeatcacheError
from probes.data import ProbeData, Split
from probes.evaluate import evaluate_scores
from probes.fit import Scored
from probes.report.roc import ROC_MAX_POINTS, plot_roc, roc_curve_params, roc_vertices, thin_roc
from probes.results import OUTCOME_PARAMS, drop_duplicates, make_rows, result_key


def _labels_scores(n, seed, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float64)
    y[:2] = (1, 0)
    s = rng.normal(size=n) + y
    return y, (np.round(s, 1) if ties else s)


@pytest.mark.parametrize(("n", "ties"), [(8, False), (60, True), (120, False), (300, True)])
def test_vertices_are_sklearns(n, ties):
    y, s = _labels_scores(n, n, ties)
    y[5] = np.nan  # a missing label is left out, as the AUROC leaves it out
    f, t = roc_vertices(y, s)
    keep = ~np.isnan(y)
    F, T, _ = roc_curve(y[keep], s[keep])
    np.testing.assert_array_equal(f, F)
    np.testing.assert_array_equal(t, T)
    p = roc_curve_params(y, s)
    assert "thinned_from" not in p and len(p["fpr"]) == len(F) <= ROC_MAX_POINTS
    # no thinning: the area of the stored points is the AUROC (up to the 5-decimal rounding)
    assert np.trapezoid(p["tpr"], p["fpr"]) == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-4)


@pytest.mark.parametrize("scores", [[0.5] * 4, [0.2, 0.7, 0.2, 0.7], [0.1, 0.1, 0.9, 0.1]])
def test_one_or_two_distinct_scores_give_sklearns_vertices(scores):
    """ML-kNN posteriors of a rare label are often one value for every test row."""
    y, s = np.array([0.0, 1, 0, 1]), np.array(scores)
    F, T, _ = roc_curve(y, s)
    f, t = roc_vertices(y, s)
    np.testing.assert_array_equal(f, F)
    np.testing.assert_array_equal(t, T)


def test_long_curves_are_thinned_to_exact_vertices():
    y, s = _labels_scores(5000, 1)
    F, T, _ = roc_curve(y, s)
    assert len(F) > ROC_MAX_POINTS
    p = roc_curve_params(y, s)
    assert p["thinned_from"] == len(F) and 2 < len(p["fpr"]) <= ROC_MAX_POINTS
    exact = {(round(a, 5), round(b, 5)) for a, b in zip(F, T)}
    assert all((a, b) in exact for a, b in zip(p["fpr"], p["tpr"]))  # a subset of sklearn's vertices
    assert (p["fpr"][0], p["tpr"][0]) == (0, 0) and (p["fpr"][-1], p["tpr"][-1]) == (1, 1)
    assert np.all(np.diff(p["fpr"]) >= 0) and np.all(np.diff(p["tpr"]) >= 0)
    # each FPR grid step keeps the last vertex at or below it: no gap wider than one step + a vertex
    assert np.max(np.diff(p["fpr"])) <= 0.01 + np.max(np.diff(F)) + 1e-9
    assert np.trapezoid(p["tpr"], p["fpr"]) == pytest.approx(roc_auc_score(y, s), abs=2e-3)
    assert len(json.dumps(p)) < 2500  # a row stays small


def test_thin_keeps_short_curves_and_refuses_one_class():
    f, t = np.array([0, 0.5, 1.0]), np.array([0, 1.0, 1.0])
    assert thin_roc(f, t)[0] is not None and np.array_equal(thin_roc(f, t)[0], f)
    with pytest.raises(FeatcacheError, match="both classes"):
        roc_vertices(np.ones(4), np.arange(4.0))


def _data(n_test=80, seed=0):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n_test, 2)) < 0.4).astype(np.float32)
    Y[:, 1] = 0  # label b: negatives only, no AUROC, no curve
    pat = np.array([f"p{i // 2}" for i in range(n_test)])
    test = Split(np.zeros((n_test, 1), np.float32), Y, pat, pat, np.arange(n_test))
    empty = Split(np.zeros((0, 1), np.float32), Y[:0], pat[:0], pat[:0], np.arange(0))
    ctx = {"dataset": "toy", "model": "m", "res": 16, "features": "cls"}
    return ProbeData("multilabel", ["a", "b"], test, empty, test, ctx), Y


def test_auroc_rows_carry_the_test_roc_and_keys_ignore_it():
    data, Y = _data()
    S = np.random.default_rng(1).random(Y.shape) + Y
    sc = Scored(S, None, None, None, np.array([True, True]), [{}, {}], len(Y), "train")
    entries = evaluate_scores(data, sc, {"seed": 0}, {}, n_boot=20, seed=0)
    rows = make_rows({**data.context, "probe": "logreg"}, entries)
    a = next(r for r in rows if r["metric"] == "auroc" and r["label"] == "a")
    F, T, _ = roc_curve(Y[:, 0], S[:, 0])
    np.testing.assert_allclose(a["params"]["roc"]["fpr"], F, atol=1e-5)
    np.testing.assert_allclose(a["params"]["roc"]["tpr"], T, atol=1e-5)
    area = np.trapezoid(a["params"]["roc"]["tpr"], a["params"]["roc"]["fpr"])
    assert area == pytest.approx(a["value"], abs=1e-4)
    b = next(r for r in rows if r["metric"] == "auroc" and r["label"] == "b")
    assert "roc" not in b["params"] and "AUROC needs both" in b["params"]["skipped"]
    assert "roc" in OUTCOME_PARAMS
    other = {**a, "params": {**a["params"], "roc": {"fpr": [0, 1], "tpr": [0, 1]}}}
    assert result_key(a) == result_key(other)
    kept, dropped = drop_duplicates([a, other])
    assert dropped == 1 and kept[0]["params"]["roc"] == other["params"]["roc"]


def _roc_rows():
    rows = []
    for model, shift in (("dinov2-vits14", 1.0), ("rad-dino", 2.0)):
        for i, label in enumerate(("Atelectasis", "Effusion", "Nodule")):
            y, s = _labels_scores(200, i)
            s = s + (shift - 1) * y
            rows.append(
                {
                    "dataset": "nih",
                    "model": model,
                    "res": 224,
                    "features": "cls",
                    "probe": "logreg",
                    "metric": "auroc",
                    "label": label,
                    "value": float(roc_auc_score(y, s)),
                    "params": {"roc": roc_curve_params(y, s)},
                }
            )
    return rows


def test_plot_roc_draws_a_panel_per_label(tmp_path):
    pytest.importorskip("matplotlib")
    from tests.test_results_report import _png_pixels

    rows = _roc_rows()
    grid = plot_roc(rows, tmp_path / "roc.png", dataset="nih")
    one = plot_roc(rows, tmp_path / "one.png", label="Effusion", backbone="rad-dino")
    for path, width in ((grid, 3 * 480), (one, 480)):  # 3.2 in per panel at 150 dpi
        px = _png_pixels(path)
        assert px.shape[1] == width and px.std() > 10
        assert ((px.max(axis=2) - px.min(axis=2)) > 60).mean() > 0.001  # coloured curves drawn
    with pytest.raises(FeatcacheError, match="no auroc row with a ROC curve"):
        plot_roc(rows, tmp_path / "none.png", label="Hernia")
