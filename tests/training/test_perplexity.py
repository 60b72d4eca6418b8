import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MASK, VOCAB, tiny_model

from unmask.schedules import LogLinear
from unmask.training.perplexity import evaluate_perplexity

BYTES = np.ones(VOCAB, dtype=np.int64)


def test_ar_perplexity_is_exact_next_token_perplexity():
    model = tiny_model("causal")
    rows = np.random.default_rng(0).integers(0, VOCAB - 1, (5, 12))
    res = evaluate_perplexity(model, rows, LogLinear(), pad_id=-1, byte_lengths=BYTES, eps=1e-3, batch_size=2)
    x = torch.as_tensor(rows)
    with torch.no_grad():
        logits = model(x[:, :-1]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    assert res.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert not res.bound and res.tokens == 5 * 11
    assert res.bits_per_byte == pytest.approx(nll.item() / math.log(2), rel=1e-5)


def test_diffusion_bound_is_seeded_and_mc_samples_average():
    model = tiny_model("block_causal", block_size=4)
    rows = np.random.default_rng(1).integers(0, VOCAB - 1, (6, 16))
    kw = dict(pad_id=-1, byte_lengths=BYTES, eps=1e-3, batch_size=3)
    a = evaluate_perplexity(model, rows, LogLinear(), mc_samples=3, **kw)
    b = evaluate_perplexity(model, rows, LogLinear(), mc_samples=3, **kw)
    assert a == b and a.bound and a.mc_samples == 3 and a.tokens == 96
    # An untrained model is near uniform over V-1 non-mask tokens: the bound sits near V-1.
    assert 0.5 * (VOCAB - 1) < a.ppl < 3 * (VOCAB - 1)
    assert MASK == VOCAB - 1


def test_empty_rows_is_an_error():
    with pytest.raises(ValueError, match="no rows"):
        evaluate_perplexity(
            tiny_model(),
            np.zeros((0, 8), dtype=np.int64),
            LogLinear(),
            pad_id=-1,
            byte_lengths=BYTES,
            eps=1e-3,
        )
