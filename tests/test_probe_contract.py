"""The scikit-learn estimator contract, checked on every probe class.

Probes take no ``random_state``: kNN and logistic regression are deterministic (few-shot
randomness lives in ``sample_episodes``' seeds), so the randomness check is "two fits give
identical results".
"""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import (
    check_do_not_raise_errors_in_init_or_set_params,
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from featcache.errors import FeatcacheError
from probes.estimators.knn import KNNProbe
from probes.estimators.logreg import LogRegProbe

PROBES = {
    "knn-multilabel": lambda: KNNProbe(k=(3, 7), temperature=0.1),
    "knn-multiclass": lambda: KNNProbe(k=(5,), task="multiclass", n_jobs=1),
    "logreg-multilabel": lambda: LogRegProbe(C_grid=(0.01, 1.0)),
    "logreg-multiclass": lambda: LogRegProbe(C=0.5, task="multiclass", max_iter=200),
}


def _data(task):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 8)).astype(np.float32)
    if task == "multiclass":
        y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    else:
        y = (X[:, :3] + rng.normal(size=(120, 3)) > 0).astype(np.float32)
    return X[:80], y[:80], X[80:], y[80:]


def _fit(est):
    Xtr, ytr, Xva, yva = _data(est.task)
    if isinstance(est, LogRegProbe) and est.C is None:
        return est.fit(Xtr, ytr, X_val=Xva, Y_val=yva)
    return est.fit(Xtr, ytr)


def _scores(est):
    out = est.predict_scores(_data(est.task)[2])
    return np.concatenate([out[k] for k in sorted(out)], axis=1) if isinstance(out, dict) else out


@pytest.fixture(params=sorted(PROBES))
def probe(request):
    return PROBES[request.param]()


def test_scikit_learn_parameter_checks(probe):
    name = type(probe).__name__
    check_parameters_default_constructible(name, probe)
    check_no_attributes_set_in_init(name, probe)
    check_get_params_invariance(name, probe)
    check_set_params(name, probe)
    check_do_not_raise_errors_in_init_or_set_params(name, probe)


def test_init_stores_parameters_unchanged(probe):
    params = probe.get_params()
    assert set(params) == set(inspect.signature(type(probe)).parameters)
    marker = (11, 3)
    key = "k" if isinstance(probe, KNNProbe) else "C_grid"
    assert type(probe)(**{**params, key: marker}).get_params()[key] is marker


def test_clone_and_set_params_round_trip(probe):
    copy = clone(probe)
    assert copy is not probe and copy.get_params() == probe.get_params()
    key, value = ("temperature", 0.5) if isinstance(probe, KNNProbe) else ("tol", 1e-7)
    assert copy.set_params(**{key: value}) is copy and copy.get_params()[key] == value
    assert probe.get_params()[key] != value


def test_fit_returns_self_and_sets_only_learned_attributes(probe):
    before = set(vars(probe))
    assert not [a for a in vars(probe) if a.endswith("_")]
    assert _fit(probe) is probe
    learned = set(vars(probe)) - before
    assert learned and all(a.endswith("_") for a in learned)
    assert {a: v for a, v in vars(probe).items() if a in before} == clone(probe).get_params()


def test_unfitted_probe_refuses_to_score(probe):
    with pytest.raises(FeatcacheError, match="not fitted"):
        probe.predict_scores(np.zeros((2, 8), dtype=np.float32))


def test_fits_are_deterministic_and_clones_start_fresh(probe):
    first = _scores(_fit(probe))
    second = _scores(_fit(clone(probe)))
    np.testing.assert_array_equal(first, second)
    refit = _scores(_fit(probe))
    np.testing.assert_array_equal(first, refit)


def test_fitted_probe_pickles_and_scores_the_same(probe):
    _fit(probe)
    np.testing.assert_array_equal(_scores(pickle.loads(pickle.dumps(probe))), _scores(probe))


def test_probes_never_import_torch():
    code = "import sys, probes.estimators.knn, probes.estimators.logreg, probes.estimators.fewshot, probes.estimators._linalg; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_is_exported_from_probes_without_torch():
    code = (
        "import sys, probes\n"
        "missing = [n for n in probes.__all__ if not hasattr(probes, n)]\n"
        "assert not missing, missing\n"
        "assert 'torch' not in sys.modules\n"
        "from probes import KNNProbe, LogRegProbe, run_knn\n"
        "assert KNNProbe.__module__ == 'probes.estimators.knn' and run_knn.__module__ == 'probes.run'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
