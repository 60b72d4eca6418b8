"""`load_pretrained(dir)`: a local Hugging Face diffusion-LM directory as an unmask Denoiser.

Weights are read shard by shard (`model.safetensors` or the index's shards) straight into the
target dtype, renamed or split into the native class's layout, and assigned into a model built
on the meta device, so no float32 copy of a bf16 model is ever made. Every weight the model needs
must be present with the right shape; errors name the key and the shard file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from unmask.config import ModelConfig
from unmask.models.pretrained import families as fam
from unmask.models.pretrained.families import Family, PretrainedError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def is_pretrained_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json naming a model type), not an unmask run."""
    path = Path(path)
    if not (path / "config.json").is_file() or (path / "state.json").is_file() or (path / "latest").is_file():
        return False
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and ("model_type" in raw or "architectures" in raw)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU with bf16, else fp32 (CPUs: see unmask.precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        from unmask.precision import resolve_precision

        return torch.bfloat16 if resolve_precision("auto", device.type).precision == "bf16" else torch.float32
    if dtype not in DTYPES:
        raise PretrainedError(f"--dtype {dtype!r}: choose auto, fp32, bf16 or fp16")
    return DTYPES[dtype]


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise PretrainedError(f"cannot read {index}: {e}") from e
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise PretrainedError(f"{path} is missing weight shard(s) {missing} listed in {index.name}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")):
        raise PretrainedError(
            f"{path} has only PyTorch .bin weights; unmask reads safetensors "
            "(convert them with transformers' save_pretrained)"
        )
    raise PretrainedError(
        f"no weights in {path} (expected model.safetensors or model.safetensors.index.json)"
    )


