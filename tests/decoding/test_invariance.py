"""A row's tokens never depend on its batch-mates, and the exact KV cache changes no token.

Token identity (never a tolerance) for every registered preset on every model kind: batch 1 ==
batch N, and on block-causal and causal models cached == uncached. These promises rest on the
forward being bit-identical across call shapes (`unmask.models.invariant`), so they are proven on
more than one kernel family: `test_every_kernel_path` reruns this module and the kernel-property
tests under the SIMD paths the machine offers (native and ATen's `default`) with 1 and 2 threads.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from torch import nn

from unmask.config import replace
from unmask.decoding.generate import final_state, generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import PRESETS, preset_config
from unmask.decoding.refresh import Marginal, SamplerRefresh
from unmask.decoding.rng import row_generators
from unmask.models.adjust_sampler import AdjustSampler
from unmask.models.transformer import Transformer

KINDS = ["block_causal", "bidirectional", "causal", "soft-bidirectional", "soft-block_causal"]
EOS = 5
BIG_VOCAB = 40_000  # a row of logits this long is reduced by two threads unless kept whole


def model_for(kind: str, vocab: int = VOCAB) -> Transformer:
    soft = kind.startswith("soft-")
    attention = kind.removeprefix("soft-")
    if vocab == VOCAB and not soft:
        return tiny_model(attention, block_size=4)
    torch.manual_seed(0)
    cfg = tiny_model(attention, block_size=4).cfg
    model = Transformer(cfg, vocab, vocab - 1, soft_mask_k=3 if soft else 0)
    if soft:
        with torch.no_grad():
            model.soft_mask.w_s.fill_(0.5)  # a blend that visibly changes the inputs
    return model.eval()


def refresher_for(model, preset: str):
    if PRESETS[preset].get("refresh") != "sampler":
        return Marginal()
    torch.manual_seed(5)
    sampler = AdjustSampler(model.cfg)
    nn.init.ones_(sampler.norm_out.weight)  # a refresh that changes the logits
    return SamplerRefresh(sampler.eval())


def decode(model, preset, prompt, rows, *, cache=None, G=16, steps=8, **over):
    if model.soft_mask is not None:
        over.setdefault("inputs", "soft")
    cfg = preset_config(preset, max_new_tokens=G, steps=steps, **over)
    plan = plan_decode(
        model, replace(cfg, cache=cache or cfg.cache), eos_id=EOS, refresher=refresher_for(model, preset)
    )
    state = final_state(generate(model, plan, prompt=prompt, generators=row_generators(0, rows)))
    return state


def prompts(B=4, P=6, vocab=VOCAB):
    return torch.randint(6, min(vocab, VOCAB) - 1, (B, P), generator=torch.Generator().manual_seed(2))


def skip_family_only(preset: str) -> None:
    if PRESETS[preset].get("ar_first_token"):
        pytest.skip(
            "Fast-dLLM v2's loop needs a shifted block-causal family; its batched rows equal the "
            "one-row reference in tests/models/test_family_loops.py"
        )
    if PRESETS[preset].get("inputs") == "renoise":
        pytest.skip(
            "a uniform-noise preset, refused on masked models (test_generate.py::test_contract); its "
            "batch invariance is tested on DiffusionGemma in tests/models/test_diffusion_gemma.py"
        )


def assert_batch_invariant(model, preset, prompt, **over):
    batched = decode(model, preset, prompt, range(len(prompt)), **over)
    assert not (batched.tokens == model.mask_id).all(), "decoding did nothing"
    for i in range(len(prompt)):
        alone = decode(model, preset, prompt[i : i + 1], [i], **over)
        assert_same_row(alone.tokens[0], batched.tokens[i])


def assert_same_row(alone: torch.Tensor, batched: torch.Tensor) -> None:
    """Identical tokens; a row that stopped at [EOS] alone may be EOS-padded to its batch's length."""
    n = alone.shape[0]
    assert torch.equal(alone, batched[:n]) and (batched[n:] == EOS).all(), (alone, batched)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_row_decodes_the_same_alone_as_in_a_batch(kind, preset):
    model = model_for(kind)
    skip_family_only(preset)
    if kind == "causal" and PRESETS[preset].get("rounds", 1) > 1:
        pytest.skip("a causal model decodes one token per call: no commit rounds")
    assert_batch_invariant(model, preset, prompts())


