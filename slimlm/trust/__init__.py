"""Trust after compression: truthfulness, bias, robustness and privacy-leakage suites (tasks as data)."""

from slimlm.trust.run import TrustRun, compare, run_trust, trust_rows
from slimlm.trust.spec import TrustSpec, builtin_trust_tasks, load_trust_task

__all__ = ["TrustRun", "TrustSpec", "builtin_trust_tasks", "compare", "load_trust_task", "run_trust", "trust_rows"]
