"""Each family's weights in a native transformers class: the config translation and key renames.

LLaDA is Llama (OLMo-style names), Dream and Fast-dLLM v2 are Qwen2, SDAR is Qwen3, LLaDA2-mini is
Glm4Moe (fused qkv split, experts packed); Llama and Qwen3 causal LMs load as themselves. Every model
is built with `is_causal=False`; block-causal and causal families get an explicit 4D mask from the
adapter. A config field the native class cannot express
is refused by name instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import Glm4MoeConfig, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from unmask.models.pretrained.families import Family, PretrainedError, require

# keys a checkpoint may carry that the native model does not need
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.rotary_emb\..*)$")
# fields that describe the remote code, not the architecture
META = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "mask_token_id",
    "block_size",
    "bd_size",
    "conplemenrary_mask",
    "attn_implementation",
    "fuse_cross_entropy",
    "use_cache",
}


def native_config(family: Family, raw: dict[str, Any], where: str) -> PretrainedConfig:
    """The native transformers config for a family's config.json."""
    build = {
        "llama": _llada,
        "llama_hf": _qwen(LlamaConfig),
        "qwen2": _qwen(Qwen2Config),
        "qwen3": _qwen(Qwen3Config),
        "glm4_moe": _llada2,
    }[family.backbone]
    cfg = build(raw, where)
    cfg.is_causal = False
    cfg._attn_implementation = "sdpa"
    return cfg


