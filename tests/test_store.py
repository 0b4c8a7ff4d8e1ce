"""The SQLite results store: records, filters, and writers in other processes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from slimlm.errors import SlimlmError
from slimlm.results import append_rows
from slimlm.store import ResultsStore, rows_to_records

ROW = {"kind": "task", "task": "piqa", "model": "m1", "recipe": "steps: []", "acc": 0.7, "acc_norm": 0.72, "n": 20,
       "machine": {"cpus": 2}, "versions": {"torch": "x"}, "git_hash": "abc", "timestamp": "2026-01-01T00:00:00Z"}


def test_rows_become_one_record_per_metric(tmp_path):
    recs = rows_to_records([ROW, {"kind": "quality", "data": "wikitext2", "model": "m2", "perplexity": 28.0, "window": 512}])
    assert {(r["model"], r["task"], r["metric"], r["value"]) for r in recs} == {
        ("m1", "piqa", "acc", 0.7), ("m1", "piqa", "acc_norm", 0.72), ("m2", "perplexity:wikitext2", "perplexity", 28.0)}
    assert json.loads(recs[0]["machine"]) == {"cpus": 2} and json.loads(recs[0]["extra"])["n"] == 20


def test_add_query_filter_and_has(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.add_rows([ROW, {**ROW, "model": "m2", "task": "blimp"}])
    assert len(store.query()) == 4
    assert [r["value"] for r in store.query(model="m1", metric="acc")] == [0.7]
    assert len(store.query(task="bl%")) == 2
    assert store.has("m2", "blimp") and not store.has("m2", "piqa")
    assert sqlite3.connect(tmp_path / "r.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_append_rows_also_fills_the_store_beside_the_jsonl(tmp_path):
    path = append_rows([ROW], tmp_path / "out" / "results.jsonl")
    assert path.read_text().count("\n") == 1
    assert len(ResultsStore(tmp_path / "out" / "results.db").query(model="m1")) == 2


HOLD_LOCK = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
con.execute("INSERT INTO results (model, task, metric, value) VALUES ('other', 't', 'm', 1.0)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
"""


def _hold(db, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_database_waits_then_writes(tmp_path):
    db = tmp_path / "r.db"
    store = ResultsStore(db, wait_s=60)
    proc = _hold(db, 2.0)
    t0 = time.monotonic()
    store.add_rows([ROW])  # blocks until the other process commits
    assert time.monotonic() - t0 > 1.0
    assert proc.wait(30) == 0
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert sorted(r[0] for r in con.execute("SELECT model FROM results")) == ["m1", "m1", "other"]


def test_a_database_locked_too_long_is_a_clear_error(tmp_path):
    db = tmp_path / "r.db"
    ResultsStore(db)
    proc = _hold(db, 4.0)
    with pytest.raises(SlimlmError, match="stayed locked"):
        ResultsStore(db, wait_s=0.5).add_rows([ROW])
    proc.wait(30)
    assert len(ResultsStore(db).query()) == 1  # nothing half-written


WRITER = """
import sys
from slimlm.store import ResultsStore
s = ResultsStore(sys.argv[1])
for i in range(40):
    s.add_records([{"model": sys.argv[2], "task": "t", "metric": f"m{i}", "value": float(i)}] * 5)
"""


def test_two_processes_append_concurrently(tmp_path):
    db = tmp_path / "r.db"
    ResultsStore(db)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), name]) for name in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    store = ResultsStore(db)
    assert len(store.query(model="a")) == len(store.query(model="b")) == 200


def test_results_cli_lists_and_filters(tmp_path, capsys):
    from slimlm.cli import main

    ResultsStore(tmp_path / "r.db").add_rows([ROW])
    assert main(["results", "--db", str(tmp_path / "r.db"), "--metric", "acc_norm", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["metric"], r["value"]) for r in rows] == [("m1", "acc_norm", 0.72)]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "r.db"
    bad.write_text("not sqlite " * 100)
    with pytest.raises(SlimlmError, match="not a database|SQLite"):
        ResultsStore(bad)
