"""A newcomer's first hour: help that lists every flag, precision chosen from the machine, `unmask
env`, a single text file that just works, one validation number, run directories that are never
appended to, Ctrl-C that saves."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from unmask.cli.main import main
from unmask.config import Config, DataConfig, DecodeConfig, EvalConfig, ModelConfig, TrainConfig
from unmask.data.corpus import DataError, load_corpus, prepare_data
from unmask.evaluation.perplexity import heldout_perplexity
from unmask.models.checkpoint import CheckpointError, load_checkpoint
from unmask.precision import resolve_precision
from unmask.training.loop import train

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
    "every jolly baker who mixes dough at dawn"
).split()


def book(path, paragraphs=120, seed=0):
    """A plain text file of `paragraphs` paragraphs of pseudo-English."""
    import random

    rng = random.Random(seed)
    text = "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90))) for _ in range(paragraphs)
    )
    path.write_text(text)
    return path


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ help


def test_train_and_posttrain_help_list_every_config_field_and_the_shorthands(capsys):
    for argv in (["train"], ["posttrain", "sft"], ["posttrain", "r2ft"]):
        text = help_text(capsys, *argv)
        for section in dataclasses.fields(Config):
            for f in dataclasses.fields(
                section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))
            ):
                assert f"--{section.name}.{f.name}=" in text, (argv, section.name, f.name)
        assert "--train.lr=0.0003" in text and "Peak learning rate" in text  # default and doc
    text = help_text(capsys, "train")
    assert "--data PATH" in text and "--out DIR" in text and "--overwrite" in text


def test_sample_help_lists_preset_max_new_tokens_and_every_decode_field(capsys):
    from unmask.cli.sample import PRESET_NAMES
    from unmask.decoding.presets import PRESETS

    text = help_text(capsys, "sample")
    assert "--preset" in text and "--max-new-tokens" in text
    for f in dataclasses.fields(DecodeConfig):
        assert f"--decode.{f.name}=" in text, f.name
    assert set(PRESET_NAMES) == set(PRESETS)


def test_sample_preset_and_max_new_tokens_flags_work(checkpoints, capsys):
    main(
        [
            "sample",
            "--checkpoint",
            str(checkpoints["block_causal"]),
            "--preset",
            "bd3lm",
            "--max-new-tokens",
            "8",
            "--prompt",
            "def",
        ]
    )
    assert "(nfe " in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- precision


def test_auto_precision_is_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setenv("UNMASK_NATIVE_BF16", "0")
    r = resolve_precision("auto", "cpu")
    assert r.precision == "fp32" and "no native bf16" in r.reason
    with pytest.warns(UserWarning, match="emulated"):
        assert resolve_precision("bf16", "cpu").precision == "bf16"
    assert resolve_precision("fp32", "cpu").precision == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_auto_precision_with_native_bf16_follows_the_probe(monkeypatch):
    monkeypatch.setenv("UNMASK_NATIVE_BF16", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no emulation warning
        r = resolve_precision("auto", "cpu")
    assert r.precision in ("fp32", "bf16") and "x fp32" in r.reason  # decided by a measured ratio


def test_training_saves_the_resolved_precision(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNMASK_NATIVE_BF16", "0")
    cfg = small_cfg(tmp_path, steps=2, precision="auto")
    train(cfg)
    assert (
        json.loads(
            (tmp_path / "run/latest")
            .parent.joinpath((tmp_path / "run/latest").read_text(), "config.json")
            .read_text()
        )["train"]["precision"]
        == "fp32"
    )
    assert "precision: fp32 (auto: this CPU has no native bf16" in capsys.readouterr().err


def test_env_reports_machine_precision_and_extras(capsys):
    main(["env", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert {
        "torch",
        "python",
        "cpu",
        "cpu_features",
        "torch_threads",
        "precision_auto",
        "extras",
        "caches",
        "matmul_gflops_256",
    } <= set(info)
    assert info["matmul_gflops_256"]["fp32"] > 0 and "mauve-text" in info["extras"]
    main(["env", "--no-probe"])
    assert "precision_auto" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- a text file


def small_cfg(tmp_path, *, corpus=None, steps=4, out="run", **train_kw) -> Config:
    corpus = corpus or str(book(tmp_path / "book.txt"))
    data = DataConfig(corpus=corpus, seq_len=32, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    return Config(
        data=data,
        model=ModelConfig(attention="block_causal", block_size=4, dim=32, n_layers=1, n_heads=2),
        train=TrainConfig(
            **{
                "steps": steps,
                "batch_size": 4,
                "eval_every": 0,
                "warmup": 0,
                "precision": "fp32",
                "out": str(tmp_path / out),
                **train_kw,
            }
        ),
        eval=EvalConfig(max_rows=16, mc_samples=2),
    )


def test_a_single_text_file_splits_into_three_non_empty_splits(tmp_path):
    path = book(tmp_path / "book.txt", paragraphs=60)
    splits = load_corpus(str(path))
    assert all(splits[s] for s in ("train", "validation", "test"))
    assert sum(map(len, splits.values())) >= 3
    assert "".join("".join(d.split()) for s in splits.values() for d in s).__len__() == len(
        "".join(path.read_text().split())
    )  # nothing lost: every character is in some document


def test_readme_train_command_on_one_text_file(tmp_path, capsys):
    path = book(tmp_path / "my_corpus.txt")
    main(
        [
            "train",
            "--data",
            str(path),
            "--model.block_size",
            "4",
            "--out",
            str(tmp_path / "mine"),
            "--data.seq_len",
            "32",
            "--data.vocab_size",
            "300",
            "--data.cache_dir",
            str(tmp_path / "c"),
            "--model.dim",
            "32",
            "--model.n_layers",
            "1",
            "--model.n_heads",
            "2",
            "--train.steps",
            "2",
            "--train.batch_size",
            "2",
            "--train.precision",
            "fp32",
            "--eval.max_rows",
            "8",
        ]
    )
    err = capsys.readouterr().err
    assert "train documents" in err and "validation:" in err and "rows of 32" in err  # sizes printed


def test_too_little_data_names_the_split_its_tokens_and_the_flags(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(f"λ{i} ∀x∈ℝ ✓" for i in range(9)))
    cfg = small_cfg(tmp_path, corpus=str(path))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=128))
    split_error = r"the (validation|test|train) split has \d+ tokens .* --data.seq_len 128"
    with pytest.raises(DataError, match=split_error):
        prepare_data(cfg.data)


def test_a_smaller_bpe_vocabulary_than_asked_is_reported(tmp_path, capsys):
    cfg = small_cfg(tmp_path)
    prepare_data(dataclasses.replace(cfg.data, vocab_size=4096), verbose=True)
    assert "fewer than the --data.vocab_size 4096" in capsys.readouterr().err


def test_an_empty_held_out_split_gets_a_document(tmp_path):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 20)
    splits = load_corpus(str(tmp_path), valid_fraction=0.01, test_fraction=0.01)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    (tmp_path / "d2.txt").unlink()
    with pytest.raises(DataError, match="at least 3 are needed"):
        load_corpus(str(tmp_path))


# ------------------------------------------------------------------------------- validation number


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_training_validation_equals_eval_ppl_on_the_saved_checkpoint(tmp_path, ema, capsys):
    cfg = small_cfg(tmp_path, steps=6, ema=ema)
    result = train(cfg)
    confirmed = heldout_perplexity(result.run_dir, split="validation")
    assert confirmed.ppl == pytest.approx(result.val_ppl, rel=1e-6)
    assert confirmed.mc_samples == 2 and confirmed.rows == 16
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    record = [r for r in records if "val_ppl" in r][-1]
    assert record["val_weights"] == ("ema" if ema else "raw") and record["val_mc_samples"] == 2
    out = capsys.readouterr().out + capsys.readouterr().err
    main(["eval", "ppl", "--checkpoint", str(result.run_dir), "--split", "validation"])
    printed = capsys.readouterr().out
    assert f"{confirmed.ppl:.3f}" in printed and "2 MC samples" in printed and "16 rows" in printed
    assert ("EMA weights" if ema else "raw weights") in printed and out is not None


# ------------------------------------------------------------------------- run dirs and checkpoints


def test_an_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    cfg = small_cfg(tmp_path, steps=2)
    train(cfg)
    with pytest.raises(CheckpointError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg)
    (tmp_path / "partial").mkdir()
    # a run killed before its first checkpoint left only its log
    (tmp_path / "partial/metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out=str(tmp_path / "partial"))))
    train(cfg, overwrite=True)
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    kinds = [(r["step"], "loss" if "loss" in r else "val" if "val_ppl" in r else "memory") for r in records]
    assert kinds == [(1, "loss"), (2, "loss"), (2, "val"), (2, "memory")]  # one run's log, not two


def test_every_saved_step_stays_loadable_and_only_the_newest_keep_optimizer_state(tmp_path):
    cfg = small_cfg(tmp_path, steps=9, save_every=3, keep_optimizer=1)
    train(cfg)
    ckpts = sorted((tmp_path / "run").glob("ckpt-*"))
    assert [c.name for c in ckpts] == ["ckpt-0000003", "ckpt-0000006", "ckpt-0000009"]
    assert [(c / "optimizer.pt").exists() for c in ckpts] == [False, False, True]
    for c in ckpts:
        assert load_checkpoint(c).state["step"] == int(c.name[5:])


# ------------------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, sig):
    path = book(tmp_path / "book.txt")
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(path),
        "--out",
        str(run),
        "--data.seq_len",
        "32",
        "--data.vocab_size",
        "300",
        "--data.cache_dir",
        str(tmp_path / "c"),
        "--model.block_size",
        "4",
        "--model.dim",
        "32",
        "--model.n_layers",
        "1",
        "--model.n_heads",
        "2",
        "--train.steps",
        "100000",
        "--train.batch_size",
        "2",
        "--train.save_every",
        "100000",
        "--train.eval_every",
        "0",
        "--train.precision",
        "fp32",
        "--eval.max_rows",
        "8",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "unmask", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = run / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and "resume with: unmask train" in err and "--resume" in err
    step = load_checkpoint(run).state["step"]
    assert step >= 3
    # the printed command continues the run (here to a few more steps)
    resume = err.split("resume with: ", 1)[1].split()[1:]
    resume[resume.index("100000")] = str(step + 2)
    main(resume)
    assert load_checkpoint(run).state["step"] == step + 2
