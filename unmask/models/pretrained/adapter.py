"""`HFDenoiser`: a native transformers causal-LM class behind unmask's Denoiser protocol.

One place owns each family's conventions so decoders never see them:
- attention: bidirectional (`is_causal=False`), or block-causal with L' (or causal) through an
  additive 4D mask built from the same predicate our own backbone uses (absolute positions, cache
  included);
- the logit shift: for Dream / Fast-dLLM v2 the logit at i predicts token i+1, so canvas position
  i is given the output at i-1 (logits and hidden states alike). When a cached call starts at
  position s > 0, the output at s-1 comes from an earlier call on the same cache (the prompt
  prefill, the previous block's commit pass, or the full refresh pass) and is carried;
- the KV cache: our `KVCache` (scratch writes, `commit`, `seek`) through `BridgeCache`, sized by
  the model's key/value heads and head dimension.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from unmask.config import ModelConfig
from unmask.models import invariant, masks
from unmask.models.kv_cache import KVCache
from unmask.models.pretrained.families import Family, PretrainedError
from unmask.models.pretrained.hf_cache import BridgeCache
from unmask.models.transformer import DenoiserOutput


class ShiftError(RuntimeError):
    """A shifted model was called at position s without the output at s-1 on record."""


class HFDenoiser(nn.Module):
    noising = "absorbing"

    def __init__(self, native: nn.Module, family: Family, cfg: ModelConfig, *, mask_id: int, max_len: int):
        super().__init__()
        self.native, self.family, self.cfg = native, family, cfg
        hf = native.config
        self.vocab_size = native.lm_head.out_features
        self.mask_id, self.max_len = mask_id, max_len
        self.n_kv_heads = hf.num_key_value_heads
        self.head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        self.soft_mask = None
        self.subs = False  # their reference loops keep [MASK] in the softmax (CHECKPOINTS.md §10)
        # per cache (decodes that take turns on the model each keep theirs): the last call's
        # (start, raw hidden), and the carried (position, hidden) of a shifted family
        self._previous: weakref.WeakKeyDictionary[KVCache, tuple[int, torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self._carry: weakref.WeakKeyDictionary[KVCache, tuple[int, torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def predicate(self) -> masks.MaskPredicate:
        if self.cfg.attention == "block_causal":
            return masks.block_causal(self.cfg.block_size)
        if self.cfg.attention == "causal":
            return masks.causal
        return masks.bidirectional

    @property
    def head(self) -> nn.Module:
        return self.native.lm_head

    @property
    def tok_embed(self) -> nn.Module:
        return self.native.get_input_embeddings()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.native.get_input_embeddings()(tokens)  # [B, T, D]

    def new_cache(self, batch: int, max_len: int, device) -> KVCache:
        dtype = next(self.native.parameters()).dtype
        return KVCache(
            self.cfg.n_layers, batch, self.n_kv_heads, self.head_dim, max_len, dtype=dtype, device=device
        )

    def _additive(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """bool [.., Tq, Tk] -> additive mask (0 / most negative); eager attention adds masks."""
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def run(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states for embeddings `h` [B, T, D] at `positions` [T] (or [B, T]);
        `allowed` [T, S] or [B, T, S] bool (None: every key)."""
        mask = None
        if allowed is not None:
            allowed = allowed if allowed.dim() == 3 else allowed[None]
            mask = self._additive(allowed[:, None], h.dtype)  # [B|1, 1, T, S]
        position_ids = positions if positions.dim() == 2 else positions[None]
        with invariant.routed(h):  # batch- and cache-invariant inference ops inside transformers' forward
            out = self.native.model(
                inputs_embeds=h,
                attention_mask=mask,
                position_ids=position_ids,
                cache=BridgeCache(cache) if cache is not None else None,
                use_cache=cache is not None,
            )
        return out.last_hidden_state

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        embeds: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """Logits [B, T, V] for `tokens` [B, T] (or `embeds` [B, T, D]) after the cache's prefix;
        position i's logits predict the token at i, whatever the family's convention. `key_mask`
        [B, >= S] (True = real token) hides left padding, as the reference loops' attention masks do."""
        h = self.embed(tokens) if embeds is None else embeds
        start = cache.write_start if cache is not None else 0
        T = h.shape[1]
        positions = torch.arange(start, start + T, device=h.device)
        visible = cache.visible(T) if cache is not None else T
        allowed = None
        if self.cfg.attention != "bidirectional":  # block-causal or causal: the mask says which keys
            allowed = masks.dense_mask(self.predicate, positions, torch.arange(visible, device=h.device))
        if key_mask is not None:
            allowed = masks.with_key_mask(allowed, key_mask[:, :visible], T)  # [B, T, S]
        raw = self.run(h, positions, allowed, cache)
        if not self.family.shift:
            return DenoiserOutput(invariant.linear(self.native.lm_head, raw), raw)
        hidden = self._shift(raw, cache, start)
        upcoming = None  # what the last output predicts: the next position (block-causal: unaffected by it)
        if self.cfg.attention == "block_causal":
            upcoming = invariant.linear(self.native.lm_head, raw[:, -1:])[:, 0]
        return DenoiserOutput(invariant.linear(self.native.lm_head, hidden), hidden, upcoming)

    def _shift(self, raw: torch.Tensor, cache: KVCache | None, start: int) -> torch.Tensor:
        """raw [B, T, D] outputs at start..start+T-1 -> the outputs at start-1..start+T-2."""
        previous = None
        if cache is not None:
            previous = self._previous.get(cache)
            self._previous[cache] = (start, raw)
        if start == 0:
            return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)  # position 0 is never predicted
        carry = self._carry.get(cache)
        if carry is None or carry[0] != start - 1:
            if previous is None or not previous[0] <= start - 1 < previous[0] + previous[1].shape[1]:
                raise ShiftError(
                    f"{self.family.name} predicts position {start} from the output at {start - 1}, "
                    "which no earlier call on this cache computed"
                )
            carry = self._carry[cache] = (start - 1, previous[1][:, start - 1 - previous[0]])
        return torch.cat([carry[1][:, None], raw[:, :-1]], dim=1)

    def forward_bd3_train(
        self, xt: torch.Tensor, x0: torch.Tensor, xt_embeds: torch.Tensor | None = None
    ) -> DenoiserOutput:
        """The vectorized block-diffusion pass over `[x_t ; x0]` (both at positions 0..L-1)."""
        if self.cfg.attention != "block_causal" or self.family.shift:
            raise PretrainedError(
                f"{self.family.name}: the NELBO bound (eval ppl) needs an unshifted block-causal or a "
                "bidirectional model; a shifted block-causal one predicts a block's first token from the "
                "previous block, which the [x_t ; x0] pass does not express"
            )
        L = xt.shape[1]
        noisy = self.embed(xt) if xt_embeds is None else xt_embeds
        h = torch.cat([noisy, self.embed(x0)], dim=1)
        index = torch.arange(2 * L, device=h.device)
        allowed = masks.dense_mask(masks.bd3_train(L, self.cfg.block_size), index, index)
        hidden = self.run(h, index % L, allowed)[:, :L]
        return DenoiserOutput(invariant.linear(self.native.lm_head, hidden), hidden)

    def num_params(self, *, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed_weight_numel()
        return n

    def embed_weight_numel(self) -> int:
        return self.native.get_input_embeddings().weight.numel() + self.native.lm_head.weight.numel()
