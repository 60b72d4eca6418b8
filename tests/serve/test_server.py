"""`unmask serve` through real clients: the official `openai` client, concurrent requests, a
bounded queue, a client that goes away, bad input, schemathesis on the OpenAPI schema, and the
page in headless Chromium."""

import concurrent.futures as cf
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from unmask.decoding.presets import preset_config  # noqa: E402
from unmask.decoding.sample import sample  # noqa: E402
from unmask.models.checkpoint import load_checkpoint  # noqa: E402
from unmask.schedules import build_schedule  # noqa: E402
from unmask.serve.server import build_app, run_in_thread  # noqa: E402

ARTIFACTS = Path(
    os.environ.get("UNMASK_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".pytest_artifacts")
)


@pytest.fixture(scope="module")
def bd3(checkpoints):
    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="tiny-bd3lm"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mdlm(checkpoints):
    srv = run_in_thread(build_app(checkpoints["bidirectional"], model_name="tiny-mdlm"))
    yield srv
    srv.stop()


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, **kw)


def alone(checkpoint, prompt, *, preset, n=1, seed=0, **fields):
    """What `unmask sample` gives for the same prompt, seed and settings."""
    loaded = load_checkpoint(checkpoint)
    cfg = preset_config(preset, **fields)
    schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
    max_len = loaded.config.data.seq_len if loaded.model.cfg.attention == "bidirectional" else None
    return [
        r["text"]
        for r in sample(
            loaded.model, loaded.tokenizer, [prompt], cfg, schedule, num_samples=n, seed=seed, max_len=max_len
        )
    ]


def test_completion_equals_unmask_sample_and_reports_usage(bd3, checkpoints):
    r = client(bd3).completions.create(
        model="tiny-bd3lm",
        prompt="def parse(",
        max_tokens=16,
        seed=3,
        extra_body={"preset": "bd3lm", "steps": 16},
    )
    assert (
        r.choices[0].text
        == alone(
            checkpoints["block_causal"], "def parse(", preset="bd3lm", seed=3, max_new_tokens=16, steps=16
        )[0]
    )
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens >= 2 and r.usage.model_extra["nfe"] >= 1


def test_chat_completion(bd3):
    r = client(bd3).chat.completions.create(
        model="tiny-bd3lm", max_tokens=8, messages=[{"role": "user", "content": "write a function"}]
    )
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.object == "chat.completion"


@pytest.mark.parametrize("which,preset", [("bd3", "bd3lm"), ("mdlm", "conv"), ("mdlm", "llada")])
def test_streamed_chunks_concatenate_to_the_text(bd3, mdlm, which, preset):
    srv = {"bd3": bd3, "mdlm": mdlm}[which]
    model = "tiny-bd3lm" if which == "bd3" else "tiny-mdlm"
    kw = dict(
        model=model, prompt="import os\n", max_tokens=16, seed=5, extra_body={"preset": preset, "steps": 12}
    )
    whole = client(srv).completions.create(**kw).choices[0].text
    chunks = list(client(srv).completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = client(srv).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        seed=1,
        extra_body={"preset": preset},
    )
    streamed = client(srv).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        seed=1,
        stream=True,
        extra_body={"preset": preset},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_n_samples_and_stop(bd3, checkpoints):
    r = client(bd3).completions.create(model="tiny-bd3lm", prompt="class ", max_tokens=12, n=3, seed=2)
    want = alone(checkpoints["block_causal"], "class ", preset="bd3lm", n=3, seed=2, max_new_tokens=12)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    stop = want[0][2:4]
    s = client(bd3).completions.create(
        model="tiny-bd3lm", prompt="class ", max_tokens=12, seed=2, stop=[stop]
    )
    assert s.choices[0].text == want[0][: want[0].find(stop)] and s.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_without_changing_any_output(bd3):
    reqs = [
        dict(prompt=p, seed=s, extra_body={"preset": preset, "steps": 8})
        for p in ("def a(", "def b(", "import x", "return self.value")
        for preset in ("bd3lm", "first-hitting")
        for s in (0, 1)
    ]
    c = client(bd3)
    solo = [c.completions.create(model="tiny-bd3lm", max_tokens=8, **r).choices[0].text for r in reqs]
    engine = bd3.server.config.app.state.engine
    before = engine.stats["batches"]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(
                lambda r: c.completions.create(model="tiny-bd3lm", max_tokens=8, **r).choices[0].text, reqs
            )
        )
    assert together == solo
    assert engine.stats["batches"] - before < len(reqs)  # some requests shared a batch


