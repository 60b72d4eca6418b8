"""`unmask bench serve`: throughput and latency of `unmask serve` against the number of concurrent
clients (loopback only, a bounded number of requests), and the gain of batching: the same request
mix at the same concurrency against a server with the static batching engine (`--batching static`:
one batch of same-length, same-settings requests at a time) and one that decodes one request at a
time (`--max-batch-rows 1`), in the same run.

Each client sends its requests one after another; the request mix cycles through a list of prompts
(`--mix same`: one token length; `lengths`: 5 to 150 tokens) with fixed settings, or (`mixed`)
with each request's own preset and step budget. At one client: the server overhead (latency outside
the lane's decode: HTTP, tokenization, queueing) and the engine's time outside forwards (the lane's
own decoding policies, which `unmask sample` spends too, and the engine's scheduling).
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from unmask.serve.server import build_app, run_in_thread

MIXED_SETTINGS = [  # `--mix mixed`: request i takes settings i mod 6 (presets x step budgets)
    {"preset": preset, "steps": steps} for preset in ("bd3lm", "mdlm", "conv") for steps in (16, 32)
]


def mix_prompts(loaded, mix: str, n: int, same_tokens: int, texts: list[str] | None = None) -> list[str]:
    """The mix's prompts: `same`, n prompts of `same_tokens` tokens; `lengths` / `mixed`, n prompts of
    5 to 150 tokens spread evenly. Cut from held-out text, or with `texts` from their tokens as one
    stream (a pretrained directory has no held-out split)."""
    from unmask.data.prompts import heldout_prompts

    width = same_tokens if mix == "same" else 150
    if texts is not None:
        pool = [t for text in texts for t in loaded.tokenizer.encode(text)]
        if not pool:
            raise ValueError("the prompts hold no tokens")
        pool = pool * -(-width * n // len(pool))
        ids = [[0] + pool[i * width : (i + 1) * width] for i in range(n)]  # [0]: a BOS slot, dropped
    else:
        ids = [row.tolist() for row in heldout_prompts(loaded.tokenizer, loaded.config.data, n, width + 1)]
    if mix == "same":
        return [loaded.tokenizer.decode(row[1:]) for row in ids]
    return [loaded.tokenizer.decode(row[1 : 1 + 5 + (145 * i) // max(1, n - 1)]) for i, row in enumerate(ids)]


def _load(
    url: str,
    model: str,
    prompts: list[str],
    *,
    clients: int,
    per_client: int,
    body: dict[str, Any],
    settings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`settings`: per-request decoder fields over `body`'s, request i taking settings[i % len]."""

    def client(c: int) -> list[tuple[float, int, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for r in range(per_client):
                t = time.perf_counter()
                i = c * per_client + r
                own = settings[i % len(settings)] if settings else {}
                resp = http.post(
                    f"{url}/v1/completions",
                    json={
                        "model": model,
                        "seed": i,
                        "prompt": prompts[(c + r) % len(prompts)],
                        **body,
                        **own,
                    },
                )
                tokens = resp.json()["usage"]["completion_tokens"] if resp.status_code == 200 else 0
                out.append((time.perf_counter() - t, resp.status_code, tokens))
        return out

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[1] == 200]
    lat = sorted(r[0] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "seconds": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r[2] for r in ok) / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "latency_sum_s": sum(lat),
    }


