"""AUPRC, ECE, Brier and reliability diagrams: against scikit-learn, a numpy ECE and a numpy bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss
from test_subgroups import make_set

from featcache.errors import FeatcacheError
from probes.data import load_probe_data
from probes.evaluation import calibration, metrics
from probes.evaluation.score_rows import score_entries
from probes.fit import knn_scores, logreg_scores
from probes.report.reliability import plot_reliability, reliability_groups
from probes.results import read_jsonl
from probes.run import run_knn, run_logreg


def numpy_ece(y, p, n_bins=10):
    """ECE written out: equal-width bins [b/B, (b+1)/B), the last one closed at 1."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (p >= lo) & ((p < hi) if b < n_bins - 1 else (p <= hi))
        if m.any():
            total += m.sum() / len(p) * abs(y[m].mean() - p[m].mean())
    return total


def _cases(n_cases=60, seed=0):
    rng = np.random.default_rng(seed)
    for t in range(n_cases):
        n = int(rng.integers(3, 60))
        y = rng.integers(0, 2, n).astype(float)
        y[0], y[1] = 1, 0
        p = rng.integers(0, 11, n) / 10 if t % 3 == 0 else rng.random(n)  # ties and bin edges
        yield y, p, rng.integers(0, 4, n).astype(float)


def test_average_precision_equals_sklearn_with_ties_and_weights():
    for y, p, w in _cases():
        assert metrics.average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
        if (w * y).sum() > 0:
            want = average_precision_score(y, p, sample_weight=w)
            assert metrics.average_precision(y, p, w) == pytest.approx(want, abs=1e-12)
    y = np.array([0.0, np.nan, 1.0, 1.0])
    s = np.array([0.1, 0.9, 0.4, 0.8])
    assert metrics.average_precision(y, s) == pytest.approx(
        average_precision_score([0, 1, 1], [0.1, 0.4, 0.8])
    )
    assert np.isnan(metrics.average_precision([0, 0], [0.2, 0.3]))  # no positive: undefined


def test_ece_equals_numpy_ece_and_brier_equals_sklearn():
    for y, p, w in _cases(seed=1):
        assert calibration.ece(y, p) == pytest.approx(numpy_ece(y, p), abs=1e-12)
        assert calibration.ece(y, p, n_bins=4) == pytest.approx(numpy_ece(y, p, 4), abs=1e-12)
        assert calibration.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        # integer weights equal repeating rows
        rep = np.repeat(np.arange(len(y)), w.astype(int))
        if len(rep):
            assert calibration.ece(y, p, sample_weight=w) == pytest.approx(
                numpy_ece(y[rep], p[rep]), abs=1e-12
            )
            assert calibration.brier(y, p, sample_weight=w) == pytest.approx(brier_score_loss(y[rep], p[rep]))
    # hand-computed: bins [0, .5) and [.5, 1]: (2/4)|0.5 - 0.2| + (2/4)|0.5 - 0.8| = 0.3
    assert calibration.ece([0, 1, 0, 1], [0.1, 0.3, 0.7, 0.9], n_bins=2) == pytest.approx(0.3)
    with pytest.raises(FeatcacheError, match="probabilities"):
        calibration.ece([0, 1], [0.5, 1.5])


def test_score_entries_cis_are_a_patient_bootstrap_of_sklearn_metrics():
    rng = np.random.default_rng(4)
    n_pat, n_boot, seed = 30, 60, 5
    patients = np.repeat([f"p{i:02d}" for i in range(n_pat)], 2)
    Y = np.stack([rng.integers(0, 2, len(patients)), rng.integers(0, 2, len(patients))], 1).astype(float)
    S = np.clip(Y * 0.3 + rng.random(Y.shape) * 0.7, 0, 1)
    entries = score_entries(Y, S, patients, ["a", "b"], [None, None], n_boot, seed)
    uniq = np.unique(patients)
    draws = np.random.default_rng(seed).integers(0, n_pat, size=(n_boot, n_pat))
    idx = [np.concatenate([np.flatnonzero(patients == uniq[p]) for p in d]) for d in draws]
    refs = {
        "auprc": lambda y, s: average_precision_score(y, s) if y.any() else np.nan,
        "brier": brier_score_loss,
        "ece": numpy_ece,
    }
    for e in entries:
        m, j = e["metric"], ["a", "b"].index(e["label"]) if e["label"] != "mean" else None
        if j is None:
            vals = [np.mean([refs[m](Y[i, c], S[i, c]) for c in range(2)]) for i in idx]
            point = np.mean([refs[m](Y[:, c], S[:, c]) for c in range(2)])
        else:
            vals = [refs[m](Y[i, j], S[i, j]) for i in idx]
            point = refs[m](Y[:, j], S[:, j])
        vals = np.array(vals)
        assert e["value"] == pytest.approx(point, abs=1e-12)
        ok = vals[~np.isnan(vals)]
        assert [e["ci_low"], e["ci_high"]] == pytest.approx(np.percentile(ok, [2.5, 97.5]), abs=1e-12)
        assert e["n_boot_skipped"] == len(vals) - len(ok)