def read_weights(path: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the directory's shards in `dtype`, and the shard each came from."""
    tensors, origin = {}, {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if t.is_floating_point() else t
                    origin[key] = file.name
        except (SafetensorError, OSError) as e:
            raise PretrainedError(f"cannot read {file}: corrupt or truncated ({e})") from e
    return tensors, origin


def assign(
    model: nn.Module, state: dict[str, torch.Tensor], origin: dict[str, str], where: Path, ignored=None
) -> None:
    """Assign `state` into `model` (built on meta); name missing, misshapen and unexpected keys."""
    own = model.state_dict()
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the checkpoint ({origin.get(k, 'converted')}), model "
        f"expects {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not (ignored and ignored.search(k))]
    if shapes or missing or unexpected:
        hint = ""
        if "lm_head.weight" in missing:
            hint = " (a checkpoint without lm_head.weight ties it to the embedding: tie_word_embeddings true)"
        raise PretrainedError(
            f"weights in {where} do not fit the model its config.json describes: "
            f"wrong shapes {shapes[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True, assign=True)


@dataclass
class Pretrained:
    model: nn.Module
    family: Family
    raw: dict[str, Any]  # config.json
    max_len: int
    digest: str  # content digest of the weight files (names + sizes + index)


SAMPLE = 1 << 16  # bytes hashed at each of 8 places in a shard


def digest(path: Path) -> str:
    """The weights' identity, cheap enough for a 16 GB model: config.json, and for each shard its
    name, size, safetensors header (every tensor's name, dtype, shape and offsets) and 64 KiB of
    tensor data at 8 evenly spaced places. Any re-save, fine-tune or truncation changes it."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, size)))
            for i in range(8):
                f.seek(min(8 + n + i * max(0, size - 8 - n) // 8, size))
                h.update(f.read(SAMPLE))
    return h.hexdigest()[:16]


def load_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto"
) -> nn.Module:
    """The model in a local HF directory as a Denoiser (see `load_pretrained_full` for metadata)."""
    return load_pretrained_full(path, device=device, dtype=dtype).model


def load_pretrained_full(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto"
) -> Pretrained:
    path = Path(path).expanduser()
    device = torch.device(device)
    raw = fam.read_config(path)
    family = fam.detect(raw, path / "config.json")
    target = resolve_dtype(dtype, device)
    where = str(path / "config.json")
    block = fam.block_size(family, raw)
    if family.backbone == "dit":
        model, max_len = _load_dit(path, raw, family, block, target, where)
    elif family.backbone == "diffusion_gemma":
        from unmask.models.pretrained.diffusion_gemma import load_diffusion_gemma

        model, max_len = load_diffusion_gemma(path, raw, family, target, where, device)
    else:
        model, max_len = _load_native(path, raw, family, block, target, where)
        if device.type == "cpu" and hasattr(model.native, "set_experts_implementation"):
            # MoE experts as one F.linear per expert (routed through the invariant ops): the grouped
            # GEMM groups tokens by expert, so a token's numbers would depend on its batch-mates
            model.native.set_experts_implementation("eager")
    return Pretrained(model.to(device).eval(), family, raw, max_len, digest(path))


def _load_dit(path: Path, raw, family: Family, block: int, dtype, where):
    from unmask.models.pretrained.dit import DiT, dit_config, fold

    cfg = dit_config(raw, where, family.attention, block)
    vocab = int(raw.get("vocab_size", 50258))
    tensors, origin = read_weights(path, dtype)
    with torch.device("meta"):
        model = DiT(cfg, vocab, fam.mask_id(family, raw, vocab))
    model.inv_freq = _inv_freq(cfg)
    assign(model, fold(tensors, cfg.n_layers), origin, path)
    return model, int(raw.get("model_length", 1024))


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    head_dim = cfg.dim // cfg.n_heads
    return 1.0 / cfg.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)


def _load_native(path: Path, raw, family: Family, block: int, dtype, where):
    from transformers import AutoModelForCausalLM

    from unmask.models.pretrained.adapter import HFDenoiser
    from unmask.models.pretrained.native import IGNORED, convert, native_config

    hf_cfg = native_config(family, raw, where)
    tensors, origin = read_weights(path, dtype)
    with torch.device("meta"):
        native = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    assign(native, tie(convert(family, hf_cfg, tensors), hf_cfg, where), origin, path, IGNORED)
    _rebuild_buffers(native, hf_cfg)
    cfg = ModelConfig(
        attention=family.attention,
        block_size=max(block, 1),
        dim=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
    )
    vocab = native.lm_head.out_features
    max_len = int(getattr(hf_cfg, "max_position_embeddings", 0) or 4096)
    return HFDenoiser(native, family, cfg, mask_id=fam.mask_id(family, raw, vocab), max_len=max_len), max_len


def tie(state: dict[str, torch.Tensor], hf_cfg, where: str) -> dict[str, torch.Tensor]:
    """A tied checkpoint (`tie_word_embeddings`) has no output layer of its own: it is the input
    embedding. One that ships a different lm_head.weight contradicts its config and is refused."""
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if not getattr(hf_cfg, "tie_word_embeddings", False) or embed not in state:
        return state
    if head not in state:
        return {**state, head: state[embed]}
    if not torch.equal(state[head], state[embed]):
        raise PretrainedError(
            f"{where}: tie_word_embeddings is true, but the checkpoint's lm_head.weight differs from "
            f"{embed}; set tie_word_embeddings to false to use its own output layer"
        )
    return state


def _rebuild_buffers(native: nn.Module, hf_cfg) -> None:
    """Non-persistent buffers (rotary frequencies) were created on meta: compute them for real."""
    for name, module in list(native.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "rotary" not in type(module).__name__.lower():
                raise PretrainedError(
                    f"internal: buffer of {name} ({type(module).__name__}) left uninitialised"
                )
            parent, _, attr = name.rpartition(".")
            setattr(native.get_submodule(parent) if parent else native, attr, type(module)(config=hf_cfg))


CONTEXT_LIMITS = {"dream": 2048}  # the authors' stated context where config.json claims more


def load_as_checkpoint(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
):
    """A pretrained directory as a `Loaded` checkpoint (model, config, tokenizer), so every command
    that takes `--checkpoint` takes it. `tokenizer` overrides the directory's own (MDLM/BD3-LM ship none)."""
    from unmask.models.checkpoint import Loaded

    path = Path(path).expanduser()
    pre = load_pretrained_full(path, device=device, dtype=dtype)
    model = pre.model
    tok = _tokenizer(path, pre.raw, pre.family, model.vocab_size, tokenizer)
    model.mask_id = tok.mask_id
    if pre.family.noising == "absorbing" and not 0 <= model.mask_id < model.vocab_size:
        raise PretrainedError(
            f"{path}: mask id {model.mask_id} is outside the model's vocabulary of "
            f"{model.vocab_size} (set mask_token_id in config.json)"
        )
    config = run_config(pre.family, model.cfg, pre.max_len, tokenizer or path)
    state = {
        "step": 0,
        "pretrained": {
            "family": pre.family.name,
            "path": str(path),
            "digest": pre.digest,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
    }
    return Loaded(model, config, tok, state, path)


def _tokenizer(path: Path, raw: dict, family: Family, vocab_size: int | None, tokenizer: str | Path | None):
    from unmask.models.pretrained.tokenizer import open_tokenizer

    mask = fam.mask_id(family, raw, vocab_size or 0)
    tok = open_tokenizer(
        tokenizer or path, family=family, mask_id=mask, model_dir=path, vocab_size=vocab_size
    )
    if "mask_token_id" not in raw and family.mask_token and family.noising == "absorbing":
        found = tok.token_id(family.mask_token)  # e.g. Fast-dLLM v2, LLaDA2: the tokenizer's
        if found is not None:
            tok.mask_id = found
    extra = [
        i for i in generation_eos_ids(path) if i not in tok.stop_ids and 0 <= i < (vocab_size or 1 << 62)
    ]
    tok.stop_ids = (*tok.stop_ids, *extra)
    return tok


def generation_eos_ids(path: Path) -> list[int]:
    """`generation_config.json`'s eos_token_id (an id or a list): where the family's own `generate`
    stops (e.g. a chat model's end of turn); [] without the file."""
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    try:
        value = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise PretrainedError(f"cannot read {file}: {e}") from e
    ids = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise PretrainedError(f"{file}: eos_token_id must be an id or a list of ids, got {value!r}")
    return ids


def load_tokenizer(path: str | Path, *, tokenizer: str | Path | None = None):
    """The tokenizer of a pretrained directory (or `tokenizer`, for MDLM/BD3-LM), with the family's
    mask id, BOS/EOS and stop tokens and its chat template."""
    path = Path(path).expanduser()
    raw = fam.read_config(path)
    family = fam.detect(raw, path / "config.json")
    return _tokenizer(path, raw, family, fam.vocab_size(raw), tokenizer)


def run_config(family: Family, model_cfg: ModelConfig, max_len: int, tokenizer: str | Path):
    """The unmask `Config` a pretrained directory stands for: its model section, its context
    (the authors' stated limit where config.json claims more), the mask-rate-t schedule, its preset."""
    from unmask.config import Config, DataConfig, DecodeConfig, NoiseConfig

    seq_len = min(max_len, CONTEXT_LIMITS.get(family.name, max_len))
    seq_len -= seq_len % model_cfg.block_size
    return Config(
        data=DataConfig(corpus="none", seq_len=seq_len, tokenizer=str(tokenizer)),
        model=model_cfg,
        noise=NoiseConfig(schedule="loglinear"),  # mask rate = t: LLaDA's too
        decode=DecodeConfig(preset=family.preset),
    )


def pretrained_config(path: str | Path):
    """`run_config` of a pretrained directory from its config.json alone (no weights read)."""
    path = Path(path).expanduser()
    raw = fam.read_config(path)
    family = fam.detect(raw, path / "config.json")
    where = str(path / "config.json")
    block = fam.block_size(family, raw)
    if family.backbone == "dit":
        from unmask.models.pretrained.dit import dit_config

        return run_config(
            family, dit_config(raw, where, family.attention, block), int(raw.get("model_length", 1024)), path
        )
    if family.backbone == "diffusion_gemma":
        text = raw.get("text_config") or {}
        cfg = ModelConfig(
            attention=family.attention,
            block_size=max(block, 1),
            dim=int(text.get("hidden_size", 2304)),
            n_layers=int(text.get("num_hidden_layers", 30)),
            n_heads=int(text.get("num_attention_heads", 8)),
        )
        return run_config(family, cfg, int(text.get("max_position_embeddings", 0) or 4096), path)
    from unmask.models.pretrained.native import native_config

    hf = native_config(family, raw, where)
    cfg = ModelConfig(
        attention=family.attention,
        block_size=max(block, 1),
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
    )
    return run_config(family, cfg, int(getattr(hf, "max_position_embeddings", 0) or 4096), path)
