"""The engine's shared forward (`serve/shared_forward`): calls of different widths, cache positions
and input kinds in one pass, each call's output bit-equal to the call run alone, and its cache
left as the call alone leaves it."""

import copy

import pytest
import torch
from conftest import MASK, VOCAB, tiny_model
from pretrained_layouts import write_family, write_gpt2_like_tokenizer

from unmask.models.checkpoint import load_checkpoint
from unmask.models.kv_cache import RaggedCache
from unmask.serve.shared_forward import Call, ForwardCost, buckets, run_shared, shareable


def _tokens(g: torch.Generator, rows: int, width: int) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (rows, width), generator=g)


def _alone(model, call: Call):
    return model(tokens=call.tokens, embeds=call.embeds, cache=call.cache, key_mask=call.key_mask)


def _same(shared, alone) -> bool:
    """Bit-equal outputs (NaN where alone is NaN: the queries of a left-padded row that see no key)."""

    def equal(a, b):
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))

    return equal(shared.logits, alone.logits) and equal(shared.hidden, alone.hidden)


@pytest.mark.parametrize("kind", ["bidirectional", "block_causal", "causal"])
def test_uncached_calls_of_every_width_share_a_forward_exactly(kind):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        calls = [Call(_tokens(g, b, n), None, None, None) for b, n in ((1, 37), (2, 20), (3, 29), (1, 24))]
        left = torch.ones(2, 24, dtype=torch.bool)
        left[0, :5] = False  # a left-padded call (a prompt_mask batch) keeps its own key mask
        calls.append(Call(_tokens(g, 2, 24), None, None, left))
        calls.append(Call(None, model.embed(_tokens(g, 1, 30)) * 0.7, None, None))  # soft inputs
        alone = [_alone(model, c) for c in calls]
        shared = run_shared(model, calls)
    for s, a in zip(shared, alone, strict=True):
        assert _same(s, a)


def test_canvases_of_one_width_share_a_forward_without_a_key_mask():
    """No call padded, none with a mask of its own: the forward takes the unmasked path (a key mask
    costs every attention call passes over its scores), and each output is still the call alone."""

    class Spy:
        def __init__(self, model):
            self.model, self.key_masks = model, []

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __call__(self, **kwargs):
            self.key_masks.append(kwargs.get("key_mask"))
            return self.model(**kwargs)

    model = tiny_model("bidirectional")
    g = torch.Generator().manual_seed(3)
    spy = Spy(model)
    with torch.inference_mode():
        same = [Call(_tokens(g, b, 24), None, None, None) for b in (1, 3, 2)]
        shared = run_shared(spy, same)
        assert spy.key_masks == [None]
        for s, c in zip(shared, same, strict=True):
            assert _same(s, _alone(model, c))
        run_shared(
            spy, [Call(_tokens(g, 1, 24), None, None, None), Call(_tokens(g, 1, 20), None, None, None)]
        )
        assert spy.key_masks[-1] is not None and not spy.key_masks[-1].all()  # padded: masked


@pytest.mark.parametrize("kind", ["block_causal", "causal", "bidirectional"])
def test_cached_calls_at_their_own_positions_share_a_forward_exactly(kind):
    """Rows of different prompts at different blocks: each cache at its own committed length, a
    block being denoised (scratch writes), a commit pass, a Fast-dLLM dual-cache rewrite (seek)."""
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(2)

    def cache_at(rows: int, committed: int, seek: int | None = None):
        kv = model.new_cache(rows, 96, "cpu")
        if committed:
            model(_tokens(g, rows, committed), cache=kv)
            kv.commit(committed)
        kv.seek(seek)
        return kv

    with torch.inference_mode():
        specs = [(1, 0, 4, None), (2, 12, 4, None), (1, 40, 4, None), (3, 7, 8, None), (1, 60, 12, None)]
        if kind == "bidirectional":
            specs.append((2, 32, 4, 16))  # rewrite positions 16..19 in place
        caches = [cache_at(b, c, seek) for b, c, _, seek in specs]
        tokens = [_tokens(g, b, n) for b, _, n, _ in specs]
        twins = copy.deepcopy(caches)
        alone = [model(tokens=t, cache=kv) for t, kv in zip(tokens, twins, strict=True)]
        shared = run_shared(model, [Call(t, None, kv, None) for t, kv in zip(tokens, caches, strict=True)])
    for s, a in zip(shared, alone, strict=True):
        assert _same(s, a)
    for kv, twin in zip(caches, twins, strict=True):  # each cache holds what its own call wrote
        assert kv.length == twin.length and kv.cursor == twin.cursor
        for layer in range(len(kv.k)):
            assert torch.equal(kv.k[layer], twin.k[layer]) and torch.equal(kv.v[layer], twin.v[layer])


