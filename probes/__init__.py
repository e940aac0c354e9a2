"""probes: CPU-only evaluation of cached features.

Estimators (kNN, logistic regression, few-shot), metrics, patient-level
statistics, long-format results and report tables/plots. Everything here runs
on numpy, scikit-learn and FAISS; ``import probes`` (or any of its modules)
never imports torch, and matplotlib is imported only when a plot is drawn.
"""

from featcache import __version__

__all__ = ["__version__"]
