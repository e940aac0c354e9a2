"""probes: CPU-only evaluation of cached features.

Estimators (kNN, ML-kNN, logistic regression, few-shot), segmentation heads on patch tokens,
slice-to-volume aggregation, metrics, patient-level statistics, long-format results and report
tables/plots. Classification probes run on numpy, scikit-learn and FAISS; ``import probes`` (or any
of its modules) never imports torch: the segmentation heads import it only when they train, and
matplotlib is imported only when a plot is drawn.

The public API, importable from ``probes`` (each name is loaded on first use, so ``import probes``
stays cheap):

- data: ``open_checked_set``, ``load_probe_data``, ``ProbeData``, ``Split``
- estimators (scikit-learn manners: ``fit``, ``predict_proba``, ``decision_function``, ``predict``,
  ``score``): ``KNNProbe``, ``MLkNNProbe``, ``LogRegProbe``, ``SegProbe``; ``dinov2_preset``
- runners (what each ``probes`` command does): ``run_knn``, ``run_logreg``, ``run_fewshot``,
  ``run_compare``, ``run_external``, ``run_seg``, ``run_report``
- statistics: ``bootstrap_ci``, ``paired_bootstrap``, ``clustered_delong``, ``delong``, ``holm``,
  ``headline_p``
- results: ``read_jsonl``, ``append_jsonl``, ``result_key``, ``drop_duplicates``

Example:
    >>> import probes
    >>> rows = probes.run_knn("cache/", "nih/dinov3-vitb16/512", k=(10, 20), out="results.jsonl")
"""

from __future__ import annotations

from importlib import import_module

from featcache import __version__

_PUBLIC = {
    "open_checked_set": "data",
    "load_probe_data": "data",
    "ProbeData": "data",
    "Split": "data",
    "KNNProbe": "estimators.knn",
    "MLkNNProbe": "estimators.mlknn",
    "LogRegProbe": "estimators.logreg",
    "dinov2_preset": "estimators.logreg",
    "SegProbe": "seg.heads",
    "run_knn": "run",
    "run_logreg": "run",
    "run_fewshot": "fewshot_run",
    "run_compare": "compare",
    "run_external": "external",
    "run_seg": "seg.run",
    "run_report": "report.run",
    "bootstrap_ci": "evaluation.stats",
    "paired_bootstrap": "evaluation.stats",
    "clustered_delong": "evaluation.stats",
    "delong": "evaluation.stats",
    "holm": "evaluation.stats",
    "headline_p": "evaluation.stats",
    "read_jsonl": "results",
    "append_jsonl": "results",
    "result_key": "results",
    "drop_duplicates": "results",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
