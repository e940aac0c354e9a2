"""Study plans (TOML): the grid of extractions and probes a paper needs, and its GPU cost.

``plan`` reads and checks a plan and expands it into steps with stable keys; ``cost`` estimates
the GPU time of its extractions. Running a plan needs the probes: ``probes.study_run``.
"""

from featcache.study.plan import Extraction, ProbeStep, StudyError, StudyPlan, load_plan, plan_steps

__all__ = ["Extraction", "ProbeStep", "StudyError", "StudyPlan", "load_plan", "plan_steps"]
