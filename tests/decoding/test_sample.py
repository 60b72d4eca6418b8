"""`unmask sample` and the sampling benchmarks on a tiny trained checkpoint."""

import json

import pytest
import torch

from unmask.bench.families import bench_llada_reference, llada_reference
from unmask.bench.sampling import bench_cache, bench_sample
from unmask.cli.main import main
from unmask.data.prompts import heldout_prompts
from unmask.decoding.presets import preset_config
from unmask.decoding.sample import sample
from unmask.models.checkpoint import load_checkpoint
from unmask.schedules import LogLinear


def test_sample_cli_writes_jsonl_and_is_batch_invariant(checkpoints, tmp_path, capsys):
    base = [
        "sample",
        "--checkpoint",
        str(checkpoints["block_causal"]),
        "--prompt",
        "def f(",
        "--preset",
        "bd3lm",
        "--max-new-tokens",
        "12",
        "--num-samples",
        "3",
        "--decode.steps=6",
    ]
    main(base + ["--batch-size", "3", "--output", str(tmp_path / "a.jsonl")])
    main(base + ["--batch-size", "1", "--output", str(tmp_path / "b.jsonl")])
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    rec = a[0]
    assert rec["settings"]["preset"] == "bd3lm" and rec["settings"]["steps"] == 6
    assert rec["settings"]["top_p"] == 0.9 and rec["nfe"] >= 1 and "text" in rec


def test_sample_cli_errors(checkpoints, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(checkpoints["bidirectional"]), "--preset", "nope"])
    assert e.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(checkpoints["bidirectional"]), "--max-new-tokens", "40"])
    assert "exceeds the model's maximum of 32" in capsys.readouterr().err


def test_prompts_share_batches_only_with_equal_lengths(checkpoints):
    loaded = load_checkpoint(checkpoints["bidirectional"])
    cfg = preset_config("llada", max_new_tokens=8, steps=4, block_len=4)
    recs = sample(
        loaded.model, loaded.tokenizer, ["import os", "x", "import os"], cfg, LogLinear(), batch_size=8
    )
    assert [r["prompt"] for r in recs] == ["import os", "x", "import os"]
    assert recs[0]["token_ids"] == recs[2]["token_ids"]  # greedy: same prompt, same text
    assert recs[0]["batch_size"] == 2 and recs[1]["batch_size"] == 1


def test_bench_sample_cache_and_llada_reference(checkpoints):
    bd3 = load_checkpoint(checkpoints["block_causal"])
    prompts = heldout_prompts(bd3.tokenizer, bd3.config.data, 2, 5)
    rows = bench_sample(
        bd3.model,
        bd3.tokenizer,
        bd3.config,
        ["bd3lm", "conv"],
        [4],
        prompts=prompts,
        max_new_tokens=8,
        batch_size=2,
        progress=False,
    )["rows"]
    assert {r["preset"] for r in rows} == {"bd3lm", "conv"}
    for r in rows:
        assert r["new_tokens"] <= 16 and 0 <= r["overhead_fraction"] < 1 and r["nfe"] >= 1
    cache = bench_cache(
        bd3.model,
        bd3.tokenizer,
        bd3.config,
        prompts=prompts,
        max_new_tokens=16,
        steps=8,
        batch_size=2,
        repeats=1,
    )
    assert cache["identical_tokens"] and cache["speedup"]["median"] > 0
    mdlm = load_checkpoint(checkpoints["bidirectional"])
    ref = bench_llada_reference(
        mdlm.model, mdlm.config, prompts=prompts, max_new_tokens=8, steps=4, block_len=4, repeats=1
    )
    assert ref["identical_tokens"]


def test_llada_reference_matches_our_preset_on_a_random_model():
    from conftest import tiny_model

    from unmask.decoding.generate import final_state, generate
    from unmask.decoding.plan import plan_decode
    from unmask.decoding.rng import row_generators

    model = tiny_model("bidirectional")
    prompt = torch.randint(0, 60, (3, 5), generator=torch.Generator().manual_seed(0))
    ref = llada_reference(model, prompt, gen_length=16, steps=8, block_length=8)
    cfg = preset_config("llada", steps=8, max_new_tokens=16, block_len=8)
    plan = plan_decode(model, cfg, schedule=LogLinear())
    ours = final_state(generate(model, plan, prompt=prompt, generators=row_generators(0, range(3))))
    assert torch.equal(ours.tokens, ref)


def test_bench_sample_cli_writes_results_json_table_and_plots(checkpoints, tmp_path, capsys):
    out = tmp_path / "bench"
    main(
        [
            "bench",
            "sample",
            "--checkpoint",
            str(checkpoints["bidirectional"]),
            "--presets",
            "mdlm,llada",
            "--steps",
            "2,4",
            "--num-prompts",
            "4",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "8",
            "--prompt-tokens",
            "4",
            "--reference",
            str(checkpoints["ar"]),
            "--featurizer",
            f"ar:{checkpoints['ar']}",
            "--min-samples",
            "4",
            "--out",
            str(out),
        ]
    )
    result = json.loads((out / "results.json").read_text())
    assert result["machine"]["torch"] and result["settings"]["presets"] == "mdlm,llada"
    assert result["matmul_peak_flops"] > 0 and result["batch_size"] == 2 and result["seed"] == 0
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        for key in (
            "tokens_per_s",
            "tokens_per_s_with_prompt",
            "nfe",
            "tokens_per_forward",
            "gen_ppl",
            "mauve",
            "token_rep4",
            "fraction_of_peak",
            "overhead_fraction",
        ):
            assert key in row, key
    assert (out / "quality_vs_nfe.png").stat().st_size > 1000
    assert (out / "quality_vs_speed.png").read_bytes()[:4] == b"\x89PNG"
    assert "| preset |" in (out / "results.md").read_text()
