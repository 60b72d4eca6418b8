"""DiffusionGemma: loaded into transformers' own class, decoded by the one loop, token-identical to
`DiffusionGemmaForBlockDiffusion.generate`.

The reference is transformers' own model and generation loop on a tiny random model saved with
`save_pretrained` (sliding and full layers of different head shapes, MoE, a vision tower that we
drop). Its draws come from the global generator; a row decoded alone by unmask draws from its own
generator, seeded as the reference's global one, in the reference's order (the initial canvas,
then per step the canvas draw and the re-noising draw), so the tokens must be identical:
several prompts and seeds, more than one canvas, sliding windows overrun, early stops, top-k,
another entropy bound. The comparison runs on `generate`'s own kernels (`invariant.fused()`): the
sampler feeds each step's logits back (self-conditioning), which amplifies last-bit differences
step after step, so on a larger model our batch-invariant kernels give other (equally valid)
tokens; batch invariance is checked on those.
"""

from __future__ import annotations

import json

import pytest
import torch
from pretrained_layouts import write_family

from unmask.cli.main import main
from unmask.decoding.generate import final_state, generate
from unmask.decoding.plan import DecodeError, plan_decode
from unmask.decoding.presets import preset_config
from unmask.decoding.rng import row_generators
from unmask.models import invariant
from unmask.models.checkpoint import load_checkpoint
from unmask.models.pretrained.families import PretrainedError

pytest.importorskip("transformers.models.diffusion_gemma")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (  # noqa: E402
    EntropyBoundSamplerConfig,
)

CANVAS = 8


