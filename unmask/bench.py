"""Benchmarks, measured as ratios inside one run (see BENCHMARKS.md).

`bench_train`: training-step speed of one model config, arms interleaved (A B C A B C ...) after
a warm-up: fp32 vs bf16 autocast, and for BD3-LM the vectorized `[x_t ; x0]` pass vs the two-pass
(clean K/V first) formulation. FLOPs of a step are counted by torch's FlopCounterMode, and the
achieved FLOP/s is reported against the machine's own matmul peak measured in the same run.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from unmask.config import Config
from unmask.metrics import autocast
from unmask.model import build_model
from unmask.objectives import Batch, ar_loss, diffusion_loss
from unmask.schedules import build_schedule


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of FLOP/s of an n x n matmul in `dtype` on the CPU (or the current GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def machine_info() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or None
    except OSError:
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"commit": commit, "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _train_step(cfg: Config, precision: str, two_pass: bool) -> tuple[Callable[[], None], int]:
    """A closure doing one full training step (forward, backward, AdamW) and its tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.vocab_size, 0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    x0 = torch.randint(1, cfg.data.vocab_size, (B, L), device=device)
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool))
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast(precision, device):
            if cfg.model.objective == "ar":
                out = ar_loss(model, batch)
            else:
                out = diffusion_loss(model, batch, schedule, g, (cfg.noise.eps, 1.0), two_pass=two_pass)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, B * L


def bench_train(cfg: Config, *, repeats: int = 5) -> dict[str, Any]:
    arms = {"fp32": ("fp32", False), "bf16": ("bf16", False)}
    if cfg.model.objective == "bd3lm":
        arms["bf16 two-pass"] = ("bf16", True)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    steps, flops, times = {}, {}, {name: [] for name in arms}
    for name, (precision, two_pass) in arms.items():
        steps[name], tokens = _train_step(cfg, precision, two_pass)
        steps[name]()  # warm-up
        with FlopCounterMode(display=False) as counter:
            steps[name]()
        flops[name] = counter.get_total_flops()
    for _ in range(repeats):  # interleaved: A B C A B C ...
        for name in arms:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)

    def ratio(slow: str, fast: str) -> dict[str, float]:
        r = [a / b for a, b in zip(times[slow], times[fast], strict=True)]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    per_arm = {}
    for name, (precision, _) in arms.items():
        sec = statistics.median(times[name])
        per_arm[name] = {"sec_per_step": sec, "tokens_per_s": tokens / sec,
                         "flops_per_step": flops[name], "flops_per_s": flops[name] / sec,
                         "fraction_of_peak": flops[name] / sec / peak[precision]}
    ratios = {"bf16 over fp32": ratio("fp32", "bf16")}
    if "bf16 two-pass" in arms:
        ratios["vectorized over two-pass"] = ratio("bf16 two-pass", "bf16")
    return {"machine": machine_info(), "model": cfg.model.__dict__ | {"objective": cfg.model.objective},
            "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
            "vocab_size": cfg.data.vocab_size, "repeats": repeats,
            "params": build_model(cfg.model, cfg.data.vocab_size, 0).num_params(),
            "matmul_peak_flops": peak, "arms": per_arm, "ratios": ratios}


