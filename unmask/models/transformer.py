"""The backbone: a pre-norm transformer with rotary positions, RMSNorm and a SwiGLU/GELU MLP.

It satisfies the `Denoiser` protocol (`unmask.models.denoiser`): `model(tokens, *, cache=None,
embeds=None, key_mask=None)` returns
`DenoiserOutput(logits [B, T, V], hidden [B, T, D])`. The attention kind is configuration:
bidirectional (MDLM), block-causal with block size L' (BD3-LM), causal (AR). The vectorized
BD3-LM training pass over `[x_t ; x0]` is `forward_bd3_train`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unmask.config import ModelConfig
from unmask.models import invariant, masks
from unmask.models.denoiser import Denoiser, DenoiserOutput  # noqa: F401 - re-exported
from unmask.models.kv_cache import KVCache
from unmask.models.soft_mask import W_S_INIT, SoftMask
from unmask.precision import resolve_precision

ROPE_CHUNK = 512  # positions per chunk of the inference rotary table


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim; x [B, H, T, Dh], cos/sin [T, Dh/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Fused q/k/v projection (rows: H query heads, then Hkv key and Hkv value heads of Dh),
    optional per-head q/k RMSNorm before rotary, grouped-query attention when Hkv < H."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, D = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = invariant.linear(self.qkv, x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q, k, v = (z.view(B, T, -1, Dh).transpose(1, 2) for z in (q, k, v))  # [B, H | Hkv, T, Dh]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, Hkv, prefix + T, Dh]
        if Hkv < H:  # each key/value head serves H / Hkv query heads
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        y = invariant.attention(q, k, v, mask)
        return self.dropout(invariant.linear(self.out, y.transpose(1, 2).reshape(B, T, D)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            hidden = 8 * math.ceil(cfg.mlp_ratio * cfg.dim * 2 / 3 / 8)
            self.up = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        else:
            hidden = int(cfg.mlp_ratio * cfg.dim)
            self.up = nn.Linear(cfg.dim, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = invariant.linear(self.up, x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = invariant.silu(gate) * value
        else:
            h = invariant.gelu(h)
        return self.dropout(invariant.linear(self.down, h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps), nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> LM head over the full vocabulary (mask included)."""

    subs = True  # SUBS parameterization: decoders never propose [MASK] (MDLM, BD3-LM)
    noising = "absorbing"

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        mask_id: int,
        *,
        soft_mask_k: int = 0,
        soft_mask_w_s: float = W_S_INIT["ours"],
    ):
        super().__init__()
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} outside the vocabulary of size {vocab_size}")
        self.cfg, self.vocab_size, self.mask_id = cfg, vocab_size, mask_id
        self.tok_embed = nn.Embedding(vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, vocab_size, bias=False)
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (
            None  # (inv_freq, cos, sin)
        )
        self.reset_parameters()
        self.soft_mask = SoftMask(soft_mask_k, vocab_size, w_s=soft_mask_w_s) if soft_mask_k else None

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("out.weight", "down.weight"))  # scaled as in GPT-2
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers) if residual else 0.02)

    @property
    def predicate(self) -> masks.MaskPredicate:
        if self.cfg.attention == "causal":
            return masks.causal
        if self.cfg.attention == "block_causal":
            return masks.block_causal(self.cfg.block_size)
        return masks.bidirectional

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)  # [B, T, D]

    def new_cache(self, batch: int, max_len: int, device) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` positions."""
        return KVCache(
            self.cfg.n_layers,
            batch,
            self.cfg.n_kv_heads,
            self.cfg.dim // self.cfg.n_heads,
            max_len,
            device=device,
        )

    def rotary_angles(self, positions: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [.., T, Dh/2] of `positions` [T] or [B, T]. On the invariant path they are read
        from a table computed in chunks of ROPE_CHUNK positions, so a position's values never
        depend on where it sits in its call (vectorised cos and sin compute a tensor's scalar tail
        differently from its body; a row of a shared call sits elsewhere than alone)."""
        if not invariant.active(h):
            angles = positions[..., None].float() * self.inv_freq  # [.., T, Dh/2]
            return angles.cos(), angles.sin()
        table = self._rope_table
        if table is None or not torch.equal(table[0], self.inv_freq):
            empty = self.inv_freq.new_zeros(0, self.inv_freq.numel())
            table = self._rope_table = (self.inv_freq.clone(), empty, empty)
        need = int(positions.max()) + 1 if positions.numel() else 0
        while table[1].shape[0] < need:
            lo = table[1].shape[0]
            angles = torch.arange(lo, lo + ROPE_CHUNK, device=h.device)[:, None].float() * self.inv_freq
            table = self._rope_table = (table[0], torch.cat([table[1], angles.cos()]),
                                        torch.cat([table[2], angles.sin()]))  # fmt: skip
        return table[1][positions], table[2][positions]

    def run(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Blocks + final norm on input embeddings `h` [B, T, D] at `positions` [T] (or per row,
        [B, T]); mask [T, S] or [B, 1, T, S]."""
        cos, sin = self.rotary_angles(positions, h)  # [T, Dh/2] | [B, T, Dh/2]
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh/2] against q, k [B, H, T, Dh]
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, mask, cache, i)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        embeds: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """Logits for `tokens` [B, T] (or `embeds` [B, T, D]) placed after the cache's prefix.
        `key_mask` [B, >= S] (True = a real token) hides padding from every query. With a
        `RaggedCache` each row starts at its own position (`write_start` [B])."""
        h = self.embed(tokens) if embeds is None else embeds
        start = cache.write_start if cache is not None else 0  # int | [B]
        T = h.shape[1]
        offset = start[:, None] if isinstance(start, torch.Tensor) else start
        positions = torch.arange(T, device=h.device) + offset  # [T] | [B, T]
        visible = cache.visible(T) if cache is not None else T
        mask = None
        if self.cfg.attention != "bidirectional":
            keys = torch.arange(visible, device=h.device)
            mask = masks.dense_mask(self.predicate, positions, keys)  # [T | B, T, start + T]
        if key_mask is not None:
            mask = masks.with_key_mask(mask, key_mask[:, :visible], T)  # [B, T, S]
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # [B, 1, T, S]
        hidden = self.run(h, positions, mask, cache)
        return DenoiserOutput(invariant.linear(self.head, hidden), hidden)

    def forward_bd3_train(
        self, xt: torch.Tensor, x0: torch.Tensor, xt_embeds: torch.Tensor | None = None
    ) -> DenoiserOutput:
        """One pass over `[x_t ; x0]` (2L tokens, both halves at positions 0..L-1) with the BD3-LM
        training mask; logits for the noisy half only: [B, L, V]. `xt_embeds` [B, L, D] replaces
        the noisy half's token embeddings (soft-masking)."""
        if self.cfg.attention != "block_causal":
            raise ValueError(
                f"forward_bd3_train needs a block_causal model, got attention={self.cfg.attention!r}"
            )
        L = xt.shape[1]
        noisy = self.embed(xt) if xt_embeds is None else xt_embeds
        h = torch.cat([noisy, self.embed(x0)], dim=1)  # [B, 2L, D]
        index = torch.arange(2 * L, device=h.device)
        mask = masks.dense_mask(masks.bd3_train(L, self.cfg.block_size), index, index)
        hidden = self.run(h, index % L, mask)[:, :L]
        return DenoiserOutput(invariant.linear(self.head, hidden), hidden)

    def compile_blocks(self) -> Transformer:
        """torch.compile every block (dynamic shapes: decoding calls vary in length). The entry
        points (forward, forward_bd3_train, run) stay eager Python around compiled blocks."""
        for block in self.blocks:
            block.compile(dynamic=True)
        return self

    def forward_flops(self, batch: int, n_query: int, n_keys: int) -> int:
        """Matmul FLOPs of one forward: `n_query` tokens per row attending to `n_keys` keys."""
        D, H = self.cfg.dim, self.blocks[0].mlp.down.in_features
        up = 2 * H if self.cfg.mlp == "swiglu" else H
        qkv = D * D * (self.cfg.n_heads + 2 * self.cfg.n_kv_heads) // self.cfg.n_heads
        per_token = 2 * (qkv + D * D + D * up + H * D) * self.cfg.n_layers + 2 * D * self.vocab_size
        attention = 2 * 2 * n_keys * D * self.cfg.n_layers  # QK^T and AV
        return batch * n_query * (per_token + attention)

    def num_params(self, *, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_embed.weight.numel() + self.head.weight.numel()
        return n


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast when `precision` is (or `auto` resolves to) bf16 on this device, else a no-op."""
    device_type = torch.device(device).type
    resolved = resolve_precision(precision, device_type).precision
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=resolved == "bf16")


def build_model(
    cfg: ModelConfig, vocab_size: int, mask_id: int, *, soft_mask_k: int = 0, soft_mask_init: str = "ours"
) -> Transformer:
    return Transformer(
        cfg, vocab_size, mask_id, soft_mask_k=soft_mask_k, soft_mask_w_s=W_S_INIT[soft_mask_init]
    )