def test_a_full_queue_answers_429_and_every_accepted_request_completes(checkpoints):
    srv = run_in_thread(
        build_app(checkpoints["bidirectional"], model_name="m", max_queue=2, max_batch_rows=1)
    )
    try:

        def one(i):
            return httpx.post(
                srv.url + "/v1/completions",
                timeout=120,
                json={"model": "m", "prompt": f"x{i}", "max_tokens": 24, "steps": 24, "seed": i},
            )

        with cf.ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(one, range(10)))
    finally:
        srv.stop()
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes and all(c in (200, 429) for c in codes), codes
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert isinstance(r.json()["choices"][0]["text"], str)


def test_a_client_that_disconnects_frees_its_slot(checkpoints):
    app = build_app(checkpoints["bidirectional"], model_name="m", max_queue=1, max_batch_rows=1)
    srv = run_in_thread(app)
    try:
        body = {"model": "m", "prompt": "a", "max_tokens": 24, "steps": 24, "stream": True, "canvas": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())  # one event, then go away
        deadline = time.time() + 20
        while time.time() < deadline and app.state.metrics.in_flight._value.get() != 0:
            time.sleep(0.05)
        assert app.state.metrics.in_flight._value.get() == 0
        ok = httpx.post(
            srv.url + "/v1/completions", json={"model": "m", "prompt": "b", "max_tokens": 4}, timeout=60
        )
        assert ok.status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "tiny-mdlm", "prompt": "x", "preset": "nope"}, "preset"),
        ({"model": "tiny-mdlm", "prompt": "x", "steps": 0}, "steps"),
        ({"model": "tiny-mdlm", "prompt": "x " * 200, "max_tokens": 4}, "prompt"),
        ({"model": "tiny-mdlm", "prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"model": "tiny-mdlm", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": "tiny-mdlm", "prompt": "x", "n": 0}, "n"),
        ({"model": "other", "prompt": "x"}, "model"),
        ({"model": "tiny-mdlm", "prompt": "x", "stepz": 3}, "stepz"),
        ({"model": "tiny-mdlm", "prompt": "x", "kernel": 4}, "kernel"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(mdlm, body, param):
    r = httpx.post(mdlm.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_is_a_400(mdlm):
    r = httpx.post(
        mdlm.url + "/v1/completions",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_api_key_health_models_and_metrics(checkpoints):
    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="k", api_key="secret"))
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        models = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer secret"}).json()
        assert models["data"][0]["id"] == "k"
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        with pytest.raises(openai.AuthenticationError):
            client(srv).completions.create(model="k", prompt="x", max_tokens=2)
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="secret").completions.create(
            model="k", prompt="x", max_tokens=2
        )
        assert ok.choices
        assert httpx.get(srv.url + "/metrics").status_code == 401  # behind the key too
        text = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer secret"}).text
        for name in (
            "unmask_queue_depth",
            "unmask_running_rows",
            "unmask_requests_total",
            "unmask_nfe_total",
            "unmask_tokens_per_second",
            "unmask_completion_tokens_total",
        ):
            assert name in text
    finally:
        srv.stop()