def bench_serve(
    checkpoint: str,
    prompts: list[str],
    *,
    clients: tuple[int, ...] = (1, 4, 16, 64),
    requests: int = 64,
    max_tokens: int = 64,
    preset: str = "bd3lm",
    steps: int | None = None,
    compare_at: int = 16,
    mix: str = "same",
) -> dict[str, Any]:
    """`requests` requests at each concurrency (split over the clients), batched server; then the same
    at `compare_at` clients against a one-row-at-a-time server. `mix`: `same` (the prompts as
    given: one token length), `lengths` (the caller's prompts of many lengths), `mixed` (lengths,
    and each request its own preset and step budget, `MIXED_SETTINGS`)."""
    if mix not in ("same", "lengths", "mixed"):
        raise ValueError(f"--mix {mix!r}: choose same, lengths or mixed")
    if compare_at not in clients:  # compare where the batched server was measured
        compare_at = max(clients)
    body = {"max_tokens": max_tokens, "preset": preset, **({"steps": steps} if steps else {})}
    settings = MIXED_SETTINGS if mix == "mixed" else None
    rows = []
    servers = (("continuous", 64, "continuous"), ("static", 64, "static"), ("one at a time", 1, "continuous"))
    for mode, max_rows, batching in servers:
        app = build_app(checkpoint, model_name="bench", max_queue=1024, max_batch_rows=max_rows,
                        batching=batching)  # fmt: skip
        engine = app.state.engine
        srv = run_in_thread(app)
        try:
            _load(srv.url, "bench", prompts, clients=1, per_client=2, body=body)  # warm-up
            for c in clients if mode == "continuous" else (compare_at,):
                before = dict(engine.stats)
                r = _load(srv.url, "bench", prompts, clients=c, per_client=max(1, requests // c), body=body,
                          settings=settings)  # fmt: skip
                d = {k: engine.stats[k] - before[k] for k in before}
                r["mode"] = mode
                r["rows_per_forward"] = d["forward_rows"] / max(1, d["forwards"])
                r["calls_per_forward"] = d["forward_calls"] / max(1, d["forwards"])
                r["lanes_per_decision"] = d["step_calls"] / max(1, d["steps"])
                if c == 1:  # one request at a time: everything outside decode is server overhead
                    r["overhead"] = 1 - d["decode_seconds"] / r["latency_sum_s"]
                    r["outside_forwards"] = 1 - d["forward_seconds"] / max(d["round_seconds"], 1e-9)
                rows.append(r)
        finally:
            srv.stop()
    batched = next(r for r in rows if r["mode"] == "continuous" and r["clients"] == compare_at)
    static = next(r for r in rows if r["mode"] == "static")
    single = next(r for r in rows if r["mode"] == "one at a time")
    return {
        "rows": rows,
        "batched_over_one_at_a_time": batched["requests_per_s"] / single["requests_per_s"],
        "static_over_one_at_a_time": static["requests_per_s"] / single["requests_per_s"],
        "compare_at": compare_at,
        "max_tokens": max_tokens,
        "preset": preset,
        "steps": steps,
        "mix": mix,
        "checkpoint": str(checkpoint),
        "prompts": len(prompts),
    }


def serve_table(result: dict[str, Any]) -> str:
    lines = [
        f"mix: {result.get('mix', 'same')}",
        "",
        "| server | clients | requests | errors | requests/s | output tokens/s | p50 s | p99 s "
        "| rows/forward | lanes/forward | lanes/decision |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} "
            f"| {r.get('rows_per_forward', 0):.1f} | {r.get('calls_per_forward', 0):.1f} "
            f"| {r.get('lanes_per_decision', 0):.1f} |"
        )
    one = next((r for r in result["rows"] if "overhead" in r), None)
    lines += [
        "",
        f"at {result['compare_at']} clients, requests/s over one-at-a-time: continuous "
        f"**{result['batched_over_one_at_a_time']:.2f}x**, static {result['static_over_one_at_a_time']:.2f}x",
    ]
    if one:
        lines.append(
            f"at 1 client: server overhead (latency outside the lane's decode) {100 * one['overhead']:.1f}%, "
            f"engine time outside forwards (the lane's own decoding policies included) "
            f"{100 * one['outside_forwards']:.1f}%"
        )
    return "\n".join(lines)


def plot_serve(result: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["mode"] == "continuous"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label="continuous")
    for mode, marker in (("static", "^"), ("one at a time", "s")):
        single = [r for r in result["rows"] if r["mode"] == mode]
        ax.plot([r["clients"] for r in single], [r["tokens_per_s"] for r in single], marker, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title("unmask serve throughput")
    ax.legend()
    fig.tight_layout()
    path = Path(out) / "serve_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
