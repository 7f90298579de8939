"""The papers' comparison end to end (``vlmoe study``, :mod:`vlmoe.commands.study`): variants at FFN FLOP
parity (:mod:`~vlmoe.study.variants`), one job per (variant, seed, task) (:mod:`~vlmoe.study.jobs`), the
statistics over seeds (:mod:`~vlmoe.study.stats`) and the report (:mod:`~vlmoe.study.report`).
"""

from .jobs import BUDGETS, METRICS, TASKS, Job, collect, plan, read_result, run_job, run_study
from .report import write_report
from .stats import aggregate, welch_t_test
from .variants import DEFAULT_VARIANTS, VARIANTS, flop_table, variant_config

__all__ = [
    "BUDGETS",
    "DEFAULT_VARIANTS",
    "METRICS",
    "TASKS",
    "VARIANTS",
    "Job",
    "aggregate",
    "collect",
    "flop_table",
    "plan",
    "read_result",
    "run_job",
    "run_study",
    "variant_config",
    "welch_t_test",
    "write_report",
]