def bench_train_report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, GPU {m['gpu']}, "
             f"commit {m['commit']}",
             f"model: {r['model']['objective']} dim {r['model']['dim']} x {r['model']['n_layers']} "
             f"layers, {r['params'] / 1e6:.2f}M params; batch {r['batch_size']} x {r['seq_len']}",
             f"matmul peak: fp32 {r['matmul_peak_flops']['fp32'] / 1e9:.0f} GFLOP/s, "
             f"bf16 {r['matmul_peak_flops']['bf16'] / 1e9:.0f} GFLOP/s", "",
             "| arm | s/step | tokens/s | GFLOP/step | GFLOP/s | of peak (same dtype) |",
             "|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {a['sec_per_step']:.3f} | {a['tokens_per_s']:,.0f} "
                     f"| {a['flops_per_step'] / 1e9:.1f} | {a['flops_per_s'] / 1e9:.0f} "
                     f"| {100 * a['fraction_of_peak']:.0f}% |")
    lines.append("")
    for name, q in r["ratios"].items():
        lines.append(f"{name}: {q['median']:.2f}x (min {q['min']:.2f}, max {q['max']:.2f}, "
                     f"{r['repeats']} interleaved pairs)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# sampling


class TimedModel(torch.nn.Module):
    """Wraps a denoiser and accumulates the wall time spent inside its calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model
        self.cfg, self.vocab_size, self.mask_id = model.cfg, model.vocab_size, model.mask_id
        self.seconds, self.calls = 0.0, 0

    def forward(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def embed(self, tokens):
        return self.inner.embed(tokens)


def heldout_prompts(tokenizer, data_cfg, n: int, prompt_tokens: int, split: str = "test") -> torch.Tensor:
    """[n, 1 + prompt_tokens]: [BOS] + the first tokens of held-out documents (the default set)."""
    from unmask.data import load_corpus

    docs = load_corpus(data_cfg.corpus, txt_documents=data_cfg.txt_documents,
                       valid_fraction=data_cfg.valid_fraction, test_fraction=data_cfg.test_fraction)[split]
    rows = [ids[:prompt_tokens] for ids in tokenizer.encode_batch(docs) if len(ids) >= prompt_tokens]
    if not rows:
        raise ValueError(f"no {split} document has {prompt_tokens} tokens for a prompt")
    rows = (rows * (n // len(rows) + 1))[:n]
    return torch.tensor([[tokenizer.bos_id] + r for r in rows])


def run_decode(model, cfg, prompts: torch.Tensor, *, batch_size: int, seed: int, eos_id: int | None,
               schedule, precision: str = "fp32") -> dict[str, Any]:
    """Decode every prompt with `cfg`; time the whole run and the part inside the model."""
    from unmask.decoding import build_decoder
    from unmask.decoding.rng import row_generators
    from unmask.generate import completions, final_state, generate
    from unmask.metrics import rep_n, unigram_entropy

    timed = TimedModel(model)
    decoder = build_decoder(cfg, schedule)
    outs, nfe, commits, row_forwards = [], 0, 0, 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        state = final_state(generate(
            timed, decoder, prompt=chunk, max_new_tokens=cfg.max_new_tokens, steps=cfg.steps,
            block_len=cfg.block_len, cache=cfg.cache, eos_id=eos_id, eos_fill=cfg.eos_fill,
            stop_entropy=cfg.stop_entropy, generators=row_generators(seed, range(start, start + len(chunk))),
            precision=precision))
        outs.extend(completions(state, eos_id))
        nfe += state.nfe
        commits += state.commit_passes
        row_forwards += state.nfe * len(chunk)
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(o) for o in outs)
    prompt_tokens = prompts.numel()
    return {
        "seconds": seconds, "model_seconds": timed.seconds,
        "overhead_fraction": 1 - timed.seconds / seconds,
        "tokens_per_s": new_tokens / seconds,
        "tokens_per_s_with_prompt": (new_tokens + prompt_tokens) / seconds,
        "nfe": nfe, "commit_passes": commits, "new_tokens": new_tokens,
        "tokens_per_forward": new_tokens / max(row_forwards, 1),
        "entropy": statistics.mean(unigram_entropy(o) for o in outs),
        "rep4": statistics.mean(rep_n(o, 4) for o in outs),
        "samples": outs,
    }


def _interleaved(arms: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict]]:
    """Run each arm once to warm up, then `repeats` rounds A B A B ...; all results per arm."""
    for fn in arms.values():
        fn()
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            runs[name].append(fn())
    return runs


def _ratio(runs, slow: str, fast: str, key: str = "seconds") -> dict[str, float]:
    r = [a[key] / b[key] for a, b in zip(runs[slow], runs[fast], strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def bench_sample(model, tokenizer, config, presets: list[str], steps: list[int], *, prompts: torch.Tensor,
                 max_new_tokens: int, batch_size: int, seed: int = 0, precision: str = "fp32",
                 overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every preset x step budget on the same prompts: speed beside quality, one row each."""
    from tqdm.auto import tqdm

    from unmask.decoding import preset_config
    from unmask.schedules import build_schedule

    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    rows = []
    grid = [(p, s) for p in presets for s in steps]
    for preset, n_steps in tqdm(grid, desc="bench sample", unit="run"):
        cfg = preset_config(preset, **{**(overrides or {}), "steps": n_steps,
                                       "max_new_tokens": max_new_tokens})
        r = run_decode(model, cfg, prompts, batch_size=batch_size, seed=seed, eos_id=tokenizer.eos_id,
                       schedule=schedule, precision=precision)
        r.pop("samples")
        rows.append({"preset": preset, "steps": n_steps, **r})
    return rows


def sample_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | steps | NFE | tokens/forward | tokens/s | tokens/s (with prompt) "
             "| overhead | entropy | rep-4 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['steps']} | {r['nfe']} | {r['tokens_per_forward']:.2f} "
                     f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s_with_prompt']:.1f} "
                     f"| {100 * r['overhead_fraction']:.1f}% | {r['entropy']:.2f} | {r['rep4']:.3f} |")
    return "\n".join(lines)


