"""`unmask bench lm-eval`: the lm-eval model on local tasks — each task's metric and wall time per
request type for several checkpoints, and the standard error of the diffusion log-likelihood
estimate against its number of Monte Carlo samples."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

# the metric each request type's task reports
METRIC = {
    "loglikelihood": "acc,none",
    "generate_until": "exact_match,none",
    "loglikelihood_rolling": "bits_per_byte,none",
}


def bench_lm_eval(
    checkpoints: dict[str, str],
    tasks: dict[str, str],
    *,
    include_path: str,
    limit: int | None,
    model_args: str = "",
    mc_counts: tuple[int, ...] = (1, 4, 16, 64),
    se_draws: int = 256,
) -> dict[str, Any]:
    """tasks: request type -> task name. Per checkpoint and task: the metric, requests and seconds
    (the harness's own evaluation, one task at a time). Per diffusion checkpoint: the standard
    error of the log-likelihood estimate at each Monte Carlo count, measured from `se_draws` draws
    per multiple-choice request (std of the means of disjoint groups of m draws) beside the
    1/sqrt(m) prediction."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from unmask.evaluation.harness import UnmaskLM

    manager = TaskManager(include_path=include_path, include_defaults=False)
    rows, se_rows = [], []
    for name, path in checkpoints.items():
        args = ",".join(x for x in (f"checkpoint={path}", model_args) if x)
        for kind, task in tasks.items():
            t = time.perf_counter()
            r = lm_eval.simple_evaluate(
                model="unmask",
                model_args=args,
                tasks=[task],
                task_manager=manager,
                limit=limit,
                log_samples=False,
            )
            seconds = time.perf_counter() - t
            n = r["n-samples"][task]["effective"]
            rows.append(
                {
                    "checkpoint": name,
                    "request_type": kind,
                    "task": task,
                    "requests": n,
                    "metric": METRIC[kind].split(",")[0],
                    "value": float(r["results"][task][METRIC[kind]]),
                    "seconds": seconds,
                    "seconds_per_doc": seconds / max(n, 1),
                }
            )
        lm = UnmaskLM(checkpoint=path, precision="fp32")
        if lm.kind == "causal" or "loglikelihood" not in tasks:
            continue
        docs = manager.load_task_or_group([tasks["loglikelihood"]])[tasks["loglikelihood"]].test_docs()
        draws = []
        for doc in list(docs)[: limit or None]:
            prefix = lm.tok.prompt_ids(doc["question"])
            target = lm.tok.encode(doc["choices"][doc["answer"]])
            draws.append(lm.mc_nelbo(prefix, target, n=se_draws))
        for m in mc_counts:
            groups = [d[: se_draws // m * m].view(-1, m).mean(-1) for d in draws]
            measured = (
                sum(float(g.std()) for g in groups if len(g) > 1) / len(groups)
                if se_draws // m > 1
                else math.nan
            )
            predicted = sum(float(d.std()) / math.sqrt(m) for d in draws) / len(draws)
            se_rows.append(
                {
                    "checkpoint": name,
                    "mc_samples": m,
                    "se_measured": measured,
                    "se_predicted": predicted,
                    "mean_nelbo": float(torch.stack([d.mean() for d in draws]).mean()),
                }
            )
    return {"rows": rows, "standard_error": se_rows, "limit": limit, "model_args": model_args}


def lm_eval_table(result: dict[str, Any]) -> str:
    lines = [
        "| checkpoint | request type | task | requests | metric | value | s/doc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['checkpoint']} | {r['request_type']} | {r['task']} | {r['requests']} | {r['metric']} "
            f"| {r['value']:.3f} | {r['seconds_per_doc']:.2f} |"
        )
    if result["standard_error"]:
        lines += [
            "",
            "| checkpoint | MC samples | SE measured (nats) | SE predicted sd/sqrt(m) | mean NELBO |",
            "|---|---|---|---|---|",
        ]
        for r in result["standard_error"]:
            lines.append(
                f"| {r['checkpoint']} | {r['mc_samples']} | {r['se_measured']:.3f} | "
                f"{r['se_predicted']:.3f} | {r['mean_nelbo']:.2f} |"
            )
    return "\n".join(lines)
