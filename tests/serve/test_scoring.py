"""Scoring through the server: `echo` + `logprobs` and the tokenizer endpoints, so lm-eval's own
`local-completions` API model runs loglikelihood tasks against `unmask serve` and agrees with the
in-process `unmask` lm-eval model; the chain-rule scores against a naive one-row-at-a-time loop."""

import math
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")

from unmask.evaluation.chain import chain_logprobs, greedy_next  # noqa: E402
from unmask.models.checkpoint import load_checkpoint  # noqa: E402
from unmask.serve.server import build_app, run_in_thread  # noqa: E402
from unmask.training.objectives import denoise  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests/evaluation/lm_eval_tasks"


def _naive(model, ids: list[int], pad_id: int) -> list[float]:
    """log p(ids[i] | ids[:i], later positions masked), one forward per position."""
    out = [math.nan]
    mask = model.mask_id
    for i in range(1, len(ids)):
        if model.cfg.attention == "causal":
            logits = model(torch.tensor([ids[:i]])).logits[0, -1]
        else:
            row = ids[:i] + [mask] * (len(ids) - i)
            pad = -len(row) % model.cfg.block_size if model.cfg.attention == "block_causal" else 0
            xt = torch.tensor([row + [pad_id] * pad])
            x0 = torch.tensor([ids + [pad_id] * pad])
            logits = denoise(model, xt, x0)[0, i]
        logits = logits.float().clone()
        if model.cfg.attention != "causal":  # SUBS: [MASK] is never a diffusion model's prediction
            logits[mask] = -math.inf
        out.append(float(logits.log_softmax(-1)[ids[i]]))
    return out


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "block_causal"])
def test_chain_scores_equal_a_naive_loop_and_the_next_token_is_the_chains(checkpoints, kind):
    loaded = load_checkpoint(checkpoints[kind])
    tok, model = loaded.tokenizer, loaded.model.eval()
    ids = tok.prompt_ids("import os\nimport sys\ndef main(argv):\n    return 0\n")[:40]
    with torch.no_grad():
        want = _naive(model, ids, tok.pad_id)
        got = chain_logprobs(model, ids, pad_id=tok.pad_id, k=3)
        nxt, lp = greedy_next(model, ids, pad_id=tok.pad_id)
        longer = chain_logprobs(model, [*ids, nxt], pad_id=tok.pad_id)
    assert math.isnan(got.logprobs[0]) and torch.allclose(
        got.logprobs[1:], torch.tensor(want[1:], dtype=torch.float64), atol=1e-4
    )
    assert (got.top_logprobs[1:, 0] >= got.logprobs[1:] - 1e-9).all()
    if kind == "causal":  # only an AR model's next token is the same prediction as a longer text's
        assert abs(longer.logprobs[-1] - lp) < 1e-4
    assert longer.top_ids[-1, 0] == nxt or kind == "bidirectional"  # a canvas's later masks change it


@pytest.fixture(scope="module", params=["causal", "block_causal"])
def served(request, checkpoints):
    srv = run_in_thread(build_app(checkpoints[request.param], model_name="m"))
    yield request.param, srv
    srv.stop()


def test_echo_logprobs_and_the_tokenizer_endpoints(served, checkpoints):
    kind, srv = served
    tok = load_checkpoint(checkpoints[kind]).tokenizer
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["eos_token"] == "[EOS]" and info["bos_token"] == "[BOS]"
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": "def f(x):"}).json()["tokens"]
    assert ids == tok.encode("def f(x):")
    assert httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "def f(x):"
    body = {"model": "m", "prompt": ids, "echo": True, "max_tokens": 1, "logprobs": 2}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is not None  # given [BOS]
    assert all(len(t) == 2 for t in lp["top_logprobs"][:-1]) and r["choices"][0]["text"].startswith(
        "def f(x):"
    )
    whole = chain_logprobs(load_checkpoint(checkpoints[kind]).model, [tok.bos_id, *ids], pad_id=tok.pad_id)
    assert lp["token_logprobs"][:-1] == pytest.approx(whole.logprobs[1:].tolist(), abs=1e-6)
    body = {"model": "m", "prompt": "def f(x):", "echo": True, "max_tokens": 0, "logprobs": 0}
    text = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
    assert text["choices"][0]["text"] == "def f(x):" and text["usage"]["completion_tokens"] == 0
    assert "".join(text["choices"][0]["logprobs"]["tokens"]) == "def f(x):"
    body = {"model": "m", "prompt": "x", "logprobs": 1, "stream": True}
    bad = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"
    many = httpx.post(
        srv.url + "/v1/completions", json={"model": "m", "prompt": "x", "echo": True, "max_tokens": 5}
    )
    assert many.status_code == 400 and many.json()["error"]["param"] == "max_tokens"


