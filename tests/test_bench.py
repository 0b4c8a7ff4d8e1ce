"""``slimlm bench``: a matrix from YAML, resumed through the store, locally and on a 2-worker Ray."""

from __future__ import annotations

import json

import pytest

from slimlm.bench import load_matrix, run_bench
from slimlm.errors import SlimlmError
from slimlm.store import ResultsStore

TASK = """name: tiny
type: multiple_choice
path: {data}
text: "{{context}}"
choices: choices
gold: label
metrics: [acc, acc_norm]
"""


def _matrix(tmp_path, models="[default]", recipes="{fp: null}") -> str:
    data = tmp_path / "tiny.jsonl"
    data.write_text(json.dumps({"context": "The capital of France is", "choices": ["Paris.", "a banana."], "label": 0}) + "\n")
    (tmp_path / "tiny.yaml").write_text(TASK.format(data=data))
    m = tmp_path / "matrix.yaml"
    m.write_text(f"models: {models}\nrecipes: {recipes}\ntasks: [{tmp_path / 'tiny.yaml'}]\nout: {tmp_path / 'art'}\n")
    return str(m)


def test_bench_runs_the_matrix_and_skips_what_is_stored(tmp_path):
    matrix = _matrix(tmp_path)
    results = tmp_path / "res" / "results.jsonl"
    assert run_bench(matrix, results=results)["done"] == 1
    store = ResultsStore(results.with_suffix(".db"))
    assert [r["value"] for r in store.query(model="default/fp", task="tiny", metric="acc")] == [1.0]
    again = run_bench(matrix, results=results)
    assert (again["done"], again["skipped"]) == (0, 1)
    assert len(store.query(metric="acc")) == 1


def test_bad_matrix_is_a_clear_error(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("models: [default]\ntasks: [piqa]\nrecipe: {}\n")
    with pytest.raises(SlimlmError, match="m.yaml"):
        load_matrix(bad)
    bad.write_text("models: [default]\ntasks: [nope]\n")
    with pytest.raises(SlimlmError, match="unknown task 'nope'"):
        load_matrix(bad)


@pytest.mark.slow
def test_bench_on_a_local_ray_of_two_workers(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray==2.60.0); the ray backend is optional")
    matrix = _matrix(tmp_path, recipes="{fp: null, rtn8: {steps: [{rtn: {bits: 8, group_size: -1}}]}}")
    results = tmp_path / "res" / "results.jsonl"
    assert run_bench(matrix, backend="ray", workers=2, results=results)["done"] == 2
    store = ResultsStore(results.with_suffix(".db"))
    assert {r["model"] for r in store.query(metric="acc")} == {"default/fp", "default/rtn8"}
    assert (tmp_path / "art" / "default" / "rtn8" / "slimlm.json").is_file()
