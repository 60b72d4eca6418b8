"""Each family's default preset against the family's own generation loop, token for token.

The reference loops below are written from the authors' published code as described in
docs/CHECKPOINTS.md §5 (and restated in each docstring), on the independently built native
transformers model of `pretrained_layouts` (full recompute, the family's attention mask). Where a
reference needs a random draw, the test compares distributions (first-step proposals) instead.
"""

from functools import partial

import pytest
import torch
from pretrained_layouts import BLOCK, write_family

from unmask.decoding.generate import final_state, generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import build_decoder, preset_config
from unmask.decoding.proposals import Distribution, candidates
from unmask.decoding.rng import row_generators
from unmask.models.checkpoint import load_checkpoint
from unmask.schedules import LogLinear

FAMILIES = ("llada", "dream", "sdar", "llada2", "fast-dllm-v2")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return root, {f: write_family(f, root / f) for f in FAMILIES}


def load(dirs, family):
    return load_checkpoint(dirs[0] / family, dtype="fp32").model


def prompt_of(P, seed, B=2):
    return torch.randint(0, 44, (B, P), generator=torch.Generator().manual_seed(seed))


def ours(model, cfg, prompt, **plan_kw):
    plan = plan_decode(model, cfg, **plan_kw)
    gens = row_generators(0, list(range(prompt.shape[0])))
    return final_state(generate(model, plan, prompt=prompt, generators=gens)).tokens


def assert_each_row_is_its_reference(got, prompt, reference, **kw):
    """Our batched rows [B, T] each equal the reference loop run on that row alone (so batching
    changes no row either), over the tokens the reference made."""
    for row in range(prompt.shape[0]):
        ref = reference(prompt[row], **kw)
        n = min(len(ref), got.shape[1])
        assert torch.equal(got[row, :n], ref[:n]), (row, got[row].tolist(), ref.tolist())


# ------------------------------------------------------------------------------------------- SDAR


