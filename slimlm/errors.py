"""One exception type for every user-facing failure.

Each error names the problem and the fix in one line, so the CLI can print it and exit 2
instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations


class SlimlmError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` what to do about it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
