"""The server's edges as users and hostile clients hit them: a table of bad and unusual requests (each
a 4xx naming its field, never a 5xx, the server still answering after it), a failing request batched
with good ones, the rest of the OpenAI surface through the official client, and the security items
(constant-time key, key from the environment or a file, protected docs and metrics, Host allow-list,
an escaped model name, idle connections closed)."""

import argparse
import concurrent.futures as cf
import json
import os
import socket
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from unmask.serve import engine as engine_module  # noqa: E402
from unmask.serve import guard  # noqa: E402
from unmask.serve.server import build_app, run_in_thread  # noqa: E402


@pytest.fixture(scope="module")
def bd3(checkpoints):
    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="tiny-bd3lm", max_new_tokens=256))
    yield srv
    srv.stop()


def cmpl(**kw):
    return {"model": "tiny-bd3lm", "prompt": "def f(", "max_tokens": 4, **kw}


def chat(**kw):
    return {"model": "tiny-bd3lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


C, CH = "/v1/completions", "/v1/chat/completions"
deep = "[" * 100 + "]" * 100
# (endpoint, body (a dict, or raw bytes), expected status, the field the error must name)
TABLE = [
    (C, cmpl(prompt="x " * 100_000), 400, "prompt"),  # 200k characters
    (C, b'{"model": "tiny-bd3lm", "prompt": "' + b"x" * (20 << 20) + b'"}', 413, None),  # 20 MB
    (C, cmpl(max_tokens=10**9), 400, "max_tokens"),
    (C, {"model": "tiny-bd3lm", "prompt": "x", "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    (C, cmpl(max_tokens=4, max_completion_tokens=5), 400, "max_completion_tokens"),
    (C, b'{"model": "tiny-bd3lm", "prompt": "\\ud800"}', 400, "prompt"),
    (CH, b'{"model": "tiny-bd3lm", "messages": [{"role": "user", "content": "a\\udfffb"}]}', 400, "messages"),
    (C, cmpl(kernel=33.0), 400, "kernel"),
    (C, cmpl(score="bogus"), 400, "score"),
    (C, cmpl(select="bogus"), 400, "select"),
    (C, cmpl(cache=5), 400, "cache"),
    (C, cmpl(inputs="soft"), 400, "inputs"),
    (C, cmpl(refresh="sampler"), 400, "refresh"),
    (C, cmpl(preset="adjust"), 400, "preset"),
    (C, cmpl(cfg_scale=2.0), 400, "cfg_scale"),
    (C, cmpl(seed=2**64), 400, "seed"),
    (C, cmpl(seed=2**63), 400, "seed"),
    (C, cmpl(seed=-1), 400, "seed"),
    (C, cmpl(seed="1"), 400, "seed"),
    (C, b'{"model": "tiny-bd3lm", "prompt": ' + deep.encode() + b"}", 400, None),
    (C, b'{"model": "tiny-bd3lm", "prompt": "caf\xe9"}', 400, None),  # Latin-1, not UTF-8
    (C, cmpl(steps="many"), 400, "steps"),
    (C, cmpl(steps=1.5), 400, "steps"),
    (C, cmpl(steps=10**6), 400, "steps"),
    (C, cmpl(steps=0), 400, "steps"),
    (C, cmpl(prompt=["def f("] * 100), 400, "prompt"),  # more than the queue ever holds
    (C, b'{"model": "tiny-bd3lm", "prompt": "x", "temperature": Infinity}', 400, "temperature"),
    (C, b'{"model": "tiny-bd3lm", "prompt": "x", "threshold": NaN}', 400, "threshold"),
    (C, cmpl(temperature=-1), 400, "temperature"),
    (C, cmpl(temperature="hot"), 400, "temperature"),
    (C, cmpl(top_p=0), 400, "top_p"),
    (C, cmpl(top_p=1.5), 400, "top_p"),
    (C, cmpl(n=0), 400, "n"),
    (C, cmpl(n=17), 400, "n"),
    (C, cmpl(n="2"), 400, "n"),
    (C, cmpl(max_tokens=0), 400, "max_tokens"),
    (C, cmpl(max_tokens=-5), 400, "max_tokens"),
    (C, cmpl(max_tokens=1.5), 400, "max_tokens"),
    (C, cmpl(max_tokens="many"), 400, "max_tokens"),
    (C, {"prompt": "x"}, 400, "model"),
    (C, cmpl(model=5), 400, "model"),
    (C, cmpl(model="other"), 400, "model"),
    (C, {"model": "tiny-bd3lm"}, 400, "prompt"),
    (C, cmpl(prompt=None), 400, "prompt"),
    (C, cmpl(prompt={}), 400, "prompt"),
    (C, cmpl(prompt=[]), 400, "prompt"),
    (C, cmpl(prompt=[-1]), 400, "prompt"),
    (C, cmpl(prompt=[10**9]), 400, "prompt"),
    (C, cmpl(prompt=[[]]), 400, "prompt"),
    (C, cmpl(prompt=[1, "a"]), 400, "prompt"),
    (C, cmpl(suffix="x"), 400, "suffix"),  # fill-in-the-middle on a block-causal model
    (C, cmpl(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (C, cmpl(stop=5), 400, "stop"),
    (C, cmpl(stream="yes"), 400, "stream"),
    (C, cmpl(canvas=True), 400, "canvas"),
    (C, cmpl(stream_options={"include_usage": True}), 400, "stream_options"),
    (C, cmpl(preset="nope"), 400, "preset"),
    (C, cmpl(stepz=3), 400, "stepz"),
    (C, cmpl(block_len=-1), 400, "block_len"),
    (C, cmpl(logit_bias={"5": 10}), 400, "logit_bias"),
    (C, cmpl(presence_penalty=0.5), 400, "presence_penalty"),
    (C, cmpl(frequency_penalty=1.0), 400, "frequency_penalty"),
    (C, cmpl(best_of=3), 400, "best_of"),
    (C, b"[]", 400, None),
    (C, b'"x"', 400, None),
    (C, b"", 400, None),
    (C, b"{not json", 400, None),
    (CH, chat(messages=[]), 400, "messages"),
    (CH, {"model": "tiny-bd3lm"}, 400, "messages"),
    (CH, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages"),
    (CH, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    (
        CH,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages",
    ),  # fmt: skip
    (CH, chat(messages=["hi"]), 400, "messages"),
    (CH, chat(tools=[{"type": "function"}]), 400, "tools"),
]


@pytest.mark.parametrize("endpoint,body,status,param", TABLE, ids=[f"{i}" for i in range(len(TABLE))])
def test_every_bad_input_is_a_4xx_naming_its_field_and_the_server_still_answers(
    bd3, endpoint, body, status, param
):
    if isinstance(body, bytes):
        r = httpx.post(
            bd3.url + endpoint, content=body, headers={"content-type": "application/json"}, timeout=60
        )
    else:
        r = httpx.post(bd3.url + endpoint, json=body, timeout=60)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and len(err["message"]) < 1000
    if param is not None:
        assert err["param"] == param, err
    ok = httpx.post(bd3.url + C, json=cmpl(), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_a_big_seed_a_plain_curl_body_and_default_penalties_are_served(bd3):
    big = httpx.post(bd3.url + C, json=cmpl(seed=10**14), timeout=60)
    assert big.status_code == 200, big.text
    form = httpx.post(bd3.url + C, content=json.dumps(cmpl(seed=3)).encode(),
                      headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)  # fmt: skip
    bare = httpx.post(bd3.url + C, content=json.dumps(cmpl(seed=3)).encode(), timeout=60)
    assert form.status_code == bare.status_code == 200
    assert form.json()["choices"][0]["text"] == bare.json()["choices"][0]["text"]
    defaults = httpx.post(
        bd3.url + C, json=cmpl(presence_penalty=0, frequency_penalty=0, logit_bias={}), timeout=60
    )
    assert defaults.status_code == 200, defaults.text


def test_a_request_that_fails_in_a_batch_fails_alone_and_its_batch_mates_finish(bd3, monkeypatch, caplog):
    real, calls = engine_module.decode_batch, []

    def poisoned(model, requests, **kw):
        calls.append(sorted({r.seed for r in requests}))
        if len(calls) == 1:
            time.sleep(1.5)  # the first request holds the worker while the others queue together
        if any(r.seed == 666 for r in requests):
            raise RuntimeError("secret internal detail")
        yield from real(model, requests, **kw)

    monkeypatch.setattr(engine_module, "decode_batch", poisoned)
    seeds = [1, 2, 666, 3]
    with cf.ThreadPoolExecutor(4) as pool:
        futures = []
        for s in seeds:
            futures.append(pool.submit(httpx.post, bd3.url + C, json=cmpl(seed=s), timeout=60))
            time.sleep(0.2)
        answers = {s: f.result() for s, f in zip(seeds, futures, strict=True)}
    assert any(666 in c and len(c) > 1 for c in calls), calls  # the poison was batched with good rows
    for s in (1, 2, 3):
        assert answers[s].status_code == 200, answers[s].text
    bad = answers[666]
    assert bad.status_code == 500 and "request id" in bad.json()["error"]["message"]
    assert "secret" not in bad.text  # the exception's text stays in the log
    assert "secret internal detail" in caplog.text


def test_the_openai_client_on_the_new_fields(bd3, checkpoints):
    client = openai.OpenAI(base_url=bd3.url + "/v1", api_key="x", max_retries=0)
    kw = dict(model="tiny-bd3lm", max_tokens=6, seed=2)
    text = client.completions.create(prompt="def f(", **kw).choices[0].text
    from unmask.models.checkpoint import load_checkpoint

    tok = load_checkpoint(checkpoints["block_causal"]).tokenizer
    ids = [tok.bos_id, *tok.encode("def f(")]
    assert client.completions.create(prompt=ids, **kw).choices[0].text == text  # token-id prompts
    messages = [{"role": "user", "content": "hi"}]
    want = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert client.chat.completions.create(messages=parts, **kw).choices[0].message.content == want
    with_null = [{"role": "system", "content": None}, *messages]
    assert client.chat.completions.create(messages=with_null, **kw).choices[0].message.content is not None
    newer = client.chat.completions.create(
        messages=messages, model="tiny-bd3lm", max_completion_tokens=6, seed=2
    )
    assert newer.choices[0].message.content == want
    stream = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))  # fmt: skip
    with_choices = [c for c in stream if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in with_choices[1:])
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == want
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens >= 1
    canvas = list(client.completions.create(prompt="def f(", stream=True, extra_body={"canvas": True}, **kw))
    drawn = [c for c in canvas if not c.choices]
    assert drawn and all("pieces" in c.model_extra["canvas"] for c in drawn)  # ignorable: no choices
    assert "".join(c.choices[0].text for c in canvas if c.choices) == text


def test_the_key_is_compared_in_constant_time_and_guards_metrics_and_docs(checkpoints, monkeypatch):
    compared = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="k", api_key="s3cret"))
    try:
        auth = {"Authorization": "Bearer s3cret"}
        for path in ("/v1/models", "/metrics", "/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 401, path
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer s3cre"}).status_code == 401
            assert httpx.get(srv.url + path, headers=auth).status_code == 200, path
        assert (
            httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/").status_code == 200
        )
        assert compared
    finally:
        srv.stop()
    srv = run_in_thread(
        build_app(checkpoints["block_causal"], model_name="k", api_key="s", open_metrics=True)
    )
    try:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
    finally:
        srv.stop()


def test_the_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from unmask.cli.serve import api_key
    from unmask.config import ConfigError

    ns = argparse.Namespace(api_key="from-flag", api_key_file=None)
    assert api_key(ns) == "from-flag"
    monkeypatch.setenv("UNMASK_API_KEY", "from-env")
    assert api_key(ns) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "key"))) == "from-file"
    with pytest.raises(ConfigError, match="no-such"):
        api_key(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "no-such")))


