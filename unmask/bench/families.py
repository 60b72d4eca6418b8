"""`unmask bench family-ref` / `llada-ref`: a family's default preset against its authors' own loop.

Each loop below is the family's published generation loop as docs/CHECKPOINTS.md §5 describes it,
greedy, run on the same loaded model with the authors' own cache strategy (SDAR and Fast-dLLM v2
keep a prefix KV cache and run each block against it; LLaDA, Dream and LLaDA2 recompute the whole
sequence every step). One row at a time for the loops written for one row (SDAR, LLaDA2, Fast-dLLM
v2), the whole batch for the batched ones (LLaDA, Dream). DiffusionGemma's is transformers' own
`generate`. The tokens must come out identical; the tests check the same loops against
transformers' own modules (tests/models/test_family_loops.py, test_diffusion_gemma.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from unmask.bench.sampling import run_decode
from unmask.bench.training import interleaved, ratio


@torch.inference_mode()
def llada_reference(
    model, prompt: torch.Tensor, *, gen_length: int, steps: int, block_length: int
) -> torch.Tensor:
    """A plain loop written the way the public LLaDA reference decodes (greedy, low-confidence
    remasking): the whole sequence recomputed every step, semi-AR blocks, a fixed number of
    tokens per step with the remainder to the first steps. The [MASK] logit is excluded for our
    SUBS models (which never predict it) and kept for pretrained families, as LLaDA's loop does."""
    mask_id = model.mask_id
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    n_blocks = gen_length // block_length
    steps_per_block = steps // n_blocks
    for b in range(n_blocks):
        lo = prompt.shape[1] + b * block_length
        hi = lo + block_length
        block_mask = x[:, lo:hi] == mask_id
        count = block_mask.sum(dim=1, keepdim=True)
        base, rem = count // steps_per_block, count % steps_per_block
        schedule = base.repeat(1, steps_per_block)
        for i in range(steps_per_block):
            schedule[:, i] += (i < rem[:, 0]).long()
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x).logits.double()
            if model.subs:
                logits[..., mask_id] = -torch.inf
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, idx = torch.topk(confidence[j], k=int(schedule[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
    return x


def bench_llada_reference(
    model, config, *, prompts: torch.Tensor, max_new_tokens: int, steps: int, block_len: int, repeats: int = 3
) -> dict[str, Any]:
    """Our `llada` preset vs `llada_reference` on the same checkpoint and prompts."""
    from unmask.decoding.presets import preset_config
    from unmask.schedules import build_schedule

    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    cfg = preset_config(
        "llada", steps=steps, max_new_tokens=max_new_tokens, block_len=block_len, eos_fill=False
    )

    def reference(x):
        return llada_reference(model, x, gen_length=max_new_tokens, steps=steps, block_length=block_len)

    r = side_by_side(model, cfg, prompts, reference, schedule=schedule, repeats=repeats)
    return {**r, "max_new_tokens": max_new_tokens, "steps": steps, "block_len": block_len}


def side_by_side(model, cfg, prompts: torch.Tensor, reference, *, schedule, repeats: int) -> dict[str, Any]:
    """Our decode of `prompts` [B, P] with `cfg` vs `reference(prompts)` -> [B, >= P] tokens,
    interleaved `repeats` times: the speedup (reference time / ours), whether the tokens are
    identical (over the tokens both made: a reference may stop at whole blocks), the medians."""
    B, P = prompts.shape

    def ours():
        r = run_decode(model, cfg, prompts, batch_size=B, seed=0, eos_id=None, schedule=schedule)
        return {"seconds": r["seconds"], "tokens": r["samples"]}

    def theirs():
        t = time.perf_counter()
        x = reference(prompts)
        return {"seconds": time.perf_counter() - t, "tokens": x[:, P:].tolist()}

    runs = interleaved({"ours": ours, "reference": theirs}, repeats)
    identical = all(
        all(a[: len(b)] == b[: len(a)] for a, b in zip(mine["tokens"], other["tokens"], strict=True))
        for mine, other in zip(runs["ours"], runs["reference"], strict=True)
    )
    return {
        "speedup": ratio(runs, "reference", "ours"),
        "identical_tokens": identical,
        "ours_seconds": statistics.median(r["seconds"] for r in runs["ours"]),
        "reference_seconds": statistics.median(r["seconds"] for r in runs["reference"]),
        "rows": B,
        "repeats": repeats,
    }


def _counts(width: int, steps: int) -> list[int]:
    """SDAR's / LLaDA2's `get_num_transfer_tokens`: the width split evenly, remainder first."""
    base, rem = divmod(width, steps)
    return [base + (i < rem) for i in range(steps)]


def _dynamic(x0_p: torch.Tensor, masked: torch.Tensor, threshold: float, count: int) -> torch.Tensor:
    """SDAR's `low_confidence_dynamic` / LLaDA2's rule on one block [L]: every masked position
    above the threshold if there are at least `count`, else the `count` most confident (at most
    the masks left)."""
    conf = torch.where(masked, x0_p, -torch.inf)
    high = conf > threshold
    if int(high.sum()) >= count:
        return high
    pick = torch.zeros_like(masked)
    pick[conf.topk(min(count, int(masked.sum()))).indices] = True
    return pick


@torch.inference_mode()
def sdar_loop(model, prompt, *, gen_length: int, steps: int, threshold: float) -> torch.Tensor:
    """SDAR's `block_diffusion_generate`, `low_confidence_dynamic`, argmax for its draw; one row
    [1, P]. Complete prompt blocks are prefilled into the cache; each block is denoised against
    it (written, not committed) and committed once clean."""
    L, mask_id = model.cfg.block_size, model.mask_id
    P = prompt.shape[1]
    n_blocks = (P + gen_length + L - 1) // L
    x = torch.full((1, n_blocks * L), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    kv = model.new_cache(1, n_blocks * L, prompt.device)
    start = P // L * L
    if start:
        model(x[:, :start], cache=kv)
        kv.commit(start)
    counts = _counts(L, steps)
    for b in range(P // L, n_blocks):
        cur = x[:, b * L : (b + 1) * L]
        for step in range(steps + 1):
            masked = cur[0] == mask_id
            if not masked.any():
                model(cur, cache=kv)
                kv.commit(L)
                break
            x0_p, x0 = torch.softmax(model(cur, cache=kv).logits[0], -1).max(-1)
            pick = _dynamic(x0_p, masked, threshold, counts[step])
            cur[0, pick] = x0[pick]
    return x[:, : P + gen_length]


@torch.inference_mode()
def llada2_loop(model, prompt, *, gen_length: int, steps: int, threshold: float) -> torch.Tensor:
    """LLaDA2's `generate()` at temperature 0; one row [1, P]: the whole prefix recomputed with the
    block-causal mask every step (its code keeps no cache)."""
    L, mask_id = model.cfg.block_size, model.mask_id
    P = prompt.shape[1]
    n_blocks = (P + gen_length + L - 1) // L
    x = torch.full((1, n_blocks * L), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    counts = _counts(L, steps)
    for b in range(P // L, n_blocks):
        end = (b + 1) * L
        for step in range(steps):
            masked = x[0, end - L : end] == mask_id
            if not masked.any():
                break
            x0_p, x0 = torch.softmax(model(x[:, :end]).logits[0, -L:], -1).max(-1)
            pick = _dynamic(x0_p, masked, threshold, counts[step])
            x[0, end - L : end][pick] = x0[pick]
    return x[:, : P + gen_length]


@torch.inference_mode()
def fast_dllm_v2_loop(model, prompt, *, gen_length: int, small_block: int, threshold: float) -> torch.Tensor:
    """Fast-dLLM v2's `batch_sample`, one row [1, P], without its block cache: prefix cache, the
    block-opening token from the previous block's (or the prompt's) last logit, sub-blocks left
    to right each until done (every position above the threshold and the most confident one)."""
    L, mask_id = model.cfg.block_size, model.mask_id
    P = prompt.shape[1]
    n_blocks = gen_length // L + P // L
    x = torch.full((1, n_blocks * L), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    kv = model.new_cache(1, n_blocks * L, prompt.device)
    upcoming = None
    if P >= L:
        start = P // L * L
        upcoming = model(x[:, :start], cache=kv).next_logits
        kv.commit(start)
    for b in range(P // L, n_blocks):
        lo, hi = b * L, (b + 1) * L
        if lo >= P:
            x[0, lo] = upcoming[0].argmax()
        block = x[:, lo:hi]
        for s in range(0, L, small_block):
            for tries in range(small_block + 1):
                if not (block[0, s : s + small_block] == mask_id).any():
                    break
                if tries == small_block:  # each pass commits one position unless the argmax is [MASK]
                    raise ValueError("the reference loop stalls: the model's argmax is [MASK] (untrained?)")
                p = torch.softmax(model(block, cache=kv).logits[0, s : s + small_block], -1)
                x1_p, x1 = p.max(-1)
                masked = block[0, s : s + small_block] == mask_id
                x1_p = torch.where(masked, x1_p, -torch.inf)
                pick = x1_p > threshold
                pick[x1_p.argmax()] = True
                pick &= masked
                block[0, s : s + small_block][pick] = x1[pick]
        upcoming = model(block, cache=kv).next_logits
        kv.commit(L)
    return x


@torch.inference_mode()
def dream_loop(model, prompt, *, gen_length: int, steps: int, eps: float = 1e-3) -> torch.Tensor:
    """Dream's `diffusion_generate` at temperature 0 with `alg="entropy"` (its README's choice): the
    canvas recomputed every step, int(n_mask (1 - s/t)) positions per step on linspace(1, eps,
    steps + 1) by negative entropy of the softmax ([MASK] included). The model's logits are already
    aligned with the canvas (Dream's shift is the adapter's)."""
    B, P = prompt.shape
    mask_id = model.mask_id
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=torch.long)], 1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        masked = x == mask_id
        probs = torch.softmax(model(x).logits[masked], -1)
        x0 = probs.argmax(-1)
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        t, s = timesteps[i], timesteps[i + 1]
        n_mask = masked.sum() / B  # Dream's count is the batch's mean mask count
        n = int(n_mask * (1 - s / t)) if i < steps - 1 else int(n_mask)
        full = torch.full(x.shape, -torch.inf)
        full[masked] = confidence
        cand = torch.full_like(x, mask_id)
        cand[masked] = x0
        if n > 0:
            idx = full.topk(n, dim=-1).indices
            x.scatter_(1, idx, cand.gather(1, idx))
    return x


FAMILY_PRESETS = {  # the family's default preset and the settings its loop takes from it
    "llada": "llada",
    "dream": "dream",
    "sdar": "sdar",
    "llada2": "llada2",
    "fast-dllm-v2": "fast-dllm-v2",
    "diffusion-gemma": "diffusion-gemma",
}


@torch.inference_mode()
def diffusion_gemma_generate(model, prompt: torch.Tensor, *, max_new_tokens: int, steps: int, per_row: bool):
    """transformers' own `DiffusionGemmaForBlockDiffusion.generate` (its defaults otherwise), no
    stop id (as ours runs here). `per_row`: one row [1, P] at a time with the global generator
    seeded as unmask seeds that row's stream (`row_generators(0, [i])`), so both draw the same
    numbers; else the whole batch in one call (its speed)."""
    from unmask.decoding.rng import row_generators

    if not per_row:
        torch.manual_seed(0)
        out = model.native.generate(prompt, max_new_tokens=max_new_tokens, max_denoising_steps=steps)
        return out.sequences[:, : prompt.shape[1] + max_new_tokens]
    rows = []
    for i, row in enumerate(prompt.split(1)):
        torch.manual_seed(row_generators(0, [i])[0].initial_seed())
        out = model.native.generate(row, max_new_tokens=max_new_tokens, max_denoising_steps=steps)
        rows.append(out.sequences[:, : prompt.shape[1] + max_new_tokens])
    return torch.cat(rows)


def _diffusion_gemma(model, cfg, prompts, *, schedule, max_new_tokens: int, steps: int, repeats: int):
    """Timed: our preset on the batch vs `generate` on the batch in one call. Tokens: the
    sampler's self-conditioning loop amplifies last-bit differences step after step, so ours
    equals `generate` row for row on the kernels `generate` runs (`invariant.fused()`, one row at
    a time, as their numbers depend on the batch); on our batch-invariant kernels (the default)
    the rows are our own, whatever the batch."""
    from unmask.models import invariant

    def theirs(x, per_row):
        return diffusion_gemma_generate(model, x, max_new_tokens=max_new_tokens, steps=steps, per_row=per_row)

    r = side_by_side(model, cfg, prompts, lambda x: theirs(x, False), schedule=schedule, repeats=repeats)
    reference = theirs(prompts, True)[:, prompts.shape[1] :].tolist()

    def ours(fused: bool) -> list[list[int]]:
        """Row by row on `generate`'s kernels (their numbers depend on the batch), else batched."""
        with invariant.fused() if fused else torch.inference_mode():
            return run_decode(model, cfg, prompts, batch_size=1 if fused else prompts.shape[0], seed=0,
                              eos_id=None, schedule=schedule)["samples"]  # fmt: skip

    r["identical_tokens"] = ours(True) == reference
    r["identical_tokens_invariant_kernels"] = ours(False) == reference
    return r


def bench_family_reference(
    loaded, *, prompts: torch.Tensor, max_new_tokens: int, steps: int, block_len: int = 32, repeats: int = 3
) -> dict[str, Any]:
    """The family's default preset vs its own loop on `prompts` [B, P], interleaved, with the
    settings of the family's model card (thresholds, sub-blocks) and `steps` for `max_new_tokens`."""
    from unmask.decoding.presets import preset_config
    from unmask.schedules import build_schedule

    family = loaded.state.get("pretrained", {}).get("family")
    if family not in FAMILY_PRESETS:
        raise ValueError(
            f"bench family-ref needs a pretrained directory of {', '.join(FAMILY_PRESETS)}; "
            f"{loaded.path} is {family or 'an unmask run'}"
        )
    model, config = loaded.model, loaded.config
    preset = FAMILY_PRESETS[family]
    over: dict[str, Any] = {"max_new_tokens": max_new_tokens, "steps": steps}
    if family == "llada":
        over |= {"block_len": block_len}
    if family == "diffusion-gemma":  # its steps are per canvas (`max_denoising_steps`)
        over |= {"block_steps": steps}
    cfg = preset_config(preset, **over)
    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    L = model.cfg.block_size
    per_block = max(1, round(steps * L / max_new_tokens))  # the loop's steps per block

    def reference_rows(x: torch.Tensor) -> torch.Tensor:
        if family == "llada":
            return llada_reference(model, x, gen_length=max_new_tokens, steps=steps, block_length=block_len)
        if family == "dream":
            return dream_loop(model, x, gen_length=max_new_tokens, steps=steps)
        rows = []
        for row in x.split(1):
            if family == "sdar":
                out = sdar_loop(
                    model, row, gen_length=max_new_tokens, steps=per_block, threshold=cfg.threshold
                )
            elif family == "llada2":
                out = llada2_loop(
                    model, row, gen_length=max_new_tokens, steps=per_block, threshold=cfg.threshold
                )
            else:  # as many blocks as ours decodes (its own count stops short when P % L > 0)
                P = row.shape[1]
                blocks = -(-(P + max_new_tokens - P // L * L) // L)
                out = fast_dllm_v2_loop(
                    model, row, gen_length=blocks * L, small_block=cfg.sub_block, threshold=cfg.threshold
                )
            rows.append(out[:, : x.shape[1] + max_new_tokens])
        return torch.cat(rows)

    if family == "diffusion-gemma":
        kw = dict(schedule=schedule, max_new_tokens=max_new_tokens, steps=steps, repeats=repeats)
        r = _diffusion_gemma(model, cfg, prompts, **kw)
    else:
        r = side_by_side(model, cfg, prompts, reference_rows, schedule=schedule, repeats=repeats)
    return {"family": family, "preset": preset, **r, "max_new_tokens": max_new_tokens, "steps": steps}


def family_table(r: dict[str, Any]) -> str:
    q = r["speedup"]
    return (
        f"{r['family']} (`{r['preset']}` preset) vs its own loop, {r['max_new_tokens']} new tokens, "
        f"{r['steps']} steps, {r['rows']} rows: ours {r['ours_seconds']:.3f}s vs reference "
        f"{r['reference_seconds']:.3f}s -> {q['median']:.2f}x (min {q['min']:.2f}, max {q['max']:.2f}); "
        f"identical tokens: {r['identical_tokens']}"
        + (
            f" (on its kernels; on our batch-invariant ones: {r['identical_tokens_invariant_kernels']})"
            if "identical_tokens_invariant_kernels" in r
            else ""
        )
    )
