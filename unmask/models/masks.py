"""Attention-mask predicates: which key each query may attend to.

A predicate maps broadcastable integer index tensors `(q, k) -> bool tensor` (True = attend). One
predicate serves every backend: `dense_mask` materialises it for SDPA on CPU; the same function
is a valid FlexAttention `mask_mod` body on CUDA. Indices are absolute positions in the key
sequence (cache included), so a cached block sees exactly what it would see uncached.

Block diffusion (BD3-LM, Arriola et al. 2025) trains on `[x_t ; x0]` (length 2L): `bd3_train`
encodes its four rules with `blk(i) = (i mod L) // L'`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MaskPredicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bidirectional(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(q >= k)


def causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q >= k


def block_causal(block_size: int) -> MaskPredicate:
    """Attend to the same block and every earlier block."""

    def predicate(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q // block_size) >= (k // block_size)

    return predicate


def bd3_train(seq_len: int, block_size: int) -> MaskPredicate:
    """The BD3-LM vectorized-training mask over `[x_t ; x0]`, indices in `[0, 2L)`.

    noisy -> noisy: same block only; noisy -> clean: strictly earlier blocks;
    clean -> clean: same or earlier blocks; clean -> noisy: never.
    """

    def predicate(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_clean, k_clean = q >= seq_len, k >= seq_len
        qb, kb = (q % seq_len) // block_size, (k % seq_len) // block_size
        noisy_noisy = ~q_clean & ~k_clean & (qb == kb)
        noisy_clean = ~q_clean & k_clean & (qb > kb)
        clean_clean = q_clean & k_clean & (qb >= kb)
        return noisy_noisy | noisy_clean | clean_clean

    return predicate


def dense_mask(predicate: MaskPredicate, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Materialise `predicate` as a boolean `[Tq, Tk]` mask (`[B, Tq, Tk]` for per-row query
    positions `q_index` [B, Tq])."""
    return predicate(q_index[..., :, None], k_index[None, :])


def with_key_mask(mask: torch.Tensor | None, key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """`mask` [T, S] or [B, T, S] (None: all keys) restricted to the keys `key_mask` [B, S] marks
    real (padding excluded) -> [B, T, S]."""
    keys = key_mask[:, None, :].expand(-1, n_query, -1)
    if mask is None:
        return keys
    return keys & (mask if mask.dim() == 3 else mask[None])
