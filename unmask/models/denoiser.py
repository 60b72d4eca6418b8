"""The `Denoiser` protocol: what every caller of a model may use, and nothing else.

Our `Transformer`, its DiT variant (MDLM / BD3-LM checkpoints), the pretrained adapter
(`HFDenoiser`, a native transformers class) and the wrappers that time or script a model satisfy
it. Decoders, the objectives, the lm-eval model and the ADJUST sampler name this protocol in their
signatures and read these members directly (no `getattr` defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from unmask.config import ModelConfig
    from unmask.models.kv_cache import KVCache
    from unmask.models.soft_mask import SoftMask


class DenoiserOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, D] final-norm hidden states
    # [B, V] the logits of the position *after* the input, where the model's last output predicts
    # it (shifted block-causal families: Fast-dLLM v2's block-opening token); None elsewhere
    next_logits: torch.Tensor | None = None


@runtime_checkable
class Denoiser(Protocol):
    cfg: ModelConfig  # cfg.attention (bidirectional | block_causal | causal), cfg.block_size L', layout
    vocab_size: int  # V: logits are over every id, [MASK] included
    mask_id: int
    subs: bool  # True: [MASK] is never proposed (SUBS: MDLM, BD3-LM, ours); False: the full softmax
    soft_mask: SoftMask | None  # the soft-masking module, when the model was trained with one
    head: nn.Module  # the LM head: hidden [.., D] -> logits [.., V] (the ADJUST sampler's refresh)
    tok_embed: nn.Module  # the token embedding (soft inputs blend its rows)
    # absorbing: [MASK] positions are decoded; uniform: canvases of random tokens re-noised each
    # step (DiffusionGemma; `mask_id` is then the virtual V marking undecided positions)
    noising: str

    def __call__(
        self,
        tokens: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        embeds: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """Logits and hidden states for `tokens` [B, T] (or `embeds` [B, T, D]) placed after the
        cache's prefix; position i's logits predict the token at i. `key_mask` [B, >= S] (True = a
        real token) hides left padding."""
        ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, D] input embeddings."""
        ...

    def new_cache(self, batch: int, max_len: int, device) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` positions (sized by the model's
        key/value heads)."""
        ...

    def parameters(self, recurse: bool = True): ...


@runtime_checkable
class TrainableDenoiser(Denoiser, Protocol):
    """What the training objectives use on top (our backbones and the pretrained adapter)."""

    def run(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Blocks + final norm on input embeddings `h` [B, T, D] at `positions`; `mask` [T, S] bool."""
        ...

    def forward_bd3_train(
        self, xt: torch.Tensor, x0: torch.Tensor, xt_embeds: torch.Tensor | None = None
    ) -> DenoiserOutput:
        """The vectorized BD3-LM pass over `[x_t ; x0]`: logits [B, L, V] of the noisy half."""
        ...
