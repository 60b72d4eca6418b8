"""`--train.loggers`: TensorBoard, Weights & Biases (offline) and MLflow fed by the records of
metrics.jsonl, read back from what each wrote."""

from __future__ import annotations

import json

import pytest

from unmask.config import Config, ConfigError, EvalConfig, ModelConfig, TrainConfig


def test_every_tracker_receives_the_metrics_records(tiny_data_cfg, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unmask.training.loop import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the logger sets for its own store
    run = tmp_path / "run"
    cfg = Config(
        data=tiny_data_cfg,
        eval=EvalConfig(max_rows=8, mc_samples=1),
        model=ModelConfig(attention="bidirectional", dim=16, n_layers=1, n_heads=2),
        train=TrainConfig(
            steps=4,
            batch_size=2,
            eval_every=2,
            precision="fp32",
            out=str(run),
            loggers=("tensorboard", "wandb", "mlflow"),
        ),  # fmt: skip
    )
    train(cfg, data=tiny_data, progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_nats"] for r in records if "val_nats" in r]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses)
    assert [e.step for e in events.Scalars("val_nats")] == [2, 4]

    # wandb >= 0.2x keeps offline runs in a protobuf log its Python package no longer reads back:
    # check the run's log holds every metric and config name (`wandb sync` uploads it as is)
    (offline,) = list((run / "wandb").glob("offline-run-*/*.wandb"))
    data = offline.read_bytes()
    for name in (b"loss", b"lr", b"grad_norm", b"val_nats", b"val_ppl", b"tokens_per_s", b"train"):
        assert name in data, name
    assert len(vals) == 2

    client = mlflow.tracking.MlflowClient((run / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "unmask"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert [m.value for m in client.get_metric_history(mlrun.info.run_id, "loss")] == pytest.approx(losses)
    assert mlrun.data.params["train.steps"] == "4"


def test_an_unknown_logger_is_named():
    with pytest.raises(ConfigError, match="unknown logger"):
        TrainConfig(loggers=("comet",))
