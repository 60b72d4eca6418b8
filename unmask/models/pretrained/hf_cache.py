"""Our `KVCache` seen through transformers' `Cache` interface.

A native transformers model writes each layer's post-rotary keys/values with
`cache.update(k, v, layer_idx)`; this bridge forwards those writes to `KVCache.write`,
so a pretrained model gets the same scratch-write / `commit` / `seek` semantics as our own
backbone, with buffers sized by the model's key/value heads (grouped-query attention).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from unmask.models.kv_cache import KVCache


class _Layer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, cache: KVCache, index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.write(self.index, key_states, value_states)  # [B, Hkv, S, Dh] each

    def get_seq_length(self) -> int:
        return self.cache.write_start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.visible(query_length), 0

    def get_max_length(self) -> int:
        return self.cache.max_len


class BridgeCache(Cache):
    """A transformers `Cache` whose layers read and write an unmask `KVCache`."""

    def __init__(self, cache: KVCache):
        super().__init__(layers=[_Layer(cache, i) for i in range(len(cache.k))])
        self.kv = cache
