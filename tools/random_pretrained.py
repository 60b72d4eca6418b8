"""Write a random model in a pretrained family's Hugging Face layout, for benchmarks (speed needs
no trained weights): `python tools/random_pretrained.py llada|sdar OUT_DIR [--hidden 512 --layers 8]`.

LLaDA layout: LlamaForCausalLM weights under LLaDA's OLMo-style names + LLaDA's config.json
fields; SDAR layout: Qwen3ForCausalLM weights (1:1 names) + SDAR's config fields. A word-level
tokenizer of the same vocabulary (w0 w1 ...) and a prompts JSONL come with it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

LLADA_NAMES = {
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=["llada", "sdar", "dream", "fast-dllm-v2", "diffusion-gemma"])
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument(
        "--logit-scale", type=float, default=8.0, help="scale the output layer (peaked predictions)"
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mask = a.vocab - 1
    if a.family == "llada":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
        top = {
            "model.embed_tokens.weight": "model.transformer.wte.weight",
            "model.norm.weight": "model.transformer.ln_f.weight",
            "lm_head.weight": "model.transformer.ff_out.weight",
        }
        tensors = {}
        for key, value in model.state_dict().items():
            m = re.match(r"model\.layers\.(\d+)\.(.*)\.weight$", key)
            name = top.get(key) or f"model.transformer.blocks.{m.group(1)}.{LLADA_NAMES[m.group(2)]}.weight"
            tensors[name] = value.to(torch.bfloat16).contiguous()
        config = {
            "model_type": "llada",
            "architectures": ["LLaDAModelLM"],
            "d_model": a.hidden,
            "n_layers": a.layers,
            "n_heads": a.heads,
            "n_kv_heads": a.kv_heads,
            "mlp_hidden_size": a.intermediate,
            "vocab_size": a.vocab,
            "embedding_size": a.vocab,
            "max_sequence_length": 4096,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "block_type": "llama",
            "activation_type": "silu",
            "weight_tying": False,
            "include_bias": False,
            "mask_token_id": mask,
        }
    elif a.family in ("dream", "fast-dllm-v2"):  # Qwen2 weights, 1:1 names; the families' config fields
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        )
        model = Qwen2ForCausalLM(cfg)
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        config = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")}
        if a.family == "dream":
            config.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=mask)
        else:
            config.update(
                model_type="Fast_dLLM_Qwen",
                architectures=["Fast_dLLM_QwenForCausalLM"],
                bd_size=a.block_size,
                mask_token_id=mask,
            )
    elif a.family == "diffusion-gemma":  # transformers' own class and save_pretrained (--block-size: canvas)
        _diffusion_gemma(a, out)
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            head_dim=a.hidden // a.heads,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        )
        model = Qwen3ForCausalLM(cfg)
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        config = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")}
        config.update(
            model_type="sdar", architectures=["SDARForCausalLM"], block_size=a.block_size, mask_token_id=mask
        )
    if a.family != "diffusion-gemma":
        # a trained model never argmaxes [MASK], and its predictions are peaked: an untrained one's
        # near-uniform softmax would leave greedy ranks to float rounding
        head = "model.transformer.ff_out.weight" if a.family == "llada" else "lm_head.weight"
        tensors[head] = (tensors[head].float() * a.logit_scale).to(torch.bfloat16)
        tensors[head][mask] = 0
        save_file(tensors, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {f"w{i}": i for i in range(a.vocab - 4)}
    for t in ("<|endoftext|>", "<|startoftext|>", "[UNK]", "<|mask|>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|startoftext|>", "[UNK]", "<|mask|>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "[UNK]",
            }
        )
    )
    g = torch.Generator().manual_seed(1)
    with open(out / "prompts.jsonl", "w") as f:
        for _ in range(16):
            words = torch.randint(0, a.vocab - 4, (16,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in words)}) + "\n")
    print(f"wrote {a.family} layout to {out}")


def _diffusion_gemma(a, out: Path) -> None:
    """Gemma-4-style: sliding / full layers 5:1 (window 512, full layers with twice the head
    width), MoE of 4 experts (top 2) beside the dense MLP, a minimal vision tower (dropped when
    unmask loads it); the tied embedding scaled by --logit-scale / 2 for peaked predictions."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    head_dim = a.hidden // a.heads
    text = dict(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=head_dim,
        global_head_dim=2 * head_dim,
        num_global_key_value_heads=max(1, a.kv_heads // 2),
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=max(16, a.intermediate // 4),
        max_position_embeddings=4096,
        eos_token_id=a.vocab - 4,
        bos_token_id=a.vocab - 3,
        pad_token_id=a.vocab - 4,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=a.block_size)
    model = DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(a.logit_scale / 2)
    model.save_pretrained(str(out))


if __name__ == "__main__":
    main()
