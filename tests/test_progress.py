"""Progress of long probe steps: off in library calls, on stderr only when a command turns it on,
silent when quiet, and blocking the kNN queries for it changes no score."""

from __future__ import annotations

import io

import numpy as np
import pytest

import featcache.progress as P
from probes import fit
from probes.data import Split
from probes.evaluation import metrics
from probes.evaluation.stats import bootstrap_ci, paired_bootstrap


@pytest.fixture
def steps_on(monkeypatch):
    """Probe progress switched on, shown at once (no 2 s delay); restored after the test."""
    monkeypatch.setattr(P, "_probe_steps", False)
    monkeypatch.setattr(P, "_level", P.NORMAL)
    monkeypatch.setattr(P, "PROBE_DELAY", 0.0)
    P.set_probe_progress(True)
    yield


def _yss(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    y[:4] = (1, 1, 0, 0)
    return y, rng.random(n) + y, np.array([f"p{i // 2}" for i in range(n)])


def test_library_calls_print_nothing(capsys, monkeypatch):
    monkeypatch.setattr(P, "_probe_steps", False)
    y, s, pat = _yss()
    bootstrap_ci(metrics.auroc, y, s, pat, 50, 0)
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and not P.probe_progress_on()


def test_commands_get_bootstrap_progress_on_stderr_only(capsys, steps_on):
    y, s, pat = _yss()
    ci = bootstrap_ci(metrics.auroc, y, s, pat, 50, 0)
    paired_bootstrap(_mse, y, s, s * 0.5, pat, 7, 0)
    out = capsys.readouterr()
    assert out.out == ""  # tables on stdout are never mixed with progress
    assert "bootstrap AUROC: 50/50 draws" in out.err and "in all" in out.err
    assert "bootstrap: 7/7 draws" in out.err  # the slow path, one draw at a time
    P.set_probe_progress(False)
    assert bootstrap_ci(metrics.auroc, y, s, pat, 50, 0) == ci  # progress changes no number
    assert capsys.readouterr().err == ""


def _mse(y, s):
    return float(np.mean((y - s) ** 2))


def test_quiet_silences_probe_progress(capsys, steps_on, monkeypatch):
    monkeypatch.setattr(P, "_level", P.QUIET)
    y, s, pat = _yss()
    bootstrap_ci(metrics.auroc, y, s, pat, 50, 0)
    assert capsys.readouterr().err == "" and not P.probe_progress_on()


def test_delay_hides_short_steps_and_lines_come_every_interval():
    now = [0.0]
    stream = io.StringIO()
    with P.Progress(100, "x", enabled=True, stream=stream, interval=30, clock=lambda: now[0], delay=2) as b:
        now[0] = 1.0
        b.update(100)
    assert stream.getvalue() == ""  # done within the delay: nothing left behind
    bar = P.Progress(100, "x", enabled=True, stream=stream, interval=30, clock=lambda: now[0], delay=45)
    now[0] = 31.0
    bar.update(10)
    assert stream.getvalue() == ""  # not before the delay, though the interval has passed
    now[0] = 46.0
    bar.update(10)
    assert stream.getvalue() == "x: 20/100 rows (0.44 rows/s, ETA 3:00)\n"  # 20 in 45 s, 80 left
    now[0] = 60.0
    bar.close()
    # started at t = 1: 20 rows in 59 s, 80 left at 20/59 rows/s = 236 s
    assert stream.getvalue().splitlines()[-1] == "x: 20/100 rows (0.34 rows/s, ETA 3:56)"


def test_knn_query_blocks_change_no_score(capsys, steps_on, monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 8)).astype(np.float32)
    Y = (rng.random((120, 3)) < 0.3).astype(np.float32)
    ids = np.array([f"r{i}" for i in range(120)])
    train = Split(X[:80], Y[:80], ids[:80], ids[:80], np.arange(80))
    whole = fit._knn_raw(train, X[80:], [3, 10], "multilabel", "dinov2")
    monkeypatch.setattr(fit, "QUERY_BLOCK", 16)
    blocked = fit._knn_raw(train, X[80:], [3, 10], "multilabel", "dinov2")
    for k in (3, 10):
        np.testing.assert_array_equal(blocked[k], whole[k])
    mlknn = fit._knn_raw(train, X[80:], [5], "multilabel", "mlknn")
    monkeypatch.setattr(fit, "QUERY_BLOCK", 10**6)
    np.testing.assert_array_equal(mlknn[5], fit._knn_raw(train, X[80:], [5], "multilabel", "mlknn")[5])
    err = capsys.readouterr().err
    assert "kNN search (80 indexed): 40/40 queries" in err and "ML-kNN: 40/40 queries" in err


def test_out_of_fold_progress_counts_folds(capsys, steps_on):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 4)).astype(np.float32)
    ids = np.array([f"p{i}" for i in range(50)])
    split = Split(X, np.zeros((50, 1), np.float32), ids, ids, np.arange(50))
    out = fit.oof_scores(split, lambda tr, q: np.full((len(q), 1), float(len(tr))), n_folds=5)
    assert np.all(out == 40)  # each row scored by a model of the other 4 folds (40 rows)
    assert "out-of-fold scores (thresholds): 5/5 folds" in capsys.readouterr().err


@pytest.mark.parametrize("head", ["logreg", "prototype", "knn"])
def test_fewshot_heads_and_scoring_show_progress_and_change_no_score(capsys, steps_on, monkeypatch, head):
    from probes.estimators import fewshot as F

    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 6)).astype(np.float32)
    y = (rng.random((60, 2)) < 0.5).astype(np.float32)
    y[:4] = ((1, 1), (1, 1), (0, 0), (0, 0))
    eps = F.sample_episodes(np.array([f"p{i}" for i in range(60)]), y, [1, 2], [0, 1], task="multilabel")
    Xt = rng.normal(size=(50, 6)).astype(np.float32)
    whole = F.fewshot_scores(X, eps, Xt, head=head, ranking=head != "knn")
    monkeypatch.setattr(F, "_TEST_BLOCK", 16)  # several test blocks
    np.testing.assert_array_equal(F.fewshot_scores(X, eps, Xt, head=head, ranking=head != "knn"), whole)
    err = capsys.readouterr().err
    if head == "logreg":
        assert f"few-shot logreg heads: {len(eps)}/{len(eps)} episodes" in err
    if head == "knn":
        assert f"few-shot kNN ({len(eps)} episodes): 100/100 test rows" in err  # 2 shot groups x 50
    else:
        assert f"few-shot scoring ({len(eps)} episodes): 50/50 test rows" in err
