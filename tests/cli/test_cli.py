import json

import pytest

from unmask.cli.main import main
from unmask.config import Config, ConfigError
from unmask.config_io import load_config


def run(argv, capsys):
    main(argv)
    return capsys.readouterr().out


def test_shipped_configs_load_and_are_consistent():
    for name in ("tiny-ar", "tiny-mdlm", "tiny-bd3lm", "tiny-bd3lm-8", "tiny-bd3lm-16", "small-bd3lm"):
        cfg = load_config(name)
        assert isinstance(cfg, Config) and cfg.data.corpus == "stdlib"
    assert load_config("tiny-bd3lm-16").model.block_size == 16


def test_older_checkpoint_configs_load_without_their_retired_keys():
    from unmask.config_io import config_from_json, to_dict

    old = to_dict(Config())
    old["decode"]["k"] = 4  # ADJUST's K before `rounds`: must not become 4 rounds for every preset
    old["train"]["eval_batches"] = 8
    cfg = config_from_json(json.dumps(old))
    assert cfg.decode.rounds == 1 and cfg == Config()
    del old["train"]["eval_batches"]
    with pytest.raises(ConfigError, match=r"decode.k"):  # only a checkpoint's config.json is lenient
        from unmask.config_io import from_dict

        from_dict(Config, old)


def test_unknown_key_wrong_type_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.stepz"):
        load_config(bad)
    bad.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match=r"--train.steps: expected an integer"):
        load_config(bad)
    bad.write_text("[data]\nseq_len = 30\n[model]\nblock_size = 4\n")
    with pytest.raises(ConfigError, match=r"--model.block_size: data.seq_len=30 is not divisible"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")


def test_cli_overrides_are_checked(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "tiny-bd3lm", "--train.stepz=3"])
    assert e.value.code == 2
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", "tiny-bd3lm", "--data.seq_len=30"])
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro boxes the message
    assert "--model.block_size: data.seq_len=30 is not divisible" in err


def test_train_then_eval_from_the_command_line(tiny_data_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        tiny_data_cfg.corpus,
        "--out",
        str(out),
        f"--data.cache_dir={tiny_data_cfg.cache_dir}",
        "--data.seq_len=32",
        "--data.vocab_size=320",
        "--data.valid_fraction=0.15",
        "--data.test_fraction=0.15",
        "--model.dim=32",
        "--model.n_layers=1",
        "--model.block_size",
        "4",
        "--train.steps=3",
        "--train.batch_size=4",
        "--eval.max_rows=8",
    ]
    assert "checkpoint:" in run(args, capsys)
    res = json.loads(run(["eval", "ppl", "--checkpoint", str(out), "--mc-samples", "2", "--json"], capsys))
    assert res["bound"] and res["mc_samples"] == 2 and res["ppl"] > 1
    text = run(["eval", "ppl", "--checkpoint", str(out), "--max-rows", "4"], capsys)
    assert "test perplexity <=" in text and "bits/byte" in text


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "ppl", "--checkpoint", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert "no checkpoint at" in capsys.readouterr().err
