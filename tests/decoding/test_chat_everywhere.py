"""Pretrained chat models behave the same in `unmask sample`, `unmask serve` and the lm-eval model.

On a tiny layout of every family that ships a chat template (written with the family's special
tokens), for a seed at which the model actually produces its end-of-turn token: the server's
`/v1/chat/completions` equals `unmask sample --chat` equals lm-eval's `generate_until` on the
context its `apply_chat_template` rendered; `/v1/completions` equals `unmask sample` equals
`generate_until` on the raw context. Every one stops at the end-of-turn token (finish reason
`stop`, `usage.completion_tokens` counting what is returned).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("lm_eval")

from pretrained_layouts import SPECIAL, write_family  # noqa: E402

from unmask.cli.main import main  # noqa: E402
from unmask.decoding.batches import Request, decode_batches  # noqa: E402
from unmask.decoding.plan import plan_decode  # noqa: E402
from unmask.decoding.presets import preset_config  # noqa: E402
from unmask.evaluation.harness import UnmaskLM  # noqa: E402
from unmask.models.checkpoint import load_checkpoint  # noqa: E402
from unmask.schedules import build_schedule  # noqa: E402
from unmask.serve.server import build_app, run_in_thread  # noqa: E402

CHAT_FAMILIES = ("llada", "dream", "sdar", "fast-dllm-v2", "llada2", "diffusion-gemma")
END_OF_TURN = {"llada": "<|eot_id|>", "dream": "<|im_end|>", "sdar": "<|im_end|>",
               "fast-dllm-v2": "<|im_end|>", "llada2": "<|role_end|>",
               "diffusion-gemma": "<end_of_turn>"}  # fmt: skip
PROMPT, N = "w1 w2 w3", 12
FIELDS = {"proposal": "sample", "steps": N}  # sampled proposals: the seed picks the answer
FAMILY_FIELDS = {"diffusion-gemma": {"block_steps": 8}}  # its sampler always draws; 8 steps per canvas


def fields_of(family: str) -> dict:
    return FAMILY_FIELDS.get(family, FIELDS)


def end_of_turn_seed(loaded, family: str, chat: bool) -> tuple[int, object]:
    """The first seed whose answer stops at the family's end-of-turn token after >= 1 token."""
    tok, model = loaded.tokenizer, loaded.model
    cfg = preset_config(loaded.config.decode.preset, max_new_tokens=N, **fields_of(family))
    max_len = loaded.config.data.seq_len if model.cfg.attention == "bidirectional" else None
    schedule = build_schedule(loaded.config.noise.schedule, loaded.config.noise.eps)
    plan = plan_decode(model, cfg, schedule=schedule, tokenizer=tok, max_len=max_len)
    eot = tok.token_id(END_OF_TURN[family])
    assert eot in plan.stop_ids
    ids = plan.prompt_ids(PROMPT, chat=chat)
    seen = {}
    for seed in range(300):
        record = next(
            decode_batches(model, [Request(ids, plan, seed=seed)], on_state=lambda b, s: seen.update(s=s))
        )
        generated = seen["s"].tokens[0, len(ids) :].tolist()
        if 0 < len(record.token_ids) < N and generated[len(record.token_ids)] == eot:
            return seed, record
    pytest.fail(f"{family}: no seed in 300 produced {END_OF_TURN[family]}")


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_sample_serve_and_lm_eval_agree_and_stop_at_end_of_turn(tmp_path, capsys, family):
    assert SPECIAL[family][2], "the layout writes the family's end-of-turn token"
    path = tmp_path / family
    write_family(family, path)
    loaded = load_checkpoint(path, dtype="fp32")
    assert loaded.tokenizer.has_chat_template
    srv = run_in_thread(build_app(path, model_name="m", device="cpu", dtype="fp32", precision="fp32"))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    try:
        for chat in (True, False):
            seed, record = end_of_turn_seed(loaded, family, chat)
            want = record.text

            out = tmp_path / f"sample-{chat}.jsonl"
            main(["sample", "--checkpoint", str(path), "--dtype", "fp32", "--precision", "fp32",
                  "--prompt", PROMPT, "--seed", str(seed), "--max-new-tokens", str(N), "--output", str(out)]
                 + [f for k, v in fields_of(family).items() for f in (f"--decode.{k}", str(v))]
                 + (["--chat"] if chat else []))  # fmt: skip
            (cli,) = [json.loads(line) for line in out.read_text().splitlines()]
            assert cli["text"] == want and cli["finish_reason"] == "stop"
            assert cli["token_ids"] == record.token_ids

            body = dict(model="m", max_tokens=N, seed=seed, extra_body=fields_of(family))
            if chat:
                r = client.chat.completions.create(messages=[{"role": "user", "content": PROMPT}], **body)
                served = r.choices[0].message.content
            else:
                r = client.completions.create(prompt=PROMPT, **body)
                served = r.choices[0].text
            assert served == want and r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == len(record.token_ids) < N

            lm = UnmaskLM(
                checkpoint=str(path), dtype="fp32", precision="fp32", seed=seed, **fields_of(family)
            )
            context = lm.apply_chat_template([{"role": "user", "content": PROMPT}]) if chat else PROMPT
            request = SimpleNamespace(args=(context, {"until": [], "max_gen_toks": N}))
            assert lm.generate_until([request], disable_tqdm=True) == [want]
    finally:
        srv.stop()
    capsys.readouterr()
