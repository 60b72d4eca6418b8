"""Trainable additions to a frozen pretrained base: soft-mask scalars and LoRA adapters (`peft`).

Continued training on a pretrained model (`unmask train --init DIR`) trains only what these add;
a checkpoint of such a run holds only those tensors (`model.safetensors`, a few MB) beside
`base.json`, which names the base directory and the digest of its weights, so a 16 GB model is
never copied and never paired with other weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from unmask.config import LoraConfig
from unmask.models.pretrained.families import PretrainedError
from unmask.models.soft_mask import W_S_INIT, SoftMask

HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DIT_TARGETS = ("attn.qkv", "attn.out")


def attach(
    model: nn.Module, *, soft_mask_k: int, lora: LoraConfig, soft_mask_init: str = "ours"
) -> nn.Module:
    """Freeze `model` and add the trainable modules: SoftMask(k) and LoRA adapters of rank r."""
    model.requires_grad_(False)
    if soft_mask_k:
        device = next(model.parameters()).device
        model.soft_mask = SoftMask(soft_mask_k, model.vocab_size, w_s=W_S_INIT[soft_mask_init]).to(device)
    if lora.r:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        native = getattr(model, "native", None)
        targets = list(lora.targets or (HF_TARGETS if native is not None else DIT_TARGETS))
        try:
            peft_cfg = PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
            )
            inject_adapter_in_model(peft_cfg, native if native is not None else model)
        except ValueError as e:
            raise PretrainedError(f"--lora.targets {targets}: {e}") from e
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    if soft_mask_k:
        model.soft_mask.requires_grad_(True)
    return model


def delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changed: the trainable parameters (soft-mask scalars, LoRA)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def write_base(path: Path, base: dict) -> None:
    (path / "base.json").write_text(json.dumps(base, indent=2))


def read_base(path: Path) -> dict | None:
    file = path / "base.json"
    return json.loads(file.read_text()) if file.is_file() else None
