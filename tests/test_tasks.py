"""Tasks and the three-call model interface on the real default model."""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.eval.lm import SlimlmLM
from slimlm.eval.tasks import load_task, run_task
from slimlm.eval.tasks.hooks import hellaswag, hellaswag_clean
from slimlm.eval.tasks.run import select
from conftest import data_dir_or_skip


@pytest.fixture(scope="module")
def slm(default_lm) -> SlimlmLM:
    return SlimlmLM(default_lm, batch_tokens=256)


def _direct(lm, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        logp = lm.model(input_ids=torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_loglikelihood_matches_direct_computation(default_lm, slm):
    reqs = [("The capital of France is", " Paris"), ("The capital of France is ", "London"),
            ("", "The cat sat on the mat."), ("Question: what is two plus two?\nAnswer:", " four, of course")]
    got = slm.loglikelihood(reqs)
    for (c, x), (ll, greedy) in zip(reqs, got):
        ctx, cont = slm.encode_pair(c, x)
        assert abs(ll - _direct(default_lm, ctx, cont)) < 1e-3
    assert got[0][1] and not got[2][1]  # " Paris" is the greedy answer; a whole sentence is not
    # trailing context space moves into the continuation, so both spellings score the same text
    assert slm.encode_pair("The capital of France is ", "London")[1] == slm.encode("The capital of France is London")[len(slm.encode("The capital of France is")):]
    assert got[0][0] > got[1][0]


def test_rolling_scores_every_token_once(default_lm, slm):
    text = "Now is the winter of our discontent made glorious summer by this sun of York."
    toks = slm.encode(text)
    whole = _direct(default_lm, [slm.prefix_id], toks)
    slm.max_length = 2048
    assert abs(slm.loglikelihood_rolling([text])[0] - whole) < 1e-3
    slm.max_length = 6  # several windows: each predicts its tokens once
    try:
        windows = slm.rolling_windows(toks)
        assert [t for _, c in windows for t in c] == toks
        assert all(len(c) <= 6 and len(ctx) <= 6 for ctx, c in windows)
        assert slm.loglikelihood_rolling([text])[0] < 0
    finally:
        slm.max_length = 2048


def test_acc_and_acc_norm_on_a_hand_made_jsonl(tmp_path, slm):
    items = [{"context": "The capital of France is", "choices": ["Paris.", "a small green banana sandwich."], "label": 0},
             {"context": "One, two, three, four,", "choices": ["five", "purple elephants dancing"], "label": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    spec = load_task("piqa", path=str(data), reader="jsonl", reader_options={}, text="{context}", choices="choices")
    res = run_task(slm, spec)
    lls = [ll for ll, _ in slm.loglikelihood([(i["context"], " " + c) for i in items for c in i["choices"]])]
    acc = [max(range(2), key=lambda k: lls[2 * n + k]) == it["label"] for n, it in enumerate(items)]
    norm = [max(range(2), key=lambda k: lls[2 * n + k] / len(it["choices"][k].encode())) == it["label"] for n, it in enumerate(items)]
    assert res["n"] == 2
    assert res["metrics"]["acc"] == sum(acc) / 2 and res["metrics"]["acc_norm"] == sum(norm) / 2
    assert acc[0] and not acc[1]  # Paris is right; "five" is far likelier than the (wrong-labelled) elephants


def test_blimp_well_above_chance_on_easy_pairs(slm):
    data_dir_or_skip()
    easy = ["determiner_noun_agreement_1", "anaphor_number_agreement", "regular_plural_subject_verb_agreement_1",
            "irregular_past_participle_verbs"]
    res = run_task(slm, load_task("blimp", reader_options={"phenomena": easy, "per_phenomenon": 10}))
    assert res["n"] == 40
    assert res["metrics"]["acc"] >= 0.8
    assert set(k for k in res["metrics"] if k.startswith("acc/")) == {f"acc/{p}" for p in easy}


@pytest.mark.slow
def test_piqa_and_hellaswag_run_with_limit_and_seed(slm):
    data_dir_or_skip()
    for name in ("piqa", "hellaswag"):
        res = run_task(slm, load_task(name, limit=3, seed=7))
        assert res["n"] == 3 and 0.0 <= res["metrics"]["acc_norm"] <= 1.0
    assert select(100, 3, 7) == select(100, 3, 7) != select(100, 3, None) == [0, 1, 2]


def test_hellaswag_preprocessing():
    assert hellaswag_clean("[header] How to cook [title] Boil water.  Then eat") == " How to cook. Boil water. Then eat"  # exactly lm-eval's output
    doc = hellaswag({"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he", "endings": [" [step] is  up."] * 4})
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][0] == " is up."


def test_generation_task_exact_match_and_contains(tmp_path, slm):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"q": "The capital of France is the city of", "answers": ["Paris"]}) + "\n"
                  + json.dumps({"q": "The capital of France is the city of", "answers": "London"}) + "\n")
    spec = load_task("piqa", path=str(qa), reader="jsonl", reader_options={}, type="generation",
                     text="{q}", metrics=["exact_match", "contains"], until=[".", "\n", ","], max_gen_toks=8)
    res = run_task(slm, spec)
    assert res["metrics"]["exact_match"] == 0.5 and res["metrics"]["contains"] == 0.5


def test_perplexity_task_on_any_text(tmp_path, slm):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 4)
    long = run_task(slm, load_task(f"wikitext2={text}", max_tokens=64, window=64))["metrics"]
    short = run_task(slm, load_task(f"wikitext2={text}", max_tokens=64, window=16))["metrics"]
    assert 1.0 < long["token_perplexity"] < short["token_perplexity"]  # the repetition only helps within a window
    assert long["word_perplexity"] > long["token_perplexity"] and 0.0 < long["bits_per_byte"] < short["bits_per_byte"]


# --- bad input -----------------------------------------------------------------------------------

def test_malformed_task_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: multiple_choice\npath: [unclosed\n")
    with pytest.raises(SlimlmError, match=r"bad.yaml, line \d+: invalid YAML"):
        load_task(str(bad))
    bad.write_text("name: x\ntype: multiple_choice\npath: a.jsonl\nchoise: [a]\n")
    with pytest.raises(SlimlmError, match="choise"):
        load_task(str(bad))


def test_malformed_jsonl_names_the_line(tmp_path, slm):
    data = tmp_path / "mc.jsonl"
    data.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n\n{"goal": "a", "sol1": \n')
    with pytest.raises(SlimlmError, match=r"mc.jsonl, line 3: not valid JSON"):
        run_task(slm, load_task(f"piqa={data}"))
    data.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 5}\n')
    with pytest.raises(SlimlmError, match=r"line 1 .* gold 5"):
        run_task(slm, load_task(f"piqa={data}"))
    data.write_text('{"goal": "a", "sol1": "b", "label": 0}\n')
    with pytest.raises(SlimlmError, match=r"line 1 .*sol2"):
        run_task(slm, load_task(f"piqa={data}"))


def test_unknown_task_suggests_a_name():
    with pytest.raises(SlimlmError, match="unknown task 'hellaswg'.*hellaswag"):
        load_task("hellaswg")


def test_missing_data_dir_names_the_variable(tmp_path, monkeypatch, slm):
    monkeypatch.setenv("SLIMLM_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SlimlmError, match="SLIMLM_DATA_DIR"):
        run_task(slm, load_task("piqa", limit=2))


def test_cli_unknown_task_exits_2(capsys):
    from slimlm.cli import main

    assert main(["tasks", "default", "--tasks", "piqa,nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
