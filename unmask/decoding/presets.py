"""Decoding policies, their registries, the named presets, and `build_decoder(cfg)`.

A preset is a dict of `DecodeConfig` field values; CLI flags override any of them. Registries
are dict literals from config names to the small policy objects.
"""

from __future__ import annotations

from dataclasses import fields, replace

from unmask.config import ConfigError, DecodeConfig
from unmask.decoding.decoder import Decoder
from unmask.decoding.inputs import BinaryInputs, Renoised, SoftInputs
from unmask.decoding.proposals import Greedy, Processed, Sample
from unmask.decoding.renoising import AdaptiveStop, Annealed, EntropyBound, RenoisingDecoder
from unmask.decoding.scores import Conv, Margin, MaxProb, NegEntropy, Random, TokenProb
from unmask.decoding.selectors import Ancestral, DreamSchedule, FirstHitting, Sequential, Threshold, TopN
from unmask.schedules import NoiseSchedule

SCORES = {
    "prob": TokenProb,
    "max-prob": MaxProb,
    "margin": Margin,
    "neg-entropy": NegEntropy,
    "random": Random,
}
INPUTS = {
    "binary": lambda cfg: BinaryInputs(),
    "soft": lambda cfg: SoftInputs(cfg.soft_schedule),
    "renoise": lambda cfg: Renoised(),
}

BD3 = dict(top_p_rule="within")  # the MDLM / BD3-LM reference's nucleus (when top_p < 1)
# Fast-dLLM's threshold rule: greedy, every position above 0.9 and at least the most confident one,
# each block until done, no EOS-fill
THRESHOLD = dict(
    proposal="greedy", score="prob", select="threshold", threshold=0.9, threshold_floor="one", eos_fill=False
)
# SDAR's and LLaDA2's loops: greedy (their temperature 0), the confidence of the softmax, the
# block's width split into fixed per-step counts, no EOS-fill
FIXED_COUNTS = dict(proposal="greedy", score="prob", step_counts="block", processing="sdar", eos_fill=False)

PRESETS: dict[str, dict[str, object]] = {
    # MDLM ancestral sampling over the whole canvas (Sahoo et al. 2024).
    "mdlm": dict(proposal="sample", select="ancestral", block_len=0, **BD3),
    # One uniformly random masked position per call (when steps = max_new_tokens, the default).
    "first-hitting": dict(proposal="sample", select="first-hitting", block_len=0, **BD3),
    # BD3-LM reference sampler: nucleus 0.9 (its rule), first-hitting, exact block KV cache.
    "bd3lm": dict(proposal="sample", top_p=0.9, select="first-hitting", **BD3),
    # MDLM ancestral inside semi-autoregressive blocks.
    "semi-ar": dict(proposal="sample", select="ancestral", block_len=32, **BD3),
    # LLaDA: greedy proposals, low-confidence remasking, fixed count per step, semi-AR blocks;
    # no EOS-fill (its reference loop has none).
    "llada": dict(proposal="greedy", score="prob", select="top-n", block_len=32, eos_fill=False),
    # Fast-dLLM: confidence threshold (at least one per step, each block until done), prefix KV
    # cache refreshed at block boundaries, no EOS-fill.
    "fast-dllm": dict(**THRESHOLD, block_len=32, cache="prefix"),
    # Fast-dLLM v2 (its model card: block 32 from the checkpoint, sub-blocks of 8, threshold 0.9):
    # a block's first token is the argmax of the previous block's last logit, then each sub-block is
    # decoded until done, every position above the threshold and at least the most confident one.
    "fast-dllm-v2": dict(**THRESHOLD, sub_block=8, ar_first_token=True),
    # Dream (Ye et al. 2025): whole canvas, Dream's count schedule, `entropy` ordering (its README's
    # choice), its `sample_tokens` order (temperature, top-p, top-k; confidences of the processed
    # softmax) and time grid linspace(1, 1e-3, S + 1); --decode.score prob | margin gives
    # maskgit_plus | topk_margin, --decode.select ancestral gives `origin`, --decode.alg_temp samples
    # the positions.
    "dream": dict(
        proposal="greedy",
        score="neg-entropy",
        select="dream",
        block_len=0,
        eos_fill=False,
        processing="dream",
        time_eps=1e-3,
    ),
    # SDAR's `block_diffusion_generate` as its README runs it: `low_confidence_dynamic` with threshold
    # 0.9 (every position above it, else the fixed count of the block's schedule), greedy (the
    # README's (G) setting; --decode.proposal sample gives its temperature / top-k / top-p draw).
    "sdar": dict(**FIXED_COUNTS, select="threshold", threshold=0.9, threshold_floor="budget"),
    # SDAR's `low_confidence_static`: the block's fixed count per step, most confident first
    # (--decode.select sequential: its `sequential`, leftmost first).
    "sdar-static": dict(**FIXED_COUNTS, select="top-n"),
    # LLaDA2's `generate()` with its model card's settings: threshold 0.95, else the fixed count of
    # the block's schedule; greedy, no cache (our exact block cache gives the same logits).
    "llada2": dict(**FIXED_COUNTS, select="threshold", threshold=0.95, threshold_floor="budget"),
    # DiffusionGemma's `generate()` defaults: canvases of uniform noise, 48 steps each, temperature
    # 0.8 -> 0.4, entropy bound 0.1, early stop at a stable argmax with mean entropy < 0.005.
    "diffusion-gemma": dict(
        proposal="sample",
        temperature=0.8,
        temperature_schedule="linear",
        temperature_end=0.4,
        select="entropy-bound",
        entropy_bound=0.1,
        inputs="renoise",
        block_steps=48,
        stop_confidence=0.005,
        stop_stable=1,
        eos_fill=False,
    ),
    # Top-k + global normalization (Seo et al. 2025), no locality.
    "topk-glob": dict(proposal="sample", top_k=20, select="ancestral", normalize=True, block_len=0),
    # Exact joint sampling (ADJUST's reference): one token per call, the lowest-entropy masked
    # position, its token sampled (set steps = max_new_tokens, the default).
    "exact-joint": dict(proposal="sample", score="neg-entropy", select="top-n", block_len=0),
    # ADJUST (Bansal & Sanghavi 2025): exact-joint with K = 4 commit rounds per full forward, the
    # distributions refreshed by a trained sampler layer (unmask sample --sampler DIR) between
    # rounds; `marginal` is the same without refresh. Any other preset takes --decode.rounds too.
    "adjust": dict(
        proposal="sample", score="neg-entropy", select="top-n", block_len=0, rounds=4, refresh="sampler"
    ),
    "marginal": dict(
        proposal="sample", score="neg-entropy", select="top-n", block_len=0, rounds=4, refresh="none"
    ),
    # Conv: top-k + Glob with the tanh(u_i) locality gate.
    "conv": dict(proposal="sample", top_k=20, select="ancestral", normalize=True, kernel=33, block_len=0),
    # Conv, ranked variant: sampled token's probability x gate, top-n per step.
    "conv-ranked": dict(proposal="sample", top_k=20, score="prob", select="top-n", kernel=33, block_len=0),
}


