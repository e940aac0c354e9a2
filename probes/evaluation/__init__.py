"""Metrics, patient-level confidence intervals and tests (numpy; below the estimators, which use its AUROC).

``probes.evaluate`` turns a probe's scores into metric rows with these (``probes.subgroups`` per
group). Here: ``score_rows`` (the metric draws per label and the mean),
``rank_metrics`` (AUROC, average precision), ``metrics`` (conventions and thresholded metrics),
``calibration`` (ECE, Brier), ``stats`` (``headline_p``,
``holm``; re-exports the two below), ``bootstrap`` (the patient bootstrap), ``delong`` (DeLong and
clustered DeLong).
"""
