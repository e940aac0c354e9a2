"""probes: CPU-only evaluation of cached features.

Estimators (kNN, logistic regression, few-shot), segmentation heads on patch
tokens, slice-to-volume aggregation, metrics, patient-level statistics,
long-format results and report tables/plots. Classification probes run on
numpy, scikit-learn and FAISS; ``import probes`` (or any of its modules) never
imports torch: the segmentation heads import it only when they train, and
matplotlib is imported only when a plot is drawn.
"""

from featcache import __version__

__all__ = ["__version__"]