def bench_cache(model, tokenizer, config, *, prompts: torch.Tensor, max_new_tokens: int, steps: int,
                batch_size: int, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """BD3-LM decoding with the exact KV cache vs recomputing the whole prefix every call."""
    from unmask.decoding import preset_config
    from unmask.schedules import build_schedule

    if model.cfg.attention != "block_causal":
        raise ValueError("bench cache needs a block-causal (BD3-LM) checkpoint")
    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    arms = {}
    for cache in ("auto", "none"):
        cfg = preset_config("bd3lm", cache=cache, steps=steps, max_new_tokens=max_new_tokens)
        arms[cache] = (lambda cfg=cfg: run_decode(model, cfg, prompts, batch_size=batch_size, seed=seed,
                                                  eos_id=None, schedule=schedule))
    runs = _interleaved(arms, repeats)
    same = all(a["samples"] == b["samples"] for a, b in zip(runs["auto"], runs["none"], strict=True))
    return {"speedup": _ratio(runs, "none", "auto"), "identical_tokens": same,
            "cached_seconds": statistics.median(r["seconds"] for r in runs["auto"]),
            "recompute_seconds": statistics.median(r["seconds"] for r in runs["none"]),
            "nfe": runs["auto"][0]["nfe"], "commit_passes": runs["auto"][0]["commit_passes"],
            "block_size": model.cfg.block_size, "max_new_tokens": max_new_tokens, "steps": steps,
            "batch_size": batch_size, "rows": len(prompts), "repeats": repeats}


@torch.inference_mode()
def llada_reference(model, prompt: torch.Tensor, *, gen_length: int, steps: int,
                    block_length: int) -> torch.Tensor:
    """A plain loop written the way the public LLaDA reference decodes (greedy, low-confidence
    remasking): the whole sequence recomputed every step, semi-AR blocks, a fixed number of
    tokens per step with the remainder to the first steps. The [MASK] logit is excluded, as our
    SUBS models never predict it."""
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


def bench_llada_reference(model, config, *, prompts: torch.Tensor, max_new_tokens: int, steps: int,
                          block_len: int, repeats: int = 3) -> dict[str, Any]:
    """Our `llada` preset vs `llada_reference` on the same checkpoint and prompts."""
    from unmask.decoding import preset_config
    from unmask.schedules import build_schedule

    schedule = build_schedule(config.noise.schedule, config.noise.eps)
    cfg = preset_config("llada", steps=steps, max_new_tokens=max_new_tokens, block_len=block_len,
                        eos_fill=False)
    B = len(prompts)

    def ours():
        r = run_decode(model, cfg, prompts, batch_size=B, seed=0, eos_id=None, schedule=schedule)
        return {"seconds": r["seconds"], "tokens": r["samples"]}

    def reference():
        t = time.perf_counter()
        x = llada_reference(model, prompts, gen_length=max_new_tokens, steps=steps, block_length=block_len)
        return {"seconds": time.perf_counter() - t, "tokens": x[:, prompts.shape[1]:].tolist()}

    runs = _interleaved({"ours": ours, "reference": reference}, repeats)
    identical = all(a["tokens"] == b["tokens"] for a, b in zip(runs["ours"], runs["reference"], strict=True))
    return {"speedup": _ratio(runs, "reference", "ours"), "identical_tokens": identical,
            "ours_seconds": statistics.median(r["seconds"] for r in runs["ours"]),
            "reference_seconds": statistics.median(r["seconds"] for r in runs["reference"]),
            "max_new_tokens": max_new_tokens, "steps": steps, "block_len": block_len, "rows": B,
            "repeats": repeats}