@pytest.fixture(scope="module")
def dg(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusion-gemma")
    native = write_family("diffusion-gemma", path)
    return path, native, load_checkpoint(path, dtype="fp32")


def prompt_of(P: int, seed: int, B: int = 1) -> torch.Tensor:
    return torch.randint(3, 44, (B, P), generator=torch.Generator().manual_seed(seed))


def ours(loaded, prompt, generators, *, kernels="native", **fields):
    """Our decode. `kernels="native"`: on the kernels `generate` runs (`invariant.fused()`), the
    reference comparison - the sampler's self-conditioning loop amplifies last-bit differences
    step after step, so equal tokens need equal logits; `"invariant"`: our batch-invariant ones."""
    cfg = preset_config("diffusion-gemma", **fields)
    plan = plan_decode(loaded.model, cfg, tokenizer=loaded.tokenizer)
    with invariant.fused() if kernels == "native" else torch.inference_mode():
        return final_state(generate(loaded.model, plan, prompt=prompt, generators=generators))


class PerPositionTopP(TopPLogitsWarper):
    """transformers' top-p warper on each canvas position: it scatters along dim 1 of [N, V]
    scores, and generate() hands processors [B, L, V]."""

    def __call__(self, input_ids, scores):
        return super().__call__(input_ids, scores.reshape(-1, scores.shape[-1])).view(scores.shape)


def reference(native, prompt, seed, *, eos, top_k=0, top_p=1.0, **kw):
    """`generate` with the global generator seeded by `seed`; top-k / top-p as a user passes them,
    logits processors run before its temperature schedule."""
    torch.manual_seed(seed)
    processors = LogitsProcessorList(
        ([TopKLogitsWarper(top_k)] if top_k else []) + ([PerPositionTopP(top_p)] if top_p < 1 else [])
    )
    out = native.generate(prompt, logits_processor=processors, eos_token_id=eos, pad_token_id=0, **kw)
    return out.sequences[0, prompt.shape[1] :].tolist()


def through_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The generated ids up to the first stop id, included (the reference pads after it; we stop)."""
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids) - 1)
    return ids[: cut + 1]


def test_the_family_loads_into_the_native_class_and_both_passes_equal_it(dg):
    path, native, loaded = dg
    model = loaded.model
    assert loaded.state["pretrained"]["family"] == "diffusion-gemma"
    assert type(model.native).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert model.native.model.encoder.vision_tower is None  # text only
    assert model.cfg.block_size == CANVAS and model.mask_id == model.vocab_size  # the virtual id
    assert loaded.config.decode.preset == "diffusion-gemma"
    prompt = prompt_of(5, 0, B=2)
    canvas = torch.randint(0, model.vocab_size, (2, CANVAS), generator=torch.Generator().manual_seed(1))
    sc = torch.randn(2, CANVAS, model.vocab_size, generator=torch.Generator().manual_seed(2))
    from transformers import DynamicCache

    with torch.inference_mode(), invariant.fused():  # the native kernels: the same numbers
        kv = model.new_cache(2, 64, "cpu")
        model(prompt, cache=kv)
        kv.commit(5)
        for self_conditioning in (None, sc):  # a canvas step reads the cache and leaves it as it is
            got = model(canvas, cache=kv, decode=True, self_conditioning=self_conditioning).logits
            cache = DynamicCache(config=native.config.text_config)
            want = native(input_ids=prompt, cache=cache, decoder_input_ids=canvas,
                          self_conditioning_logits=self_conditioning).logits  # fmt: skip
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        model(canvas, cache=kv)  # the finished canvas's encoder pass, then the next canvas
        kv.commit(CANVAS)
        nxt = torch.randint(0, model.vocab_size, (2, CANVAS), generator=torch.Generator().manual_seed(3))
        got = model(nxt, cache=kv, decode=True).logits
        native.model.encoder(input_ids=canvas, cache=cache)  # generate()'s encoder pass of a canvas
        want = native(cache=cache, decoder_input_ids=nxt).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kv.length == cache.get_seq_length() == 5 + CANVAS


CASES = [  # (prompt length, our fields, the reference's generate() arguments)
    (5, {}, {}),
    (1, {"block_steps": 10}, {"max_denoising_steps": 10}),
    (9, {"top_k": 5}, {"top_k": 5}),  # the window of 6 is overrun by the prompt alone
    (6, {"top_k": 8, "top_p": 0.7}, {"top_k": 8, "top_p": 0.7}),
    (5, {"stop_confidence": 3.0, "entropy_bound": 1.0},
     {"confidence_threshold": 3.0, "sampler_config": EntropyBoundSamplerConfig(1.0)}),
    (3, {"stop_confidence": 3.0, "entropy_bound": 1.0, "stop_stable": 2},
     {"confidence_threshold": 3.0, "sampler_config": EntropyBoundSamplerConfig(1.0),
      "stability_threshold": 2}),
    (4, {"temperature": 1.2, "temperature_end": 0.1}, {"t_max": 1.2, "t_min": 0.1}),
]  # fmt: skip


@pytest.mark.parametrize(("P", "fields", "theirs"), CASES)
def test_the_preset_is_token_identical_to_transformers_generate(dg, P, fields, theirs):
    _, native, loaded = dg
    eos = list(loaded.tokenizer.stop_ids)  # EOS and end of turn: the reference's eos_token_id list
    fields = {"max_new_tokens": 3 * CANVAS, "block_steps": 12, **fields}
    theirs = {"max_new_tokens": 3 * CANVAS, "max_denoising_steps": 12, **theirs}
    early = 0
    for seed in range(4):
        prompt = prompt_of(P, seed)
        state = ours(loaded, prompt, [torch.Generator().manual_seed(seed)], **fields)
        got = state.tokens[0, P:].tolist()
        want = reference(native, prompt, seed, eos=eos, **theirs)
        assert through_stop(got, eos) == through_stop(want, eos), (seed, got, want)
        canvases = -(-len(through_stop(got, eos)) // CANVAS)
        early += state.nfe < canvases * fields["block_steps"]
    if "stop_confidence" in fields:
        assert early, "the adaptive stop must fire in these cases"


def test_a_row_is_the_same_in_any_batch(dg):
    """Per-row streams: each row of a batch of 3 is what it is decoded alone (a row whose canvas
    stopped early stops drawing while its batch-mates go on)."""
    _, _, loaded = dg
    prompt = prompt_of(5, 7, B=3)
    fields = {"max_new_tokens": 2 * CANVAS, "block_steps": 12, "stop_confidence": 3.0, "entropy_bound": 1.0}
    batch = ours(loaded, prompt, row_generators(5, range(3)), kernels="invariant", **fields)
    alone = [
        ours(loaded, prompt[i : i + 1], row_generators(5, [i]), kernels="invariant", **fields)
        for i in range(3)
    ]
    for i, state in enumerate(alone):
        assert torch.equal(batch.tokens[i], state.tokens[0]), i
    assert len({s.nfe for s in alone}) > 1, "rows stop after different numbers of steps"


def test_what_does_not_compose_is_refused_with_the_reason(dg, checkpoints):
    _, _, loaded = dg
    model, tok = loaded.model, loaded.tokenizer
    for preset in ("mdlm", "bd3lm", "llada"):
        with pytest.raises(DecodeError, match="has no \\[MASK\\]"):
            plan_decode(model, preset_config(preset), tokenizer=tok)
    refusals = {
        "kernel": ({"kernel": 5}, "Conv gate"),
        "rounds": ({"rounds": 2}, "rounds"),
        "cfg": ({"cfg_scale": 1.0}, "guidance"),
        "cache": ({"cache": "none"}, "cache auto"),
        "soft inputs": ({"inputs": "soft"}, "has no \\[MASK\\]"),
        "ADJUST-style rounds": ({"rounds": 4, "refresh": "model"}, "rounds"),
    }
    for fields, why in refusals.values():
        with pytest.raises(DecodeError, match=why):
            plan_decode(model, preset_config("diffusion-gemma", **fields), tokenizer=tok)
    masked = load_checkpoint(checkpoints["block_causal"]).model
    for cfg in (preset_config("diffusion-gemma"), preset_config("mdlm", inputs="renoise")):
        with pytest.raises(DecodeError, match="needs a uniform-noise model"):
            plan_decode(masked, cfg)
    with pytest.raises(PretrainedError, match="uniform-noise model"):
        model.forward_bd3_train(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))


def test_unmask_sample_defaults_to_the_preset_and_matches_generate(dg, tmp_path, capsys):
    path, native, loaded = dg
    out = tmp_path / "s.jsonl"
    with invariant.fused():  # generate()'s kernels (see `ours`)
        main(["sample", "--checkpoint", str(path), "--dtype", "fp32", "--precision", "fp32",
              "--prompt", "w1 w2 w3", "--num-samples", "2", "--batch-size", "2", "--seed", "3",
              "--max-new-tokens", str(2 * CANVAS),
              "--decode.block_steps", "12", "--output", str(out)])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = loaded.tokenizer.prompt_ids("w1 w2 w3")
    eos = list(loaded.tokenizer.stop_ids)
    for g, record in zip(row_generators(3, range(2)), records, strict=True):
        seed = g.initial_seed()
        want = reference(native, torch.tensor([ids]), seed, eos=eos, max_new_tokens=2 * CANVAS,
                         max_denoising_steps=12)  # fmt: skip
        assert record["token_ids"] == [t for t in through_stop(want, eos) if t not in eos]
    capsys.readouterr()


def test_bench_family_ref_times_the_preset_against_transformers_generate(dg, tmp_path, capsys):
    path, _, _ = dg
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3 w4 w5"}\n{"prompt": "w6 w7 w8 w9 w10"}\n')
    main(["bench", "family-ref", "--checkpoint", str(path), "--prompts-file", str(prompts), "--dtype", "fp32",
          "--max-new-tokens", str(2 * CANVAS), "--steps", "8", "--repeats", "1",
          "--out", str(tmp_path / "out")])  # fmt: skip
    saved = json.loads((tmp_path / "out" / "family_ref_diffusion-gemma.json").read_text())
    assert saved["preset"] == "diffusion-gemma" and saved["identical_tokens"] is True
    assert saved["speedup"]["median"] > 0
    assert "diffusion-gemma (`diffusion-gemma` preset) vs its own loop" in capsys.readouterr().out


def test_only_the_self_conditioning_logits_are_kept_between_steps_in_the_models_dtype(dg):
    """Memory per row: between two steps the state holds one [B, W, V] tensor, the processed
    logits in the embedding's dtype (bf16 for a bf16 model, as `generate` keeps them)."""
    path, _, _ = dg
    loaded = load_checkpoint(path, dtype="bf16")
    cfg = preset_config("diffusion-gemma", max_new_tokens=CANVAS, block_steps=3)
    plan = plan_decode(loaded.model, cfg, tokenizer=loaded.tokenizer)
    states = list(
        generate(loaded.model, plan, prompt=prompt_of(4, 0, B=2), generators=row_generators(0, range(2)))
    )
    mid = states[0]
    big = [
        name
        for name, v in vars(mid).items()
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] > 8
    ]
    assert big == ["prev_logits"] and mid.prev_logits.dtype == torch.bfloat16
    assert mid.prev_logits.shape == (2, CANVAS, loaded.model.vocab_size)