def test_schemathesis_finds_no_server_error(checkpoints):
    """Every operation of the app's OpenAPI schema, with bodies generated by schemathesis
    (a bounded number per operation): no response is a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="tiny", request_timeout=30))
    failures, calls = [], 0
    try:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def call(case):
                nonlocal calls
                response = case.call(timeout=60)
                calls += 1
                if response.status_code >= 500:
                    failures.append((case.path, case.body, response.status_code, response.text[:300]))

            call()
    finally:
        srv.stop()
    assert calls >= 20 and not failures, failures


def test_the_page_shows_the_denoising_in_chromium(bd3):
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser_path:
        pytest.skip("no chromium on this machine (Debian package `chromium`)")
    api = client(bd3).completions.create(
        model="tiny-bd3lm",
        prompt="def parse(",
        max_tokens=16,
        seed=0,
        extra_body={"preset": "bd3lm", "steps": 16},
    )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.goto(bd3.url + "/")
        page.fill("#prompt", "def parse(")
        page.select_option("#preset", "bd3lm")
        page.fill("#max_tokens", "16")
        page.fill("#steps", "16")
        page.fill("#seed", "0")
        page.click("#go")
        page.wait_for_selector('#final[data-done="1"]', state="attached", timeout=60_000)
        final = page.eval_on_selector("#final", "e => e.textContent")
        canvas = page.inner_text("#canvas")
        nfe = int(page.inner_text("#nfe"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-page.png"))
        browser.close()
    assert final == api.choices[0].text
    assert "░" not in canvas and nfe >= 1


def test_bench_serve_measures_concurrency_and_the_batching_gain(checkpoints, tmp_path):
    from unmask.bench.serve import bench_serve, plot_serve, serve_table

    r = bench_serve(
        str(checkpoints["block_causal"]),
        ["def a(", "def b("],
        clients=(1, 2),
        requests=2,
        max_tokens=4,
        compare_at=2,
    )
    assert [(row["mode"], row["clients"]) for row in r["rows"]] == [
        ("continuous", 1),
        ("continuous", 2),
        ("static", 2),
        ("one at a time", 2),
    ]
    assert all(row["errors"] == 0 and row["requests_per_s"] > 0 for row in r["rows"])
    assert 0 <= r["rows"][0]["overhead"] < 1 and 0 <= r["rows"][0]["outside_forwards"] < 1
    assert r["batched_over_one_at_a_time"] > 0 and r["static_over_one_at_a_time"] > 0
    assert "over one-at-a-time: continuous" in serve_table(r) and plot_serve(r, tmp_path).is_file()
    assert all(row["rows_per_forward"] >= 1 and row["calls_per_forward"] >= 1 for row in r["rows"])
    assert r["rows"][-1]["rows_per_forward"] == 1  # one row at a time


def test_bench_serve_mixes_prompt_lengths_and_settings(checkpoints, tmp_path, capsys):
    import json

    from unmask.bench.serve import MIXED_SETTINGS
    from unmask.cli.main import main

    main(["bench", "serve", "--checkpoint", str(checkpoints["block_causal"]), "--mix", "mixed",
          "--clients", "2", "--requests", "4", "--max-tokens", "4", "--num-prompts", "3",
          "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "serve_mixed.json").read_text())
    assert saved["mix"] == "mixed" and all(row["errors"] == 0 for row in saved["rows"])
    assert len({m["preset"] for m in MIXED_SETTINGS}) == 3 and "mix: mixed" in capsys.readouterr().out
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\n    return x\nimport os\n")
    main(["bench", "serve", "--checkpoint", str(checkpoints["block_causal"]), "--mix", "lengths",
          "--prompts-file", str(prompts), "--clients", "1", "--requests", "2", "--max-tokens", "4",
          "--num-prompts", "2", "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "serve_lengths.json").read_text())
    assert saved["prompts"] == 2 and all(row["errors"] == 0 for row in saved["rows"])
    with pytest.raises(ValueError, match="--mix 'odd'"):
        from unmask.bench.serve import bench_serve

        bench_serve(str(checkpoints["block_causal"]), ["a"], mix="odd")


def test_a_request_leaves_its_batch_when_its_rows_finish(checkpoints, monkeypatch):
    """Two jobs share a batch; the first one's row finishes (EOS) after the first state: it is
    answered from that state, before the batch's last one."""
    import asyncio

    import torch

    from unmask.config import DecodeConfig
    from unmask.decoding import batches
    from unmask.decoding.state import DecodeState
    from unmask.serve.engine import Engine, Job

    loaded = load_checkpoint(checkpoints["block_causal"])
    eos, mask = loaded.tokenizer.eos_id, loaded.model.mask_id
    word = loaded.tokenizer.encode("a")[0]

    def fake_states(model, plan, *, prompt, **kw):
        B, P = prompt.shape
        for nfe, finished in ((1, [True, False]), (2, [True, False]), (3, [True, True])):
            tail = torch.tensor([[word, eos, eos, eos], [word, word, word if nfe > 1 else mask, mask]])
            yield DecodeState(
                tokens=torch.cat([prompt, tail], 1),
                fixed=torch.zeros(B, P + 4, dtype=torch.bool),
                mask_id=mask,
                prompt_len=P,
                window=(P, P + 4),
                block=0,
                step=nfe,
                steps=3,
                nfe=nfe,
                commit_passes=0,
                finished=torch.tensor(finished),
            )

    monkeypatch.setattr(batches, "generate", fake_states)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config)

    async def run():
        loop = asyncio.get_running_loop()
        cfg = DecodeConfig(max_new_tokens=4)
        jobs = [Job([loaded.tokenizer.bos_id, word], engine.plan(cfg), seed, 1, loop) for seed in (0, 1)]
        with engine._cv:  # both wait before the worker looks: they form one batch
            for job in jobs:
                engine.waiting.append(job)
            engine._cv.notify()
        return [await asyncio.wait_for(job.events.get(), 10) for job in jobs]

    first, second = asyncio.run(run())
    engine.shutdown()
    assert first[0] == "done" and first[1]["nfe"] == 1 and first[1]["choices"][0]["finish_reason"] == "stop"
    assert second[0] == "done" and second[1]["nfe"] == 3


