"""Writing an export: weights (safetensors, sharded above a size, with an index), `config.json`,
the tokenizer with its special tokens declared, `generation_config.json`, the model card. The
directory is assembled beside its target and renamed into place, so a failed export leaves none."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from unmask.exporting.layouts import ExportError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def write_weights(out: Path, tensors: dict[str, torch.Tensor], dtype: str, max_shard_bytes: int) -> None:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`."""
    cast = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in cast.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in cast.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


CHAT_TEMPLATE = (  # the repo's `chat` template (data/templates.toml) in Jinja, [BOS] first as SFT encodes it
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tokenizer(out: Path, tokenizer, *, max_len: int, chat: bool) -> None:
    """`tokenizer.json` and the files that declare its special tokens to `AutoTokenizer`."""
    tokenizer.save(out / "tokenizer.json")
    ids = {
        "mask": tokenizer.mask_id,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "pad": tokenizer.pad_id,
    }
    specials = {f"{k}_token": tokenizer.hf.id_to_token(i) for k, i in ids.items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def write_json(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / name).write_text(json.dumps(data, indent=2) + "\n")


class Staging:
    """A temporary directory beside `out`, renamed to it on success, removed on failure."""

    def __init__(self, out: Path, *, overwrite: bool):
        self.out, self.overwrite = out, overwrite
        self.tmp = out.parent / f".{out.name}.export-tmp{os.getpid()}"

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise ExportError(f"--out {self.out} exists; pass --overwrite to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
