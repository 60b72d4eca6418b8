"""`export(loaded, DIR, format=...)`: a trained run as a Hugging Face directory in a pretrained
family's layout (LLaDA, SDAR, LLaDA2, Llama, Qwen3), which unmask loads back as that family."""

from __future__ import annotations

import warnings
from pathlib import Path

from unmask.exporting.card import model_card
from unmask.exporting.layouts import FORMATS, ExportError, pick, shape_of
from unmask.exporting.write import TORCH_NAMES, Staging, write_json, write_tokenizer, write_weights

__all__ = ["FORMATS", "ExportError", "export"]


def export(
    loaded,
    out: str | Path,
    *,
    format: str = "auto",
    dtype: str = "bf16",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write the run `loaded` (`load_checkpoint(RUN)`: its EMA weights when it has them) to `out` in
    `format` (`auto`: llada for bidirectional runs, sdar / llada2 for block-causal ones with / without
    q/k norm, qwen3 / llama for AR ones) with weights in `dtype` (bf16, as the families ship; fp32
    for exact logits). Returns `out`."""
    if "pretrained" in loaded.state or not hasattr(loaded.model, "blocks"):
        raise ExportError(
            "--checkpoint: export writes runs trained by unmask; this is already a pretrained model"
        )
    if dtype not in TORCH_NAMES:
        raise ExportError(f"--dtype: one of {', '.join(TORCH_NAMES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ExportError(f"--max-shard-bytes must be >= 1, got {max_shard_bytes}")
    config, tok = loaded.config, loaded.tokenizer
    fmt = pick(format, config)
    s = shape_of(loaded.model, config, tok)
    if fmt.sglang and s.mask_id != fmt.sglang[0]:
        warnings.warn(
            f"{fmt.name}: SGLang serves {fmt.config(s)['architectures'][0]} with mask id "
            f"{fmt.sglang[0]} built in, and this run's mask id is {s.mask_id}: the export loads in "
            "unmask and transformers, "
            "but SGLang would decode it wrongly (see the README: train with a tokenizer whose mask "
            "token has that id)",
            stacklevel=2,
        )
    state = {k: v for k, v in loaded.model.state_dict().items()}
    hf_config = {**fmt.config(s), "torch_dtype": TORCH_NAMES[dtype]}
    params = sum(p.numel() for p in loaded.model.parameters())
    out = Path(out)
    with Staging(out, overwrite=overwrite) as tmp:
        write_weights(tmp, fmt.tensors(state, s), dtype, max_shard_bytes)
        write_json(tmp, "config.json", hf_config)
        generation = {k: v for k, v in hf_config.items() if k.endswith("_token_id") and k != "mask_token_id"}
        write_json(tmp, "generation_config.json", generation)
        write_tokenizer(tmp, tok, max_len=s.max_len, chat=config.instruct.stage != "none")
        (tmp / "README.md").write_text(model_card(fmt, s, config, loaded.state, params, dtype))
    return out
