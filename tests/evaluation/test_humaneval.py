"""The HumanEval harness (exact on known answers, contained, refuses without a time limit) and the
offline judges."""

from __future__ import annotations

import math

import pytest
import torch

from unmask.evaluation.humaneval import (
    HarnessError,
    check_completions,
    evaluate_humaneval,
    pass_at_k,
    program,
    read_problems,
    run_program,
    score,
    truncate_completion,
)
from unmask.evaluation.judge import answer_f1, judge_scores, response_nll, win_rate
from unmask.evaluation.reference import ReferenceModelError, UnmaskAR


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def test_problems_ship_with_the_package(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])


def test_correct_passes_wrong_fails_loop_times_out(problems):
    p = problems[2]
    assert run_program(program(p, p["canonical_solution"]), timeout=10).passed
    wrong = run_program(program(p, "    return 0.0\n"), timeout=10)
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    loop = run_program(program(p, "    while True:\n        pass\n"), timeout=1)
    assert loop.status == "timeout"
    syntax = run_program(program(p, "    return (\n"), timeout=10)
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail


def test_generated_code_gets_no_network():
    out = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", timeout=10)
    assert out.status == "failed" and "OSError" in out.detail


@pytest.mark.parametrize("timeout", [None, 0, -1.0, math.inf])
def test_refuses_without_a_time_limit(problems, timeout):
    with pytest.raises(HarnessError, match="time limit"):
        run_program("print(1)", timeout=timeout)
    with pytest.raises(HarnessError, match="time limit"):
        check_completions(problems[:1], [["    pass\n"]], timeout=timeout)


def test_pass_at_k_and_scoring(problems):
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(3, 0, 3) == 0.0
    with pytest.raises(HarnessError):
        pass_at_k(2, 1, 3)
    subset = problems[:3]
    comps = [[p["canonical_solution"], "    return None\n"] for p in subset]
    outcomes = check_completions(subset, comps, timeout=10)
    assert [[o.status for o in row] for row in outcomes] == [["passed", "failed"]] * 3
    assert score(outcomes, (1, 2)) == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}


def test_truncate_completion_keeps_the_body():
    text = "    x = 1\n\n    return x\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    x = 1\n\n    return x\n"
    assert truncate_completion("    return 1\n") == "    return 1\n"


def test_evaluate_humaneval_end_to_end(checkpoints):
    from unmask.decoding.presets import preset_config
    from unmask.models.checkpoint import load_checkpoint
    from unmask.schedules import LogLinear

    loaded = load_checkpoint(checkpoints["bidirectional"])
    cfg = preset_config("conv", max_new_tokens=8, steps=2, kernel=5)
    r = evaluate_humaneval(
        loaded.model, loaded.tokenizer, cfg, LogLinear(), num_samples=2, ks=(1, 2), timeout=10, limit=2
    )
    assert r["problems"] == 2 and r["passed"] + r["failed"] + r["timeouts"] == 4
    assert 0 <= r["pass@1"] <= r["pass@2"] <= 1 and len(r["per_problem"]) == 2
    with pytest.raises(HarnessError, match="time limit"):
        evaluate_humaneval(loaded.model, loaded.tokenizer, cfg, LogLinear(), timeout=None, limit=1)


def test_answer_f1_and_win_rate():
    assert answer_f1("return a + b", "return a + b") == 1.0
    assert answer_f1("return a", "return b") == pytest.approx(0.5)  # 1 of 2 tokens each side
    assert answer_f1("", "x") == 0.0
    w = win_rate([3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 2.0, 5.0], "answer-f1")
    assert (w.wins, w.ties, w.losses, w.n) == (1, 1, 2, 4) and w.win_rate == pytest.approx(1.5 / 4)
    with pytest.raises(ReferenceModelError):
        win_rate([1.0], [], "x")
    with pytest.raises(ReferenceModelError, match="unknown judge"):
        judge_scores("gpt4", ["p"], ["t"])


def test_response_nll_scores_only_the_response(checkpoints):
    ref = UnmaskAR(checkpoints["ar"])
    prompt, response = "import json\n", "def load(path):\n    return 1\n"
    ids = ref.encode(prompt + response)
    k = len(ref.encode(prompt))
    assert ref.encode(prompt) == ids[:k]
    logits, _ = ref.forward(torch.tensor([ids]))
    logp = logits[0, :-1].float().log_softmax(-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert response_nll(ref, prompt, response) == pytest.approx(float(nll[k - 1 :].mean()), rel=1e-5)
    assert response_nll(ref, prompt, "") is None
    scores = judge_scores("ref-nll", [prompt] * 3, [response, "", "\n    "], ref=ref)
    assert scores[1] == scores[2] == -math.inf and scores[0] > -math.inf  # empty / blank responses lose
