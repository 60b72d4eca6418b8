"""`DecodeConfig`: how to decode - the fields a preset fills and every flag can override.

A section of `Config` (`--decode.*`); its values are checked here, its cross-field checks against a
model and a tokenizer in `decoding/plan.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unmask.config_check import _check


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How to decode. A preset (see `unmask.decoding.PRESETS`) fills these; flags override it."""

    preset: str = "mdlm"
    """Named preset whose values are the defaults of every field below."""
    proposal: Literal["greedy", "sample"] = "sample"
    """How a candidate token is drawn: argmax, or a categorical draw (float64)."""
    temperature: float = 1.0
    """Softmax temperature of the proposal (sample only); with `temperature_schedule linear`, the
    first step's."""
    temperature_schedule: Literal["constant", "linear"] = "constant"
    """`linear`: the temperature falls from `temperature` at a block's first step to
    `temperature_end` in equal parts, T_k = end + (temperature - end) (S - k) / S at step k of S
    (DiffusionGemma's schedule, t_max 0.8 -> t_min 0.4)."""
    temperature_end: float = 0.4
    """The `linear` schedule's limit (reached just after a block's last step)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens with this much probability (1 = all)."""
    top_p_rule: Literal["crossing", "within"] = "crossing"
    """Which tokens top-p keeps: `crossing` = every token whose preceding mass is <= top_p, so the
    token that crosses top_p is kept (Dream, SDAR, transformers); `within` = the tokens whose
    inclusive cumulative probability is <= top_p, at least the most likely (the BD3-LM / MDLM
    reference's nucleus)."""
    processing: Literal["unmask", "dream", "sdar"] = "unmask"
    """How a proposal's distribution is made, and which distribution scores read. `unmask`: top-k /
    top-p truncate the model's distribution, the temperature then tempers the candidates, scores
    read the model's (temperature 1, untruncated) distribution. `dream`: logits / temperature, then
    top-p, then top-k; `sdar` (also LLaDA2): logits / temperature, top-k, then top-p of the
    renormalised top-k; both score the processed distribution ([MASK] stays in it for the families
    that keep it). Greedy `sdar` ranks by the untruncated softmax (LLaDA2 at temperature 0)."""
    score: Literal["prob", "max-prob", "margin", "neg-entropy", "random"] = "prob"
    """Confidence: the proposed token's probability, the max probability, the top-2 margin, -H, or
    a uniform draw (LLaDA's `random` remasking)."""
    kernel: int = 0
    """Conv decoding: odd width of the locality window (0 = off)."""
    select: Literal[
        "ancestral", "first-hitting", "top-n", "threshold", "dream", "sequential", "entropy-bound"
    ] = "ancestral"
    """Which masked positions to commit per step (`dream`: Dream's count int(R (1 - s/t)) on
    linspace(1, time_eps, S+1), the most confident or, with `alg_temp`, sampled; `sequential`: the
    leftmost, SDAR's; `entropy-bound`: uniform-noise models (DiffusionGemma) - every step accepts
    the lowest-entropy positions within `entropy_bound` and re-noises the rest, nothing is final
    until the block stops)."""
    entropy_bound: float = 0.1
    """`entropy-bound` selector: accept the k lowest-entropy positions with
    sum(H_1..H_k) - max(H_1..H_k) <= this (at least one)."""
    stop_confidence: float = 0.0
    """`entropy-bound` selector: a block stops early once its argmax is stable (`stop_stable`
    steps) and its mean entropy is below this (0 = run every step)."""
    stop_stable: int = 1
    """Steps the argmax canvas must stay the same for the early stop (0 = no stability test)."""
    alg_temp: float = 0.0
    """`dream` selector: > 0 samples the positions from softmax(confidence / alg_temp) (Dream's
    alg_temp) instead of taking the most confident."""
    ban_stop: bool = False
    """Every stop id's logit (EOS and end of turn) is -inf: answers use the whole budget (stricter
    than LLaDA's `logits_eos_inf`, which bans EOS alone)."""
    defer_stop: bool = False
    """Proposals of any stop id get confidence -inf: committed only where nothing else is left
    (stricter than LLaDA's `confidence_eos_eot_inf`)."""
    logits_eos_inf: bool = False
    """LLaDA's knob: the EOS logit alone is -inf before the proposal (end of turn stays)."""
    confidence_eos_eot_inf: bool = False
    """LLaDA's knob, as its loop runs it: once the proposal is chosen, the confidence softmax drops
    end of turn (and EOS too for greedy proposals, where LLaDA's noised logits are the logits), so
    those proposals score 0 and the others are renormalised."""
    cfg_scale: float = 0.0
    """Classifier-free guidance (LLaDA): logits un + (s + 1)(cond - un), the prompt masked in the
    unconditional copy; 0 = off. Needs `cache none`."""
    normalize: bool = False
    """Ancestral only: global normalization of the unmask rate (top-k + Glob, Conv)."""
    threshold: float = 0.9
    """`threshold` selector: commit every position whose confidence exceeds this."""
    threshold_floor: Literal["one", "budget"] = "one"
    """`threshold` selector's minimum per step: `one` = the most confident position, decoding each
    block until it is done and ignoring `steps` (Fast-dLLM); `budget` = the count `steps` implies."""
    steps: int = 64
    """Denoising steps for `max_new_tokens` tokens; each block gets its share."""
    block_steps: int = 0
    """Denoising steps per block (block-causal models), whatever `max_new_tokens` is (DiffusionGemma's
    `max_denoising_steps`); 0 = the block's share of `steps`."""
    step_counts: Literal["remaining", "block"] = "remaining"
    """Counted selectors' count at step k of S: `remaining` = ceil(R / (S - k)) of the R masks left
    (LLaDA); `block` = the window's width split evenly over the S steps, remainder to the first
    steps, whatever was committed before (SDAR, LLaDA2), at most the masks left."""
    time_eps: float = 0.0
    """The reverse-time grid runs from 1 down to this (Dream's `eps`, 1e-3), for the ancestral
    selector's rates and the `dream` count."""
    block_len: int = 0
    """Semi-AR block length for bidirectional models (0 = the whole canvas); block-causal models
    always use their own block size."""
    sub_block: int = 0
    """Decode each block in sub-blocks of this width, left to right: only the leftmost sub-block
    with masks left is eligible (Fast-dLLM v2's `small_block_size`; 0 = the whole block)."""
    ar_first_token: bool = False
    """Shifted block-causal models (Fast-dLLM v2): a block's first token is the argmax of the
    previous block's last logit, committed before the block's first step, as its reference loop
    does (a block holding the prompt's tail keeps it)."""
    cache: Literal["auto", "none", "prefix", "dual"] = "auto"
    """KV cache. auto: exact for block-causal/causal models, none for bidirectional ones; prefix /
    dual: Fast-dLLM caches for bidirectional models (approximate; for block-causal models prefix
    is the exact cache); none: recompute the whole sequence every call."""
    max_new_tokens: int = 64
    """Tokens to generate (the canvas for bidirectional models, the cap for block/AR models)."""
    min_new_tokens: int = 0
    """No stop token (EOS, end of turn) among the first this many generated positions."""
    eos_fill: bool = True
    """Full-canvas decoding: once [EOS] is decoded, every position right of it becomes [EOS]."""
    stop_entropy: float = 0.0
    """Block decoding: stop a row when the unigram entropy (nats) of its last 256 tokens falls
    below this (0 = never)."""
    inputs: Literal["binary", "soft", "renoise"] = "binary"
    """What still-masked positions feed the model: the [MASK] embedding, the soft-mask blend
    of the previous call's predictions (needs a model trained with --soft-mask.k), or (`renoise`,
    uniform-noise models) fresh uniform random tokens, with the previous step's processed logits
    as the model's self-conditioning input."""
    rounds: int = 1
    """Commit rounds per full forward (ADJUST's K tokens per forward): the decoder steps this many
    times on one forward's output, `refresh` updating the distributions in between. `steps`
    counts rounds, so a block of S steps costs ceil(S / rounds) forwards."""
    refresh: Literal["none", "sampler", "model"] = "none"
    """Between two rounds: nothing (the marginal baseline), the ADJUST sampler layer (`--sampler
    DIR`), or a new full forward (exact, as rounds = 1; a check, it saves nothing)."""
    soft_schedule: Literal["none", "linear", "stepwise"] = "none"
    """Soft inputs: scale w_s by 1, by the masked fraction, or by (masked fraction > 1/2)."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "decode.steps", f"must be >= 1, got {self.steps}")
        _check(self.max_new_tokens >= 1, "decode.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "decode.min_new_tokens",
            f"must be in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_new_tokens}",
        )
        _check(self.temperature > 0, "decode.temperature", f"must be > 0, got {self.temperature}")
        _check(self.top_k >= 0, "decode.top_k", f"must be >= 0, got {self.top_k}")
        _check(0 < self.top_p <= 1, "decode.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(
            self.kernel == 0 or (self.kernel > 0 and self.kernel % 2 == 1),
            "decode.kernel",
            f"must be 0 (off) or a positive odd width, got {self.kernel}",
        )
        _check(0 <= self.threshold <= 1, "decode.threshold", f"must be in [0, 1], got {self.threshold}")
        _check(self.block_len >= 0, "decode.block_len", f"must be >= 0, got {self.block_len}")
        _check(self.sub_block >= 0, "decode.sub_block", f"must be >= 0, got {self.sub_block}")
        _check(self.stop_entropy >= 0, "decode.stop_entropy", "must be >= 0")
        _check(self.rounds >= 1, "decode.rounds", f"must be >= 1, got {self.rounds}")
        _check(0 <= self.time_eps < 1, "decode.time_eps", f"must be in [0, 1), got {self.time_eps}")
        _check(self.block_steps >= 0, "decode.block_steps", f"must be >= 0, got {self.block_steps}")
        _check(self.entropy_bound > 0, "decode.entropy_bound", f"must be > 0, got {self.entropy_bound}")
        _check(self.stop_confidence >= 0, "decode.stop_confidence", "must be >= 0")
        _check(self.stop_stable >= 0, "decode.stop_stable", f"must be >= 0, got {self.stop_stable}")
        if self.temperature_schedule == "linear":
            _check(
                0 <= self.temperature_end < self.temperature,
                "decode.temperature_end",
                f"must be in [0, temperature = {self.temperature}) for the linear schedule, "
                f"got {self.temperature_end}",
            )
