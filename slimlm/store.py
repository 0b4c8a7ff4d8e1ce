"""Results store: one SQLite row per (model, source, recipe, task, metric, value) with provenance.

SQLite in WAL mode lets readers run while one process writes; writers take the lock up front
(``BEGIN IMMEDIATE``), wait on a busy timeout and retry with backoff, so two benchmark processes
appending at once both succeed and the file never holds a half-written batch. Default location:
``$SLIMLM_RESULTS_DB``, else ``results.db`` beside ``$SLIMLM_RESULTS``, else ``slimlm-results/results.db``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from slimlm.errors import SlimlmError

COLUMNS = ("timestamp", "model", "source", "recipe", "task", "metric", "value", "machine", "versions", "git_hash", "extra")
SCHEMA = f"""CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY AUTOINCREMENT,
  {', '.join(f'{c} {"REAL" if c == "value" else "TEXT"}' for c in COLUMNS)});
CREATE INDEX IF NOT EXISTS results_model_task ON results (model, recipe, task, metric);"""
# Row fields that describe a run rather than measure it.
META = {"model", "source", "source_kind", "source_hash", "model_type", "recipe", "task", "kind", "data", "machine",
        "versions", "git_hash", "timestamp", "window", "bos", "threads", "repeats", "n", "limit", "seed",
        "new_tokens", "prompt_tokens", "windows", "tokens", "energy_source", "watts_per_core", "compression_basis",
        "source_weight_bytes", "artifact", "against"}


def default_db_path() -> Path:
    if os.environ.get("SLIMLM_RESULTS_DB"):
        return Path(os.environ["SLIMLM_RESULTS_DB"])
    if os.environ.get("SLIMLM_RESULTS"):
        return Path(os.environ["SLIMLM_RESULTS"]).with_suffix(".db")
    return Path("slimlm-results/results.db")


def task_of(row: dict[str, Any]) -> str:
    """``task`` if the row names one; spine rows: ``perplexity:<data>`` or their ``kind``."""
    if row.get("task"):
        return str(row["task"])
    if row.get("kind") == "quality" and row.get("data"):
        return f"perplexity:{row['data']}"
    return str(row.get("kind", "unknown"))


def rows_to_records(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wide result rows (one per run, many numbers) → long records (one per metric)."""
    records = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k in META and k not in COLUMNS}
        base = {"timestamp": row.get("timestamp") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "model": str(row.get("model")), "source": row.get("source") or row.get("source_hash"),
                "recipe": row.get("recipe"), "task": task_of(row), "machine": json.dumps(row.get("machine"), default=str),
                "versions": json.dumps(row.get("versions"), default=str), "git_hash": row.get("git_hash"),
                "extra": json.dumps(extra, default=str)}
        for key, value in row.items():
            if key not in META and isinstance(value, (int, float)) and not isinstance(value, bool):
                records.append({**base, "metric": key, "value": float(value)})
    return records


class ResultsStore:
    """An SQLite results database that waits for, and never breaks on, concurrent writers."""

    def __init__(self, path: str | Path | None = None, *, wait_s: float = 120.0) -> None:
        self.path = Path(path) if path else default_db_path()
        self.wait_s = wait_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(self._init)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=min(self.wait_s, 10.0), isolation_level=None)
        con.row_factory = sqlite3.Row
        return con

    def _init(self) -> None:
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
        finally:
            con.close()

    def _retry(self, fn: Any, *args: Any) -> Any:
        """Call ``fn`` until the database stops being locked or ``wait_s`` passes."""
        deadline = time.monotonic() + self.wait_s
        delay = 0.05
        while True:
            try:
                return fn(*args)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise SlimlmError(f"results database {self.path}: {exc}", "check the file is an SQLite results DB (or delete it)") from None
                if time.monotonic() + delay > deadline:
                    raise SlimlmError(f"results database {self.path} stayed locked for {self.wait_s:.0f} s",
                                      "another process holds a write lock; wait for it to finish, then re-run") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except sqlite3.DatabaseError as exc:
                raise SlimlmError(f"results database {self.path}: {exc}", "check the file is an SQLite results DB (or delete it)") from None

    def _insert(self, records: list[dict[str, Any]]) -> None:
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # take the write lock before writing anything
            con.executemany(f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            [tuple(r.get(c) for c in COLUMNS) for r in records])
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def add_records(self, records: list[dict[str, Any]]) -> int:
        """Append long records in one transaction; returns how many."""
        if records:
            self._retry(self._insert, records)
        return len(records)

    def add_rows(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append wide result rows (as ``append_rows`` writes them to JSONL)."""
        return self.add_records(rows_to_records(rows))

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        con = self._connect()
        try:
            return [dict(r) for r in con.execute(sql, params)]
        finally:
            con.close()

    def query(self, *, model: str | None = None, task: str | None = None, metric: str | None = None,
              recipe: str | None = None) -> list[dict[str, Any]]:
        """Records matching every given filter (``%`` wildcards allowed), oldest first."""
        where, params = [], []
        for col, val in (("model", model), ("task", task), ("metric", metric), ("recipe", recipe)):
            if val is not None:
                where.append(f"{col} LIKE ?")
                params.append(val)
        sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        return self._retry(self._select, sql, tuple(params))

    def has(self, model: str, task: str) -> bool:
        """Whether any record exists for this model label and task (``slimlm bench`` skips those)."""
        sql = "SELECT 1 FROM results WHERE model = ? AND task = ? LIMIT 1"
        return bool(self._retry(self._select, sql, (model, task)))