def test_a_ragged_cache_masks_every_key_a_row_would_not_see_alone():
    model = tiny_model("block_causal")
    a, b = model.new_cache(1, 32, "cpu"), model.new_cache(2, 32, "cpu")
    a.commit(8)
    b.commit(4)
    ragged = RaggedCache([(a, 4), (b, 4)])
    assert ragged.write_start.tolist() == [8, 4, 4]
    assert ragged.length == 64  # 12 keys, rounded up to a whole chunk of the invariant attention
    assert ragged.key_mask().sum(-1).tolist() == [12, 8, 8]


def test_calls_pad_into_a_wider_forward_while_padding_costs_less_than_a_forward():
    def call(width, rows=1, cached=False):
        return Call(torch.zeros(rows, width, dtype=torch.long), None, object() if cached else None, None)

    shapes = [(1, 10), (4, 50), (16, 100), (2, 200), (8, 30)]  # (rows, width) of observed forwards
    cheap = ForwardCost()  # the fixed cost dominates (a small model on a CPU)
    dear = ForwardCost()  # compute-bound: 1 ms per 100 positions
    quadratic = ForwardCost()  # attention-bound: 1 ms per 10^4 query-key pairs
    for rows, width in shapes:
        cheap.observe(rows, width, 1e-3 + 1e-8 * rows * width)
        dear.observe(rows, width, 1e-4 + 1e-5 * rows * width)
        quadratic.observe(rows, width, 1e-4 + 1e-7 * rows * width * width)
    assert cheap.fit == pytest.approx((1e-3, 1e-8, 0), abs=1e-12)
    assert dear.fit == pytest.approx((1e-4, 1e-5, 0), abs=1e-12)
    assert quadratic.fit == pytest.approx((1e-4, 0, 1e-7), abs=1e-12)
    wide, mid, narrow = call(100), call(95), call(10)
    cached = [call(4, 2, True), call(4, 1, True)]
    calls = [narrow, cached[0], wide, mid, cached[1]]
    assert buckets(calls, 10_000, cheap) == [[wide, mid, narrow], cached]  # uncached by width; cached apart
    assert buckets(calls, 10_000, dear) == [[wide, mid], [narrow], cached]  # 90 padded positions: 0.9 ms
    # 10 -> 100 positions: 9900 more pairs (0.99 ms); 95 -> 100: 975 (0.1 ms, a forward's fixed cost)
    assert buckets(calls, 10_000, quadratic) == [[wide, mid], [narrow], cached]
    near = [call(100), call(97), call(60), call(58)]  # attention-bound: forwards of similar widths
    assert buckets(near, 10_000, quadratic) == [near[:2], near[2:]]
    assert buckets(near, 10_000, cheap) == [near]
    assert buckets([wide, mid], 150, cheap) == [[wide], [mid]]  # two rows of 100 positions exceed 150
    prefill, steps = call(100, 1, True), [call(4, 8, True), call(3, 2, True)]
    assert buckets([steps[0], prefill, steps[1]], 10_000, cheap) == [[prefill], steps]  # cached: by width


def test_only_calls_the_construction_covers_are_shared(tmp_path):
    model = tiny_model("block_causal")
    x = torch.zeros(1, 4, dtype=torch.long)
    with torch.inference_mode():
        assert shareable(model, {"tokens": x, "cache": None})
        assert shareable(model, {"tokens": x, "cache": model.new_cache(1, 8, "cpu")})
        assert not shareable(model, {"tokens": x, "decode": True})  # another model's own pass
    assert not shareable(model, {"tokens": x})  # autograd on: training kernels, not invariant
    write_family("dream", tmp_path / "dream")
    write_gpt2_like_tokenizer(tmp_path / "tok")
    dream = load_checkpoint(tmp_path / "dream", tokenizer=tmp_path / "tok", dtype="fp32").model
    with torch.inference_mode():
        assert shareable(dream, {"tokens": x})
        assert not shareable(dream, {"tokens": x, "cache": dream.new_cache(1, 8, "cpu")})


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_pretrained_canvases_of_every_length_share_a_forward_exactly(family, tmp_path):
    """A native transformers model (LLaDA; Dream, whose logits are shifted) with right-padded rows."""
    write_family(family, tmp_path / family)
    write_gpt2_like_tokenizer(tmp_path / "tok")
    model = load_checkpoint(tmp_path / family, tokenizer=tmp_path / "tok", dtype="fp32").model.eval()
    g = torch.Generator().manual_seed(3)
    vocab = min(model.vocab_size, MASK)
    with torch.inference_mode():
        calls = [Call(torch.randint(0, vocab, (b, n), generator=g), None, None, None)
                 for b, n in ((1, 30), (2, 17), (1, 23))]  # fmt: skip
        alone = [_alone(model, c) for c in calls]
        shared = run_shared(model, calls)
    for s, a in zip(shared, alone, strict=True):
        assert _same(s, a)
