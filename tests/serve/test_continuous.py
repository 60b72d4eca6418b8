"""The continuous-batching engine without HTTP: lanes that join and leave at every round, first come
first served under the row budget, cancellation within a round, and a failure that stays in its lane."""

import asyncio
import time

import pytest
from test_server import alone

from unmask.decoding.decoder import Decoder
from unmask.decoding.presets import preset_config
from unmask.models.checkpoint import load_checkpoint
from unmask.models.transformer import Transformer
from unmask.serve.engine import Engine, Job


@pytest.fixture(scope="module")
def bd3(checkpoints):
    return load_checkpoint(checkpoints["block_causal"])


def _run(engine: Engine, specs: list[dict], *, cancel: int | None = None, timeout: float = 60.0):
    """Submit jobs (`prompt`, `seed`, DecodeConfig fields; `after` seconds later than the previous
    one) and wait for each one's final event; `cancel`: the job cancelled once it is decoding."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        for spec in specs:
            spec = dict(spec)
            await asyncio.sleep(spec.pop("after", 0.0))
            prompt, seed, n = spec.pop("prompt"), spec.pop("seed", 0), spec.pop("n", 1)
            cfg = preset_config(spec.pop("preset", "bd3lm"), **spec)
            plan = engine.plan(cfg)
            job = Job(plan.prompt_ids(prompt), plan, seed, n, loop)  # as `unmask sample` feeds it
            engine.submit(job)
            jobs.append(job)
        if cancel is not None:
            while jobs[cancel].started is None:
                await asyncio.sleep(0.005)
            engine.cancel(jobs[cancel])

        async def final(job):  # (kind, payload, when it arrived)
            while True:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout)
                if kind in ("done", "failed", "error"):
                    return kind, payload, time.perf_counter()

        waits = [final(job) for i, job in enumerate(jobs) if i != cancel]
        out = list(await asyncio.gather(*waits))
        if cancel is not None:
            out.insert(cancel, None)
        return jobs, out

    return asyncio.run(main())


def _texts(event) -> list[str]:
    return [c["text"] for c in event[1]["choices"]]


def _each_as_alone(loaded, specs: list[dict], out) -> None:
    """Every job finished with the texts `sample` gives its request alone (a pretrained layout)."""
    from unmask.decoding.sample import sample

    for spec, o in zip(specs, out, strict=True):
        assert o[0] == "done", o
        fields = {k: v for k, v in spec.items() if k not in ("prompt", "seed", "preset")}
        cfg = preset_config(spec["preset"], **fields)
        want = sample(loaded.model, loaded.tokenizer, [spec["prompt"]], cfg, None, seed=spec.get("seed", 0))
        assert _texts(o) == [r["text"] for r in want]


def test_a_short_job_leaves_at_once_and_a_waiting_job_takes_its_row(bd3, checkpoints):
    """Two rows: a long and a short job run; the third waits, starts when the short one leaves
    (while the long one still runs) and finishes first; each text is the request decoded alone."""
    engine = Engine(bd3.model, bd3.tokenizer, bd3.config, max_batch_rows=2)
    specs = [
        {"prompt": "def a(", "max_new_tokens": 48, "ban_stop": True},
        {"prompt": "import os", "max_new_tokens": 8, "seed": 1},
        {"prompt": "x", "max_new_tokens": 8, "seed": 2},
    ]
    try:
        jobs, out = _run(engine, specs)
    finally:
        engine.shutdown()
    long, short, late = out
    assert all(o[0] == "done" for o in out)
    assert jobs[2].started >= short[2] - 0.5 and jobs[2].started < long[2]
    assert late[2] < long[2]  # joined the running decode, did not wait for it to end
    for spec, o in zip(specs, out, strict=True):
        fields = {k: v for k, v in spec.items() if k not in ("prompt", "seed")}
        want = alone(
            checkpoints["block_causal"], spec["prompt"], preset="bd3lm", seed=spec.get("seed", 0), **fields
        )
        assert _texts(o) == want


def test_the_oldest_waiting_job_is_never_overtaken(bd3):
    """One row free and the oldest waiting job needs two: the one-row job behind it waits too."""
    engine = Engine(bd3.model, bd3.tokenizer, bd3.config, max_batch_rows=3)
    specs = [
        {"prompt": "def a(", "max_new_tokens": 32, "ban_stop": True, "n": 2},
        {"prompt": "import", "max_new_tokens": 8, "n": 2},
        {"prompt": "x", "max_new_tokens": 8},
    ]
    try:
        jobs, out = _run(engine, specs)
    finally:
        engine.shutdown()
    assert all(o[0] == "done" for o in out)
    assert jobs[2].started >= jobs[1].started  # first come, first served


def test_a_job_larger_than_the_row_budget_runs_alone(bd3):
    engine = Engine(bd3.model, bd3.tokenizer, bd3.config, max_batch_rows=2)
    try:
        _, out = _run(
            engine, [{"prompt": "x", "max_new_tokens": 8, "n": 3}, {"prompt": "y", "max_new_tokens": 8}]
        )
    finally:
        engine.shutdown()
    assert [o[0] for o in out] == ["done", "done"] and len(out[0][1]["choices"]) == 3


def test_a_cancelled_running_job_frees_its_rows_at_the_next_round(bd3):
    engine = Engine(bd3.model, bd3.tokenizer, bd3.config, max_batch_rows=4)
    specs = [
        {"prompt": "def a(", "max_new_tokens": 2048, "steps": 2048, "ban_stop": True, "n": 3},
        {"prompt": "import", "max_new_tokens": 64, "ban_stop": True},
    ]
    try:
        t = time.perf_counter()
        _, out = _run(engine, specs, cancel=0)
        assert out[1][0] == "done" and out[1][2] - t < 30  # not after 2048 tokens of the other
        deadline = time.perf_counter() + 5
        while engine.lanes and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert engine.running_rows == 0 and not engine.lanes
    finally:
        engine.shutdown()


class Poisoned(Transformer):
    """Raises on any call whose tokens hold POISON (a request the model cannot serve)."""

    poison = -1

    def forward(self, tokens=None, **kw):
        if tokens is not None and (tokens == self.poison).any():
            raise RuntimeError("poisoned row")
        return super().forward(tokens, **kw)


def test_a_call_that_fails_in_a_shared_forward_fails_only_its_own_lane(bd3, checkpoints, caplog):
    model = bd3.model
    model.__class__ = Poisoned  # the same weights, one prompt it cannot take
    Poisoned.poison = bd3.tokenizer.encode("@")[-1]
    engine = Engine(model, bd3.tokenizer, bd3.config, max_batch_rows=8)
    specs = [
        {"prompt": p, "max_new_tokens": 16, "seed": i}
        for i, p in enumerate(["def a(", "x @ y", "import os, sys"])
    ]
    try:
        _, out = _run(engine, specs)
    finally:
        engine.shutdown()
        model.__class__ = Transformer
    assert [o[0] for o in out] == ["done", "failed", "done"]
    assert "shared forward of" in caplog.text  # the poison was in a shared forward, rerun call by call
    for spec, o in zip(specs, out, strict=True):
        if o[0] == "done":
            assert _texts(o) == alone(checkpoints["block_causal"], spec["prompt"], preset="bd3lm",
                                      seed=spec["seed"], max_new_tokens=16)  # fmt: skip


def test_a_step_that_fails_in_a_shared_decision_fails_only_its_own_lane(
    bd3, checkpoints, caplog, monkeypatch
):
    """A decision that raises for one lane's window (its prompt's tail, in its first block's first
    step) fails that lane's job; the lanes decided with it are decided again alone and finish."""
    engine = Engine(bd3.model, bd3.tokenizer, bd3.config, max_batch_rows=8)
    prompts = ["def a(", "y = x@", "import os"]
    ids = [engine.plan(preset_config("bd3lm")).prompt_ids(p) for p in prompts]  # as the engine feeds them
    poison, Lb = ids[1][-1], bd3.model.cfg.block_size
    assert len(ids[1]) % Lb  # the poison sits in the first block, beside masks
    assert all(len(i) >= Lb for i in ids)  # each lane prefills first, so their first steps meet
    assert poison not in ids[0] + ids[2]
    real = Decoder.decide

    def decide(self, w):
        if ((w.tokens == poison).any(-1) & (w.step == 0)).any():  # a fresh block holds no generated token
            raise RuntimeError("poisoned window")
        return real(self, w)

    monkeypatch.setattr(Decoder, "decide", decide)
    specs = [{"prompt": p, "max_new_tokens": 16, "seed": i} for i, p in enumerate(prompts)]
    try:
        _, out = _run(engine, specs)
    finally:
        engine.shutdown()
    assert [o[0] for o in out] == ["done", "failed", "done"]
    assert "shared step of" in caplog.text  # the poison was decided with other lanes, then alone
    for spec, o in zip(specs, out, strict=True):
        if o[0] == "done":
            assert _texts(o) == alone(checkpoints["block_causal"], spec["prompt"], preset="bd3lm",
                                      seed=spec["seed"], max_new_tokens=16)  # fmt: skip