def test_a_loopback_server_refuses_other_hosts_and_the_page_escapes_the_model_name(checkpoints):
    name = '</title><script>alert("x")</script>'
    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name=name))
    try:
        assert httpx.get(srv.url + "/health", headers={"Host": "evil.example:80"}).status_code == 400
        port = srv.url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
            assert httpx.get(srv.url + "/health", headers={"Host": host}).status_code == 200, host
        page = httpx.get(srv.url + "/").text
        assert "<script>alert" not in page and "&lt;script&gt;alert" in page
        assert json.dumps(name).replace("<", "\\u003c").replace(">", "\\u003e") in page
    finally:
        srv.stop()
    open_srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="m", host="0.0.0.0"))
    try:  # bound to every address without --allowed-hosts: any Host
        assert httpx.get(open_srv.url + "/health", headers={"Host": "box.lan"}).status_code == 200
    finally:
        open_srv.stop()


def test_a_connection_that_sends_nothing_is_closed(bd3):
    host, port = bd3.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as s:
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the server
        assert 3 < time.monotonic() - t0 < 15


def test_litellm_on_the_new_fields(bd3, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price table
    litellm = pytest.importorskip("litellm")
    kw = dict(model="openai/tiny-bd3lm", api_base=bd3.url + "/v1", api_key="x", seed=2)
    messages = [{"role": "user", "content": "hi"}]
    want = litellm.completion(messages=messages, max_tokens=6, **kw).choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert (
        litellm.completion(messages=parts, max_completion_tokens=6, **kw).choices[0].message.content == want
    )
    chunks = list(litellm.completion(messages=messages, max_tokens=6, stream=True,
                                     stream_options={"include_usage": True}, **kw))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens >= 1  # litellm shows the usage of a stream
    text = dict(model="text-completion-openai/tiny-bd3lm", api_base=bd3.url + "/v1", api_key="x")
    r = litellm.text_completion(prompt="def f(", max_tokens=6, seed=2, logprobs=1, **text).choices[0]
    assert len(r.logprobs.token_logprobs) == len(r.logprobs.tokens) >= 1
    echo = litellm.text_completion(prompt="def f(", max_tokens=0, echo=True, logprobs=1, **text).choices[0]
    assert echo.text == "def f(" and "".join(echo.logprobs.tokens) == "def f("


def test_headers_trickled_slower_than_the_header_timeout_close_the_connection(checkpoints):
    srv = run_in_thread(build_app(checkpoints["block_causal"], model_name="m"), header_timeout=2.0)
    try:
        host, port = srv.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\n")
            closed = False
            for _ in range(12):  # a byte a second: never the end of the headers
                time.sleep(0.5)
                try:
                    s.sendall(b"X")
                except OSError:
                    closed = True
                    break
                s.settimeout(0.5)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed and time.monotonic() - t0 < 5
        ok = httpx.get(srv.url + "/health")  # a normal client on a kept-alive connection is served
        assert ok.status_code == 200
    finally:
        srv.stop()


def _running(engine, deadline: float) -> int:
    """The engine's running rows once they reach 0 or the deadline passes."""
    while time.time() < deadline and engine.running_rows:
        time.sleep(0.02)
    return engine.running_rows


def test_a_timed_out_or_abandoned_request_stops_its_batch_within_a_step(checkpoints):
    """A 408 and a non-streamed client that hangs up both cancel the job; the worker stops its batch
    at the next step (it no longer decodes a job nobody waits for, so later requests are served)."""
    app = build_app(checkpoints["block_causal"], model_name="m", request_timeout=1.0, max_batch_rows=1)
    engine, srv = app.state.engine, run_in_thread(app)
    long = {"model": "m", "prompt": "a", "max_tokens": 4096, "steps": 1024, "ban_stop": True}  # > 1 s here
    try:
        t = time.time()
        r = httpx.post(srv.url + "/v1/completions", json=long, timeout=60)
        assert r.status_code == 408 and time.time() - t < 5, r.text
        assert _running(engine, time.time() + 2.0) == 0  # stopped, not decoding 4096 tokens on
        ok = httpx.post(
            srv.url + "/v1/completions", json={"model": "m", "prompt": "b", "max_tokens": 8}, timeout=60
        )
        assert ok.status_code == 200

        closed = app.state.metrics.requests.labels("499")._value.get()
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s and closes
            httpx.post(srv.url + "/v1/completions", json={**long, "prompt": "c"}, timeout=0.3)
        assert _running(engine, time.time() + 2.0) == 0
        deadline = time.time() + 2.0
        while time.time() < deadline and app.state.metrics.requests.labels("499")._value.get() == closed:
            time.sleep(0.02)
        assert app.state.metrics.requests.labels("499")._value.get() == closed + 1
        assert app.state.metrics.in_flight._value.get() == 0
    finally:
        srv.stop()


def test_metrics_show_batching_queueing_and_minute_long_latencies(checkpoints):
    app = build_app(checkpoints["block_causal"], model_name="m")
    srv = run_in_thread(app)
    try:
        for prompt in ("a", "b"):
            body = {"model": "m", "prompt": prompt, "max_tokens": 8}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        for name in ("unmask_rows_per_forward", "unmask_tokens_per_forward", "unmask_queue_seconds",
                     "unmask_batch_seconds"):  # fmt: skip
            count = next(line for line in text.splitlines() if line.startswith(f"{name}_count"))
            assert float(count.split()[-1]) > 0, name
        assert 'unmask_request_seconds_bucket{le="600.0"}' in text  # buckets up to minutes
        assert 'unmask_rows_per_forward_bucket{le="1.0"}' in text
    finally:
        srv.stop()


def test_decoding_threads_default_to_every_core_but_one_and_are_checked(checkpoints):
    import torch

    from unmask.config import ConfigError
    from unmask.serve.server import default_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads() == max(1, cores - 1)
    build_app(checkpoints["block_causal"], model_name="m", threads=1)
    assert torch.get_num_threads() == 1
    with pytest.raises(ConfigError, match="--threads must be >= 0"):
        build_app(checkpoints["block_causal"], model_name="m", threads=-1)
