"""Configuration: frozen, keyword-only dataclasses, one per concern, nested in `Config`.

Configs hold names (strings) that builders resolve through registry dicts, so a config always
serialises to TOML/JSON and back. Files are TOML; command-line overrides are
`--section.field=value` (parsed by `tyro`). Unknown keys, wrong types and inconsistent values
are errors that name the offending flag. Reading and writing them is `config_io.py`; how to
decode (`DecodeConfig`, the largest section) lives in `decode_config.py`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unmask.config_check import ConfigError, _check
from unmask.decode_config import DecodeConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DecodeConfig",
    "DistConfig",
    "EvalConfig",
    "InstructConfig",
    "LoraConfig",
    "ModelConfig",
    "NoiseConfig",
    "SoftMaskConfig",
    "TrainConfig",
    "replace",
]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    corpus: str = "stdlib"
    """Corpus: `stdlib` (embedded), a .txt/.jsonl(.gz)/.parquet/.arrow file or a directory of them,
    `hf:ORG/NAME[:CONFIG][@SPLIT]` (a Hub dataset), or `hf:DIR` (a `save_to_disk` folder or a folder
    of data files)."""
    text_field: str = "text"
    """The text column of .jsonl files and Hugging Face datasets."""
    seq_len: int = 256
    """Tokens per training row (L)."""
    packing: Literal["wrap", "pad"] = "wrap"
    """`wrap`: join documents with BOS/EOS and cut exact rows; `pad`: one document per row."""
    txt_documents: Literal["auto", "file", "blank_lines", "chunks"] = "auto"
    """How .txt files split into documents: auto = chunks for a single file, file for a directory;
    file = whole files; blank_lines = paragraphs; chunks = runs of paragraphs of >= 4096 characters."""
    valid_fraction: float = 0.01
    """Fraction of documents (by stable hash) held out for validation."""
    test_fraction: float = 0.01
    """Fraction of documents (by stable hash) held out for test."""
    tokenizer: str = "bpe"
    """`bpe` trains a byte-level BPE on the training split; otherwise a local HF tokenizer directory."""
    vocab_size: int = 4096
    """Vocabulary size of the trained BPE (special tokens included)."""
    bpe_chars: int = 100_000_000
    """The BPE trains on about this many characters of the training split: all of it when smaller,
    else documents sampled by a hash of their key (its memory grows with what it reads)."""
    num_proc: int = 1
    """Processes that tokenize the corpus (1: this one; the tokenizer itself uses every core)."""
    streaming: bool = False
    """Read `hf:` datasets as a stream (nothing downloaded or converted whole)."""
    cache_dir: str = ""
    """Where tokenizers and tokenized corpora are cached (empty: $XDG_CACHE_HOME/unmask, by default
    ~/.cache/unmask, so runs from any directory share it)."""

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "unmask"

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(self.bpe_chars >= 1, "data.bpe_chars", f"must be >= 1, got {self.bpe_chars}")
        _check(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        _check(self.vocab_size >= 260, "data.vocab_size", f"must be >= 260, got {self.vocab_size}")
        for name in ("valid_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0.0 < v < 0.5, f"data.{name}", f"must be in (0, 0.5), got {v}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    attention: Literal["bidirectional", "block_causal", "causal"] = "block_causal"
    """bidirectional = MDLM, block_causal = BD3-LM with blocks of `block_size`, causal = AR."""
    block_size: int = 16
    """Block size L' for block-causal attention (ignored by the other kinds)."""
    dim: int = 256
    """Hidden width D."""
    n_layers: int = 4
    """Number of transformer layers."""
    n_heads: int = 4
    """Attention heads H (dim must be divisible by it)."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """Feed-forward kind."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of dim (SwiGLU uses 2/3 of it per branch)."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output."""
    rope_base: float = 10000.0
    """Rotary embedding base."""
    kv_heads: int = 0
    """Key/value heads (grouped-query attention; 0 = n_heads). Fewer shrink the KV cache."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before rotary (Qwen3 / SDAR layers)."""
    norm_eps: float | None = None
    """RMSNorm epsilon (None: the compute dtype's machine epsilon, as older checkpoints)."""

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.n_heads

    def __post_init__(self) -> None:
        _check(
            self.kv_heads >= 0 and self.n_heads % self.n_kv_heads == 0,
            "model.kv_heads",
            f"must be 0 (= n_heads) or divide n_heads={self.n_heads}, got {self.kv_heads}",
        )
        _check(
            self.norm_eps is None or self.norm_eps > 0, "model.norm_eps", f"must be > 0, got {self.norm_eps}"
        )
        _check(
            self.dim > 0 and self.dim % self.n_heads == 0,
            "model.dim",
            f"must be positive and divisible by n_heads={self.n_heads}, got {self.dim}",
        )
        _check((self.dim // self.n_heads) % 2 == 0, "model.n_heads", "head dim must be even (rotary)")
        _check(self.n_layers >= 1, "model.n_layers", f"must be >= 1, got {self.n_layers}")
        _check(self.block_size >= 1, "model.block_size", f"must be >= 1, got {self.block_size}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")

    @property
    def objective(self) -> str:
        """The loss a model of this attention kind trains with: mdlm, bd3lm or ar."""
        return {"bidirectional": "mdlm", "block_causal": "bd3lm", "causal": "ar"}[self.attention]


@dataclass(frozen=True, kw_only=True)
class NoiseConfig:
    schedule: Literal["loglinear", "linear", "cosine"] = "loglinear"
    """Noise schedule alpha(t)."""
    eps: float = 1e-3
    """Times are drawn in [eps, 1]."""
    clip: tuple[float, float] = (0.0, 1.0)
    """Training range [beta, omega] of t (= mask rate for loglinear); evaluation always uses [eps, 1]."""
    clip_search: bool = False
    """Re-choose `clip` at every validation round by minimising per-block loss variance."""
    clip_widths: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    """Interval widths of the search grid (the full range [0, 1] is always a candidate too)."""
    clip_grid_step: float = 0.05
    """Spacing of interval starts in the search grid."""
    clip_search_batches: int = 4
    """Validation batches per candidate interval (the paper uses up to 100)."""
    resample: bool = False
    """Redraw a block's mask until its masked fraction lies inside `clip`."""
    resample_tries: int = 16
    """Retry cap for `resample`; blocks still outside after it keep their last draw."""

    def __post_init__(self) -> None:
        _check(0.0 < self.eps < 0.5, "noise.eps", f"must be in (0, 0.5), got {self.eps}")
        lo, hi = self.clip
        _check(0.0 <= lo < hi <= 1.0, "noise.clip", f"needs 0 <= beta < omega <= 1, got {self.clip}")
        _check(self.clip_search_batches >= 1, "noise.clip_search_batches", "must be >= 1")
        _check(self.resample_tries >= 1, "noise.resample_tries", "must be >= 1")
        _check(
            all(0.0 < w <= 1.0 for w in self.clip_widths),
            "noise.clip_widths",
            f"widths must be in (0, 1], got {self.clip_widths}",
        )
        _check(0.0 < self.clip_grid_step <= 0.5, "noise.clip_grid_step", "must be in (0, 0.5]")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup: int = 50
    """Linear warm-up steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine decay to 10% of lr at `steps`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    ema: float = 0.0
    """EMA decay of the weights (0 disables; the reference uses 0.9999 at GPU scale)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: auto = bf16 on GPUs and CPUs with native bf16 (AMX / AVX-512 BF16), else fp32."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 0
    """Seeds data order, noise and dropout; a run is a function of (config, seed)."""
    eval_every: int = 100
    """Validation (and clip search) every N steps; 0 only at the end. Validation is `unmask eval ppl`'s
    estimator on the validation split with the [eval] settings (mc_samples, max_rows, seed)."""
    save_every: int = 100
    """Checkpoint every N steps (and always at the end); every checkpoint's weights are kept."""
    keep_optimizer: int = 1
    """Optimizer states kept: only the newest N checkpoints keep optimizer.pt (what --resume needs)."""
    out: str = "runs/unnamed"
    """Run directory: checkpoints, config and metrics.jsonl."""
    loggers: tuple[str, ...] = ()
    """Experiment trackers beside metrics.jsonl (always written): any of tensorboard, wandb, mlflow
    (`--train.loggers tensorboard,wandb`; extra `[track]`)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.loggers) - {"jsonl", "tensorboard", "wandb", "mlflow"})
        _check(
            not unknown,
            "train.loggers",
            f"unknown logger(s) {unknown}; choose from tensorboard, wandb, mlflow",
        )
        for name in ("steps", "batch_size", "grad_accum", "keep_optimizer"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup >= 0, "train.warmup", "must be >= 0")
        _check(0.0 <= self.ema < 1.0, "train.ema", f"must be in [0, 1), got {self.ema}")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(
            self.eval_every >= 0,
            "train.eval_every",
            f"must be >= 0 (0: only at the end), got {self.eval_every}",
        )
        _check(self.save_every >= 1, "train.save_every", f"must be >= 1, got {self.save_every}")


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    """Under torchrun: ddp (replicated model) or fsdp (FSDP2, fully_shard per block); none = one process."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations during backward (less memory, more compute)."""
    consolidate: bool = True
    """fsdp: also write a consolidated model.safetensors beside the sharded checkpoint (other commands)."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA adapters (via `peft`) on a frozen pretrained base (`unmask train --init DIR`)."""

    r: int = 0
    """Adapter rank (0 = no LoRA: only the new modules, e.g. soft-mask scalars, train)."""
    alpha: float = 16.0
    """LoRA scaling numerator (updates are scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    targets: tuple[str, ...] = ()
    """Module names to adapt; empty = the attention projections (q/k/v/o_proj; qkv/out for DiT)."""

    def __post_init__(self) -> None:
        _check(self.r >= 0, "lora.r", f"must be >= 0, got {self.r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")


@dataclass(frozen=True, kw_only=True)
class SoftMaskConfig:
    """Soft-masking (Hersche et al. 2026): masked inputs blended with the previous pass's top-k."""

    k: int = 0
    """Top-k predictions mixed into a masked input (0 = binary masking, no soft-mask module)."""
    p: float = 0.8
    """Per-batch probability of the two-pass soft-masked training step (0.8 language, 0.5 code)."""
    lr: float = 1e-2
    """Learning rate of the three scalars (their own optimizer group, no weight decay)."""
    init: Literal["ours", "reference"] = "ours"
    """Initial w_s: ours = 0.05 (soft inputs matter from the first step); reference = 1e-6 (the
    authors' code: training starts from plain masks and learns how much to blend)."""

    def __post_init__(self) -> None:
        _check(self.k >= 0, "soft_mask.k", f"must be >= 1 (or 0 for off), got {self.k}")
        _check(0.0 <= self.p <= 1.0, "soft_mask.p", f"must be in [0, 1], got {self.p}")
        _check(self.lr > 0, "soft_mask.lr", f"must be > 0, got {self.lr}")


@dataclass(frozen=True, kw_only=True)
class InstructConfig:
    """Instruction tuning (SFT) and rejective fine-tuning (R2FT, Seo et al. 2025) on prompt/response
    pairs; `stage = none` is ordinary pre-training on `data.corpus`."""

    stage: Literal["none", "sft", "r2ft"] = "none"
    """none: pre-training; sft: diffusion loss on response tokens only; r2ft: the rejection loss."""
    data: str = "stdlib-functions"
    """Pairs: `stdlib-functions[:mod,...]` (embedded), an Alpaca .json/.jsonl or chat `messages`
    .jsonl file, or `hf:ORG/NAME[:CONFIG]`."""
    template: str = "auto"
    """Prompt template from unmask/templates.toml (alpaca, plain, chat, code); auto: code for
    stdlib-functions, alpaca otherwise."""
    eos: Literal["tail", "all", "first"] = "tail"
    """Row tail after the answer: tail = [EOS] to the end, masked like the answer but only the
    answer and its first [EOS] scored (the Conv/R2FT authors' SFT rows); all = [EOS] to the end,
    every one scored (LLaDA); first = one [EOS] scored, then [PAD] (never masked)."""
    max_prompt: int = 0
    """Drop pairs whose prompt (with [BOS]) exceeds this many tokens (0 = half the row)."""
    unit: tuple[int, int] = (1, 14)
    """R2FT: the repetition unit g is drawn uniformly from this inclusive range of tokens."""
    span: tuple[int, int] = (30, 49)
    """R2FT: the rejected span length z is drawn uniformly from this inclusive range."""
    b_w: float = 1.0
    """R2FT: weight of the chosen mean log-probability inside the sigmoid."""
    b_l: float = 1.0
    """R2FT: weight of the rejected mean log-probability inside the sigmoid."""
    gamma: float = 0.0
    """R2FT: margin subtracted inside the sigmoid."""
    b_a: float = 0.1
    """R2FT: weight of the plain likelihood term on the chosen answer."""

    def __post_init__(self) -> None:
        for name in ("unit", "span"):
            lo, hi = getattr(self, name)
            _check(1 <= lo <= hi, f"instruct.{name}", f"needs 1 <= low <= high, got {(lo, hi)}")
        _check(self.max_prompt >= 0, "instruct.max_prompt", f"must be >= 0, got {self.max_prompt}")
        _check(
            self.b_w >= 0 and self.b_l >= 0 and self.b_a >= 0, "instruct.b_w", "b_w, b_l and b_a must be >= 0"
        )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    mc_samples: int = 4
    """Monte Carlo time samples per row for the NELBO bound (AR is exact and ignores it); training's
    validation and `unmask eval ppl` both use it."""
    batch_size: int = 16
    """Rows per evaluation batch."""
    max_rows: int = 0
    """Evaluate the first N rows of the split (0 = all); training's validation and `eval ppl` both."""
    split: Literal["validation", "test"] = "test"
    """Which held-out split `unmask eval ppl` reads."""
    seed: int = 1234
    """Seed of the evaluation noise, so numbers are repeatable."""

    def __post_init__(self) -> None:
        _check(self.mc_samples >= 1, "eval.mc_samples", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_rows >= 0, "eval.max_rows", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    soft_mask: SoftMaskConfig = field(default_factory=SoftMaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        _check(
            self.instruct.stage != "r2ft" or self.model.attention == "bidirectional",
            "instruct.stage",
            "r2ft needs a bidirectional (MDLM) model: its one forward masks everything after the cut, "
            "which a block-causal model's clean-context pass cannot express without showing later "
            "blocks the answer",
        )
        _check(
            self.instruct.stage == "none" or self.model.attention != "causal",
            "instruct.stage",
            "sft/r2ft are diffusion post-training; an AR model has no masked positions",
        )
        _check(
            self.soft_mask.k <= self.data.vocab_size,
            "soft_mask.k",
            f"must be <= the vocabulary size {self.data.vocab_size}, got {self.soft_mask.k}",
        )
        _check(
            self.soft_mask.k == 0 or self.model.attention != "causal",
            "soft_mask.k",
            "soft-masking needs a diffusion model (bidirectional or block_causal attention)",
        )
        if self.model.attention == "block_causal":
            _check(
                self.data.seq_len % self.model.block_size == 0,
                "model.block_size",
                f"data.seq_len={self.data.seq_len} is not divisible by block_size={self.model.block_size}",
            )


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` re-exported so callers need one import for configs."""
    return dataclasses.replace(cfg, **changes)
