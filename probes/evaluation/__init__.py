"""From a probe's scores to metric rows: metrics, patient-level confidence intervals and tests.

``evaluate`` (scores -> rows with CIs), ``score_rows`` (the metric draws per label and the mean),
``rank_metrics`` (AUROC, average precision), ``metrics`` (conventions and thresholded metrics),
``calibration`` (ECE, Brier), ``subgroups`` (per-group rows and gaps), ``stats`` (``headline_p``,
``holm``; re-exports the two below), ``bootstrap`` (the patient bootstrap), ``delong`` (DeLong and
clustered DeLong).
"""
