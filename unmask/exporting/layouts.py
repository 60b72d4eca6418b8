"""Export formats: each a pretrained family's `config.json` schema and weight names, written from
our backbone's state dict.

Our backbone (`unmask.models.transformer`) is a Llama-style pre-norm stack: fused q/k/v rows
(H query heads, then Hkv key and Hkv value heads of Dh), rotary on the two halves of each head
(transformers' `rotate_half`), SwiGLU with the gate first, RMSNorm, an untied head. So:

- `llada` (bidirectional runs): LLaDA's OLMo-style names (`model.transformer.blocks.N.q_proj`, ...).
- `sdar` (block-causal runs with `--model.qk_norm`): Qwen3 layers (per-head q/k RMSNorm), SDAR's
  `block_size` and mask id.
- `llada2` (block-causal runs): LLaDA2's layout with every layer dense (`first_k_dense_replace` =
  layers), the fused `query_key_value` exactly our rows, q/k norms when the run has them.
- `llama` / `qwen3` (AR runs): the causal-LM classes of transformers, `mask_token_id` carried along.

A run a format cannot express is refused naming the field that stops it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from unmask.config import Config


class ExportError(ValueError):
    """A run cannot be written in the asked format; the message names the field."""


@dataclass(frozen=True)
class Shape:
    """What every format reads off a run."""

    attention: str
    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int  # SwiGLU branch width (Llama's intermediate_size)
    vocab: int
    block: int
    rope_base: float
    eps: float
    qk_norm: bool
    max_len: int
    mask_id: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None


def shape_of(model, config: Config, tokenizer) -> Shape:
    m = config.model
    hidden = model.blocks[0].mlp.down.in_features
    eps = m.norm_eps if m.norm_eps is not None else float(torch.finfo(torch.float32).eps)
    return Shape(
        attention=m.attention,
        layers=m.n_layers,
        dim=m.dim,
        heads=m.n_heads,
        kv_heads=m.n_kv_heads,
        head_dim=m.dim // m.n_heads,
        hidden=hidden,
        vocab=model.vocab_size,
        block=m.block_size,
        rope_base=float(m.rope_base),
        eps=eps,
        qk_norm=m.qk_norm,
        max_len=config.data.seq_len,
        mask_id=model.mask_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )


def _per_layer(state: dict[str, torch.Tensor], s: Shape) -> list[dict[str, torch.Tensor]]:
    """Our layer tensors by role: q, k, v, o, gate, up, down, attn_norm, mlp_norm (, q_norm, k_norm)."""
    out = []
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for i in range(s.layers):
        p = f"blocks.{i}."
        wq, wk, wv = state[p + "attn.qkv.weight"].split([q, kv, kv])
        gate, up = state[p + "mlp.up.weight"].split([s.hidden, s.hidden])
        layer = {
            "q": wq, "k": wk, "v": wv, "qkv": state[p + "attn.qkv.weight"], "o": state[p + "attn.out.weight"],
            "gate": gate, "up": up, "down": state[p + "mlp.down.weight"],
            "attn_norm": state[p + "norm1.weight"], "mlp_norm": state[p + "norm2.weight"],
        }  # fmt: skip
        if s.qk_norm:
            layer["q_norm"], layer["k_norm"] = (
                state[p + "attn.q_norm.weight"],
                state[p + "attn.k_norm.weight"],
            )
        out.append(layer)
    return out


def _common_ids(s: Shape) -> dict[str, Any]:
    return {
        "bos_token_id": s.bos_id,
        "eos_token_id": s.eos_id,
        "pad_token_id": s.pad_id,
        "mask_token_id": s.mask_id,
    }


# ---- llada ------------------------------------------------------------------------------------------
def _llada_config(s: Shape) -> dict[str, Any]:
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": s.dim,
        "n_layers": s.layers,
        "n_heads": s.heads,
        "n_kv_heads": s.kv_heads,
        "mlp_hidden_size": s.hidden,
        "mlp_ratio": s.hidden / s.dim,
        "vocab_size": s.vocab,
        "embedding_size": s.vocab,
        "max_sequence_length": s.max_len,
        "rope_theta": s.rope_base,
        "rms_norm_eps": s.eps,
        "block_type": "llama",
        "activation_type": "silu",
        "layer_norm_type": "rms",
        "rope": True,
        "include_bias": False,
        "include_qkv_bias": False,
        "bias_for_layer_norm": False,
        "weight_tying": False,
        "scale_logits": False,
        "input_emb_norm": False,
        "attention_layer_norm": False,
        "alibi": False,
        "multi_query_attention": None,
        **_common_ids(s),
    }


def _llada_tensors(state, s: Shape) -> dict[str, torch.Tensor]:
    out = {"model.transformer.wte.weight": state["tok_embed.weight"]}
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj",
             "down": "ff_out", "attn_norm": "attn_norm", "mlp_norm": "ff_norm"}  # fmt: skip
    for i, layer in enumerate(_per_layer(state, s)):
        for role, name in names.items():
            out[f"model.transformer.blocks.{i}.{name}.weight"] = layer[role]
    out["model.transformer.ln_f.weight"] = state["norm.weight"]
    out["model.transformer.ff_out.weight"] = state["head.weight"]
    return out


# ---- Qwen3 / Llama (HF names) -------------------------------------------------------------------------
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
            "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
            "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}  # fmt: skip


def _hf_tensors(state, s: Shape) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["tok_embed.weight"]}
    for i, layer in enumerate(_per_layer(state, s)):
        for role, name in HF_NAMES.items():
            if role in layer:
                out[f"model.layers.{i}.{name}.weight"] = layer[role]
    out["model.norm.weight"] = state["norm.weight"]
    out["lm_head.weight"] = state["head.weight"]
    return out


def _hf_config(s: Shape) -> dict[str, Any]:
    return {
        "vocab_size": s.vocab,
        "hidden_size": s.dim,
        "intermediate_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "max_position_embeddings": s.max_len,
        "rms_norm_eps": s.eps,
        "rope_theta": s.rope_base,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        **_common_ids(s),
    }


def _sdar_config(s: Shape) -> dict[str, Any]:
    return {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        **_hf_config(s),
        "use_sliding_window": False,
        "block_size": s.block,
    }


def _qwen3_config(s: Shape) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_hf_config(s),
        "use_sliding_window": False,
    }


def _llama_config(s: Shape) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_hf_config(s), "mlp_bias": False}


# ---- llada2 (dense) -------------------------------------------------------------------------------------
def _llada2_config(s: Shape) -> dict[str, Any]:
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "vocab_size": s.vocab,
        "hidden_size": s.dim,
        "intermediate_size": s.hidden,
        "moe_intermediate_size": s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "num_experts": 1,  # no layer is a mixture: every one is below first_k_dense_replace
        "num_shared_experts": 0,
        "num_experts_per_tok": 1,
        "first_k_dense_replace": s.layers,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "score_function": "sigmoid",
        "use_qk_norm": s.qk_norm,
        "use_qkv_bias": False,
        "use_bias": False,
        "hidden_act": "silu",
        "rms_norm_eps": s.eps,
        "max_position_embeddings": s.max_len,
        "rope_theta": s.rope_base,
        "partial_rotary_factor": 1.0,
        "tie_word_embeddings": False,
        "block_length": s.block,
        **_common_ids(s),
    }


def _llada2_tensors(state, s: Shape) -> dict[str, torch.Tensor]:
    out = {"model.word_embeddings.weight": state["tok_embed.weight"]}
    names = {"qkv": "attention.query_key_value", "o": "attention.dense", "gate": "mlp.gate_proj",
             "up": "mlp.up_proj", "down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm", "q_norm": "attention.query_layernorm",
             "k_norm": "attention.key_layernorm"}  # fmt: skip
    for i, layer in enumerate(_per_layer(state, s)):
        for role, name in names.items():
            if role in layer:
                out[f"model.layers.{i}.{name}.weight"] = layer[role]
    out["model.norm.weight"] = state["norm.weight"]
    out["lm_head.weight"] = state["head.weight"]
    return out


@dataclass(frozen=True)
class Format:
    name: str
    attention: tuple[str, ...]  # the run kinds it expresses
    config: Callable[[Shape], dict[str, Any]]
    tensors: Callable[[dict[str, torch.Tensor], Shape], dict[str, torch.Tensor]]
    qk_norm: bool | None  # True: needed, False: not expressible, None: either
    loads_as: str  # the unmask family an export loads back as
    sglang: tuple[int, int] | None = None  # (mask id, block size) SGLang hard-codes for the architecture


FORMATS = {
    "llada": Format("llada", ("bidirectional",), _llada_config, _llada_tensors, False, "llada"),
    "sdar": Format("sdar", ("block_causal",), _sdar_config, _hf_tensors, True, "sdar", sglang=(151669, 4)),
    "llada2": Format(
        "llada2", ("block_causal",), _llada2_config, _llada2_tensors, None, "llada2", sglang=(156895, 32)
    ),
    "llama": Format("llama", ("causal",), _llama_config, _hf_tensors, False, "llama"),
    "qwen3": Format("qwen3", ("causal",), _qwen3_config, _hf_tensors, True, "qwen3"),
}


def pick(name: str, config: Config) -> Format:
    """The format `name` (or for `auto` the one the run's attention and q/k norm call for), checked."""
    m = config.model
    if name == "auto":
        name = {"bidirectional": "llada", "block_causal": "sdar" if m.qk_norm else "llada2",
                "causal": "qwen3" if m.qk_norm else "llama"}[m.attention]  # fmt: skip
    if name not in FORMATS:
        raise ExportError(f"--format: unknown format {name!r}; known: auto, {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    if m.attention not in fmt.attention:
        fits = [f for f, x in FORMATS.items() if m.attention in x.attention]
        raise ExportError(
            f"model.attention: a {m.attention} run cannot be written as {name} (a {fmt.attention[0]} "
            f"family); formats for it: {', '.join(fits)}"
        )
    if m.mlp != "swiglu":
        raise ExportError(f"model.mlp: {name} layers are SwiGLU; this run's MLP is {m.mlp}")
    if fmt.qk_norm is True and not m.qk_norm:
        raise ExportError(
            f"model.qk_norm: {name} layers normalise queries and keys per head (Qwen3); this run has no "
            "q/k norm (train with --model.qk_norm, or export as "
            + ("llada2)" if m.attention == "block_causal" else "llama)")
        )
    if fmt.qk_norm is False and m.qk_norm:
        raise ExportError(f"model.qk_norm: {name} layers have no per-head q/k norm; this run has one")
    if config.soft_mask.k:
        raise ExportError("soft_mask.k: no export format holds the soft-masking module (its 3 scalars)")
    return fmt
