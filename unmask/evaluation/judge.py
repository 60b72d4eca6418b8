"""Offline pairwise judges and win rates: an automatic proxy for preference evaluations such as
AlpacaEval. It is NOT AlpacaEval (no GPT-4 judge, no length control) and is never reported as such.

Judges score each response to a prompt; the higher score wins a pair, equal scores tie:
- `ref-nll`: minus the mean NLL per token of the response given its prompt under a reference AR
  model (sliding windows). Fluency, not helpfulness: it rewards predictable text, repetition
  included, so report it beside the repetition metrics. An empty or whitespace-only response
  loses (whitespace after a code prompt is very predictable, and says nothing).
- `answer-f1`: token-bag F1 between the response and the held-out reference answer (tokens are
  identifiers, numbers and single punctuation marks). Closeness to one correct answer.

`win_rate` counts a tie as half a win.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from unmask.evaluation.reference import ReferenceLM, ReferenceModelError, token_nlls

TOKEN = re.compile(r"\w+|[^\w\s]")


def response_token_nlls(
    ref: ReferenceLM, prompt: str, response: str, *, window: int | None = None
) -> np.ndarray:
    """-log p(token | prompt, earlier response tokens) of each response token under `ref` (sliding
    windows): the response's tokens are those after the longest common prefix of encode(prompt)
    and encode(prompt + response). Empty for an empty or whitespace-only response (it says nothing)."""
    if not response.strip():
        return np.zeros(0)
    p_ids, ids = ref.encode(prompt), ref.encode(prompt + response)
    shared = zip(p_ids, ids, strict=False)
    k = next((i for i, (a, b) in enumerate(shared) if a != b), min(len(p_ids), len(ids)))
    k = max(k, 1)  # ids[0] ([BOS]) is never predicted
    if len(ids) <= k:
        return np.zeros(0)
    window = window or ref.max_len
    return token_nlls(ref, ids, window, max(1, window // 2))[k - 1 :]  # nll[i - 1] scores ids[i]


def response_nll(ref: ReferenceLM, prompt: str, response: str, *, window: int | None = None) -> float | None:
    """Mean -log p(response | prompt) per token under `ref`; None for an empty/whitespace response."""
    nll = response_token_nlls(ref, prompt, response, window=window)
    return float(nll.mean()) if len(nll) else None


def nll_score(nlls: np.ndarray) -> float:
    """The ref-nll judge's score of a response from its token NLLs: minus their mean; an empty
    (or blank) response scores -inf, so it always loses."""
    return -float(nlls.mean()) if len(nlls) else -math.inf


def answer_f1(response: str, answer: str) -> float:
    """F1 of the token bags of `response` and `answer` (0 when either is empty)."""
    r, a = Counter(TOKEN.findall(response)), Counter(TOKEN.findall(answer))
    common = sum((r & a).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(r.values()), common / sum(a.values())
    return 2 * precision * recall / (precision + recall)


JUDGES = ("ref-nll", "answer-f1")


def judge_scores(
    judge: str,
    prompts: list[str],
    texts: list[str],
    *,
    ref: ReferenceLM | None = None,
    answers: list[str] | None = None,
) -> list[float]:
    """One score per response (higher is better)."""
    if judge == "ref-nll":
        if ref is None:
            raise ReferenceModelError("the ref-nll judge needs a reference AR model (--reference)")
        return [nll_score(response_token_nlls(ref, p, t)) for p, t in zip(prompts, texts, strict=True)]
    if judge == "answer-f1":
        if answers is None or len(answers) != len(texts):
            raise ReferenceModelError("the answer-f1 judge needs a held-out answer per response (--answers)")
        return [answer_f1(t, a) for t, a in zip(texts, answers, strict=True)]
    raise ReferenceModelError(f"unknown judge {judge!r} (known: {', '.join(JUDGES)})")


@dataclass(frozen=True)
class WinRate:
    win_rate: float  # (wins + ties / 2) / n
    wins: int
    ties: int
    losses: int
    n: int
    judge: str


def win_rate(scores_a: list[float], scores_b: list[float], judge: str) -> WinRate:
    """How often response A beats response B to the same prompt."""
    if not scores_a or len(scores_a) != len(scores_b):
        raise ReferenceModelError(
            f"win rate needs two equally long, non-empty lists of responses "
            f"(got {len(scores_a)} and {len(scores_b)})"
        )
    wins = sum(a > b for a, b in zip(scores_a, scores_b, strict=True))
    ties = sum(a == b for a, b in zip(scores_a, scores_b, strict=True))
    n = len(scores_a)
    return WinRate((wins + ties / 2) / n, wins, ties, n - wins - ties, n, judge)
