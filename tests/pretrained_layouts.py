"""Tiny random models written in each pretrained family's own directory layout, with references.

Each writer builds a random model, saves its weights under the *family's* key names and its
`config.json` fields (what the real checkpoints ship), a small tokenizer with the family's special
tokens, and returns an independent reference: a native transformers model run with the family's
attention semantics (or, for MDLM/BD3-LM, the DiT with adaLN applied at run time).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

V = 64  # model vocabulary
MASK = 63  # mask id written into config.json where the family's config has one
FAMILIES = ("llada", "dream", "sdar", "fast-dllm-v2", "llada2", "mdlm", "bd3lm")
BLOCK = {"sdar": 4, "fast-dllm-v2": 4, "llada2": 4, "bd3lm": 4}
SPECIAL = {  # family -> (bos, eos, extra stop / chat tokens, mask token)
    "llada": ("<|startoftext|>", "<|endoftext|>", ["<|eot_id|>"], "<|mdm_mask|>"),
    "dream": ("<|beginoftext|>", "<|endoftext|>", ["<|im_end|>"], "<|mask|>"),
    "sdar": (None, "<|endoftext|>", ["<|im_end|>"], "<|MASK|>"),
    "fast-dllm-v2": (None, "<|im_end|>", ["<|endoftext|>"], "|<MASK>|"),
    "llada2": (None, "<|endoftext|>", ["<|role_end|>"], "<|mask|>"),
    "diffusion-gemma": ("<bos>", "<eos>", ["<end_of_turn>"], None),
}
CHAT = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def additive_block_mask(T: int, block: int) -> torch.Tensor:
    """[1, 1, T, T] 0 / -inf: query q sees key k iff k's block is not after q's."""
    q = torch.arange(T)[:, None] // block
    k = torch.arange(T)[None, :] // block
    return torch.zeros(T, T).masked_fill(q < k, torch.finfo(torch.float32).min)[None, None]


def write_tokenizer(path: Path, family: str) -> None:
    bos, eos, extra, mask = SPECIAL[family]
    specials = [t for t in (bos, eos, *extra, mask, "<|user|>", "<|assistant|>", "[UNK]") if t]
    words = [f"w{i}" for i in range(50 - len(specials))]
    vocab = {w: i for i, w in enumerate(words)}
    for t in specials:
        vocab[t] = len(vocab)
    if family in ("llada",):  # LLaDA's mask id is fixed by config.json (63), not by the tokenizer
        vocab.pop(mask)
        vocab[mask] = MASK
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "unk_token": "[UNK]",
        "chat_template": CHAT,
    }
    if bos:
        config["bos_token"] = bos
    if family == "dream":  # a remote tokenizer class: loaded through tokenizer.json
        config.update(
            tokenizer_class="DreamTokenizer",
            auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        )
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _save(path: Path, tensors: dict, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors")
    )
    (path / "config.json").write_text(json.dumps(config))


def write_family(family: str, path: Path, seed: int = 0):
    """Write the family's tiny directory; return `reference(tokens [B, T]) -> logits [B, T, V]`
    in the family's own convention (unshifted: logit i as the model computes it)."""
    torch.manual_seed(seed)
    writer = {
        "llada": _llada,
        "dream": _qwen2,
        "fast-dllm-v2": _qwen2,
        "sdar": _sdar,
        "llada2": _llada2,
        "mdlm": _dit,
        "bd3lm": _dit,
        "diffusion-gemma": lambda family, path: write_diffusion_gemma(path, seed=seed),
    }[family]
    reference = writer(family, path)
    if family in SPECIAL:
        write_tokenizer(path, family)
    return reference


