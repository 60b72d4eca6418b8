"""Contract suite: every preset on every model kind, plus cache/batch/infilling parity."""

import pytest
import torch
from conftest import MASK, VOCAB, tiny_model

from unmask.config import replace
from unmask.decoding.generate import DecodeError, completions, generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import PRESETS, preset_config
from unmask.decoding.rng import row_generators
from unmask.schedules import LogLinear

EOS = 5
KINDS = ["block_causal", "bidirectional"]


class CountingModel(torch.nn.Module):
    """Wraps a model and counts every call (NFE and commit passes alike)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0
        self.cfg, self.vocab_size, self.mask_id = model.cfg, model.vocab_size, model.mask_id
        self.subs, self.soft_mask, self.head, self.tok_embed = (
            model.subs,
            model.soft_mask,
            model.head,
            model.tok_embed,
        )
        self.new_cache, self.embed, self.noising = model.new_cache, model.embed, model.noising

    def forward(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)


def run(model, preset, *, prompt=None, template=None, seed=0, rows=None, eos=None, **over):
    plan = plan_decode(model, preset_config(preset, **over), schedule=LogLinear(), eos_id=eos)
    given = prompt if prompt is not None else template
    gens = row_generators(seed, rows if rows is not None else range(given.shape[0]))
    return list(generate(model, plan, prompt=prompt, template=template, generators=gens))


def prompt_batch(B=3, P=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, VOCAB - 1, (B, P), generator=g)


@pytest.mark.parametrize("kind", KINDS)
# presets that need a trained ADJUST sampler: tests/decoding/test_rounds.py
@pytest.mark.parametrize("preset", [p for p in PRESETS if PRESETS[p].get("refresh") != "sampler"])
def test_contract(kind, preset):
    model = CountingModel(tiny_model(kind, block_size=4))
    prompt = prompt_batch()
    over = dict(max_new_tokens=16, steps=8)
    if preset_config(preset).ar_first_token:  # Fast-dLLM v2's loop needs a shifted family's last logit
        with pytest.raises(DecodeError, match="ar_first_token|last output predicts"):
            run(model, preset, prompt=prompt, **over)
        return
    if preset_config(preset).inputs == "renoise":  # DiffusionGemma's: tests/models/test_diffusion_gemma.py
        with pytest.raises(DecodeError, match="needs a uniform-noise model"):
            run(model, preset, prompt=prompt, **over)
        return
    states = run(model, preset, prompt=prompt, **over)
    final = states[-1]
    assert torch.equal(final.tokens[:, :6], prompt)  # prompt never edited
    assert not (final.tokens == MASK).any()  # nothing left masked
    assert final.tokens.shape == (3, 22)
    block = 4 if kind == "block_causal" else (preset_config(preset).block_len or 16)
    n_blocks = max(1, 16 // block)
    per_block = max(1, round(8 * block / 16))
    if preset_config(preset).select == "threshold" and preset_config(preset).threshold_floor == "one":
        per_block = block  # Fast-dLLM: >= 1 per step until the block is done, whatever the budget
    assert final.nfe <= per_block * (n_blocks + 1)  # within steps x blocks (+1: prompt's partial block)
    assert model.calls == final.nfe + final.commit_passes  # NFE counts denoiser calls exactly
    again = run(tiny_model(kind, block_size=4), preset, prompt=prompt, **over)[-1]
    assert torch.equal(again.tokens, final.tokens)  # same seed, same output


class Recording:
    """Forwards to a decoder and keeps the logits each step received."""

    def __init__(self, decoder):
        self.decoder, self.logits = decoder, []

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def step(self, state, logits, *u):
        self.logits.append(logits.clone())
        return self.decoder.step(state, logits, *u)


def test_cached_logits_equal_uncached_during_real_decoding():
    model = tiny_model("block_causal", block_size=4)
    prompt = prompt_batch(2, 6)
    out = {}
    for cache in ("auto", "none"):
        plan = plan_decode(model, preset_config("bd3lm", max_new_tokens=16, steps=16, cache=cache))
        rec = Recording(plan.decoder)
        plan = replace(plan, decoder=rec)
        states = list(generate(model, plan, prompt=prompt, generators=row_generators(0, range(2))))
        out[cache] = (states[-1], rec.logits)
    assert torch.equal(out["auto"][0].tokens, out["none"][0].tokens)
    # the prompt's whole block, then every block but the last (nothing reads the last one's K/V)
    assert out["auto"][0].commit_passes == 1 + 4 and out["none"][0].commit_passes == 0
    assert len(out["auto"][1]) == len(out["none"][1]) == 16 + 2  # 18 masks, 1 per call
    for a, b in zip(out["auto"][1], out["none"][1], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "kind,preset",
    [
        ("block_causal", "bd3lm"),
        ("bidirectional", "mdlm"),
        ("bidirectional", "conv"),
        ("bidirectional", "fast-dllm"),
        ("causal", "mdlm"),
    ],
)
def test_batched_output_equals_per_row_output(kind, preset):
    model = tiny_model(kind, block_size=4)
    prompt = prompt_batch(3, 5)
    batched = run(model, preset, prompt=prompt, max_new_tokens=12, steps=6)[-1].tokens
    for i in range(3):
        alone = run(model, preset, prompt=prompt[i : i + 1], rows=[i], max_new_tokens=12, steps=6)[-1]
        assert torch.equal(alone.tokens[0], batched[i])


def test_first_hitting_commits_one_token_per_row_per_call():
    model = tiny_model("bidirectional")
    states = run(model, "first-hitting", prompt=prompt_batch(4, 3), max_new_tokens=8, steps=8)
    masks = [int((s.tokens == MASK).sum(-1).max()) for s in states[:-1]]
    assert masks == list(range(7, -1, -1))
    per_row = [(s.tokens == MASK).sum(-1) for s in states[:-1]]
    assert all(torch.equal(r, r[:1].expand_as(r)) for r in per_row)


def test_infilling_keeps_the_template():
    model = tiny_model("bidirectional")
    template = prompt_batch(2, 16)
    template[:, 4:9] = MASK
    template[1, 12] = MASK
    for preset in ("mdlm", "llada", "conv", "conv-ranked"):
        final = run(model, preset, template=template, steps=4, block_len=0)[-1]
        keep = template != MASK
        assert torch.equal(final.tokens[keep], template[keep]) and not (final.tokens == MASK).any()


def test_ar_model_decodes_one_token_per_call():
    model = CountingModel(tiny_model("causal"))
    final = run(model, "mdlm", prompt=prompt_batch(2, 4), max_new_tokens=7)[-1]
    assert final.tokens.shape == (2, 11) and final.nfe == 7 == model.calls


def test_eos_stops_block_rows_and_fills_canvas():
    model = tiny_model("bidirectional")
    # Force EOS everywhere by biasing the head: the canvas fills with EOS after the first one.
    with torch.no_grad():
        model.head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        model.head.bias[EOS] = 50.0
    final = run(model, "llada", prompt=prompt_batch(2, 3), max_new_tokens=8, steps=8, eos=EOS)[-1]
    assert (final.tokens[:, 3:] == EOS).all()
    assert completions(final, EOS) == [[], []]
    bd3 = tiny_model("block_causal", block_size=4)
    with torch.no_grad():
        bd3.head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        bd3.head.bias[EOS] = 50.0
    final = run(bd3, "bd3lm", prompt=prompt_batch(2, 4), max_new_tokens=64, steps=64, eos=EOS)[-1]
    assert final.tokens.shape[1] == 8  # one block, then every row stopped at its EOS


def test_bad_inputs():
    model = tiny_model("bidirectional")
    cfg = preset_config("mdlm", max_new_tokens=128, steps=128, block_len=0, cache="auto")
    plan = plan_decode(model, cfg)
    gens = row_generators(0, range(1))
    with pytest.raises(DecodeError, match=r"prompt must be \[B, n\] with n >= 1"):
        list(generate(model, plan, prompt=torch.zeros(1, 0, dtype=torch.long), generators=gens))
    with pytest.raises(DecodeError, match="exceeds the model's maximum of 16"):
        short = plan_decode(model, replace(cfg, max_new_tokens=12), max_len=16)
        list(generate(model, short, prompt=prompt_batch(1, 8), generators=gens))
    from unmask.config import ConfigError

    with pytest.raises(ConfigError, match="steps: must be >= 1"):  # a plan is built from a checked config
        plan_decode(model, replace(cfg, steps=0))
    with pytest.raises(DecodeError, match="cache='dual' does not apply to a block_causal model"):
        plan_decode(tiny_model(), replace(cfg, cache="dual"))

    with pytest.raises(ConfigError, match="--decode.kernel: must be 0 .off. or a positive odd width"):
        preset_config("conv", kernel=64)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset_config("nope")


@pytest.mark.slow
def test_compiled_model_decodes_the_same_tokens():
    model = tiny_model("block_causal", block_size=4)
    prompt = prompt_batch(2, 6)
    eager = run(model, "bd3lm", prompt=prompt, max_new_tokens=16, steps=8)[-1]
    model.compile_blocks()
    compiled = run(model, "bd3lm", prompt=prompt, max_new_tokens=16, steps=8)[-1]
    assert torch.equal(eager.tokens, compiled.tokens)


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_floors(kind):
    """floor=one commits >= 1 per step and finishes every block (Fast-dLLM); floor=budget keeps the
    step budget (>= the counted minimum per step)."""
    prompt = prompt_batch()
    one = run(
        tiny_model(kind, block_size=4), "fast-dllm", prompt=prompt, max_new_tokens=16, steps=2, threshold=1.0
    )
    assert not (one[-1].tokens == MASK).any()
    assert all(
        int((b.tokens == MASK).sum()) - int((a.tokens == MASK).sum()) >= 3  # one per row per step
        for a, b in zip(one[1:], one[:-1], strict=True)
        if a.block == b.block and a.step > b.step
    )
    budget = run(
        tiny_model(kind, block_size=4),
        "fast-dllm",
        prompt=prompt,
        max_new_tokens=16,
        steps=4,
        threshold=1.0,
        threshold_floor="budget",
    )[-1]
    assert budget.nfe <= 4 + 1  # the budget (+1: the prompt's partial block)
    assert not (budget.tokens == MASK).any()


@pytest.mark.parametrize(
    "kind,preset", [("bidirectional", "llada"), ("block_causal", "bd3lm"), ("causal", "mdlm")]
)
def test_min_new_tokens_holds_off_the_stop_token(kind, preset):
    """A head biased to EOS stops at once; with min_new_tokens = 5 the first 5 generated positions
    are something else, and the stop comes right after."""
    model = tiny_model(kind, block_size=4)
    with torch.no_grad():
        model.head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        model.head.bias[EOS] = 50.0
    over = dict(max_new_tokens=8, steps=8)
    first = run(model, preset, prompt=prompt_batch(2, 4), eos=EOS, **over)[-1]
    assert completions(first, EOS) == [[], []]
    held = run(model, preset, prompt=prompt_batch(2, 4), eos=EOS, min_new_tokens=5, **over)[-1]
    assert [len(c) for c in completions(held, EOS)] == [5, 5]
    assert (held.tokens[:, 4 + 5] == EOS).all()
