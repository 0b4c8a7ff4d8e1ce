"""slimlm as an lm-evaluation-harness model type, on a task defined locally (no hub)."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")

TASK = """task: slimlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ITEMS = [{"question": "The capital of France is", "choices": ["Paris.", "a small green banana sandwich."], "answer": 0},
         {"question": "One, two, three, four,", "choices": ["purple elephants dancing", "five"], "answer": 1}]


def test_registered_model_type():
    from lm_eval.api.registry import get_model

    from slimlm.lm_eval_plugin import SlimlmEvalLM

    assert get_model("slimlm") is SlimlmEvalLM


@pytest.mark.slow
def test_lm_eval_runs_a_local_task_and_agrees_with_slimlm(tmp_path, monkeypatch, default_lm):
    from lm_eval.tasks import TaskManager

    from slimlm.eval.lm import SlimlmLM
    from slimlm.lm_eval_plugin import SlimlmEvalLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=data))
    out = lm_eval.simple_evaluate(model=SlimlmEvalLM(loaded=default_lm), tasks=["slimlm_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=False)
    res = out["results"]["slimlm_tiny_mc"]
    slm = SlimlmLM(default_lm)
    lls = [ll for ll, _ in slm.loglikelihood([(i["question"], " " + c) for i in ITEMS for c in i["choices"]])]
    acc = sum(max(range(2), key=lambda k: lls[2 * n + k]) == it["answer"] for n, it in enumerate(ITEMS)) / 2
    norm = sum(max(range(2), key=lambda k: lls[2 * n + k] / len(it["choices"][k])) == it["answer"] for n, it in enumerate(ITEMS)) / 2
    assert res["acc,none"] == acc == 1.0
    assert res["acc_norm,none"] == norm