def sdar_reference(native, prompt, *, mask_id, gen_length, block_length, steps, strategy, threshold):
    """SDAR's `block_diffusion_generate` (JetAstra/SDAR generate.py) with its draw replaced by the
    argmax (the README's greedy (G) decoding): blocks of L' = `block_length` from the prompt's
    block; per step the fixed count `num_transfer_tokens[step]` = L' split evenly over `steps`
    (remainder first), x0 = argmax, x0_p = softmax over the full vocabulary ([MASK] included);
    `low_confidence_static`: top-count of x0_p among masked; `low_confidence_dynamic`: every masked
    position with x0_p > threshold if there are at least count of them, else top-count;
    `sequential`: count positions from the first mask. A block ends when no mask is left. The
    logits of a block are those of the block-causal pass over everything up to it (its KV cache
    gives the same). One row at a time (its `mask_index.sum()` is batch-wide)."""
    (P,) = prompt.shape
    n_blocks = (P + gen_length + block_length - 1) // block_length
    x = torch.full((n_blocks * block_length,), mask_id)
    x[:P] = prompt
    base, rem = divmod(block_length, steps)
    counts = [base + (i < rem) for i in range(steps)]
    for b in range(P // block_length, n_blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        for step in range(steps + 1):
            cur = x[lo:hi]
            masked = cur == mask_id
            if not masked.any():
                break
            logits = native(x[None, :hi])[0, lo:hi]
            p = torch.softmax(logits, -1)
            x0 = p.argmax(-1)
            x0_p = p.gather(-1, x0[:, None])[:, 0]
            conf = torch.where(masked, x0_p, -torch.inf)
            pick = torch.zeros_like(masked)
            k = counts[step]
            if strategy == "sequential":
                first = int(masked.nonzero()[0])
                pick[first : first + k] = True
            elif strategy == "low_confidence_dynamic" and int((conf > threshold).sum()) >= k:
                pick = conf > threshold
            else:
                assert k <= int(masked.sum()), "re-picks a filled position: not a well-defined case"
                pick[conf.topk(k).indices] = True
            cur[pick] = x0[pick]
    return x[: P + gen_length]


SDAR_CASES = [  # (strategy, prompt length, steps per block): the prompt on / off a block boundary
    ("low_confidence_static", 8, 4),
    ("low_confidence_static", 6, 4),
    ("low_confidence_static", 8, 2),
    ("low_confidence_static", 8, 3),
    ("sequential", 8, 4),
    ("sequential", 6, 4),
    ("sequential", 8, 2),
] + [  # the tiny model's confidences straddle 0.03: both branches of `dynamic` run
    ("low_confidence_dynamic", P, steps, threshold)
    for P, steps in ((8, 4), (6, 4), (6, 2))
    for threshold in (0.03, 0.9)
]


@pytest.mark.parametrize("case", SDAR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sdar_presets_are_token_identical_to_sdars_loop(dirs, case):
    strategy, P, steps, threshold = (*case, 0.03)[:4]
    model, native = load(dirs, "sdar"), dirs[1]["sdar"]
    L, new = BLOCK["sdar"], 16
    prompt = prompt_of(P, seed=P + steps)
    preset = {"low_confidence_dynamic": "sdar", "low_confidence_static": "sdar-static"}.get(strategy)
    over = dict(max_new_tokens=new, steps=new * steps // L, threshold=threshold)
    if preset is None:
        preset, over["select"] = "sdar-static", "sequential"
    got = ours(model, preset_config(preset, **over), prompt)
    assert_each_row_is_its_reference(
        got,
        prompt,
        partial(sdar_reference, native),
        mask_id=model.mask_id,
        gen_length=new,
        block_length=L,
        steps=steps,
        strategy=strategy,
        threshold=threshold,
    )


def test_the_sdar_family_defaults_to_its_own_loop(dirs):
    loaded = load_checkpoint(dirs[0] / "sdar", dtype="fp32")
    assert loaded.config.decode.preset == "sdar"
    cfg = preset_config("sdar")
    assert (cfg.select, cfg.threshold, cfg.threshold_floor, cfg.step_counts) == (
        "threshold",
        0.9,
        "budget",
        "block",
    )


# ------------------------------------------------------------------------------------------ LLaDA2


def llada2_reference(native, prompt, *, mask_id, gen_length, block_length, steps, threshold):
    """LLaDA2's `generate()` (remote modeling_llada2_moe.py) at temperature 0: blocks from the
    prompt's block, the whole prefix recomputed with the block-causal mask each step; per step the
    fixed count = L' split evenly over `steps` (remainder first); x0 = argmax, x0_p = its softmax
    probability (full vocabulary); every masked position with x0_p > threshold if at least count
    of them, else top-min(count, masks left). At most `steps` steps per block."""
    (P,) = prompt.shape
    n_blocks = (P + gen_length + block_length - 1) // block_length
    x = torch.full((n_blocks * block_length,), mask_id)
    x[:P] = prompt
    base, rem = divmod(block_length, steps)
    counts = [base + (i < rem) for i in range(steps)]
    for b in range(P // block_length, n_blocks):
        end = (b + 1) * block_length
        for step in range(steps):
            masked = x[end - block_length : end] == mask_id
            if not masked.any():
                break
            logits = native(x[None, :end])[0, -block_length:]
            p = torch.softmax(logits, -1)
            x0 = p.argmax(-1)
            conf = torch.where(masked, p.gather(-1, x0[:, None])[:, 0], -torch.inf)
            high = conf > threshold
            if int(high.sum()) >= counts[step]:
                pick = high
            else:
                pick = torch.zeros_like(masked)
                pick[conf.topk(min(counts[step], int(masked.sum()))).indices] = True
            x[end - block_length : end][pick] = x0[pick]
    return x[: P + gen_length]


@pytest.mark.parametrize("threshold", [0.03, 0.95])  # 0.95: the count rule alone
@pytest.mark.parametrize("P,steps", [(8, 2), (8, 3), (6, 2), (6, 3), (5, 4)])
def test_llada2_preset_is_token_identical_to_llada2_generate(dirs, P, steps, threshold):
    model, native = load(dirs, "llada2"), dirs[1]["llada2"]
    L, new = BLOCK["llada2"], 16
    prompt = prompt_of(P, seed=10 + P + steps)
    cfg = preset_config("llada2", max_new_tokens=new, steps=new * steps // L, threshold=threshold)
    got = ours(model, cfg, prompt)
    assert_each_row_is_its_reference(
        got,
        prompt,
        partial(llada2_reference, native),
        mask_id=model.mask_id,
        gen_length=new,
        block_length=L,
        steps=steps,
        threshold=threshold,
    )
    assert load_checkpoint(dirs[0] / "llada2", dtype="fp32").config.decode.preset == "llada2"


# ------------------------------------------------------------------------------------------- Dream


def dream_sample_tokens(logits, *, temperature=0.0, top_p=None, top_k=None, alg="maskgit_plus"):
    """Dream's `sample_tokens`: logits / temperature (if > 0), top-p (drop a token once the mass
    before it exceeds top_p), top-k (drop below the k-th logit), softmax; x0 = argmax (temperature
    0) with confidence its probability, or the top-1 - top-2 margin (`topk_margin`), or
    sum p log(p + 1e-10) (`entropy`) - all of the processed distribution. Returns (probs, x0, c)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        values, order = logits.sort(-1, descending=True)
        cum = torch.softmax(values, -1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -torch.inf)
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k)[0][..., -1:], -torch.inf)
    probs = torch.softmax(logits, -1)
    confidence, x0 = probs.max(-1)
    if alg == "topk_margin":
        top = probs.sort(-1, descending=True).values
        confidence = top[:, 0] - top[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return probs, x0, confidence


def dream_reference(native, prompt, *, mask_id, gen_length, steps, alg, top_p=None, top_k=None, eps=1e-3):
    """Dream's `diffusion_generate` (`_sample`) at temperature 0: canvas = prompt + masks; logits
    shifted right by one; timesteps linspace(1, eps, steps + 1); per step commit
    int(n_mask (1 - s/t)) (all at the last step) of the masked positions with the highest
    confidence of `sample_tokens`. One row at a time."""
    x = torch.cat([prompt, torch.full((gen_length,), mask_id)])
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        masked = x == mask_id
        logits = native(x[None])[0]
        logits = torch.cat([logits[:1], logits[:-1]])
        _, x0, confidence = dream_sample_tokens(logits[masked], top_p=top_p, top_k=top_k, alg=alg)
        t, s = timesteps[i], timesteps[i + 1]
        n_mask = int(masked.sum())
        n = int(n_mask * (1 - s / t)) if i < steps - 1 else n_mask
        full = torch.full(x.shape, -torch.inf)
        full[masked] = confidence
        if n > 0:
            idx = full.topk(n).indices
            cand = torch.full(x.shape, mask_id)
            cand[masked] = x0
            x[idx] = cand[idx]
    return x


@pytest.mark.parametrize(
    "alg,score,top_p,top_k",
    [
        ("entropy", "neg-entropy", 0.9, None),
        ("maskgit_plus", "max-prob", 0.9, None),
        ("topk_margin", "margin", 0.8, None),
        ("entropy", "neg-entropy", 0.9, 5),
        ("entropy", "neg-entropy", None, None),
    ],
)
def test_dream_preset_with_top_p_is_token_identical_to_diffusion_generate(dirs, alg, score, top_p, top_k):
    """At temperature 0 Dream ranks by the confidence of the top-p / top-k-renormalised softmax."""
    model, native = Tilted(load(dirs, "dream"), 8.0), Tilted(dirs[1]["dream"], 8.0)
    prompt = prompt_of(6, seed=3)
    over = dict(max_new_tokens=12, steps=6, score=score, top_p=top_p or 1.0, top_k=top_k or 0)
    got = ours(model, preset_config("dream", **over), prompt)
    assert_each_row_is_its_reference(
        got,
        prompt,
        partial(dream_reference, native),
        mask_id=model.mask_id,
        gen_length=12,
        steps=6,
        alg=alg,
        top_p=top_p,
        top_k=top_k,
    )


def sdar_processed(logits, *, temperature, top_k, top_p):
    """SDAR's / LLaDA2's `sample_with_temperature_topk_topp` distribution: logits / temperature,
    keep logits >= the k-th, then top-p of the renormalised rest (drop once the mass before a token
    exceeds top_p), softmax."""
    logits = logits / temperature
    if top_k > 0:
        logits = logits.masked_fill(logits < logits.topk(top_k)[0][..., -1:], -torch.inf)
    if top_p < 1:
        values, order = logits.sort(-1, descending=True)
        cum = torch.softmax(values, -1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -torch.inf)
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("processing", ["dream", "sdar"])
@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 0.9), (1.3, 6, 0.8), (0.5, 10, 1.0), (1.0, 0, 0.5)]
)
def test_sampled_proposals_draw_from_the_familys_processed_distribution(
    processing, temperature, top_k, top_p
):
    """First-step proposals of a sampled setting: the distribution our draw uses (and scores read)
    equals the reference's, and the draws follow it (empirical TV over 4000 draws)."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)) * 2
    cfg = preset_config(processing, proposal="sample", temperature=temperature, top_k=top_k, top_p=top_p)
    propose = build_decoder(cfg, LogLinear()).propose
    dist = Distribution.from_logits(logits, None)
    got = propose(dist, torch.full((3,), 0.5, dtype=torch.float64)).dist.probs
    if processing == "dream":
        ref = dream_sample_tokens(logits, temperature=temperature, top_p=top_p, top_k=top_k or None)[0]
    else:
        ref = sdar_processed(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    n = 4000
    u = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = Distribution.from_logits(logits[:1].expand(n, -1), None)
    draws = propose(rows, u).tokens
    empirical = torch.bincount(draws, minlength=40).double() / n
    assert 0.5 * (empirical - ref[0].double()).abs().sum() < 0.05
    # the proposal's confidence is the processed probability of the drawn token
    p = propose(rows, u)
    assert torch.allclose(p.dist.probs.gather(-1, draws[:, None])[:, 0], ref[0][draws], atol=1e-6)


def test_dreams_origin_uses_its_time_grid_with_eps():
    """`origin` unmasks with probability 1 - s/t on linspace(1, 1e-3, S + 1)."""
    cfg = preset_config("dream", select="ancestral", steps=4)
    select = build_decoder(cfg, LogLinear()).select
    grid = torch.linspace(1, 1e-3, 5, dtype=torch.float64)
    for k in range(3):
        from unmask.decoding.selectors import SelectContext

        W = 6
        ones = torch.ones(1, W)
        c = SelectContext(ones, ones, ones.double(), torch.ones(1, W, dtype=torch.bool), k, 4, ones.double())
        unmask, stay = select.weights(c)
        rate = unmask / (unmask + stay)
        torch.testing.assert_close(rate, (1 - grid[k + 1] / grid[k]).expand(1, W), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- BD3-LM


def bd3lm_nucleus(p, top_p):
    """BD3-LM's `_nucleus_sample`: sort descending, keep tokens whose inclusive cumulative
    probability is <= p, always the first, renormalise."""
    values, order = p.sort(-1, descending=True)
    keep = values.cumsum(-1) <= top_p
    keep[..., 0] = True
    out = torch.zeros_like(p).scatter(-1, order, values * keep)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("top_p", [0.9, 0.5, 0.05])
def test_the_bd3lm_nucleus_keeps_what_the_reference_keeps(top_p):
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float()
    dist = Distribution.from_logits(logits, None)
    cfg = preset_config("bd3lm", top_p=top_p)
    assert cfg.top_p_rule == "within"
    p, ids = candidates(dist, 0, top_p, cfg.top_p_rule)
    ref = bd3lm_nucleus(torch.softmax(logits.double(), -1), top_p)
    assert torch.equal(p > 0, ref > 0)
    torch.testing.assert_close(p / p.sum(-1, keepdim=True), ref, rtol=0, atol=1e-6)
    crossing, _ = candidates(dist, 0, top_p, "crossing")  # the usual rule keeps the crossing token too
    assert not ((p > 0) & ~(crossing > 0)).any()
    assert ((crossing > 0) & ~(p > 0)).any() == (top_p >= 0.5)


# ------------------------------------------------------------------------------------ LLaDA's knobs


class Tilted(torch.nn.Module):
    """Our model or the native reference with its logits scaled by `scale` (a tiny random model's
    are nearly flat: entropies tie to float32 noise) and the `ids` logits raised by `by`."""

    def __init__(self, inner, scale=1.0, ids=(), by=0.0):
        super().__init__()
        self.inner, self.scale, self.ids, self.by = inner, scale, list(ids), by
        for name in ("cfg", "vocab_size", "mask_id", "subs", "new_cache", "embed", "noising"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def forward(self, *args, **kw):
        out = self.inner(*args, **kw)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        for x in (logits, getattr(out, "next_logits", None)):
            if x is not None:
                x.mul_(self.scale)
                x[..., self.ids] += self.by
        return out


def llada_knobs_reference(
    native, prompt, *, mask_id, eos, eot, steps, gen_length, block_length, logits_eos_inf, conf_inf
):
    """LLaDA's `generate()` (ML-GSAI/LLaDA generate.py) at temperature 0 with its two knobs:
    `logits_eos_inf` sets logits[EOS] = -inf before x0 = argmax; `confidence_eos_eot_inf` runs
    `logits_with_noise[EOS] = logits[EoT] = -inf` after x0 is chosen, and at temperature 0
    `logits_with_noise` is `logits` itself; the confidence is softmax(logits)[x0]. Counts: the
    block's masks split evenly over its steps. All rows at once (the loop is batched)."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id)], 1)
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n_masked = (x[:, lo:hi] == mask_id).sum(1)
        counts = [n_masked // per_block + (i < n_masked % per_block).long() for i in range(per_block)]
        for i in range(per_block):
            masked = x == mask_id
            logits = native(x).clone()
            if logits_eos_inf:
                logits[:, :, eos] = -torch.inf
            noised = logits  # temperature 0: add_gumbel_noise returns the logits themselves
            x0 = noised.argmax(-1)
            if conf_inf:
                noised[:, :, eos] = logits[:, :, eot] = -torch.inf
            p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
            p[:, hi:] = -torch.inf
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, p, -torch.inf)
            for row in range(B):
                k = int(counts[i][row])
                if k:
                    idx = conf[row].topk(k).indices
                    x[row, idx] = x0[row, idx]
    return x


@pytest.mark.parametrize("logits_eos_inf,conf_inf", [(True, False), (False, True), (True, True)])
def test_llada_eos_knobs_mean_what_llada_means(dirs, logits_eos_inf, conf_inf):
    root, refs = dirs
    loaded = load_checkpoint(root / "llada", dtype="fp32")
    tok = loaded.tokenizer
    eos, eot = tok.eos_id, tok.token_id("<|eot_id|>")
    model = Tilted(loaded.model, ids=(eos, eot), by=2.5)
    native = Tilted(refs["llada"], ids=(eos, eot), by=2.5)
    prompt = prompt_of(5, seed=9)
    ref = llada_knobs_reference(
        native,
        prompt.clone(),
        mask_id=model.mask_id,
        eos=eos,
        eot=eot,
        steps=8,
        gen_length=16,
        block_length=8,
        logits_eos_inf=logits_eos_inf,
        conf_inf=conf_inf,
    )
    assert (ref[:, 5:] == eot).any() or (ref[:, 5:] == eos).any()  # the knobs had something to act on
    cfg = preset_config(
        "llada",
        max_new_tokens=16,
        steps=8,
        block_len=8,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=conf_inf,
    )
    got = ours(model, cfg, prompt, tokenizer=tok)
    assert torch.equal(got, ref), (got.tolist(), ref.tolist())
    if logits_eos_inf:
        assert not (got[:, 5:] == eos).any()


# ------------------------------------------------------------------------------------ Fast-dLLM v2


def fast_dllm_v2_reference(native, prompt, *, mask_id, gen_length, block_length, small_block, threshold):
    """Fast-dLLM v2's `batch_sample` for one row, greedy, without its block cache: a prompt longer
    than a block is prefilled up to its last block boundary, and when it ends on the boundary the
    prefill's last logit gives the next token (argmax); blocks run up to
    `gen_length // L + P // L`; each block is decoded in sub-blocks of `small_block`, left to
    right, each until no mask is left: the block is forwarded against the prefix, the logits
    shifted inside the block (`cat(logits[:1], logits[:-1])`), p = softmax (full vocabulary),
    every masked position of the sub-block with argmax probability > threshold and the most
    confident one are committed. A finished block is forwarded once more and its last logit's
    argmax opens the next block. The model is the native one recomputing the whole prefix with
    the block-causal mask (its KV cache gives the same logits)."""
    (P,) = prompt.shape
    L = block_length
    x = prompt.clone()
    if P > L and P % L == 0:
        x = torch.cat([x, native(x[None])[0, -1].argmax()[None]])
    for b in range(P // L, gen_length // L + P // L):
        lo, hi = b * L, (b + 1) * L
        x = torch.cat([x, torch.full((hi - len(x),), mask_id)])
        for sub in range(L // small_block):
            s_lo, s_hi = lo + sub * small_block, lo + (sub + 1) * small_block
            while (x[s_lo:s_hi] == mask_id).any():
                out = native(x[None, :hi])[0, lo:hi]
                logits = torch.cat([out[:1], out[:-1]])[s_lo - lo : s_hi - lo]
                p = torch.softmax(logits, -1)
                x1 = p.argmax(-1)
                masked = x[s_lo:s_hi] == mask_id
                x1_p = torch.where(masked, p.gather(-1, x1[:, None])[:, 0], -torch.inf)
                pick = x1_p > threshold
                pick[x1_p.argmax()] = True
                pick &= masked
                x[s_lo:s_hi][pick] = x1[pick]
        x = torch.cat([x, native(x[None, :hi])[0, -1].argmax()[None]])
    return x


@pytest.mark.parametrize("threshold", [0.03, 0.9])
@pytest.mark.parametrize("P,small", [(8, 2), (6, 2), (3, 2), (9, 4), (12, 1)])
def test_fast_dllm_v2_preset_is_token_identical_to_its_loop(dirs, P, small, threshold):
    """Several blocks, the block-opening token from the previous block, sub-blocks; the prompt on a
    block boundary, inside one, and shorter than one."""
    raw = load(dirs, "fast-dllm-v2")
    no_mask = dict(ids=(raw.mask_id,), by=-30.0)  # an argmax [MASK] would be committed as no token
    model, native = Tilted(raw, **no_mask), Tilted(dirs[1]["fast-dllm-v2"], **no_mask)
    L, new = BLOCK["fast-dllm-v2"], 16
    prompt = prompt_of(P, seed=20 + P)
    cfg = preset_config("fast-dllm-v2", max_new_tokens=new, sub_block=small, threshold=threshold)
    got = ours(model, cfg, prompt)
    assert_each_row_is_its_reference(  # the reference stops at its last full block
        got,
        prompt,
        partial(fast_dllm_v2_reference, native),
        mask_id=raw.mask_id,
        gen_length=new,
        block_length=L,
        small_block=small,
        threshold=threshold,
    )
    assert load_checkpoint(dirs[0] / "fast-dllm-v2", dtype="fp32").config.decode.preset == "fast-dllm-v2"


def test_the_block_opening_token_needs_a_shifted_block_causal_model_with_its_cache(dirs):
    with pytest.raises(Exception, match="ar_first_token"):
        plan_decode(load(dirs, "fast-dllm-v2"), preset_config("fast-dllm-v2", cache="none"))
    with pytest.raises(Exception, match="ar_first_token"):
        plan_decode(load(dirs, "llada"), preset_config("fast-dllm-v2"))
    sdar = load(dirs, "sdar")  # block-causal but unshifted: its last output predicts nothing after it
    with pytest.raises(Exception, match="last output predicts the next position"):
        ours(sdar, preset_config("fast-dllm-v2", max_new_tokens=8), prompt_of(4, seed=0))


# --------------------------------------------------------------------------------- bench family-ref


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_family_ref_times_each_preset_against_its_loop_at_identical_tokens(dirs, family):
    """The bench's loops (on the loaded model, with the authors' cache strategy) make the tokens
    our family preset makes; the result carries the side-by-side ratio."""
    from unmask.bench.families import bench_family_reference, family_table

    loaded = load_checkpoint(dirs[0] / family, dtype="fp32")
    with torch.no_grad():  # peaked predictions and no [MASK] argmax, as a trained model has
        loaded.model.head.weight.mul_(8.0)
        loaded.model.head.weight[loaded.model.mask_id] = 0
    r = bench_family_reference(
        loaded, prompts=prompt_of(9, seed=1), max_new_tokens=16, steps=16, block_len=8, repeats=1
    )
    assert r["identical_tokens"] and r["family"] == family and r["speedup"]["median"] > 0
    assert family in family_table(r) and "identical tokens: True" in family_table(r)


def test_bench_family_ref_on_the_command_line_and_its_refusal(dirs, tmp_path, capsys):
    import json

    from unmask.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w1 w2 w3 w4 w5"}\n{"prompt": "w6 w7 w8 w9 w10"}\n')
    args = ["bench", "family-ref", "--checkpoint", str(dirs[0] / "sdar"), "--prompts-file", str(prompts)]
    main([*args, "--max-new-tokens", "8", "--steps", "8", "--repeats", "1", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "family_ref_sdar.json").read_text())
    assert saved["preset"] == "sdar" and "machine" in saved and "speedup" in saved
    assert "sdar (`sdar` preset) vs its own loop" in capsys.readouterr().out
    from pretrained_layouts import write_gpt2_like_tokenizer

    write_family("bd3lm", tmp_path / "bd3lm")
    write_gpt2_like_tokenizer(tmp_path / "gpt2")
    with pytest.raises(SystemExit, match="family-ref needs a pretrained directory of llada, dream"):
        main(
            [
                "bench",
                "family-ref",
                "--checkpoint",
                str(tmp_path / "bd3lm"),
                "--tokenizer",
                str(tmp_path / "gpt2"),
                "--prompts-file",
                str(prompts),
            ]
        )