def test_run_rows_carry_auprc_ece_brier_on_the_probe_scores(tmp_path):
    s = make_set(tmp_path, n_patients=50)
    rows = run_logreg(s["cache"], C=1.0, n_boot=20)
    data = load_probe_data(s["cache"])
    S = logreg_scores(data, 1.0, ())[0].test
    for j, lab in enumerate(("effusion", "nodule")):
        y = data.test.y[:, j].astype(np.float64)  # float32 labels would make the references round
        got = {r["metric"]: r for r in rows if r["label"] == lab}
        assert got["auprc"]["value"] == pytest.approx(average_precision_score(y, S[:, j]), abs=1e-12)
        assert got["ece"]["value"] == pytest.approx(numpy_ece(y, S[:, j]), abs=1e-12)
        assert got["brier"]["value"] == pytest.approx(brier_score_loss(y, S[:, j]), abs=1e-12)
        assert (
            got["ece"]["params"]["calibration_of"] == "probability" and got["ece"]["params"]["ece_bins"] == 10
        )
        assert got["auprc"]["ci_low"] <= got["auprc"]["value"] <= got["auprc"]["ci_high"]
        assert sum(got["ece"]["params"]["reliability"]["count"]) == len(y)
    means = {r["metric"]: r for r in rows if r["label"] == "mean"}
    want = np.mean([average_precision_score(data.test.y[:, j], S[:, j]) for j in range(2)])
    assert means["auprc"]["value"] == pytest.approx(want, abs=1e-12)
    assert means["brier"]["params"]["labels_in_mean"] == ["effusion", "nodule"]


def test_knn_calibration_says_what_the_scores_are(tmp_path):
    s = make_set(tmp_path, n_patients=40)
    rows = run_knn(s["cache"], k=(5, 20), n_boot=10)
    ece = {r["k"]: r for r in rows if r["metric"] == "ece" and r["label"] == "effusion"}
    assert ece[20]["params"]["calibration_of"] == "probability"
    assert ece[5]["params"]["calibration_of"].startswith("partial vote mass")
    data = load_probe_data(s["cache"])
    S = knn_scores(data, [5, 20], thresholds=False)[5].test
    assert ece[5]["value"] == pytest.approx(
        numpy_ece(data.test.y[:, 0].astype(float), np.clip(S[:, 0], 0, 1)), abs=1e-12
    )


def test_non_probability_scores_get_no_calibration_and_say_why():
    Y = np.array([[0.0], [1.0], [0.0], [1.0]])
    S = np.array([[-2.0], [3.0], [0.5], [1.0]])
    entries = score_entries(Y, S, np.array(list("abcd")), ["x"], [None], 10, 0)
    got = {e["metric"]: e for e in entries if e["label"] == "x"}
    assert got["ece"]["value"] is None and "probabilities" in got["ece"]["params"]["skipped"]
    assert got["auprc"]["value"] == pytest.approx(average_precision_score(Y[:, 0], S[:, 0]))


