"""Prompt sets as token tensors: held-out document prefixes (the default set of benchmarks,
reproductions and ADJUST trajectories) or prompts from a file."""

from __future__ import annotations

import torch

from unmask.data.corpus import load_corpus


def heldout_prompts(tokenizer, data_cfg, n: int, prompt_tokens: int, split: str = "test") -> torch.Tensor:
    """[n, 1 + prompt_tokens]: [BOS] + the first tokens of held-out documents (the default set)."""
    docs = load_corpus(
        data_cfg.corpus,
        txt_documents=data_cfg.txt_documents,
        valid_fraction=data_cfg.valid_fraction,
        test_fraction=data_cfg.test_fraction,
    )[split]
    rows = [ids[:prompt_tokens] for ids in tokenizer.encode_batch(docs) if len(ids) >= prompt_tokens]
    if not rows:
        raise ValueError(f"no {split} document has {prompt_tokens} tokens for a prompt")
    rows = (rows * (n // len(rows) + 1))[:n]
    return torch.tensor([[tokenizer.bos_id] + r for r in rows])


def file_prompts(tokenizer, prompts: list[str], n: int) -> torch.Tensor:
    """[n, 1 + P]: prompts from a file, cycled to n; they must share one token length (one batch
    shape, so no padding can change a row's positions)."""
    rows = [tokenizer.prompt_ids(p) for p in prompts]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"benchmark prompts must share one token length, got lengths {sorted(lengths)}")
    return torch.tensor((rows * (n // len(rows) + 1))[:n])