def preset_config(name: str, **overrides) -> DecodeConfig:
    """The preset's DecodeConfig with `overrides` applied on top."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(DecodeConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown decode field(s) {unknown}")
    return replace(DecodeConfig(), **{**PRESETS[name], **overrides, "preset": name})


def build_decoder(cfg: DecodeConfig, schedule: NoiseSchedule) -> Decoder:
    if cfg.select == "entropy-bound":
        annealed = Annealed(
            cfg.temperature, cfg.temperature_end, cfg.temperature_schedule == "linear", cfg.top_k, cfg.top_p
        )
        return RenoisingDecoder(
            annealed,
            SCORES["neg-entropy"](),
            EntropyBound(cfg.entropy_bound),
            INPUTS[cfg.inputs](cfg),
            stop=AdaptiveStop(cfg.stop_confidence, cfg.stop_stable),
        )
    truncation = dict(top_k=cfg.top_k, top_p=cfg.top_p, rule=cfg.top_p_rule)
    if cfg.processing != "unmask":
        propose = Processed(
            cfg.processing, greedy=cfg.proposal == "greedy", temperature=cfg.temperature, **truncation
        )
    elif cfg.proposal == "greedy":
        propose = Greedy(**truncation)
    else:
        propose = Sample(temperature=cfg.temperature, **truncation)
    score = SCORES[cfg.score]()
    if cfg.kernel:
        score = Conv(score, cfg.kernel)
    counts = cfg.step_counts
    select = {
        "ancestral": lambda: Ancestral(schedule, normalize=cfg.normalize, eps=cfg.time_eps),
        "first-hitting": lambda: FirstHitting(counts),
        "top-n": lambda: TopN(counts),
        "sequential": lambda: Sequential(counts),
        "threshold": lambda: Threshold(cfg.threshold, cfg.threshold_floor, counts),
        "dream": lambda: DreamSchedule(eps=cfg.time_eps, alg_temp=cfg.alg_temp),
    }[cfg.select]()
    return Decoder(propose, score, select, INPUTS[cfg.inputs](cfg), sub_block=cfg.sub_block)