def test_a_pretrained_directory_is_served_with_its_familys_decoder(tmp_path):
    """An SDAR-layout model (native Qwen3 class): the official client's completion equals
    `sample()` with SDAR's own preset (`sdar`: its dynamic loop, exact block cache)."""
    from pretrained_layouts import write_family

    write_family("sdar", tmp_path / "sdar")
    srv = run_in_thread(build_app(tmp_path / "sdar", model_name="tiny-sdar", device="cpu", dtype="fp32"))
    try:
        r = client(srv).completions.create(
            model="tiny-sdar", prompt="w1 w2 w3", max_tokens=8, seed=2, extra_body={"steps": 8}
        )
    finally:
        srv.stop()
    assert (
        r.choices[0].text
        == alone(tmp_path / "sdar", "w1 w2 w3", preset="sdar", seed=2, max_new_tokens=8, steps=8)[0]
    )


def test_suffix_fills_the_middle_on_a_bidirectional_model_and_is_a_400_on_block_causal(
    mdlm, bd3, checkpoints
):
    r = client(mdlm).completions.create(
        model="tiny-mdlm",
        prompt="def f(x):",
        suffix="return y",
        max_tokens=6,
        seed=2,
        extra_body={"steps": 8},
    )
    loaded = load_checkpoint(checkpoints["bidirectional"])
    schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
    cfg, max_len = preset_config("mdlm", steps=8), loaded.config.data.seq_len
    template = "def f(x):<mask*6>return y"
    (rec,) = sample(
        loaded.model, loaded.tokenizer, [template], cfg, schedule, seed=2, max_len=max_len, infill=True,
        precision="auto",
    )  # fmt: skip
    assert r.choices[0].text == rec["fills"][0] and r.usage.completion_tokens == 6
    bad = httpx.post(
        bd3.url + "/v1/completions", json={"model": "tiny-bd3lm", "prompt": "x", "suffix": "y"}, timeout=30
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "suffix"


def test_completion_tokens_count_what_a_stop_string_leaves(mdlm, checkpoints):
    from unmask.decoding.batches import Request, decode_batches
    from unmask.decoding.plan import plan_decode

    body = dict(model="tiny-mdlm", prompt="def f(", max_tokens=16, seed=1, extra_body={"steps": 16})
    full = client(mdlm).completions.create(**body)
    text = full.choices[0].text
    assert len(text) > 4
    cut = client(mdlm).completions.create(stop=[text[3:5]], **body)
    assert cut.choices[0].text == text[: text.index(text[3:5])] and cut.choices[0].finish_reason == "stop"
    loaded = load_checkpoint(checkpoints["bidirectional"])
    cfg = preset_config("mdlm", max_new_tokens=16, steps=16)
    plan = plan_decode(loaded.model, cfg, tokenizer=loaded.tokenizer, max_len=loaded.config.data.seq_len)
    (rec,) = decode_batches(
        loaded.model, [Request(plan.prompt_ids("def f("), plan, seed=1, stop=(text[3:5],))]
    )
    assert cut.usage.completion_tokens == len(rec.token_ids) < full.usage.completion_tokens


@pytest.mark.parametrize("kind", ["bidirectional", "block_causal", "causal"])
def test_every_response_is_the_request_decoded_alone_whatever_arrives_with_it(checkpoints, kind):
    """A property of the engine, on random traffic: random arrival times, prompt lengths, presets,
    step budgets, sample counts and seeds. Each response equals `unmask sample` on that request
    alone, whatever it was batched with (some requests must share a batch)."""
    import random
    import threading

    rnd = random.Random(f"traffic-{kind}")
    words = "def return import self value class for in while print data".split()
    reqs = [
        {
            "prompt": " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 5))),  # fits a 32-token canvas
            "seed": rnd.randrange(1000),
            "n": rnd.choice((1, 1, 2)),
            "preset": rnd.choice(("mdlm", "bd3lm", "first-hitting", "conv")),
            "steps": rnd.choice((4, 8)),
            "delay": rnd.uniform(0, 0.3),
        }
        for _ in range(10)
    ]
    for i in range(4):  # a burst at t = 0 of 4 pairs of one shape: at least 3 pairs wait together
        reqs[i]["delay"] = 0.0
        reqs.append(dict(reqs[i], seed=reqs[i]["seed"] + 1))
    app = build_app(checkpoints[kind], model_name="m", max_batch_rows=8)
    srv = run_in_thread(app)
    engine, got = app.state.engine, {}
    try:
        c = client(srv)

        def send(i: int) -> None:
            r = reqs[i]
            time.sleep(r["delay"])
            try:
                body = {"prompt": r["prompt"], "max_tokens": 8, "seed": r["seed"], "n": r["n"]}
                extra = {"preset": r["preset"], "steps": r["steps"]}
                out = c.completions.create(model="m", extra_body=extra, **body)
            except Exception as e:  # noqa: BLE001 - shown by the assertion below
                got[i] = e
                return
            got[i] = [choice.text for choice in sorted(out.choices, key=lambda ch: ch.index)]

        before = dict(engine.stats)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        forwards = engine.stats["forwards"] - before["forwards"]
        calls = engine.stats["forward_calls"] - before["forward_calls"]
    finally:
        srv.stop()
    assert sorted(got) == list(range(len(reqs)))
    assert not [e for e in got.values() if isinstance(e, Exception)]
    for i, r in enumerate(reqs):
        fields = {"steps": r["steps"], "max_new_tokens": 8}
        want = alone(checkpoints[kind], r["prompt"], preset=r["preset"], n=r["n"], seed=r["seed"], **fields)
        assert got[i] == want, (i, r)
    assert calls > forwards  # some forwards served several requests
