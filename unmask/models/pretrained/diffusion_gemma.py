"""DiffusionGemma (transformers' `DiffusionGemmaForBlockDiffusion`) behind the Denoiser protocol.

One shared Gemma stack used two ways (`transformers/models/diffusion_gemma/modeling_*.py`):

- the *encoder* pass is causal and writes the KV cache: the prompt, then each finished canvas.
  In the decode loop it is the commit pass: `model(tokens, cache=kv)` then `kv.commit(n)`;
- the *decoder* pass is bidirectional over a canvas of `canvas_length` tokens and reads the cache
  without writing it (sliding-window layers see the last `sliding_window - 1` cached positions,
  full layers all of them); it adds the self-conditioning signal built from the previous step's
  processed logits. In the loop it is a block step: `model(tokens, cache=kv, decode=True,
  self_conditioning=logits)`, the keywords the `Renoised` input policy passes.

It is not a masked model: the canvas starts as uniform random tokens and what a step does not
accept is re-drawn uniformly. Nothing is ever fed as [MASK], so `mask_id` is the virtual id V (one
past the vocabulary) that marks a block's still-undecided positions in the loop's state; it never
reaches the model. The cache is transformers' own `DynamicCache` (per-layer head shapes, sliding
layers keep their window), wrapped with the committed length the loop reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from unmask.config import ModelConfig
from unmask.models import invariant
from unmask.models.pretrained.families import Family, PretrainedError
from unmask.models.transformer import DenoiserOutput

NOT_MASKED = (
    "DiffusionGemma is a uniform-noise model (no [MASK]; what is not accepted is re-drawn uniformly): "
    "the absorbing-mask NELBO behind eval ppl, lm-eval loglikelihood and unmask's training objectives "
    "does not apply to it, and its uniform-diffusion bound is not implemented"
)


class CanvasCache:
    """transformers' `DynamicCache` for one batch, with the committed length the decode loop reads.
    Only encoder passes write it (each is committed right after); decoder passes only read it."""

    def __init__(self, hf_cache, max_len: int):
        self.hf, self.max_len = hf_cache, max_len
        self.length = 0  # committed positions
        self.pending = 0  # written by the last encoder pass, not yet committed
        self.cursor = None

    @property
    def write_start(self) -> int:
        return self.length

    def seek(self, pos: int | None) -> None:
        raise PretrainedError("DiffusionGemma's cache is append-only (no Fast-dLLM dual cache)")

    def commit(self, n: int) -> None:
        if n != self.pending:
            raise ValueError(f"cannot commit {n} positions: the last encoder pass wrote {self.pending}")
        self.length += n
        self.pending = 0


class DiffusionGemmaDenoiser(nn.Module):
    noising = "uniform"  # canvases of uniform noise, re-noised each step (no [MASK])

    def __init__(self, native: nn.Module, family: Family, *, max_len: int):
        super().__init__()
        self.native, self.family, self.max_len = native, family, max_len
        text = native.config.text_config
        self.text_config = text
        self.canvas = int(native.config.canvas_length)
        self.cfg = ModelConfig(
            attention="block_causal",
            block_size=self.canvas,
            dim=text.hidden_size,
            n_layers=text.num_hidden_layers,
            n_heads=text.num_attention_heads,
        )
        self.vocab_size = int(text.vocab_size)
        self.mask_id = self.vocab_size  # virtual: a still-undecided position, never fed
        self.subs = True
        self.soft_mask = None
        self.softcap = text.final_logit_softcapping

    @property
    def head(self) -> nn.Module:
        return self.native.lm_head

    @property
    def tok_embed(self) -> nn.Module:
        return self.native.model.decoder.embed_tokens

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)  # [B, T, D] (Gemma's scaled embedding)

    def new_cache(self, batch: int, max_len: int, device) -> CanvasCache:
        from transformers import DynamicCache

        return CanvasCache(DynamicCache(config=self.text_config), max_len)

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        cache: CanvasCache | None = None,
        embeds: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        decode: bool = False,
        self_conditioning: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """`decode=False`: the causal encoder pass over `tokens` [B, T] after the cache's prefix,
        written to the cache (its hidden states; no logits, nothing reads them). `decode=True`: the
        decoder pass over the canvas `tokens` [B, L], with `self_conditioning` [B, L, V] the
        previous step's processed logits (None at a canvas's first step): logits [B, L, V]."""
        if cache is None or embeds is not None or key_mask is not None:
            raise PretrainedError(
                "DiffusionGemma runs on token ids with its KV cache (decode with --decode.cache auto); "
                "embeddings and left padding are not supported"
            )
        start = cache.length
        T = tokens.shape[1]
        positions = torch.arange(start, start + T, dtype=torch.int32, device=tokens.device)[None]
        with invariant.routed(tokens):  # batch-invariant inference ops inside transformers' forward
            if decode:
                return self._decode(tokens, cache, positions, self_conditioning)
            encoder = self.native.model.encoder
            dummy = torch.empty(
                (tokens.shape[0], T, 0), dtype=self.tok_embed.weight.dtype, device=tokens.device
            )
            masks = encoder.create_masks_for_generate(
                config=self.native.config,
                inputs_embeds=dummy,
                attention_mask=torch.ones(tokens.shape[0], start + T, dtype=torch.bool, device=tokens.device),
                cache=cache.hf,
                position_ids=positions,
            )
            out = encoder(input_ids=tokens, attention_mask=masks, cache=cache.hf, position_ids=positions)
        cache.pending = T
        hidden = out.last_hidden_state
        return DenoiserOutput(hidden.new_empty(*hidden.shape[:2], 0), hidden)

    def _decode(self, tokens, cache: CanvasCache, positions, self_conditioning) -> DenoiserOutput:
        if cache.pending:
            raise ValueError("an encoder pass was not committed before the next canvas step")
        if self_conditioning is not None:
            self_conditioning = self_conditioning.to(self.tok_embed.weight.dtype)
        out = self.native.model.decoder(
            decoder_input_ids=tokens,
            cache=cache.hf,
            self_conditioning_logits=self_conditioning,
            decoder_position_ids=positions,
        )
        hidden = out.last_hidden_state
        logits = invariant.linear(self.native.lm_head, hidden).to(torch.float32)
        logits = torch.tanh(logits / self.softcap) * self.softcap  # Gemma's final logit soft-capping
        return DenoiserOutput(logits, hidden)

    def run(self, *args, **kwargs):
        raise PretrainedError(NOT_MASKED)

    def forward_bd3_train(self, *args, **kwargs):
        raise PretrainedError(NOT_MASKED)

    def num_params(self, *, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - (0 if embeddings else self.tok_embed.weight.numel())


def load_diffusion_gemma(
    path: Path, raw: dict[str, Any], family: Family, dtype: torch.dtype, where: str, device: torch.device
):
    """The directory's weights in transformers' own `DiffusionGemmaForBlockDiffusion` (its loader
    ties the encoder to the decoder and the head to the embedding); every missing, unexpected or
    misshapen weight is an error naming it. The vision tower is dropped after loading: unmask
    decodes text. On a CPU the experts run as one F.linear each (routed through the invariant
    ops): the grouped GEMM groups tokens by expert, so a token's numbers would depend on its
    batch-mates (set at load: the text config does not take it later)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    try:
        config = DiffusionGemmaConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, TypeError, OSError, StrictDataclassError) as e:
        raise PretrainedError(f"{where}: DiffusionGemmaConfig refuses this config: {e}") from None
    if not config.canvas_length or config.canvas_length < 1:
        raise PretrainedError(
            f"{where}: canvas_length must be a positive block size, got {config.canvas_length}"
        )
    config._attn_implementation = "sdpa"
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the missing-weight warnings become our error below
    hf_logging.disable_progress_bar()
    try:
        native, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
            str(path),
            config=config,
            dtype=dtype,
            local_files_only=True,
            output_loading_info=True,
            **({"experts_implementation": "eager"} if device.type == "cpu" else {}),
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"cannot load the weights in {path}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise PretrainedError(
            f"weights in {path} do not fit the model its config.json describes: "
            + "; ".join(f"{k.replace('_', ' ')} {sorted(map(str, v))[:5]}" for k, v in bad.items())
        )
    encoder = native.model.encoder
    encoder.vision_tower, encoder.embed_vision = None, None  # text only: free the vision weights
    max_len = int(config.text_config.max_position_embeddings or 4096)
    return DiffusionGemmaDenoiser(native.eval(), family, max_len=max_len), max_len
