"""Soft-masking (Hersche et al., "Soft-Masked Diffusion Language Models", ICLR 2026).

A still-masked position is fed a blend of the [MASK] embedding and the top-k predictions of the
previous pass instead of the bare mask:

    e = (1 - lam) * e_MASK + lam * sum_{i in topk(p)} pi_i * e_{v_i},
    lam = w_s * sigmoid(w_a * (-H(p) - w_b)),

with `pi` the top-k probabilities renormalised to sum to 1 and `H` the entropy of the full
distribution. Three learned scalars: w_s = sigmoid(raw) in (0, 1), w_a = softplus(raw) > 0,
w_b = -softplus(raw) < 0. Decoded positions keep their token embedding (lam = 0 there).

`SoftMask` is a submodule of the model (its scalars live in the checkpoint's weights and are also
written to `soft_mask.json` for inspection); the decoding input policy that feeds it is
`unmask.decoding.inputs.SoftInputs`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unmask.models import invariant


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


W_S_INIT = {"ours": 0.05, "reference": 1e-6}  # SoftMaskConfig.init -> the initial w_s


class SoftMask(nn.Module):
    """The three scalars and the blend. `k` is the number of predictions mixed in."""

    def __init__(self, k: int, vocab_size: int, *, w_s: float = 0.05, w_a: float = 6.66, w_b: float = -0.75):
        super().__init__()
        if not 1 <= k <= vocab_size:
            raise ValueError(f"soft-mask k must be in [1, V={vocab_size}], got {k}")
        self.k = k
        self.raw_s = nn.Parameter(torch.tensor(math.log(w_s / (1 - w_s))))
        self.raw_a = nn.Parameter(torch.tensor(_inverse_softplus(w_a)))
        self.raw_b = nn.Parameter(torch.tensor(_inverse_softplus(-w_b)))

    @property
    def w_s(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_s)

    @property
    def w_a(self) -> torch.Tensor:
        return F.softplus(self.raw_a)

    @property
    def w_b(self) -> torch.Tensor:
        return -F.softplus(self.raw_b)

    def values(self) -> dict[str, float]:
        with torch.no_grad():
            return {"k": self.k, "w_s": float(self.w_s), "w_a": float(self.w_a), "w_b": float(self.w_b)}

    def mix(
        self, logits: torch.Tensor, mask_id: int, scale: float | torch.Tensor = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From logits [..., V]: lam [...], top-k weights pi [..., k] (sum 1) and ids [..., k].
        `scale` multiplies w_s (decoding schedules)."""
        logits = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
        logp = logits.log_softmax(-1)
        plogp = logp.exp() * logp.nan_to_num(neginf=0.0)
        entropy = -invariant.row_sum(plogp.reshape(-1, plogp.shape[-1])).reshape(plogp.shape[:-1])  # [...]
        lam = scale * self.w_s * invariant.sigmoid(self.w_a * (-entropy - self.w_b))
        top_logp, ids = logp.topk(self.k, dim=-1)
        pi = top_logp.softmax(-1)  # renormalised top-k probabilities
        return lam, pi, ids

    def blend(
        self,
        embedding: nn.Embedding,
        tokens: torch.Tensor,
        soft: torch.Tensor,
        logits: torch.Tensor,
        mask_id: int,
        scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """Input embeddings [B, T, D] for `tokens` [B, T]: the N positions where `soft` [B, T] is
        True (row-major order) get the blend built from `logits` [N, V] (scaled by `scale`, a
        float or [N]); every other position its token embedding. Nothing larger than [N, k, D]."""
        embeds = embedding(tokens)  # [B, T, D]
        where = soft.nonzero(as_tuple=True)
        if len(where[0]) == 0:
            return embeds
        lam, pi, ids = self.mix(logits, mask_id, scale)  # [N], [N, k], [N, k]
        e_top = (pi.unsqueeze(-1).to(embeds.dtype) * embedding(ids)).sum(-2)  # [N, D]
        e_mask = embedding.weight[mask_id]
        mixed = (1 - lam).unsqueeze(-1).to(embeds.dtype) * e_mask + lam.unsqueeze(-1).to(embeds.dtype) * e_top
        return embeds.index_put(where, mixed)
