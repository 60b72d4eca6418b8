"""The pretrained families: how to recognise each from `config.json`, and its conventions.

A family fixes what decoders must never see: the attention kind (and block size L'), whether the
logit at position i predicts token i+1 (`shift`), the mask id when the config does not say, the
stop tokens, and which native transformers class carries the weights (facts from
`docs/CHECKPOINTS.md`-style sources: the models' own configs and reference loops).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PretrainedError(ValueError):
    """A pretrained directory cannot be used; the message names the file or field."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values (lower-cased)
    architectures: tuple[str, ...]
    backbone: str  # llama (LLaDA's names) | llama_hf | qwen2 | qwen3 | glm4_moe | dit
    attention: str  # bidirectional | block_causal | causal
    block_key: str | None = None  # config field holding L' (block-causal families)
    block_default: int = 0
    shift: bool = False  # logit i predicts token i+1 (Dream, Fast-dLLM v2)
    mask_id: int | None = None  # when config.json has no mask_token_id (None: vocab - 1) ...
    mask_token: str | None = None  # ... unless the tokenizer has this token
    stop_tokens: tuple[str, ...] = ()  # end-of-text / end-of-turn tokens an answer stops at
    prepend_bos: bool = False  # raw prompts start with the tokenizer's BOS
    preset: str = "llada"  # the decoder its authors use
    tokenizer_shipped: bool = True
    # absorbing ([MASK]) or uniform: canvases of random tokens re-noised each step (DiffusionGemma,
    # whose mask id is the virtual V, one past the vocabulary)
    noising: str = "absorbing"


FAMILIES = (
    Family(
        "llada",
        ("llada",),
        ("LLaDAModelLM",),
        "llama",
        "bidirectional",
        mask_id=126336,
        mask_token="<|mdm_mask|>",
        stop_tokens=("<|endoftext|>", "<|eot_id|>"),
        prepend_bos=True,
    ),
    Family(
        "dream",
        ("dream",),
        ("DreamModel",),
        "qwen2",
        "bidirectional",
        shift=True,
        mask_id=151666,
        mask_token="<|mask|>",
        stop_tokens=("<|endoftext|>", "<|im_end|>"),
        prepend_bos=True,
        preset="dream",
    ),
    Family(
        "sdar",
        ("sdar",),
        ("SDARForCausalLM",),
        "qwen3",
        "block_causal",
        block_key="block_size",
        block_default=4,
        mask_id=151669,
        mask_token="<|MASK|>",
        stop_tokens=("<|endoftext|>", "<|im_end|>"),
        preset="sdar",
    ),
    Family(
        "fast-dllm-v2",
        ("fast_dllm_qwen",),
        ("Fast_dLLM_QwenForCausalLM",),
        "qwen2",
        "block_causal",
        block_key="bd_size",
        block_default=32,
        shift=True,
        mask_id=151665,
        mask_token="|<MASK>|",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        preset="fast-dllm-v2",
    ),
    Family(
        "llada2",
        ("llada2_moe",),
        ("LLaDA2MoeModelLM",),
        "glm4_moe",
        "block_causal",
        block_key="block_length",
        block_default=32,
        mask_id=156895,
        mask_token="<|mask|>",
        stop_tokens=("<|endoftext|>", "<|role_end|>"),
        preset="llada2",
    ),
    Family(
        "mdlm",
        ("mdlm",),
        ("MDLM",),
        "dit",
        "bidirectional",
        stop_tokens=("<|endoftext|>",),
        prepend_bos=True,
        preset="mdlm",
        tokenizer_shipped=False,
    ),
    Family(
        "bd3lm",
        ("bd3lm",),
        ("BD3LM",),
        "dit",
        "block_causal",
        block_key="block_size",
        block_default=4,
        stop_tokens=("<|endoftext|>",),
        prepend_bos=True,
        preset="bd3lm",
        tokenizer_shipped=False,
    ),
    Family(
        "diffusion-gemma",
        ("diffusion_gemma",),
        ("DiffusionGemmaForBlockDiffusion",),
        "diffusion_gemma",
        "block_causal",
        block_key="canvas_length",
        block_default=256,
        stop_tokens=("<eos>", "<end_of_turn>", "<turn|>"),
        prepend_bos=True,
        preset="diffusion-gemma",
        noising="uniform",
    ),
    # causal LMs in transformers' own layouts: AR baselines, and where `unmask export` writes AR runs
    Family(
        "llama",
        ("llama",),
        ("LlamaForCausalLM",),
        "llama_hf",
        "causal",
        stop_tokens=("<|end_of_text|>", "<|eot_id|>"),
        prepend_bos=True,
        preset="mdlm",
    ),
    Family(
        "qwen3",
        ("qwen3",),
        ("Qwen3ForCausalLM",),
        "qwen3",
        "causal",
        stop_tokens=("<|endoftext|>", "<|im_end|>"),
        preset="mdlm",
    ),
)


def supported() -> str:
    return ", ".join(f"{f.name} (model_type {f.model_types[0]!r})" for f in FAMILIES)


def read_config(path: str | Path) -> dict[str, Any]:
    """The directory's `config.json` as a dict; a clear error when it is missing or unreadable."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise PretrainedError(f"{path} has no config.json (expected a Hugging Face model directory)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"cannot read {file}: {e}") from e
    if not isinstance(raw, dict):
        raise PretrainedError(f"{file} is not a JSON object")
    return raw


def detect(raw: dict[str, Any], where: str | Path = "config.json") -> Family:
    """The family of a parsed config.json (by `model_type`, then `architectures`)."""
    model_type = str(raw.get("model_type", "")).lower()
    archs = tuple(raw.get("architectures") or ())
    for family in FAMILIES:
        if model_type in family.model_types or any(a in family.architectures for a in archs):
            return family
    raise PretrainedError(
        f"{where}: model_type {raw.get('model_type')!r} (architectures {list(archs)}) "
        f"is not a supported diffusion LM; supported: {supported()}"
    )


def mask_id(family: Family, raw: dict[str, Any], vocab_size: int) -> int:
    """config.json's mask_token_id, else the family's (MDLM/BD3-LM: the last id); a uniform-noise
    family's is the virtual V (it has none)."""
    if family.noising == "uniform":
        return vocab_size
    value = raw.get("mask_token_id", family.mask_id)
    return vocab_size - 1 if value is None else int(value)


def vocab_size(raw: dict[str, Any]) -> int | None:
    """config.json's vocabulary (LLaDA's padded `embedding_size`; a multimodal config's text part)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    return int(raw.get("embedding_size") or raw.get("vocab_size") or text.get("vocab_size") or 0) or None


def block_size(family: Family, raw: dict[str, Any]) -> int:
    if family.attention != "block_causal":
        return 1
    return int(raw.get(family.block_key, family.block_default) or family.block_default)


def require(raw: dict[str, Any], where: str, field: str, allowed, why: str) -> None:
    """Refuse a config value the native class cannot express, naming the field."""
    if field in raw and raw[field] not in allowed:
        raise PretrainedError(
            f"{where}: {field}={raw[field]!r} is not supported ({why}); "
            f"supported: {sorted(map(repr, allowed))}"
        )
