"""`unmask bench data`: preparing a corpus at growing sizes, and training from shards vs memory.

Preparation runs in a fresh process per size (so its peak RSS is its own): the survey pass, the BPE
trained on the training split, and tokenization into shards, each timed; peak RSS of the process and
of its tokenizing workers. Training: the same model's full steps fed by rows gathered from the
memory-mapped shards and by the same rows materialised in memory, interleaved A B A B.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from unmask.config import Config, DataConfig

UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def parse_size(text: str) -> int:
    """`100MB`, `2GB`, `512KB` or a byte count."""
    t = text.strip().upper()
    for unit, scale in UNITS.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def make_text(path: Path, nbytes: int) -> Path:
    """A .txt corpus of about `nbytes`: the standard library's sources, paragraph by paragraph,
    repeated with a numbered heading per copy (reused when a file of that size is already there)."""
    from unmask.data.sources import _read_text, stdlib_files

    if path.is_file() and abs(path.stat().st_size - nbytes) < (1 << 20):
        return path
    texts = [_read_text(p) for _, p in stdlib_files()]
    tmp = path.with_name(path.name + ".tmp")
    written, copy = 0, 0
    with tmp.open("w", encoding="utf-8") as f:
        while written < nbytes:
            for text in texts:
                piece = f"# copy {copy}\n\n{text}\n\n"
                f.write(piece)
                written += len(piece.encode("utf-8"))
                if written >= nbytes:
                    break
            copy += 1
    tmp.replace(path)
    return path


def _prepare(cfg: DataConfig) -> dict[str, Any]:
    """In this process: the three passes of `prepare_data`, timed, and the peak RSS."""
    from unmask.data.corpus import build_tokenizer, survey_corpus, tokenize_corpus

    def peak() -> float:  # MB, the most this process has held so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    start_rss = peak()
    t0 = time.perf_counter()
    survey = survey_corpus(cfg)
    t1, survey_rss = time.perf_counter(), peak()
    tokenizer = build_tokenizer(cfg, survey)
    t2, bpe_rss = time.perf_counter(), peak()
    shards = tokenize_corpus(cfg, tokenizer, survey, ("train", "validation", "test"))
    t3 = time.perf_counter()
    tokens = sum(len(s) for s in shards.values())
    return {
        "chars": survey.chars,
        "tokens": tokens,
        "survey_s": t1 - t0,
        "bpe_s": t2 - t1,
        "tokenize_s": t3 - t2,
        "tokens_per_s": tokens / (t3 - t2),
        "start_rss_mb": start_rss,  # after imports
        "survey_peak_rss_mb": survey_rss,
        "bpe_peak_rss_mb": bpe_rss,
        "peak_rss_mb": peak(),
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "shard_bytes": sum(f.stat().st_size for s in shards.values() for f in s.folder.iterdir()),
    }


def bench_prepare(cfg: DataConfig, sizes: list[int], workdir: Path) -> list[dict[str, Any]]:
    """One fresh process per corpus size (each with an empty cache of its own)."""
    out = []
    for size in sizes:
        corpus = make_text(workdir / f"corpus-{size >> 20}MB.txt", size)
        run_cfg = dataclasses.replace(
            cfg, corpus=str(corpus), cache_dir=str(workdir / f"cache-{size >> 20}MB")
        )
        subprocess.run(["rm", "-rf", run_cfg.cache_dir], check=True)
        code = "import json, sys; from unmask.bench.data import _child; _child(sys.argv[1])"
        done = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(run_cfg))],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"preparing {corpus} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        out.append({"text_mb": corpus.stat().st_size / (1 << 20), **result})
        print(f"{out[-1]['text_mb']:.0f} MB: {json.dumps(result)}", file=sys.stderr, flush=True)
    return out


def _child(cfg_json: str) -> None:
    cfg = DataConfig(**json.loads(cfg_json))
    print(json.dumps(_prepare(cfg)))


def bench_rows(cfg: Config, *, steps: int = 20, repeats: int = 5) -> dict[str, Any]:
    """Training steps/s of one model with rows from the shards vs the same rows in memory."""
    import torch

    from unmask.bench.training import interleaved
    from unmask.data.corpus import PreparedData, batch_indices, prepare_data
    from unmask.models.transformer import build_model
    from unmask.schedules import build_schedule
    from unmask.training.loop import make_batch
    from unmask.training.objectives import diffusion_loss

    data = prepare_data(cfg.data, splits=("train",))
    memory = PreparedData(data.tokenizer, {"train": np.asarray(data.rows["train"])})
    torch.manual_seed(0)
    model = build_model(cfg.model, data.tokenizer.vocab_size, data.tokenizer.mask_id).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = build_schedule(cfg.noise.schedule, cfg.noise.eps)
    n_rows, B = len(memory.rows["train"]), cfg.train.batch_size
    counter = {"shards": 0, "memory": 0}

    def arm(name: str, prepared: PreparedData):
        def run() -> dict[str, float]:
            g = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            for _ in range(steps):
                index = batch_indices(n_rows, B, counter[name], cfg.train.seed)
                counter[name] += 1
                batch = make_batch(prepared, "train", index, cfg, "cpu")
                loss = diffusion_loss(model, batch, schedule, g, (0.0, 1.0)).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return {"seconds": (time.perf_counter() - t) / steps}

        return run

    runs = interleaved({"shards": arm("shards", data), "memory": arm("memory", memory)}, repeats)
    sec = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    gather = {}
    for name, prepared in (("shards", data), ("memory", memory)):
        t = time.perf_counter()
        for i in range(200):
            prepared.rows["train"][batch_indices(n_rows, B, i, 1)]
        gather[name] = (time.perf_counter() - t) / 200
    return {
        "rows": n_rows,
        "batch": [B, cfg.data.seq_len],
        "steps_per_s": {k: 1 / v for k, v in sec.items()},
        "shards_over_memory": sec["memory"] / sec["shards"],
        "gather_ms": {k: 1e3 * v for k, v in gather.items()},
    }


def data_table(prepared: list[dict[str, Any]], rows: dict[str, Any] | None) -> str:
    lines = [
        "| text | tokens | survey s | BPE s | tokenize s | tokens/s | peak RSS MB: imports / survey / BPE / "
        "all | workers' RSS MB | shards MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in prepared:
        lines.append(
            f"| {r['text_mb']:.0f} MB | {r['tokens']:,} | {r['survey_s']:.1f} | {r['bpe_s']:.1f} | "
            f"{r['tokenize_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['start_rss_mb']:.0f} / "
            f"{r['survey_peak_rss_mb']:.0f} / {r['bpe_peak_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} | "
            f"{r['workers_peak_rss_mb']:.0f} | {r['shard_bytes'] / (1 << 20):.0f} |"
        )
    if rows:
        sps = rows["steps_per_s"]
        lines += [
            "",
            f"training ({rows['rows']:,} rows, batch {rows['batch']}): shards {sps['shards']:.2f} steps/s, "
            f"memory {sps['memory']:.2f} steps/s, shards/memory {rows['shards_over_memory']:.3f}; "
            f"gathering a batch {rows['gather_ms']['shards']:.3f} ms from shards vs "
            f"{rows['gather_ms']['memory']:.3f} ms in memory",
        ]
    return "\n".join(lines)
