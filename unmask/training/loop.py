"""The training loop, written out: AdamW, warm-up, clipping, accumulation, EMA, bf16, validation.

Every random draw of step `s` comes from generators seeded by `(seed, s)` and the batch of step
`s` is a pure function of `(seed, s)` (see `data.batch_indices`), so a run resumed from a
checkpoint reproduces the uninterrupted run exactly; the checkpoint stores the step, the
optimizer state and the chosen clipped range. The learning-rate schedule is a function of the step.

Validation is the same estimator `unmask eval ppl` uses, on the weights a checkpoint loads as its
model (EMA when enabled), so the number printed here is the number `eval ppl --split validation`
gives for the saved checkpoint. Run directories and interrupts (SIGINT / SIGTERM finish the step,
write a checkpoint and raise `TrainingInterrupted`) are `unmask.training.runs`; the set-up stages
(resume / init, data, model, optimizer) are `unmask.training.setup`.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.config import Config, ConfigError, replace
from unmask.data.corpus import PreparedData, batch_indices
from unmask.data.instruct import maskable_mask, response_mask
from unmask.integrity import is_write_error, write_failed
from unmask.models.checkpoint import (
    load_state_dict_strict,
    save_checkpoint,
)
from unmask.models.denoiser import Denoiser
from unmask.models.transformer import autocast
from unmask.precision import resolve_precision
from unmask.schedules import NoiseSchedule, build_schedule
from unmask.training.clip_search import search_clip
from unmask.training.distributed import (
    Objective,
    full_model_state,
    init_distributed,
    load_full_optimizer,
    load_sharded,
    memory_report,
    save_sharded,
    unsharded,
    wrap,
)
from unmask.training.loggers import build_loggers
from unmask.training.objectives import (
    Batch,
    LossOutput,
    ar_loss,
    diffusion_loss,
    r2ft_loss,
    sft_loss,
)
from unmask.training.perplexity import Perplexity, evaluate_perplexity
from unmask.training.runs import (
    RunLock,
    TrainingInterrupted,
    clean_leftovers,
    prepare_run_dir,
    rewind_log,
    stop_requests,
)
from unmask.training.setup import Start, run_data, run_model, run_optimizer, start_of


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_ppl: float | None
    t_range: tuple[float, float]


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to `lr`, then constant or cosine decay to 10% at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_loss(
    model: Denoiser,
    batch: Batch,
    schedule: NoiseSchedule,
    cfg: Config,
    generator: torch.Generator,
    t_range: tuple[float, float],
    eos_id: int,
    rows: slice | None = None,
) -> LossOutput:
    """The step's loss; `rows`: this process's share of the global batch (see training/distributed)."""
    if cfg.instruct.stage == "r2ft":
        return r2ft_loss(model, batch, cfg.instruct, eos_id, generator, rows=rows)
    if cfg.instruct.stage == "sft":
        return sft_loss(model, batch, schedule, generator, t_range, rows=rows)
    if model.cfg.objective == "ar":
        return ar_loss(model, batch, rows=rows)
    resample = (*cfg.noise.clip, cfg.noise.resample_tries) if cfg.noise.resample else None
    soft_p = cfg.soft_mask.p if cfg.soft_mask.k else 0.0
    return diffusion_loss(
        model, batch, schedule, generator, t_range, resample=resample, soft_p=soft_p, rows=rows
    )


def make_batch(data: PreparedData, split: str, index: np.ndarray, cfg: Config, device) -> Batch:
    """Rows `index` of a split as a Batch: [PAD] excluded from the loss; instruction rows keep loss
    on their response only (`instruct.eos` decides the tail) and carry their spans."""
    x0 = torch.as_tensor(np.asarray(data.rows[split][index]), device=device)
    if data.spans is None:
        return Batch(x0, x0 != data.tokenizer.pad_id)
    spans = np.asarray(data.spans[split][index])
    L, eos = x0.shape[1], cfg.instruct.eos
    maskable = torch.as_tensor(maskable_mask(spans, L, eos), device=device)
    scored = torch.as_tensor(response_mask(spans, L, eos), device=device)
    return Batch(x0, maskable, torch.as_tensor(spans, device=device), scored)


class _Run:
    """A run in progress: the stages after set-up, each a method reading the state set up once."""

    def __init__(
        self,
        cfg: Config,
        d,
        device,
        start: Start,
        data: PreparedData,
        model,
        progress: bool,
        rewind_log: bool,
    ):
        tc = cfg.train
        self.cfg, self.tc, self.d, self.device, self.data, self.model = cfg, tc, d, device, data, model
        self.tokenizer = data.tokenizer
        self.run_dir = Path(tc.out)
        self.schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
        objective = Objective(
            model,
            lambda m, **kw: training_loss(
                m, schedule=self.schedule, cfg=cfg, eos_id=self.tokenizer.eos_id, **kw
            ),
        )
        self.step_module = wrap(
            objective, d, precision=tc.precision, checkpoint_activations=cfg.dist.activation_checkpointing
        )
        self.optimizer, self.base_lrs = run_optimizer(model, cfg)
        self.ema = copy.deepcopy(model).requires_grad_(False) if tc.ema > 0 else None
        self.t_range = (max(cfg.noise.clip[0], cfg.noise.eps), cfg.noise.clip[1])
        if start.ckpt is not None:
            self._restore(start)
        self.train_rows, self.val_rows = data.rows["train"], data.rows["validation"]
        self.byte_lengths = self.tokenizer.byte_lengths()
        self.log = self._open_log(start.step, resume=rewind_log)
        self.trackers = build_loggers(tc.loggers, self.run_dir, cfg) if d.main else []
        self.tokens_seen, self.t0 = 0, time.perf_counter()
        self.memory: dict[str, float] = {}
        self.bar = tqdm(
            range(start.step, tc.steps),
            initial=start.step,
            total=tc.steps,
            disable=not progress,
            desc=f"train {cfg.model.objective}",
            unit="step",
            dynamic_ncols=True,
        )

    def _restore(self, start: Start) -> None:
        """The optimizer, EMA and clipped range of the checkpoint resumed from."""
        ckpt = start.ckpt
        if self.ema is not None:
            load_state_dict_strict(self.ema, ckpt / "ema.safetensors")
        if (ckpt / "dist").is_dir():  # written by an FSDP run: resharded onto this run's layout
            load_sharded(ckpt / "dist", self.model, self.optimizer)
        elif self.d.strategy == "fsdp":
            load_full_optimizer(
                self.model, self.optimizer, torch.load(ckpt / "optimizer.pt", weights_only=True)
            )
        else:
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        self.t_range = tuple(start.state.get("t_range", self.t_range))

    def _open_log(self, start_step: int, *, resume: bool):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if self.d.main and resume:  # rewind to the checkpoint: drop a killed run's tail, set torn lines aside
            _, torn = rewind_log(path, start_step)
            if torn:
                print(
                    f"--resume: {torn} torn or corrupt line(s) of {path} set aside in {path.name}.torn",
                    file=sys.stderr,
                )
        return path.open("a") if self.d.main else None

    def write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            try:
                self.log.write(json.dumps(record) + "\n")
                self.log.flush()  # a record per flush: a kill tears at most the last line
            except OSError as e:
                if is_write_error(e):
                    raise write_failed(self.run_dir / "metrics.jsonl", e) from None
                raise
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    # ----------------------------------------------------------------------------- a step

    def train_step(self, step: int) -> None:
        tc, d, model, optimizer = self.tc, self.d, self.model, self.optimizer
        t_step = time.perf_counter()
        lr = lr_at(step, tc)
        for group, base_lr in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * lr / tc.lr  # every group follows the same warm-up/decay shape
        nats, tokens, extras, positions = 0.0, 0, {}, 0
        for micro in range(tc.grad_accum):
            index = step * tc.grad_accum + micro
            rows = batch_indices(len(self.train_rows), tc.batch_size, index, tc.seed)
            batch = make_batch(self.data, "train", rows, self.cfg, self.device)
            generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + index)
            torch.manual_seed(tc.seed * 7_919 + index)  # dropout
            with autocast(tc.precision, self.device):
                out = self.step_module(
                    batch=batch, generator=generator, t_range=self.t_range, rows=d.rows(tc.batch_size)
                )
            (out.loss * d.world / tc.grad_accum).backward()  # DDP/FSDP average the ranks' gradients
            nats, tokens = nats + d.sum(out.nats, self.device), tokens + out.tokens
            positions += batch.x0.numel()
            for k, v in (out.extras or {}).items():
                extras[k] = extras.get(k, 0.0) + v / tc.grad_accum
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if tc.grad_clip > 0
            else torch.tensor(float("nan"))
        )
        optimizer.step()
        if step + 1 == tc.steps:  # what this process holds, gradients included (before they are freed)
            self.memory.update(memory_report(model, optimizer))
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1 - tc.ema)
        self.tokens_seen += positions  # throughput counts every position processed
        loss = nats / tokens
        rate = self.tokens_seen / (time.perf_counter() - self.t0)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
        record = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": rate,
            "step_seconds": time.perf_counter() - t_step,
            **extras,
        }
        if model.soft_mask is not None:
            record["soft_mask"] = model.soft_mask.values()
        self.write(record)

    # ------------------------------------------------------------------------- validation

    def validate(self, step: int) -> Perplexity:
        with unsharded(self.step_module, self.d):  # every rank evaluates the whole set: the same number
            return self._validate(step)

    def _validate(self, step: int) -> Perplexity:
        cfg, val_rows = self.cfg, self.val_rows
        eval_model = self.ema if self.ema is not None else self.model  # what load_checkpoint returns
        n = cfg.eval.max_rows or len(val_rows)
        loss_positions = maskable = None
        if self.data.spans is not None:  # instruction rows: the response-only bound, masked as in training
            spans, L = self.data.spans["validation"][:n], val_rows.shape[1]
            loss_positions = response_mask(spans, L, cfg.instruct.eos)
            maskable = maskable_mask(spans, L, cfg.instruct.eos)
        ppl = evaluate_perplexity(
            eval_model,
            val_rows[:n],
            self.schedule,
            pad_id=self.tokenizer.pad_id,
            byte_lengths=self.byte_lengths,
            eps=cfg.noise.eps,
            mc_samples=cfg.eval.mc_samples,
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            precision=self.tc.precision,
            loss_positions=loss_positions,
            maskable=maskable,
            progress=not self.bar.disable,
        )
        record = {
            "step": step,
            "val_nats": ppl.nats_per_token,
            "val_ppl": ppl.ppl,
            "val_bpb": ppl.bits_per_byte,
            "val_rows": ppl.rows,
            "val_mc_samples": ppl.mc_samples,
            "val_weights": "ema" if self.ema is not None else "raw",
        }
        if cfg.noise.clip_search and self.model.cfg.objective != "ar":
            t_range, var = search_clip(
                eval_model, val_rows, self.schedule, cfg, self.tokenizer.pad_id, self.device
            )
            self.t_range = (max(t_range[0], cfg.noise.eps), t_range[1])
            record.update(clip=list(self.t_range), clip_loss_var=var)
        self.write(record)
        return ppl

    # ------------------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, val_ppl: float | None) -> None:
        d, tc = self.d, self.tc
        meta = {
            "t_range": list(self.t_range),
            "val_ppl": val_ppl,
            "seed": tc.seed,
            "world_size": d.world,
            "strategy": d.strategy,
        }
        common = dict(
            step=step,
            model=self.model,
            config=self.cfg,
            tokenizer=self.tokenizer,
            state=meta,
            keep_optimizer=tc.keep_optimizer,
        )
        if d.strategy != "fsdp":
            if d.main:
                save_checkpoint(self.run_dir, ema=self.ema, optimizer=self.optimizer, **common)
            d.barrier()
            return
        shards = self.run_dir / f".dist-{step:07d}"  # every rank writes its shard; rank 0 commits atomically
        save_sharded(shards, self.model, self.optimizer)
        weights = full_model_state(self.model) if self.cfg.dist.consolidate else None  # a collective
        d.barrier()
        if d.main:
            save_checkpoint(self.run_dir, model_state=weights or {}, move_in={"dist": shards}, **common)
        d.barrier()


def train(
    cfg: Config,
    *,
    resume: bool = False,
    init: str | None = None,
    overwrite: bool = False,
    data: PreparedData | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `cfg` into `cfg.train.out`. `resume` continues the run there; `init` starts from
    another checkpoint's weights (and tokenizer); `overwrite` replaces a run already there (without
    it, such a directory is refused). The precision `auto` is resolved here, printed, and saved in
    the run's config."""
    d, device = init_distributed(cfg.dist.strategy, cfg.train.batch_size)
    progress = progress and d.main  # rank 0 does the talking
    if cfg.dist.strategy == "fsdp" and cfg.train.ema > 0:
        raise ConfigError(
            "--train.ema with --dist.strategy fsdp is not supported (the EMA copy would need "
            "its own sharding); use ddp or turn the EMA off"
        )
    resolved = resolve_precision(cfg.train.precision, device.type)
    cfg = replace(cfg, train=replace(cfg.train, precision=resolved.precision))
    if progress:
        print(
            f"precision: {resolved}" + (f"; {d.world} processes, {d.strategy}" if d.world > 1 else ""),
            file=sys.stderr,
        )
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --train.out and --overwrite replaces it: pass one")
    run_dir = Path(cfg.train.out)
    lock = RunLock(run_dir) if d.main else None  # one writer per run directory
    try:
        if d.main and resume:
            gone = clean_leftovers(run_dir)
            if gone and progress:
                print(f"--resume: removed what a killed run left: {', '.join(gone)}", file=sys.stderr)
        torch.manual_seed(cfg.train.seed)
        start = start_of(cfg, resume, init, device)
        cfg = start.cfg
        if cfg.lora.r and start.on_base is None:  # never a silent full fine-tune under a LoRA config
            raise ConfigError(
                f"--lora.r {cfg.lora.r}: LoRA adapters attach to a pretrained (transformers) base given "
                "with --init DIR; this run trains unmask's own backbone, every weight of it: drop --lora.r "
                "(or --init a pretrained directory)"
            )
        if d.main:
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        d.barrier()
        data = run_data(cfg, start.tokenizer, data, progress)
        model = run_model(cfg, start, data.tokenizer, init, device)
        run = _Run(cfg, d, device, start, data, model, progress, rewind_log=resume)
        return _loop(run, start.step)
    finally:
        if lock is not None:
            lock.release()


