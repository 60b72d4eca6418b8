"""ADJUST approximate joint sampling (Bansal & Sanghavi, 2025): the sampler's loss, K-per-forward decoding.

One full forward gives every masked position a distribution; decoding several tokens from those
*marginals* ignores their dependence. ADJUST's sampler layer refreshes the remaining positions'
distributions after each decoded token at the cost of one small layer instead of a full forward:

    h_j = RMSNorm(Block(Linear([RMSNorm(embed(x^(j))) ; RMSNorm(h_{j-1})]))) + h_{j-1}
    q_j = LM_head(h_j)                    (the frozen base model's embedding and head)

with h_0 the full model's final hidden states (the layer: `unmask.models.adjust_sampler`). The loss
unrolls the same refresher objects `generate()` uses between commit rounds (`unmask.decoding.refresh`).
Only the sampler trains. Its objective: forward
KL(p_full(. | x^(J)) || q(. | x^(J))) over the positions still masked in x^(J), after J refreshes
along the base model's own one-token-per-forward trajectory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from unmask.decoding.generate import generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import preset_config
from unmask.decoding.refresh import Marginal, Refresher, View
from unmask.decoding.state import DecodeState
from unmask.models.denoiser import Denoiser


def _view(out) -> View:
    """The whole-canvas view of a model output."""
    return View(0, out.logits, out.hidden)


def unroll_weights(K: int) -> torch.Tensor:
    """P(J = j) for j = 1..K-1 (decoding refreshes K-1 times per full forward):
    softmax(0.5^0, ..., 0.5^(K-2)), short unrolls slightly favoured."""
    if K < 2:
        raise ValueError(f"an ADJUST sampler refreshes K - 1 times per forward: K must be >= 2, got {K}")
    return torch.softmax(0.5 ** torch.arange(K - 1, dtype=torch.float64), dim=0)


def naive_kl(
    base: Denoiser, start: torch.Tensor, reveal_pos: torch.Tensor, reveal_tok: torch.Tensor
) -> torch.Tensor:
    """What no refresh costs: KL(p_full(. | x^(J)) || p_full(. | x^(0))) over positions still masked
    in x^(J). A sampler is useful only below it."""
    return adjust_kl(base, Marginal(), start, reveal_pos, reveal_tok)


def adjust_kl(
    base: Denoiser,
    refresher: Refresher,
    start: torch.Tensor,
    reveal_pos: torch.Tensor,
    reveal_tok: torch.Tensor,
) -> torch.Tensor:
    """Forward KL(p_full || q) averaged over positions still masked after J reveals.

    start [B, T]: trajectory states x^(0); reveal_pos / reveal_tok [B, J]: the next J positions the
    trajectory decoded and their tokens (on a block-causal base all in one block, whose masked
    positions are the ones averaged). The base model is frozen (no gradients); the refresher (the
    decode loop's: `SamplerRefresh`, `Marginal` for the naive KL, `FullModel` for a KL of 0) is
    unrolled J times from the full model's output for x^(0), gradients flowing through it.
    """
    with torch.no_grad():
        view = _view(base(start))  # logits and h_0 [B, T, D] of x^(0)
    rows = torch.arange(start.shape[0], device=start.device)
    tokens = start
    for j in range(reveal_pos.shape[1]):
        tokens = tokens.clone()
        tokens[rows, reveal_pos[:, j]] = reveal_tok[:, j]  # x^(j+1)
        view = refresher(base, tokens, view, lambda tokens=tokens: _view(base(tokens)))
    logits = view.logits
    with torch.no_grad():
        target = base(tokens).logits  # p_full(. | x^(J))
    masked = tokens == base.mask_id  # [B, T]
    if base.cfg.attention == "block_causal":  # decoding refreshes the active block only: the reveals'
        L = base.cfg.block_size
        block = torch.arange(tokens.shape[1], device=tokens.device) // L
        masked &= block[None, :] == (reveal_pos[:, :1] // L)
    mask_col = torch.tensor([base.mask_id], device=tokens.device)
    log_p = target.float().index_fill(-1, mask_col, -torch.inf).log_softmax(-1)[masked]
    log_q = logits.float().index_fill(-1, mask_col, -torch.inf).log_softmax(-1)[masked]
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").nan_to_num()  # 0 * log 0 terms
    return kl.sum(-1).mean()


def joint_generate(
    model: Denoiser,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    K: int,
    refresher: Refresher,
    generators: list[torch.Generator],
    block_len: int = 0,
    temperature: float = 1.0,
    cache: str = "auto",
) -> Iterator[DecodeState]:
    """ADJUST decoding through the one loop: the `exact-joint` decoder (the lowest-entropy masked
    position, its token sampled) with K commit rounds per full forward, `refresher` between them
    (`SamplerRefresh(sampler)`: ADJUST; `Marginal()`: the baseline; `FullModel()`: exact). K = 1
    is exact sequential sampling. Any model kind; block-causal models keep their exact cache."""
    cfg = preset_config(
        "exact-joint",
        max_new_tokens=max_new_tokens,
        steps=max_new_tokens,
        block_len=block_len,
        temperature=temperature,
        rounds=K,
        cache=cache,
        eos_fill=False,
    )
    plan = plan_decode(model, cfg, refresher=refresher)
    return generate(model, plan, prompt=prompt, generators=generators)
