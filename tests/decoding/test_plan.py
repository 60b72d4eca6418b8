"""One decode request (`DecodePlan`), the batching driver (`decode_batches`), infilling from every
entry point, and the `Denoiser` protocol as the contract every model and wrapper satisfies."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from unmask.cli.main import main
from unmask.decoding.batches import Request, decode_batches
from unmask.decoding.generate import final_state, generate
from unmask.decoding.plan import DecodeError, plan_decode
from unmask.decoding.presets import preset_config
from unmask.decoding.rng import row_generators
from unmask.decoding.sample import sample
from unmask.models.checkpoint import load_checkpoint
from unmask.models.denoiser import Denoiser
from unmask.schedules import LogLinear


def test_decode_batches_equals_generate_row_by_row_whatever_the_batch_size():
    """The driver's records are the loop's rows, cut at the plan's stop ids, for any batching."""
    model = tiny_model("block_causal")
    plan = plan_decode(model, preset_config("bd3lm", max_new_tokens=12, steps=12), eos_id=5)
    prompts = [[1, 7, 9], [1, 8], [1, 7, 10], [1, 9]]
    reqs = [Request(p, plan, seed=4, index=i) for i, p in enumerate(prompts)]
    for batch_size in (1, 3, 8):
        records = sorted(decode_batches(model, reqs, batch_size=batch_size), key=lambda r: r.request.index)
        for i, (p, record) in enumerate(zip(prompts, records, strict=True)):
            state = final_state(
                generate(model, plan, prompt=torch.tensor([p]), generators=row_generators(4, [i]))
            )
            row = state.tokens[0, len(p) :].tolist()
            cut = row.index(5) if 5 in row else len(row)
            assert record.token_ids == row[:cut]
            assert record.finish_reason == ("stop" if 5 in row else "length")


def test_a_stop_string_leaves_only_the_tokens_it_returns(checkpoints):
    loaded = load_checkpoint(checkpoints["bidirectional"])
    tok = loaded.tokenizer
    plan = plan_decode(
        loaded.model, preset_config("mdlm", max_new_tokens=16, steps=16), tokenizer=tok, max_len=32
    )
    ids = plan.prompt_ids("def f(")
    (full,) = decode_batches(loaded.model, [Request(ids, plan, seed=1)])
    assert len(full.text) > 4
    stop = full.text[3:5]
    (cut,) = decode_batches(loaded.model, [Request(ids, plan, seed=1, stop=(stop,))])
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert tok.decode(cut.token_ids).startswith(cut.text) and len(cut.token_ids) < len(full.token_ids)
    assert len(tok.decode(cut.token_ids[:-1])) < len(cut.text) if cut.text else cut.token_ids == []


def test_infilling_keeps_prefix_and_suffix_and_fills_every_slot(checkpoints, tmp_path, capsys):
    loaded = load_checkpoint(checkpoints["bidirectional"])
    model, tok = loaded.model, loaded.tokenizer
    template = "def f(x):<mask*6>return y<mask>"
    cfg = preset_config("mdlm", steps=8)
    (rec,) = sample(model, tok, [template], cfg, LogLinear(), seed=2, max_len=32, infill=True)
    plan = plan_decode(model, cfg, tokenizer=tok, max_len=32)
    ids = plan.infill_ids(template)
    M = tok.mask_id
    assert ids == [tok.bos_id, *tok.encode("def f(x):"), *[M] * 6, *tok.encode("return y"), M]
    assert len(rec["token_ids"]) == 7 and M not in rec["token_ids"]  # every slot filled
    assert len(rec["fills"]) == 2
    filled = [tok.bos_id, *tok.encode("def f(x):"), *rec["token_ids"][:6], *tok.encode("return y"),
              rec["token_ids"][6]]  # fmt: skip
    assert rec["text"] == tok.decode(filled)  # the prefix and the suffix as written, in place
    out = tmp_path / "infill.jsonl"
    main(["sample", "--checkpoint", str(checkpoints["bidirectional"]), "--infill", template, "--seed", "2",
          "--decode.steps", "8", "--precision", "fp32", "--output", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["text"] == rec["text"]
    capsys.readouterr()


def test_infill_errors_name_the_problem(checkpoints):
    loaded = load_checkpoint(checkpoints["bidirectional"])
    plan = plan_decode(loaded.model, preset_config("mdlm"), tokenizer=loaded.tokenizer, max_len=32)
    with pytest.raises(DecodeError, match="at least one <mask>"):
        plan.infill_ids("no slot here")
    with pytest.raises(DecodeError, match="at least one"):
        plan.infill_ids("a<mask*0>b")
    block = load_checkpoint(checkpoints["block_causal"])
    with pytest.raises(DecodeError, match="infilling templates need a bidirectional model"):
        sample(block.model, block.tokenizer, ["a<mask*4>b"], preset_config("bd3lm"), LogLinear(), infill=True)
    with pytest.raises(DecodeError, match="exceeds the model's maximum of 32"):
        plan.check_length(len(plan.infill_ids("x<mask*40>")), template=True)


def test_every_model_and_wrapper_satisfies_the_denoiser_protocol(checkpoints, tmp_path):
    from pretrained_layouts import write_family, write_gpt2_like_tokenizer

    from unmask.bench.sampling import TimedModel

    models = [tiny_model(kind) for kind in ("block_causal", "bidirectional", "causal")]
    write_family("dream", tmp_path / "dream")
    write_family("mdlm", tmp_path / "mdlm")
    write_gpt2_like_tokenizer(tmp_path / "gpt2")
    models.append(load_checkpoint(tmp_path / "dream", dtype="fp32").model)  # HFDenoiser (native Qwen2)
    models.append(load_checkpoint(tmp_path / "mdlm", tokenizer=tmp_path / "gpt2", dtype="fp32").model)  # DiT
    models.append(TimedModel(models[0]))
    for model in models:
        assert isinstance(model, Denoiser), type(model).__name__
        assert isinstance(model.subs, bool) and model.mask_id < model.vocab_size
    assert [m.subs for m in models[3:5]] == [False, True]  # Dream keeps [MASK] in its softmax; MDLM not


def test_the_plan_reads_family_conventions_once():
    model = tiny_model("bidirectional")
    plan = plan_decode(model, preset_config("llada", defer_stop=True, ban_stop=True), eos_id=5)
    assert plan.decoder.subs is True and plan.decoder.deferred == (5,) and plan.ban_ids == (5,)
    model.subs = False
    assert plan_decode(model, preset_config("llada"), eos_id=5).decoder.deferred == ()
    assert plan_decode(model, preset_config("llada")).decoder.subs is False