def _loop(run: _Run, start_step: int) -> TrainResult:
    """The steps, with validation, checkpoints and a clean stop on SIGINT / SIGTERM."""
    tc, d, cfg = run.tc, run.d, run.cfg
    run.model.train()
    val_ppl = None
    with stop_requests() as stop:
        for step in run.bar:
            run.train_step(step)
            done = step + 1
            # every rank stops at the same step (torchrun forwards the signal to all, not at once)
            signal_name = stop["signal"]
            if d.world > 1 and d.sum(1.0 if signal_name else 0.0, run.device) > 0:
                signal_name = signal_name or "SIGTERM"
            if tc.eval_every and done % tc.eval_every == 0 or done == tc.steps:
                ppl = run.validate(done)
                val_ppl = ppl.ppl
                weights = "EMA" if run.ema is not None else "raw"
                if d.main:
                    clip = (
                        f"; clip {run.t_range[0]:.2f}-{run.t_range[1]:.2f}" if cfg.noise.clip_search else ""
                    )
                    run.bar.write(f"step {done}: val ppl {ppl.describe()}, {weights} weights{clip}")
            if done % tc.save_every == 0 or done == tc.steps or signal_name:
                run.checkpoint(done, val_ppl)
            if signal_name:
                run.close()
                raise TrainingInterrupted(run.run_dir, done, signal_name)
    run.write({"step": tc.steps, "memory": run.memory, "world_size": d.world, "strategy": d.strategy})
    run.close()
    return TrainResult(run.run_dir, tc.steps, val_ppl, run.t_range)
