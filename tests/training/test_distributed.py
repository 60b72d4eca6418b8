"""Training on two CPU processes (torchrun, gloo): DDP and FSDP2 give the single process's loss curve
and weights for the same global batch; runs resume on another world size; a dead rank stops the job."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unmask.models.checkpoint import load_checkpoint, resolve_checkpoint

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jolly baker".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    (root / "book.txt").write_text(
        "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90))) for _ in range(150))
    )
    return root


def args(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(corpus / "book.txt"),
        "--out",
        str(out),
        "--data.seq_len",
        "32",
        "--data.vocab_size",
        "300",
        "--data.cache_dir",
        str(corpus / "cache"),
        "--model.block_size",
        "4",
        "--model.dim",
        "32",
        "--model.n_layers",
        "2",
        "--model.n_heads",
        "2",
        "--train.steps",
        str(steps),
        "--train.batch_size",
        "4",
        "--train.eval_every",
        "0",
        "--train.warmup",
        "2",
        "--train.save_every",
        "4",
        "--train.precision",
        "fp32",
        "--eval.max_rows",
        "8",
        *extra,
    ]


def run(argv: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = (
        [sys.executable, "-m", "unmask", *argv]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "unmask",
            *argv,
        ]
    )
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir: Path) -> list[float]:
    return [
        json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run_dir) / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == pytest.approx(losses(b), rel=1e-5, abs=1e-6)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(corpus):
    run(args(corpus, corpus / "single", 8))
    return corpus / "single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank(corpus, single, strategy):
    out = corpus / strategy
    proc = run(args(corpus, out, 8, "--dist.strategy", strategy), nproc=2)
    assert_same_run(single, out)
    assert proc.stdout.count("checkpoint:") == 1  # rank 0 does the talking
    assert len(losses(out)) == 8  # one metrics log
    state = load_checkpoint(out).state
    assert state["world_size"] == 2 and state["strategy"] == strategy
    if strategy == "fsdp":
        assert (
            resolve_checkpoint(out) / "dist"
        ).is_dir()  # the sharded checkpoint beside the consolidated one


@pytest.mark.parametrize("strategy,first,then", [("ddp", 2, 1), ("fsdp", 2, 1), ("fsdp", 1, 2)])
def test_resume_on_another_world_size(corpus, single, strategy, first, then):
    out = corpus / f"resume-{strategy}-{first}{then}"
    dist = ["--dist.strategy", strategy]
    if strategy == "ddp":  # `unmask train --nproc 2` launches torchrun itself (ddp by default)
        run(args(corpus, out, 4, "--nproc", str(first)))
    else:
        run(args(corpus, out, 4, *(dist if first > 1 else [])), nproc=first)
    run(args(corpus, out, 8, "--resume", *(dist if then > 1 else [])), nproc=then)
    assert_same_run(single, out)


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir) in cmd and f"RANK={rank}".encode() in env and "torch.distributed.run" not in cmd:
            return int(proc.name)
    return None


def test_a_dead_rank_stops_the_job_and_the_last_checkpoint_loads(corpus):
    out = corpus / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "unmask",
        *args(corpus, out, 100000, "--dist.strategy", "ddp"),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "latest").exists():
        time.sleep(0.2)
    assert (out / "latest").exists(), "no checkpoint was written"
    pid = _rank_pid(out, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t < 120
    assert "failed" in err.lower() or "error" in err.lower()
    assert load_checkpoint(out).state["step"] >= 4


def test_bench_dist_reports_step_time_and_memory_per_rank(corpus):
    from unmask.bench.dist import bench_dist, dist_table

    flags = args(corpus, corpus / "unused", 4)[1:]  # the data/model flags, without --out and --train.steps
    drop = {
        i + j
        for i, f in enumerate(flags)
        if f in ("--out", "--train.steps", "--train.save_every")
        for j in (0, 1)
    }
    overrides = tuple(f for i, f in enumerate(flags) if i not in drop)
    r = bench_dist("tiny-bd3lm", steps=4, nproc=2, overrides=overrides)
    arms = {row["arm"]: row for row in r["rows"]}
    assert set(arms) == {"1 process", "2 x ddp", "2 x fsdp"}
    one, ddp, fsdp = arms["1 process"], arms["2 x ddp"], arms["2 x fsdp"]
    assert ddp["params_mb"] == pytest.approx(one["params_mb"])  # DDP replicates
    assert fsdp["params_mb"] == pytest.approx(one["params_mb"] / 2, rel=0.1)  # FSDP holds about half
    assert fsdp["optimizer_mb"] == pytest.approx(one["optimizer_mb"] / 2, rel=0.1)
    assert fsdp["loss"] == pytest.approx(one["loss"], rel=1e-5) and "s/step" in dist_table(r)