@pytest.mark.parametrize(
    "kind,settings",
    [
        # Fast-dLLM's prefix and dual caches, classifier-free guidance, a step budget below the length
        ("bidirectional", [{"preset": "fast-dllm", "block_len": 8},
                           {"preset": "fast-dllm", "cache": "dual", "block_len": 8},
                           {"preset": "llada", "block_len": 8, "cfg_scale": 1.0},
                           {"preset": "mdlm", "steps": 6}]),
        ("block_causal", [{"preset": "conv"}, {"preset": "semi-ar", "block_len": 8}, {"preset": "bd3lm"},
                          {"preset": "llada", "cache": "none"}]),
        ("causal", [{"preset": "mdlm"}, {"preset": "mdlm", "cache": "none", "top_k": 5}]),
    ],
)  # fmt: skip
def test_lanes_of_every_cache_and_decoder_share_forwards_and_equal_their_request_alone(
    kind, settings, checkpoints
):
    loaded = load_checkpoint(checkpoints[kind])
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config, max_batch_rows=16)
    # five prompts: the two jobs of a setting differ in prompt length (else they share one lane)
    prompts = ["def a(", "import os, sys, json", "x", "class Thing(object):", "print(42)"]
    specs = [
        {"prompt": prompts[i % len(prompts)], "seed": i, "max_new_tokens": 12, **s}
        for i, s in enumerate(settings * 2)
    ]
    try:
        _, out = _run(engine, specs)
    finally:
        engine.shutdown()
    assert engine.stats["forward_calls"] > engine.stats["forwards"]  # forwards were shared
    if kind != "causal":  # and the steps' decisions (an AR step is one proposal, in its lane)
        assert engine.stats["step_calls"] > engine.stats["steps"]
    for spec, o in zip(specs, out, strict=True):
        fields = {k: v for k, v in spec.items() if k not in ("prompt", "seed", "preset")}
        assert o[0] == "done", o
        assert _texts(o) == alone(
            checkpoints[kind], spec["prompt"], preset=spec["preset"], seed=spec["seed"], **fields
        )


