"""`unmask` as an lm-evaluation-harness model: the three request types through lm-eval's own
`simple_evaluate` and command line on local YAML tasks, exactness for AR, the diffusion estimate
against `eval ppl`'s estimator, generation equal to `unmask sample`, clear errors."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from unmask.cli.main import main  # noqa: E402
from unmask.config import ConfigError  # noqa: E402
from unmask.decoding.presets import preset_config  # noqa: E402
from unmask.decoding.sample import cut_at_stop, sample  # noqa: E402
from unmask.evaluation.harness import UnmaskLM  # noqa: E402
from unmask.models.checkpoint import CheckpointError  # noqa: E402
from unmask.training.perplexity import evaluate_perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = "tests/evaluation/lm_eval_tasks"


@pytest.fixture(autouse=True)
def _offline_in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(ROOT / TASKS), include_defaults=False)  # skip indexing lm-eval's own


def req(*args):
    return SimpleNamespace(args=args)


@pytest.mark.parametrize(
    "kind,preset", [("causal", "mdlm"), ("bidirectional", "llada"), ("block_causal", "bd3lm")]
)
def test_three_request_types_through_simple_evaluate(checkpoints, task_manager, kind, preset):
    r = lm_eval.simple_evaluate(
        model="unmask",
        model_args=f"checkpoint={checkpoints[kind]},preset={preset},mc_samples=2,max_new_tokens=8",
        tasks=["unmask_mc", "unmask_gen", "unmask_ppl"],
        task_manager=task_manager,
        limit=2,
    )
    res = r["results"]
    assert 0 <= res["unmask_mc"]["acc,none"] <= 1
    assert 0 <= res["unmask_gen"]["exact_match,none"] <= 1
    assert (
        math.isfinite(res["unmask_ppl"]["bits_per_byte,none"]) and res["unmask_ppl"]["bits_per_byte,none"] > 0
    )


def test_lm_eval_command_line(checkpoints, tmp_path, capsys):
    main(
        [
            "eval",
            "lm-eval",
            "--checkpoint",
            str(checkpoints["block_causal"]),
            "--preset",
            "bd3lm",
            "--mc-samples",
            "2",
            "--decode.max_new_tokens=8",
            "--tasks",
            "unmask_mc,unmask_ppl",
            "--include_path",
            TASKS,
            "--limit",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert files, "lm-eval wrote no results file"
    results = json.loads(files[0].read_text())
    assert results["config"]["model"] == "unmask" and results["config"]["model_args"]["mc_samples"] == 2
    assert "acc,none" in results["results"]["unmask_mc"]


def test_ar_loglikelihood_is_the_exact_log_probability(checkpoints):
    lm = UnmaskLM(checkpoint=str(checkpoints["causal"]))
    context, continuation = "import os\nimport", " sys"
    ((ll, greedy),) = lm.loglikelihood([req(context, continuation)], disable_tqdm=True)
    tok, model = lm.tok, lm.model
    ctx, cont = [tok.bos_id] + tok.encode(context), tok.encode(continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0]  # the whole sequence, sliced here
    expected = sum(float(torch.log_softmax(logits[len(ctx) - 1 + j], -1)[t]) for j, t in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(logits[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))


@pytest.mark.parametrize("kind", ["bidirectional", "block_causal"])
def test_diffusion_estimate_agrees_with_the_eval_ppl_estimator(checkpoints, tiny_data, kind):
    """Both are Monte Carlo estimates of the same NELBO of a row's tokens given its [BOS]: the
    harness's mean over many draws must agree with evaluate_perplexity's within their errors."""
    lm = UnmaskLM(checkpoint=str(checkpoints[kind]), precision="fp32")
    row = np.asarray(tiny_data.rows["validation"][0]).copy()
    row[0] = lm.tok.bos_id
    draws = lm.mc_nelbo([int(row[0])], [int(t) for t in row[1:]], n=256)
    scored = np.ones((1, len(row)), dtype=bool)
    scored[0, 0] = False
    ppl = evaluate_perplexity(
        lm.model,
        row[None].repeat(8, 0),
        lm.schedule,
        pad_id=-1,
        byte_lengths=lm.tok.byte_lengths(),
        eps=lm.config.noise.eps,
        mc_samples=16,
        loss_positions=scored.repeat(8, 0),
        seed=7,
    )
    other = ppl.nats_per_token * (len(row) - 1)  # mean NELBO of the row over 128 draws
    se = float(draws.std()) * math.sqrt(1 / 256 + 1 / 128)
    assert abs(float(draws.mean()) - other) < 4 * se, (float(draws.mean()), other, se)
    ((ll, _),) = lm.loglikelihood([req(lm.tok.decode([int(t) for t in row[1:5]]), " x")], disable_tqdm=True)
    assert ll < 0


def test_mc_draws_are_deterministic_and_standard_error_falls(checkpoints):
    lm = UnmaskLM(checkpoint=str(checkpoints["bidirectional"]), mc_samples=4)
    a = lm.loglikelihood([req("def f(x):", " return x")], disable_tqdm=True)
    b = lm.loglikelihood([req("class A:", " pass"), req("def f(x):", " return x")], disable_tqdm=True)
    assert a[0] == b[1]  # seeded by the tokens, not by the position in the list
    prefix, target = [lm.tok.bos_id] + lm.tok.encode("def f(x):"), lm.tok.encode(" return x + 1")
    d = lm.mc_nelbo(prefix, target, n=256)
    assert d.std() > 0 and torch.all(d >= 0)


@pytest.mark.parametrize(
    "kind,preset", [("block_causal", "bd3lm"), ("bidirectional", "conv"), ("causal", "mdlm")]
)
def test_generate_until_equals_unmask_sample(checkpoints, kind, preset):
    lm = UnmaskLM(checkpoint=str(checkpoints[kind]), preset=preset, seed=3, steps=12)
    contexts = ["def parse(", "import"]
    got = lm.generate_until([req(c, {"until": [], "max_gen_toks": 12}) for c in contexts], disable_tqdm=True)
    cfg = preset_config(preset, max_new_tokens=12, steps=12)
    max_len = lm.config.data.seq_len if kind == "bidirectional" else None
    want = [r["text"] for r in sample(lm.model, lm.tok, contexts, cfg, lm.schedule, seed=3, max_len=max_len)]
    assert got == want
    cut = lm.generate_until(
        [req(contexts[0], {"until": [want[0][3:5]], "max_gen_toks": 12})], disable_tqdm=True
    )
    assert want[0].startswith(cut[0]) and len(cut[0]) <= len(want[0])


def test_cut_at_and_the_chat_template(checkpoints):
    assert cut_at_stop("abc\ndef", ["\n"]) == ("abc", True)
    assert cut_at_stop("abcdef", ["x", "cd", "b"]) == ("a", True)
    assert cut_at_stop("abc", []) == ("abc", False)
    lm = UnmaskLM(checkpoint=str(checkpoints["bidirectional"]))
    text = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi\n<|assistant|>\n"


def test_bad_model_args_are_clear_errors(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        UnmaskLM(checkpoint=str(checkpoints["bidirectional"]), preset="nope")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        UnmaskLM(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="checkpoint=PATH is required"):
        UnmaskLM()
    with pytest.raises(ConfigError, match="unknown decode field"):
        UnmaskLM(checkpoint=str(checkpoints["bidirectional"]), stepz=3)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            UnmaskLM(checkpoint=str(checkpoints["bidirectional"]), device="cuda:0")
    with pytest.raises(ConfigError, match="mc_samples"):
        UnmaskLM(checkpoint=str(checkpoints["bidirectional"]), mc_samples=0)
    lm = UnmaskLM(checkpoint=str(checkpoints["bidirectional"]))
    with pytest.raises(ConfigError, match="gen_kwargs: unknown field"):
        lm.generate_until([req("x", {"until": [], "num_beams": 4})], disable_tqdm=True)


def test_bench_lm_eval_reports_every_request_type_and_the_mc_error(checkpoints, capsys):
    from unmask.bench.harness import bench_lm_eval, lm_eval_table

    tasks = {
        "loglikelihood": "unmask_mc",
        "generate_until": "unmask_gen",
        "loglikelihood_rolling": "unmask_ppl",
    }
    r = bench_lm_eval(
        {"bd3": str(checkpoints["block_causal"])},
        tasks,
        include_path=str(ROOT / TASKS),
        limit=2,
        model_args="mc_samples=2,max_new_tokens=4,steps=4",
        mc_counts=(1, 4, 16),
        se_draws=32,
    )
    assert [row["request_type"] for row in r["rows"]] == list(tasks)
    se = {row["mc_samples"]: row for row in r["standard_error"]}
    assert se[1]["se_predicted"] > se[4]["se_predicted"] > se[16]["se_predicted"] > 0  # 1/sqrt(m)
    assert "SE measured" in lm_eval_table(r)


def test_unmask_plot_draws_the_curves_of_several_runs(checkpoints, tmp_path, capsys):
    out = tmp_path / "curves.png"
    main(
        [
            "plot",
            str(checkpoints["block_causal"]),
            str(checkpoints["causal"]),
            "--out",
            str(out),
            "--smooth",
            "3",
        ]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path / "nothing"), "--out", str(out)])
    assert e.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err
