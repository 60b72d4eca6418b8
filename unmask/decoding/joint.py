"""ADJUST approximate joint sampling (Bansal & Sanghavi, 2025): refreshers, the sampler's loss, decoding.

One full forward gives every masked position a distribution; decoding several tokens from those
*marginals* ignores their dependence. ADJUST's sampler layer refreshes the remaining positions'
distributions after each decoded token at the cost of one small layer instead of a full forward:

    h_j = RMSNorm(Block(Linear([RMSNorm(embed(x^(j))) ; RMSNorm(h_{j-1})]))) + h_{j-1}
    q_j = LM_head(h_j)                    (the frozen base model's embedding and head)

with h_0 the full model's final hidden states (the layer: `unmask.models.adjust_sampler`).
Only the sampler trains. Its objective: forward
KL(p_full(. | x^(J)) || q(. | x^(J))) over the positions still masked in x^(J), after J refreshes
along the base model's own one-token-per-forward trajectory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from unmask.decoding.proposals import Distribution, Sample
from unmask.decoding.rng import row_uniform
from unmask.decoding.state import DecodeState
from unmask.models.adjust_sampler import Refresh
from unmask.models.transformer import Transformer


def full_model_refresher(base: Transformer) -> Refresh:
    """The exact (expensive) refresh: a full forward on the new state. With it the KL is 0."""

    def refresh(tokens: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = base(tokens)
        return out.logits, out.hidden

    return refresh


def no_refresher(base: Transformer) -> Refresh:
    """No refresh at all (the marginal baseline): the prior hidden states through the base head."""

    def refresh(tokens: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return base.head(prior), prior

    return refresh


def unroll_weights(K: int) -> torch.Tensor:
    """P(J = j) for j = 1..K-1 (decoding refreshes K-1 times per full forward):
    softmax(0.5^0, ..., 0.5^(K-2)), short unrolls slightly favoured."""
    if K < 2:
        raise ValueError(f"an ADJUST sampler refreshes K - 1 times per forward: K must be >= 2, got {K}")
    return torch.softmax(0.5 ** torch.arange(K - 1, dtype=torch.float64), dim=0)


def naive_kl(base: Transformer, start: torch.Tensor, reveal_pos: torch.Tensor,
             reveal_tok: torch.Tensor) -> torch.Tensor:
    """What no refresh costs: KL(p_full(. | x^(J)) || p_full(. | x^(0))) over positions still masked
    in x^(J). A sampler is useful only below it."""
    return adjust_kl(base, no_refresher(base), start, reveal_pos, reveal_tok)


def adjust_kl(base: Transformer, refresh: Refresh, start: torch.Tensor, reveal_pos: torch.Tensor,
              reveal_tok: torch.Tensor) -> torch.Tensor:
    """Forward KL(p_full || q) averaged over positions still masked after J reveals.

    start [B, T]: trajectory states x^(0); reveal_pos / reveal_tok [B, J]: the next J positions the
    trajectory decoded and their tokens. The base model is frozen (no gradients); the refresh is
    unrolled J times from the full model's hidden states of x^(0), gradients flowing through it.
    """
    with torch.no_grad():
        prior = base(start).hidden  # h_0 [B, T, D]
    rows = torch.arange(start.shape[0], device=start.device)
    tokens = start
    logits = None
    for j in range(reveal_pos.shape[1]):
        tokens = tokens.clone()
        tokens[rows, reveal_pos[:, j]] = reveal_tok[:, j]  # x^(j+1)
        logits, prior = refresh(tokens, prior)
    with torch.no_grad():
        target = base(tokens).logits  # p_full(. | x^(J))
    masked = tokens == base.mask_id  # [B, T]
    mask_col = torch.tensor([base.mask_id], device=tokens.device)
    log_p = target.float().index_fill(-1, mask_col, -torch.inf).log_softmax(-1)[masked]
    log_q = logits.float().index_fill(-1, mask_col, -torch.inf).log_softmax(-1)[masked]
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").nan_to_num()  # 0 * log 0 terms
    return kl.sum(-1).mean()


def adjust_generate(model: Transformer, prompt: torch.Tensor, *, max_new_tokens: int, K: int,
                    refresh: Refresh | None, generators: list[torch.Generator], block_len: int = 0,
                    temperature: float = 1.0) -> Iterator[DecodeState]:
    """ADJUST decoding of a bidirectional model: per full forward, K rounds of (the lowest-entropy
    masked position of the active block, its token sampled, then every distribution refreshed by
    `refresh`). `refresh=None` is the marginal baseline (no refresh); K = 1 is exact sequential
    sampling; the full-model refresher makes any K exact. Whole canvas, or semi-AR blocks of
    `block_len`. `nfe` counts full forwards; `commit_passes` here counts sampler passes.

    This is its own loop rather than a `generate()` policy: K decisions per forward with a
    refresh in between do not fit the one-call-one-step contract of `Decoder.step`.
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if model.cfg.attention != "bidirectional":
        raise ValueError(f"ADJUST decoding needs a bidirectional model, not {model.cfg.attention}")
    B, P = prompt.shape
    tokens = torch.cat([prompt, torch.full((B, max_new_tokens), model.mask_id)], dim=1)
    T = tokens.shape[1]
    block_len = block_len or max_new_tokens
    propose = Sample(temperature=temperature)
    state = DecodeState(tokens=tokens, fixed=tokens != model.mask_id, mask_id=model.mask_id, prompt_len=P,
                        window=(P, P), block=-1, step=0, steps=max_new_tokens, nfe=0, commit_passes=0,
                        finished=torch.zeros(B, dtype=torch.bool))
    rows = torch.arange(B)
    with torch.inference_mode():
        for block, lo in enumerate(range(P, T, block_len)):
            hi = min(lo + block_len, T)
            state = state.advance(window=(lo, hi), block=block, step=0)
            while state.masked.any():
                out = model(state.tokens)
                logits, hidden = out.logits, out.hidden
                nfe, passes = state.nfe + 1, state.commit_passes
                tokens = state.tokens.clone()
                for r in range(K):
                    masked = tokens[:, lo:hi] == model.mask_id  # [B, W]
                    if not masked.any():
                        break
                    u = row_uniform(generators, 2 * (hi - lo))[:, : hi - lo]  # one draw per token
                    dist = Distribution.from_logits(logits[:, lo:hi][masked], model.mask_id)
                    entropy = torch.full(masked.shape, torch.inf, dtype=torch.float64)
                    entropy[masked] = dist.entropy()
                    pos = entropy.argmin(-1)  # [B] lowest-entropy masked position per row
                    live = masked.any(-1)
                    chosen = Distribution.from_logits(logits[rows, lo + pos], model.mask_id)
                    tok = propose(chosen, u[rows, pos]).tokens
                    tokens[rows[live], lo + pos[live]] = tok[live]
                    if refresh is not None and r < K - 1 and (tokens[:, lo:hi] == model.mask_id).any():
                        logits, hidden = refresh(tokens, hidden)
                        passes += 1
                state = state.advance(tokens=tokens, step=state.step + 1, nfe=nfe, commit_passes=passes)
                yield state
