"""Which precision to compute in, decided from the machine rather than assumed.

`precision = "auto"` (the default everywhere) resolves to bf16 on a CUDA device that supports it,
and on a CPU only when the CPU multiplies bf16 natively (AMX or AVX-512 BF16) *and* a short probe
confirms a bf16 matmul is not slower than fp32; otherwise fp32. On CPUs without native bf16,
PyTorch emulates it, and a bf16 matmul can be ~50x slower than fp32: an explicit `bf16` there still
runs, with a warning that says how much slower it measured.

`UNMASK_NATIVE_BF16=0|1` overrides the CPU feature check (to exercise the other path on any machine).
"""

from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Resolved:
    precision: Literal["fp32", "bf16"]
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where unreadable), read once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_cpu_bf16() -> bool:
    """True when the CPU has a bf16 matmul instruction set (or UNMASK_NATIVE_BF16 says so)."""
    forced = os.environ.get("UNMASK_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


def matmul_flops(dtype: torch.dtype, *, budget_s: float = 0.1, n: int = 256, device: str = "cpu") -> float:
    """FLOP/s of an n x n matmul in `dtype`, repeated for about `budget_s` seconds (at least once
    after one warm-up), so the probe costs the same time on a fast or a slow machine."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up: one-time kernel selection stays out of the timing
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            return 2 * n**3 * reps / elapsed


@functools.lru_cache(maxsize=1)
def bf16_speedup() -> float:
    """bf16 matmul speed over fp32 on this CPU (below 1: slower), measured once per process."""
    return matmul_flops(torch.bfloat16) / matmul_flops(torch.float32)


def resolve_precision(requested: str, device_type: str = "cpu") -> Resolved:
    """`auto` -> fp32 or bf16 for this machine, with the reason; `fp32`/`bf16` are kept as asked (an
    emulated bf16 warns; Python shows a warning once per place that asks)."""
    native = native_cpu_bf16()
    if requested == "bf16" and device_type == "cpu" and not native:
        warnings.warn(
            f"bf16 on a CPU without native bf16 ({cpu_model()}: no AMX / AVX-512 BF16) is "
            f"emulated: a bf16 matmul measured {1 / bf16_speedup():.0f}x slower than fp32 "
            "here; precision auto (the default) picks fp32",
            stacklevel=2,
        )
    return _resolve(requested, device_type, native)


@functools.lru_cache(maxsize=16)
def _resolve(requested: str, device_type: str, native: bool) -> Resolved:
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return Resolved("fp32", "asked for")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Resolved("bf16", "asked for" if requested == "bf16" else "auto: the GPU supports bf16")
        return Resolved(
            "fp32" if requested == "auto" else "bf16",
            "auto: this GPU has no bf16" if requested == "auto" else "asked for",
        )
    if requested == "bf16":
        return Resolved("bf16", "asked for" + ("" if native else ", emulated on this CPU"))
    if not native:
        return Resolved("fp32", "auto: this CPU has no native bf16 matmul (no AMX / AVX-512 BF16)")
    speedup = bf16_speedup()
    if speedup >= 1.0:
        return Resolved("bf16", f"auto: native bf16 on this CPU, matmul {speedup:.1f}x fp32")
    return Resolved("fp32", f"auto: the CPU reports native bf16 but a bf16 matmul ran at {speedup:.2f}x fp32")
