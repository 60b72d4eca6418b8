"""KVCache: preallocated keys/values per layer, with a committed prefix and scratch space.

Writes go to positions `[length, length + T)` and do not move `length`: a block can be denoised
many times against the same committed prefix, each call overwriting the same scratch slots.
`commit(n)` makes the first `n` scratch positions part of the prefix. `seek(pos)` redirects writes
to `[pos, pos + T)` inside the committed region (the Fast-dLLM dual cache refreshes the active
block in place while the suffix stays cached); a call then attends to all committed positions.

For block-causal (BD3-LM) and causal models the cache is *exact*: a committed block's keys and
values never depend on later tokens, so cached logits equal uncached logits. For bidirectional
models it is the Fast-dLLM approximation: committed K/V are stale once later tokens change, and
are only as good as the last refresh.
"""

from __future__ import annotations

import torch

from unmask.models.invariant import KEY_CHUNK


class KVCache:
    """Per-layer K/V buffers `[B, H, max_len, Dh]`; `length` positions are committed."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.cursor: int | None = None

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def write_start(self) -> int:
        """Position of the next write: `length` (append mode) or the `seek` position."""
        return self.length if self.cursor is None else self.cursor

    def seek(self, pos: int | None) -> None:
        """Write the next calls at `pos` (inside the committed prefix); None returns to appending."""
        if pos is not None and not 0 <= pos <= self.length:
            raise ValueError(f"cannot seek to {pos}: only {self.length} positions are committed")
        self.cursor = pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new `k, v` `[B, H, T, Dh]` at `[start, start+T)`; return all visible K/V
        `[B, H, max(length, start+T), Dh]`."""
        start = self.write_start
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions needed, max_len={self.max_len}")
        if self.k[layer].dtype != k.dtype:  # e.g. first write under autocast: follow the model
            self.k[layer] = self.k[layer].to(k.dtype)
            self.v[layer] = self.v[layer].to(v.dtype)
        if torch.is_grad_enabled():
            # Out of place, so K/V that earlier calls saved for backward stay valid (two-pass
            # training differentiates through the cache).
            index = torch.arange(start, end, device=k.device)
            self.k[layer] = self.k[layer].index_copy(2, index, k)
            self.v[layer] = self.v[layer].index_copy(2, index, v)
        else:
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
        visible = max(end, self.length)
        return self.k[layer][:, :, :visible], self.v[layer][:, :, :visible]

    def visible(self, n: int) -> int:
        """Keys a call of `n` new positions sees: the committed prefix and its own writes."""
        return max(self.write_start + n, self.length)

    def commit(self, n: int) -> None:
        """Make the next `n` written positions part of the committed prefix."""
        if n < 0 or self.length + n > self.max_len:
            raise ValueError(f"cannot commit {n} positions at length {self.length} (max_len={self.max_len})")
        self.length += n


class RaggedCache:
    """The rows of several `KVCache`s in one call, each row at its own position (the serving
    engine's shared forward: lanes at different blocks of different prompts).

    `parts` pairs each cache with the number of real positions its rows have in the call (the call
    is right-padded to its longest part). A write stores each part's real positions in its own
    cache at its own `write_start` and returns the visible K/V of all rows, each part's right-padded
    with zeros to the longest (rounded up to whole key chunks of the invariant attention): a row's
    keys keep their absolute positions (so the attention sums them in the same chunks as alone) and
    `key_mask()` hides the rest.
    """

    def __init__(self, parts: list[tuple[KVCache, int]]):
        self.parts = parts
        self.rows = [cache.rows for cache, _ in parts]
        device = parts[0][0].device
        self.write_start = torch.cat(  # [B] each row's first position in the call
            [
                torch.full((b,), c.write_start, device=device)
                for b, (c, _) in zip(self.rows, parts, strict=True)
            ]
        )
        self.ends = [cache.visible(n) for cache, n in parts]  # keys each part sees
        # whole chunks of the invariant attention's keys: it then pads (copies) no K/V of its own
        self.length = -(-max(self.ends) // KEY_CHUNK) * KEY_CHUNK

    def visible(self, n: int) -> int:
        return self.length

    def key_mask(self) -> torch.Tensor:
        """[B, S] True at the keys each row's own call would hold."""
        keys = torch.arange(self.length, device=self.write_start.device)
        return torch.cat(
            [(keys < end)[None].expand(b, -1) for b, end in zip(self.rows, self.ends, strict=True)]
        )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, T, Dh] (T: the longest part) -> all rows' visible K/V [B, H, S, Dh]."""
        B, H, _, Dh = k.shape
        keys = k.new_empty(B, H, self.length, Dh)
        values = v.new_empty(B, H, self.length, Dh)
        row = 0
        for b, (cache, n) in zip(self.rows, self.parts, strict=True):
            kk, vv = cache.write(layer, k[row : row + b, :, :n], v[row : row + b, :, :n])
            S = kk.shape[2]
            keys[row : row + b, :, :S] = kk
            values[row : row + b, :, :S] = vv
            keys[row : row + b, :, S:] = 0  # past a row's end: masked, and finite
            values[row : row + b, :, S:] = 0
            row += b
        return keys, values