def test_lanes_of_a_shifted_family_keep_their_own_carried_outputs(tmp_path):
    """Dream predicts position s from the output at s - 1, which the adapter carries between calls
    on a cache: lanes whose calls interleave on the one model (two with prefix caches, one without)
    each get their own, and each equals its request decoded alone."""
    from pretrained_layouts import write_family, write_gpt2_like_tokenizer

    write_family("dream", tmp_path / "dream")
    write_gpt2_like_tokenizer(tmp_path / "tok")
    loaded = load_checkpoint(tmp_path / "dream", tokenizer=tmp_path / "tok", dtype="fp32")
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config, max_batch_rows=8)
    base = {"max_new_tokens": 8, "block_len": 4, "steps": 8}
    specs = [
        {"prompt": "def a(", "preset": "fast-dllm", **base},
        {"prompt": "import os, sys", "preset": "fast-dllm", **base, "seed": 1},
        {"prompt": "x = 1", "preset": "dream", **base, "seed": 2},
    ]
    try:
        _, out = _run(engine, specs)
    finally:
        engine.shutdown()
    assert engine.stats["forwards"] > 2 * engine.stats["batches"]  # rounds: the lanes took turns
    _each_as_alone(loaded, specs, out)


def test_lanes_of_a_decoder_with_its_own_step_decode_as_alone(tmp_path):
    """DiffusionGemma's renoising decoder steps in its own lane (no shared decision; its model calls
    run alone in their rounds); each response equals its request decoded alone."""
    from pretrained_layouts import write_family

    write_family("diffusion-gemma", tmp_path / "dg")
    loaded = load_checkpoint(tmp_path / "dg", dtype="fp32")
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config, max_batch_rows=8, precision="fp32")
    specs = [
        {"prompt": "w1 w2 w3", "preset": "diffusion-gemma", "max_new_tokens": 8, "block_steps": 4},
        {"prompt": "w4 w5", "preset": "diffusion-gemma", "max_new_tokens": 8, "block_steps": 3, "seed": 1},
        {
            "prompt": "w6 w7 w8 w9",
            "preset": "diffusion-gemma",
            "max_new_tokens": 8,
            "block_steps": 4,
            "seed": 2,
        },
    ]
    try:
        _, out = _run(engine, specs)
    finally:
        engine.shutdown()
    assert engine.stats["steps"] == 0  # no decision was shared: each renoising step ran in its lane
    _each_as_alone(loaded, specs, out)