def test_plot_reliability_from_scores_and_from_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(float)
    path = plot_reliability({"effusion": (y, p)}, tmp_path / "a" / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = make_set(tmp_path, n_patients=30)
    rows = run_logreg(s["cache"], C=1.0, n_boot=5)
    assert plot_reliability(rows, tmp_path / "rows.png").stat().st_size > 1000
    with pytest.raises(FeatcacheError, match="nothing to draw"):
        plot_reliability([r for r in rows if r["metric"] == "auroc"], tmp_path / "x.png")
    r = calibration.reliability_bins(y, p, 10)
    assert r["count"].sum() == 200 and np.nanmax(np.abs(r["mean_p"] - (np.arange(10) + 0.5) / 10)) < 0.05


def test_report_draws_one_reliability_diagram_per_set_and_probe(tmp_path):
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from cli import probes as probes_cli

    s = make_set(tmp_path, n_patients=30)
    out = tmp_path / "r.jsonl"
    run_logreg(s["cache"], C=1.0, n_boot=5, out=out)
    run_knn(s["cache"], k=(3, 5), n_boot=5, out=out)
    run_logreg(s["cache"], C=1.0, n_boot=5, out=out)  # a re-run: drawn once
    groups = reliability_groups(read_jsonl(out))
    assert [c.split("probe=")[1] for c, _ in groups] == ["logreg", "knn, k=5"]  # the largest k only
    for _, g in groups:  # one curve per label, each the bins its ece row carries
        labels = [r["label"] for r in g]
        assert len(labels) == len(set(labels)) == 2 and {r.get("k") for r in g} <= {None, 5}
    r = CliRunner().invoke(probes_cli, ["report", str(out), "--plot-reliability", str(tmp_path / "rel.png")])
    assert r.exit_code == 0, r.output
    drawn = sorted(p.name for p in tmp_path.glob("rel-*.png"))
    assert len(drawn) == 2 and all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in drawn), drawn
    assert r.output.count("reliability diagram:") == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n".join(line for line in out.read_text().splitlines() if '"ece"' not in line) + "\n")
    r = CliRunner().invoke(probes_cli, ["report", str(empty), "--plot-reliability", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "no ece rows with reliability bins" in r.output


def test_thresholded_cis_are_a_patient_bootstrap_of_sklearn_metrics_at_the_fixed_threshold():
    from sklearn.metrics import f1_score, recall_score

    from probes.data import ProbeData, Split
    from probes.evaluate import evaluate_scores
    from probes.fit import Scored

    rng = np.random.default_rng(7)
    n_pat, n_boot, seed = 40, 80, 3
    patients = np.repeat([f"p{i:02d}" for i in range(n_pat)], 2)
    y = rng.integers(0, 2, len(patients)).astype(float)
    s = np.clip(y * 0.35 + rng.random(len(y)) * 0.65, 0, 1)
    yv = rng.integers(0, 2, 50).astype(float)
    sv = np.clip(yv * 0.35 + rng.random(50) * 0.65, 0, 1)
    test = Split(np.zeros((len(y), 1), np.float32), y[:, None], patients, patients, np.arange(len(y)))
    empty = Split(np.zeros((0, 1), np.float32), np.zeros((0, 1)), np.array([]), np.array([]), np.arange(0))
    data = ProbeData(task="multilabel", label_names=["a"], train=empty, val=empty, test=test)
    sc = Scored(s[:, None], yv[:, None], sv[:, None], "val", np.ones(1, bool))
    rows = {e["metric"]: e for e in evaluate_scores(data, sc, {}, {}, n_boot, seed) if e["label"] == "a"}
    uniq = np.unique(patients)
    draws = np.random.default_rng(seed).integers(0, n_pat, size=(n_boot, n_pat))
    idx = [np.concatenate([np.flatnonzero(patients == uniq[p]) for p in d]) for d in draws]
    refs = {
        "sensitivity": lambda yy, pp: recall_score(yy, pp, zero_division=np.nan),
        "specificity": lambda yy, pp: recall_score(1 - yy, 1 - pp, zero_division=np.nan),
        "f1": lambda yy, pp: f1_score(yy, pp, zero_division=np.nan),
    }
    for t_name in ("0.5", "youden"):
        for m, ref in refs.items():
            e = rows[f"{m}@{t_name}"]
            t = e["params"]["threshold"]
            assert e["value"] == pytest.approx(ref(y, s >= t), abs=1e-12)
            vals = np.array([ref(y[i], s[i] >= t) for i in idx], dtype=float)
            ok = vals[~np.isnan(vals)]
            assert [e["ci_low"], e["ci_high"]] == pytest.approx(np.percentile(ok, [2.5, 97.5]), abs=1e-12)
            assert e["n_boot"] == n_boot and e["n_boot_skipped"] == len(vals) - len(ok)
    assert rows["sensitivity@youden"]["params"]["threshold"] != 0.5