@pytest.mark.parametrize("kind", ["block_causal", "causal", "soft-block_causal"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_exact_cache_changes_no_token(kind, preset):
    model = model_for(kind)
    skip_family_only(preset)
    if kind == "causal" and PRESETS[preset].get("rounds", 1) > 1:
        pytest.skip("a causal model decodes one token per call: no commit rounds")
    cached = decode(model, preset, prompts(), range(4), cache="auto")
    uncached = decode(model, preset, prompts(), range(4), cache="none")
    assert kind == "causal" or cached.commit_passes > 0 and uncached.commit_passes == 0
    assert torch.equal(cached.tokens, uncached.tokens), (cached.tokens, uncached.tokens)


@pytest.mark.parametrize("kind", ["block_causal", "causal"])
@pytest.mark.parametrize("preset", ["bd3lm", "mdlm", "conv"])
def test_long_canvases_and_large_vocabularies(kind, preset):
    """Past one chunk of attention keys (64) and with logit rows long enough to be split between
    threads: a batch of one row, cached and uncached."""
    model = model_for(kind, BIG_VOCAB)
    prompt = prompts(2)
    cached = decode(model, preset, prompt, range(2), cache="auto", G=72, steps=36)
    uncached = decode(model, preset, prompt, range(2), cache="none", G=72, steps=36)
    assert torch.equal(cached.tokens, uncached.tokens)
    for i in range(2):
        alone = decode(model, preset, prompt[i : i + 1], [i], cache="auto", G=72, steps=36)
        assert_same_row(alone.tokens[0], cached.tokens[i])


def test_guidance_and_fast_dllm_caches_keep_rows_apart():
    model = model_for("bidirectional")
    assert_batch_invariant(model, "llada", prompts(), cfg_scale=1.0, cache="none", block_len=8)
    for cache in ("prefix", "dual"):
        assert_batch_invariant(model, "fast-dllm", prompts(), cache=cache, block_len=8, threshold=0.05)


def test_the_cached_block_sees_bit_identical_logits():
    """The logits themselves, step by step, not only the tokens they lead to."""
    model = model_for("block_causal")
    seen = {}
    for cache in ("auto", "none"):
        plan = plan_decode(model, preset_config("bd3lm", max_new_tokens=16, steps=16, cache=cache))
        decoder = plan.decoder
        logits = []
        step = decoder.step

        def recording(state, x, *u, step=step, logits=logits):
            logits.append(x.clone())
            return step(state, x, *u)

        object.__setattr__(decoder, "step", recording)
        final_state(generate(model, plan, prompt=prompts(2), generators=row_generators(0, range(2))))
        seen[cache] = logits
    assert len(seen["auto"]) == len(seen["none"]) > 0
    for a, b in zip(seen["auto"], seen["none"], strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny random directories of every pretrained family (tests/pretrained_layouts.py), loaded."""
    from pretrained_layouts import FAMILIES, write_family, write_gpt2_like_tokenizer

    from unmask.models.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("families")
    write_gpt2_like_tokenizer(root / "gpt2")
    out = {}
    for family in FAMILIES:
        write_family(family, root / family)
        tok = root / "gpt2" if family in ("mdlm", "bd3lm") else None
        out[family] = load_checkpoint(root / family, tokenizer=tok, dtype="fp32").model
    return out


PRETRAINED = ["llada", "dream", "sdar", "fast-dllm-v2", "llada2", "mdlm", "bd3lm"]


@pytest.mark.parametrize("family", PRETRAINED)
@pytest.mark.parametrize("preset", ["family", "mdlm", "conv"])
def test_pretrained_families_are_batch_and_cache_invariant(pretrained, family, preset):
    """The adapters run transformers' own modules; their linears, attention and activations are
    routed through the invariant ops too."""
    model = pretrained[family]
    from unmask.models.pretrained.families import FAMILIES

    name = next(f.preset for f in FAMILIES if f.name == family) if preset == "family" else preset
    prompt = torch.randint(0, 44, (3, 5), generator=torch.Generator().manual_seed(1))
    over = {"block_len": 4} if model.cfg.attention == "bidirectional" else {}
    assert_batch_invariant(model, name, prompt, G=8, steps=4, **over)
    if model.cfg.attention == "block_causal" and not PRESETS[name].get(
        "ar_first_token"
    ):  # it needs the cache
        cached = decode(model, name, prompt, range(3), cache="auto", G=8, steps=4)
        uncached = decode(model, name, prompt, range(3), cache="none", G=8, steps=4)
        assert torch.equal(cached.tokens, uncached.tokens)


@pytest.mark.parametrize("family", PRETRAINED)
def test_pretrained_logits_are_bit_identical_across_batches_and_the_cache(pretrained, family):
    model = pretrained[family]
    x = torch.randint(0, 44, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(x).logits
        for i in range(3):
            assert torch.equal(model(x[i : i + 1]).logits[0], full[i])
        if model.cfg.attention == "block_causal":  # prefill, then each block against the cache
            Lb = model.cfg.block_size
            kv = model.new_cache(3, 16, "cpu")
            model(x[:, :Lb], cache=kv)
            kv.commit(Lb)
            for lo in range(Lb, 16, Lb):
                assert torch.equal(model(x[:, lo : lo + Lb], cache=kv).logits, full[:, lo : lo + Lb]), lo
                kv.commit(Lb)


def _paths() -> list[dict[str, str]]:
    """The kernel paths other than this process's: native and `default` SIMD x 1 and 2 threads."""
    here = (os.environ.get("ATEN_CPU_CAPABILITY", ""), str(torch.get_num_threads()))
    native = torch.backends.cpu.get_cpu_capability().lower()
    simd = [""] + (["default"] if native != "default" else [])
    out = []
    for capability in simd:
        for threads in ("1", "2"):
            if (capability, threads) != here:
                out.append({"ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": threads})
    return out


@pytest.mark.skipif(os.environ.get("UNMASK_KERNEL_PATH") == "1", reason="already a rerun")
@pytest.mark.parametrize(
    "path", _paths(), ids=lambda p: f"{p['ATEN_CPU_CAPABILITY'] or 'native'}-{p['OMP_NUM_THREADS']}t"
)
def test_every_kernel_path(path):
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, **path, "UNMASK_KERNEL_PATH": "1"}
    if not path["ATEN_CPU_CAPABILITY"]:
        env.pop("ATEN_CPU_CAPABILITY")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            str(tests / "decoding" / "test_invariance.py"),
            str(tests / "models" / "test_invariant.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tests.parent,
    )
    assert run.returncode == 0, f"under {path}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    assert " passed" in run.stdout