def write_diffusion_gemma(
    path: Path, *, seed: int = 0, canvas: int = 8, window: int = 6, scale: float = 40.0
):
    """A tiny random `DiffusionGemmaForBlockDiffusion` (MoE, sliding + full layers of different
    head shapes, a vision tower) saved with its own `save_pretrained`, with the family's tokenizer;
    the tied embedding / head is scaled by `scale` so that predictions are peaked enough for the
    entropy bound to accept several positions and for the adaptive stop to fire. Returns the
    native model, reloaded with `from_pretrained` (the reference; `write_family` adds the tokenizer)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    text = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=16,
        max_position_embeddings=512,
    )
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    model = DiffusionGemmaForBlockDiffusion(
        DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas)
    )
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(scale)
    model.save_pretrained(str(path))
    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(path)).eval()


def _native_reference(model, block: int | None):
    model.eval()

    def reference(tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask` [B, T] (1 = real token): the padding mask the reference loops pass."""
        mask = additive_block_mask(tokens.shape[1], block) if block else attention_mask
        with torch.no_grad():
            return model(input_ids=tokens, attention_mask=mask).logits

    return reference


def _llada(family: str, path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        is_causal=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a trained LLaDA never argmaxes [MASK]; keep the reference loop comparable
        model.lm_head.weight[MASK] = 0.0
    names = {
        "self_attn.q_proj": "q_proj",
        "self_attn.k_proj": "k_proj",
        "self_attn.v_proj": "v_proj",
        "self_attn.o_proj": "attn_out",
        "mlp.gate_proj": "ff_proj",
        "mlp.up_proj": "up_proj",
        "mlp.down_proj": "ff_out",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ff_norm",
    }
    top = {
        "model.embed_tokens.weight": "model.transformer.wte.weight",
        "model.norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    }
    tensors = {}
    for key, value in model.state_dict().items():
        if key in top:
            tensors[top[key]] = value
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.*)\.weight$", key)
        tensors[f"model.transformer.blocks.{m.group(1)}.{names[m.group(2)]}.weight"] = value
    _save(
        path,
        tensors,
        {
            "model_type": "llada",
            "architectures": ["LLaDAModelLM"],
            "activation_type": "silu",
            "alibi": False,
            "block_type": "llama",
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 4,
            "mlp_hidden_size": 48,
            "vocab_size": V,
            "embedding_size": V,
            "max_sequence_length": 256,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "include_bias": False,
            "include_qkv_bias": False,
            "weight_tying": False,
            "scale_logits": False,
            "input_emb_norm": False,
            "layer_norm_type": "rms",
            "rope": True,
            "mask_token_id": MASK,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
    )
    return _native_reference(model, None)


def _qwen2(family: str, path: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        is_causal=family != "dream",
    )
    model = Qwen2ForCausalLM(cfg)
    raw = {k: v for k, v in cfg.to_dict().items() if k not in ("is_causal", "model_type", "architectures")}
    if family == "dream":
        raw.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=MASK)
    else:  # Fast-dLLM v2: no mask_token_id in config.json; the tokenizer's |<MASK>| gives it
        raw.update(
            model_type="Fast_dLLM_Qwen", architectures=["Fast_dLLM_QwenForCausalLM"], bd_size=BLOCK[family]
        )
    _save(path, model.state_dict(), raw)
    return _native_reference(model, BLOCK.get(family))


def _sdar(family: str, path: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(cfg)
    raw = {k: v for k, v in cfg.to_dict().items() if k not in ("is_causal", "model_type", "architectures")}
    raw.update(
        model_type="sdar", architectures=["SDARForCausalLM"], block_size=BLOCK[family], mask_token_id=MASK
    )
    _save(path, model.state_dict(), raw)
    return _native_reference(model, BLOCK[family])


def _llada2(family: str, path: Path):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        use_qk_norm=True,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 600000.0, "partial_rotary_factor": 0.5},
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = Glm4MoeForCausalLM(cfg)
    tensors = {}
    for key, value in model.state_dict().items():
        key2 = key.replace("model.embed_tokens.", "model.word_embeddings.")
        key2 = key2.replace(".self_attn.q_norm.", ".attention.query_layernorm.")
        key2 = key2.replace(".self_attn.k_norm.", ".attention.key_layernorm.")
        key2 = key2.replace(".self_attn.o_proj.", ".attention.dense.")
        key2 = key2.replace("gate.e_score_correction_bias", "gate.expert_bias")
        if ".self_attn.q_proj." in key:
            p = key[: key.index(".self_attn.")]
            sd = model.state_dict()
            tensors[p + ".attention.query_key_value.weight"] = torch.cat(
                [
                    sd[p + ".self_attn.q_proj.weight"],
                    sd[p + ".self_attn.k_proj.weight"],
                    sd[p + ".self_attn.v_proj.weight"],
                ]
            )
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        if key.endswith("experts.gate_up_proj"):  # [E, 2I, D], gate rows first (Glm4Moe's forward)
            gate, up = value.chunk(2, dim=1)
            p = key2[: -len(".gate_up_proj")]
            for e in range(value.shape[0]):
                tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"] = gate[e], up[e]
            continue
        if key.endswith("experts.down_proj"):
            p = key2[: -len(".down_proj")]
            for e in range(value.shape[0]):
                tensors[f"{p}.{e}.down_proj.weight"] = value[e]
            continue
        tensors[key2] = value
    for key in list(tensors):  # non-zero router biases (as trained checkpoints have), in both models
        if key.endswith("gate.expert_bias"):
            tensors[key] = torch.randn_like(tensors[key]) * 0.1
            model.get_buffer(key.replace("gate.expert_bias", "gate.e_score_correction_bias")).copy_(
                tensors[key]
            )
    _save(
        path,
        tensors,
        {
            "model_type": "llada2_moe",
            "architectures": ["LLaDA2MoeModelLM"],
            "vocab_size": V,
            "hidden_size": 32,
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_experts": 4,
            "num_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1,
            "use_qk_norm": True,
            "use_qkv_bias": False,
            "use_bias": False,
            "score_function": "sigmoid",
            "rope_theta": 600000.0,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "block_length": BLOCK[family],
        },
    )
    return _native_reference(model, BLOCK[family])


# ---- MDLM / BD3-LM: the DiT with adaLN at run time, written from the BD3-LM model description -----
D, H, COND, LAYERS, LENGTH = 32, 4, 16, 2, 64


def _dit(family: str, path: Path):
    g = torch.Generator().manual_seed(7)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    t = {
        "backbone.vocab_embed.embedding": rnd(V, D, scale=1.0),
        "backbone.sigma_map.mlp.0.weight": rnd(COND, 256),
        "backbone.sigma_map.mlp.0.bias": rnd(COND),
        "backbone.sigma_map.mlp.2.weight": rnd(COND, COND),
        "backbone.sigma_map.mlp.2.bias": rnd(COND),
        "backbone.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, D // H, 2).float() / (D // H)),
        "backbone.output_layer.norm_final.weight": 1 + rnd(D),
        "backbone.output_layer.linear.weight": rnd(V, D),
        "backbone.output_layer.linear.bias": rnd(V),
        "backbone.output_layer.adaLN_modulation.weight": rnd(2 * D, COND),
        "backbone.output_layer.adaLN_modulation.bias": rnd(2 * D),
    }
    for i in range(LAYERS):
        p = f"backbone.blocks.{i}."
        t.update(
            {
                p + "norm1.weight": 1 + rnd(D),
                p + "norm2.weight": 1 + rnd(D),
                p + "attn_qkv.weight": rnd(3 * D, D),
                p + "attn_out.weight": rnd(D, D),
                p + "mlp.0.weight": rnd(4 * D, D),
                p + "mlp.0.bias": rnd(4 * D),
                p + "mlp.2.weight": rnd(D, 4 * D),
                p + "mlp.2.bias": rnd(D),
                p + "adaLN_modulation.weight": rnd(6 * D, COND),
                p + "adaLN_modulation.bias": rnd(6 * D),
            }
        )
    if family == "bd3lm":
        t["sampling_eps_min"], t["sampling_eps_max"] = torch.tensor(1e-3), torch.tensor(0.999)
    config = {
        "model_type": family,
        "architectures": [family.upper() if family == "mdlm" else "BD3LM"],
        "vocab_size": V,
        "model_length": LENGTH,
        "hidden_dim": D,
        "cond_dim": COND,
        "n_blocks": LAYERS,
        "n_heads": H,
        "dropout": 0.1,
        "time_conditioning": False,
        "adaln": True,
        "cross_attn": True,
    }
    if family == "bd3lm":
        config.update(block_size=BLOCK[family], attn_backend="sdpa", var_min=True)
    _save(path, t, config)
    block = BLOCK.get(family)

    def reference(tokens: torch.Tensor) -> torch.Tensor:
        """adaLN-modulated DiT: c = silu(sigma_map(0)); per block modulate -> attn -> gate ..."""
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        emb = torch.cat([torch.cos(0 * freqs), torch.sin(0 * freqs)])[None]
        c = F.silu(
            F.linear(
                F.silu(
                    F.linear(emb, t["backbone.sigma_map.mlp.0.weight"], t["backbone.sigma_map.mlp.0.bias"])
                ),
                t["backbone.sigma_map.mlp.2.weight"],
                t["backbone.sigma_map.mlp.2.bias"],
            )
        )
        x = t["backbone.vocab_embed.embedding"][tokens]
        B, T = tokens.shape
        pos = torch.arange(T).float()[:, None] * t["backbone.rotary_emb.inv_freq"][None]
        cos, sin = torch.cat([pos, pos], -1).cos(), torch.cat([pos, pos], -1).sin()

        def rot(z):  # z [B, T, H, Dh]
            z1, z2 = z.chunk(2, -1)
            return z * cos[None, :, None] + torch.cat([-z2, z1], -1) * sin[None, :, None]

        allowed = None
        if block:
            allowed = (torch.arange(T)[:, None] // block) >= (torch.arange(T)[None] // block)
        for i in range(LAYERS):
            p = f"backbone.blocks.{i}."
            mod = F.linear(c, t[p + "adaLN_modulation.weight"], t[p + "adaLN_modulation.bias"])[
                :, None
            ].chunk(6, -1)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
            h = F.layer_norm(x, [D]) * t[p + "norm1.weight"] * (1 + scale_a) + shift_a
            qkv = F.linear(h, t[p + "attn_qkv.weight"]).view(B, T, 3, H, D // H)
            q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
            a = (
                F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
                )
                .transpose(1, 2)
                .reshape(B, T, D)
            )
            x = x + gate_a * F.linear(a, t[p + "attn_out.weight"])
            h = F.layer_norm(x, [D]) * t[p + "norm2.weight"] * (1 + scale_m) + shift_m
            m = F.linear(
                F.gelu(F.linear(h, t[p + "mlp.0.weight"], t[p + "mlp.0.bias"]), approximate="tanh"),
                t[p + "mlp.2.weight"],
                t[p + "mlp.2.bias"],
            )
            x = x + gate_m * m
        p = "backbone.output_layer."
        shift, scale = F.linear(c, t[p + "adaLN_modulation.weight"], t[p + "adaLN_modulation.bias"])[
            :, None
        ].chunk(2, -1)
        h = F.layer_norm(x, [D]) * t[p + "norm_final.weight"] * (1 + scale) + shift
        return F.linear(h, t[p + "linear.weight"], t[p + "linear.bias"])

    return reference


def write_gpt2_like_tokenizer(path: Path) -> None:
    """MDLM/BD3-LM ship no tokenizer (they use GPT-2's); a stand-in with <|endoftext|> as BOS/EOS."""
    path.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(V - 3)]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "[UNK]"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "[UNK]",
            }
        )
    )
