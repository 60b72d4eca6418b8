"""The model card (`README.md`) of an exported directory: what it is, what it was trained on, how
well, and how to load it."""

from __future__ import annotations

from typing import Any

from unmask.config import Config
from unmask.exporting.layouts import Format, Shape

CLASSES = {
    "llada": ("transformers.LlamaForCausalLM", "bidirectional (is_causal=False)"),
    "sdar": ("transformers.Qwen3ForCausalLM", "block-causal: a 4D mask, query block >= key block"),
    "llada2": ("transformers.Glm4MoeForCausalLM", "block-causal: a 4D mask, query block >= key block"),
    "llama": ("transformers.LlamaForCausalLM", "causal"),
    "qwen3": ("transformers.Qwen3ForCausalLM", "causal"),
}


def model_card(fmt: Format, s: Shape, config: Config, state: dict[str, Any], params: int, dtype: str) -> str:
    cls, attention = CLASSES[fmt.name]
    val = state.get("val_ppl")
    bound = "exact perplexity" if s.attention == "causal" else "perplexity bound (NELBO, Monte Carlo)"
    val_line = f"{val:.3f} ({bound}, validation split)" if isinstance(val, int | float) else "not recorded"
    preset = config.decode.preset
    block = f", block size L' = {s.block}" if s.attention == "block_causal" else ""
    sglang = ""
    if fmt.sglang:
        mask, block_size = fmt.sglang
        ok = s.mask_id == mask and s.vocab > mask
        arch = fmt.config(s)["architectures"][0]
        verdict = (
            "it can be served as is.\n"
            if ok
            else "SGLang would decode with the wrong mask id; see the unmask README (train with a "
            "tokenizer whose mask token has that id).\n"
        )
        sglang = (
            f"\n## SGLang\n\nSGLang serves `{arch}` with mask id {mask} and block size {block_size} built "
            f"in (the block size can be set in `--dllm-algorithm-config`). This export's mask id is "
            f"{s.mask_id}: {verdict}"
        )
    return f"""---
library_name: unmask
tags: [diffusion-language-model, {s.attention.replace("_", "-")}, unmask]
---

# {fmt.name} export of an unmask run

| | |
|---|---|
| layout | {fmt.name} (`{fmt.config(s)["architectures"][0]}`), weights in {dtype} |
| attention | {s.attention}{block} |
| layers x width | {s.layers} x {s.dim}, {s.heads} heads ({s.kv_heads} key/value), head dim {s.head_dim}, \
SwiGLU {s.hidden}{", q/k RMSNorm" if s.qk_norm else ""} |
| parameters | {params:,} |
| vocabulary | {s.vocab} tokens, mask id {s.mask_id} |
| context | {s.max_len} tokens |
| training data | `{config.data.corpus}` |
| training steps | {state.get("step", "?")} (objective {config.model.objective}, lr {config.train.lr}, \
batch {config.train.batch_size}) |
| validation | {val_line} |
| decoding | evaluated with the `{preset}` preset |

## Load it

With unmask (every command takes the directory):

```bash
unmask sample --checkpoint DIR --prompt "..."      # decodes with the family's preset
unmask serve --checkpoint DIR
```

With transformers: the weights load into `{cls}` after the family's key renames (unmask's
`models/pretrained/native.py` lists them); the attention is {attention}. The family's own remote
code (its `modeling_*.py`, not shipped here) reads `config.json` as written.
{sglang}"""