def _llada(raw: dict[str, Any], where: str) -> LlamaConfig:
    why = "LLaDA is loaded as Llama"
    require(raw, where, "block_type", {"llama"}, why)
    require(raw, where, "activation_type", {"silu", "swiglu"}, why)
    require(raw, where, "layer_norm_type", {"rms"}, why)
    for flag in (
        "include_bias",
        "include_qkv_bias",
        "bias_for_layer_norm",
        "scale_logits",
        "input_emb_norm",
        "attention_layer_norm",
        "alibi",
        "multi_query_attention",
    ):
        require(raw, where, flag, {False, None}, why)
    require(raw, where, "rope", {True}, why)
    vocab = raw.get("embedding_size") or raw["vocab_size"]
    # OLMo's convention: without mlp_hidden_size the MLP is mlp_ratio x d_model wide
    hidden = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4) * raw["d_model"])
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=raw["d_model"],
        intermediate_size=hidden,
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=raw["n_heads"],
        num_key_value_heads=raw.get("n_kv_heads") or raw["n_heads"],
        max_position_embeddings=raw.get("max_sequence_length", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(raw.get("weight_tying", False)),  # the output layer is wte
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        pad_token_id=raw.get("pad_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _qwen(cls):
    def build(raw: dict[str, Any], where: str) -> PretrainedConfig:
        require(
            raw, where, "use_sliding_window", {False, None}, "sliding-window attention is not bidirectional"
        )
        require(raw, where, "hidden_act", {"silu"}, f"loaded as {cls.__name__}")
        fields = {k: v for k, v in raw.items() if k not in META}
        from huggingface_hub.errors import StrictDataclassError

        try:
            return cls(**fields)
        except (ValueError, TypeError, StrictDataclassError) as e:  # transformers' own validation
            raise PretrainedError(f"{where}: {cls.__name__} refuses this config: {e}") from None

    return build


def _llada2(raw: dict[str, Any], where: str) -> Glm4MoeConfig:
    why = "LLaDA2 is loaded as Glm4Moe, which has no such biases"
    require(raw, where, "use_qkv_bias", {False}, why)
    require(raw, where, "use_bias", {False}, why)
    require(raw, where, "score_function", {"sigmoid"}, "Glm4Moe routes with a sigmoid")
    require(raw, where, "hidden_act", {"silu"}, "loaded as Glm4Moe")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    partial = raw.get("partial_rotary_factor")
    if partial is None:
        partial = raw.get("rotary_dim", head_dim) / head_dim
    return Glm4MoeConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"],
        head_dim=head_dim,
        n_routed_experts=raw["num_experts"],
        n_shared_experts=raw.get("num_shared_experts", 0),
        num_experts_per_tok=raw["num_experts_per_tok"],
        n_group=raw.get("n_group", 1),
        topk_group=raw.get("topk_group", 1),
        routed_scaling_factor=raw.get("routed_scaling_factor", 1.0),
        first_k_dense_replace=raw.get("first_k_dense_replace", 0),
        norm_topk_prob=True,
        use_qk_norm=raw.get("use_qk_norm", False),
        attention_bias=False,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(raw.get("rope_theta", 10000.0)),
            "partial_rotary_factor": float(partial),
        },
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        pad_token_id=raw.get("pad_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


# ---- weight names ---------------------------------------------------------------------------------
LLADA_RENAMES = [
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.(q_proj|k_proj|v_proj)\.", r"model.layers.\1.self_attn.\2."),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.", r"model.layers.\1.mlp.up_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.", r"model.layers.\1.mlp.down_proj."),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.", r"model.layers.\1.post_attention_layernorm."),
]
LLADA2_RENAMES = [
    (r"^model\.word_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.query_layernorm\.", ".self_attn.q_norm."),
    (r"\.attention\.key_layernorm\.", ".self_attn.k_norm."),
    (r"\.attention\.dense\.", ".self_attn.o_proj."),
    (r"\.mlp\.gate\.expert_bias$", ".mlp.gate.e_score_correction_bias"),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def convert(
    family: Family, cfg: PretrainedConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The family's checkpoint tensors under the native class's names and layout."""
    if family.backbone == "llama":
        return {_rename(k, LLADA_RENAMES): v for k, v in tensors.items()}
    if family.backbone == "glm4_moe":
        return _convert_llada2(cfg, tensors)
    return dict(tensors)


def _convert_llada2(cfg: Glm4MoeConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int, str], torch.Tensor] = {}
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    for key, value in tensors.items():
        key = _rename(key, LLADA2_RENAMES)
        if key.endswith(".attention.query_key_value.weight"):  # [(H + 2 Hkv) Dh, D] -> q, k, v
            prefix = key[: -len(".attention.query_key_value.weight")] + ".self_attn."
            if value.shape[0] != q + 2 * kv:
                raise PretrainedError(
                    f"{key}: shape {tuple(value.shape)}, expected ({q + 2 * kv}, "
                    f"{value.shape[-1]}) for {cfg.num_attention_heads} query and "
                    f"{cfg.num_key_value_heads} key/value heads of {cfg.head_dim}"
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split([q, kv, kv]), strict=True):
                out[prefix + name + ".weight"] = part
            continue
        match = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if match:
            experts[(match.group(1), int(match.group(2)), match.group(3))] = value
            continue
        out[key.replace(".attention.", ".self_attn.")] = value
    # routed experts: per-expert gate/up/down -> packed gate_up_proj [E, 2I, D] (gate first),
    # down_proj [E, D, I]
    for prefix in sorted({p for p, _, _ in experts}):
        n = cfg.n_routed_experts
        beyond = sorted({e for p, e, _ in experts if p == prefix and e >= n})
        if beyond:
            raise PretrainedError(
                f"{prefix}: the checkpoint holds experts {beyond[:4]}{' ...' if len(beyond) > 4 else ''} "
                f"beyond config.json's num_experts={n}"
            )
        missing = [
            f"{prefix}.{e}.{w}.weight"
            for e in range(n)
            for w in ("gate_proj", "up_proj", "down_proj")
            if (prefix, e, w) not in experts
        ]
        if missing:
            raise PretrainedError(
                f"missing expert weights: {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            )
        out[prefix + ".gate_up_proj"] = torch.stack(
            [
                torch.cat([experts[(prefix, e, "gate_proj")], experts[(prefix, e, "up_proj")]])
                for e in range(n)
            ]
        )
        out[prefix + ".down_proj"] = torch.stack([experts[(prefix, e, "down_proj")] for e in range(n)])
    return out
