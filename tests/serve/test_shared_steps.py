"""Shared steps: windows of several lanes, at different steps of different budgets, decided in one
`Decoder.decide`, give each lane exactly the tokens it gets deciding alone (every preset whose
decoder decides by `decide`), and the engine groups only steps that may be decided together."""

import pytest
import torch

from unmask.decoding.decoder import Decoder, Window
from unmask.decoding.presets import PRESETS, build_decoder, preset_config
from unmask.schedules import LogLinear
from unmask.serve.shared_steps import StepCall, run_steps, step_groups

MASK, V, W = 7, 96, 8


def _window(seed: int, rows: int, step: int, steps: int, width: int = W, vocab: int = V) -> Window:
    """A lane's window: random tokens with masks (a finished row: none), logits, uniforms, its
    block's step counter."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, width), generator=g)
    tokens[torch.rand(rows, width, generator=g) < 0.6] = MASK
    masked = tokens == MASK
    logits = torch.randn(rows, width, vocab, generator=g) * 3
    gate = torch.where(torch.rand(rows, width, generator=g) < 0.2, 0.0, torch.rand(rows, width, generator=g))
    return Window(
        tokens=tokens,
        masked=masked,
        gate=gate,
        logits=logits,
        step=torch.full((rows,), step),
        steps=torch.full((rows,), steps),
        u_token=torch.rand(rows, width, generator=g, dtype=torch.float64),
        u_select=torch.rand(rows, width, generator=g, dtype=torch.float64),
        mask_id=MASK,
    )


DECIDING = [name for name in PRESETS if type(build_decoder(preset_config(name), LogLinear())) is Decoder]


@pytest.mark.parametrize("name", DECIDING)
def test_stacked_windows_decide_as_each_alone(name):
    decoder = build_decoder(preset_config(name), LogLinear())
    # lanes at the first, a middle and the last step of budgets 2, 4, 8; of 1 and 3 rows
    windows = [
        _window(i, rows, step, steps)
        for i, (rows, step, steps) in enumerate([(1, 0, 4), (3, 3, 4), (1, 1, 2), (2, 5, 8), (1, 7, 8)])
    ]
    alone = [decoder.decide(w) for w in windows]
    calls = [StepCall(decoder, w) for w in windows]
    stacked = run_steps(calls)
    for a, s, w in zip(alone, stacked, windows, strict=True):
        assert torch.equal(a, s)
        assert ((a != w.tokens) <= w.masked).all()  # only masked positions change
    assert any((a != w.tokens).any() for a, w in zip(alone, windows, strict=True))  # a step decided


def test_steps_are_grouped_by_policies_width_and_vocabulary():
    bd3 = build_decoder(preset_config("bd3lm"), LogLinear())
    again = build_decoder(preset_config("bd3lm"), LogLinear())  # equal settings, another object
    llada = build_decoder(preset_config("llada"), LogLinear())
    soft = build_decoder(preset_config("bd3lm", inputs="soft"), LogLinear())  # inputs act before
    calls = [
        StepCall(bd3, _window(0, 1, 0, 4)),
        StepCall(llada, _window(1, 1, 0, 4)),
        StepCall(again, _window(2, 2, 1, 4)),
        StepCall(bd3, _window(3, 1, 0, 4, width=4)),
        StepCall(bd3, _window(4, 1, 0, 4, vocab=V + 1)),
        StepCall(soft, _window(5, 1, 2, 4)),
    ]
    groups = step_groups(calls)
    assert [[calls.index(c) for c in g] for g in groups] == [[0, 2, 5], [1], [3], [4]]