def test_lm_evals_local_completions_against_the_server_equals_the_in_process_model(
    served, checkpoints, monkeypatch
):
    kind, srv = served
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval.models.openai_completions  # noqa: F401 - registers local-completions
    from lm_eval.tasks import TaskManager

    import unmask.evaluation.harness  # noqa: F401 - registers the `unmask` lm-eval model

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    api = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={srv.url}/v1/completions,model=m,tokenizer_backend=remote,max_retries=1,num_concurrent=1",
        tasks=["unmask_mc"], task_manager=manager, limit=4, log_samples=True,
    )  # fmt: skip
    local = lm_eval.simple_evaluate(
        model="unmask", model_args=f"checkpoint={checkpoints[kind]},likelihood=chain",
        tasks=["unmask_mc"], task_manager=manager, limit=4, log_samples=True,
    )  # fmt: skip
    a = [s["filtered_resps"] for s in api["samples"]["unmask_mc"]]
    b = [s["filtered_resps"] for s in local["samples"]["unmask_mc"]]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        for (lla, ga), (llb, gb) in zip(ra, rb, strict=True):
            assert lla == pytest.approx(llb, abs=1e-5) and ga == gb
    assert api["results"]["unmask_mc"]["acc,none"] == local["results"]["unmask_mc"]["acc,none"]
    # the other two request types run against the server too (generation; rolling log-likelihood
    # in lm-eval's own windows, so only finite, not equal to the in-process windows)
    rest = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={srv.url}/v1/completions,model=m,tokenizer_backend=remote,max_retries=1,"
        "max_gen_toks=8",
        tasks=["unmask_gen", "unmask_ppl"], task_manager=manager, limit=2,
    )  # fmt: skip
    assert 0 <= rest["results"]["unmask_gen"]["exact_match,none"] <= 1
    assert math.isfinite(rest["results"]["unmask_ppl"]["bits_per_byte,none"])


def test_generated_tokens_carry_the_log_probability_they_were_committed_with(served, checkpoints):
    """AR: exactly the model's next-token log-probabilities of the text it wrote (the chain scores
    of prompt + answer); any model with greedy proposals: each token is its step's argmax, so its
    value is the top-1's. Asking for logprobs never changes the text."""
    kind, srv = served
    loaded = load_checkpoint(checkpoints[kind])
    tok = loaded.tokenizer
    for temperature in (0, 1.0):
        body = {"model": "m", "prompt": "import os\n", "max_tokens": 8, "seed": 4, "temperature": temperature}
        plain = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        r = httpx.post(srv.url + "/v1/completions", json={**body, "logprobs": 2}, timeout=60).json()[
            "choices"
        ][0]
        assert r["text"] == plain["text"] and plain["logprobs"] is None
        lp = r["logprobs"]
        values = lp["token_logprobs"]
        assert values and all(v is not None and v <= 1e-9 for v in values)
        for v, top in zip(values, lp["top_logprobs"], strict=True):
            assert 1 <= len(top) <= 2 and max(top.values()) >= v - 1e-9
            if temperature == 0:
                assert max(top.values()) == pytest.approx(v, abs=1e-9)
        if kind == "causal":  # in process: the ids themselves, against the chain scores of the text
            from unmask.decoding.batches import Request, decode_batch
            from unmask.decoding.plan import plan_decode
            from unmask.decoding.presets import preset_config
            from unmask.schedules import build_schedule

            extra = {"proposal": "greedy"} if temperature == 0 else {"temperature": temperature}
            cfg = preset_config("mdlm", max_new_tokens=8, **extra)
            plan = plan_decode(loaded.model, cfg, schedule=build_schedule("loglinear", 1e-3), tokenizer=tok)
            prompt = tok.prompt_ids("import os\n")
            (record,) = decode_batch(loaded.model, [Request(prompt, plan, 4, 0)], logprobs=2)
            assert record.text == r["text"] and [v for v, _ in record.logprobs] == pytest.approx(values)
            chain = chain_logprobs(loaded.model, prompt + record.token_ids, pad_id=tok.pad_id)
            assert values == pytest.approx(chain.logprobs[len(prompt) :].tolist(), abs=1e-4)
