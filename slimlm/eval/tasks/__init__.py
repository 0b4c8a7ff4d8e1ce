"""Evaluation tasks as data: YAML definitions (``defs/``), readers, hooks and scorers."""

from slimlm.eval.tasks.run import run_task, task_rows
from slimlm.eval.tasks.spec import TaskSpec, builtin_tasks, load_task

__all__ = ["TaskSpec", "builtin_tasks", "load_task", "run_task", "task_rows"]
