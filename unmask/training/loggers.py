"""Experiment trackers fed by the records the training loop writes to `metrics.jsonl` (which is
always written): TensorBoard event files under `RUN/tensorboard`, Weights & Biases (offline unless
`WANDB_MODE` says otherwise, files under `RUN/wandb`), MLflow (`MLFLOW_TRACKING_URI`, else a file
store under `RUN/mlruns`). The run's config is logged once; numbers are logged per step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from unmask.config import Config, ConfigError
from unmask.config_io import to_dict


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested dicts flattened with `/` (`soft_mask/w_s`), `step` left out."""
    out = {}
    for k, v in record.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _need(module: str, logger: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"--train.loggers {logger} needs the `{module.split('.')[0]}` package: "
            "pip install 'unmask[track]'"
        ) from e


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: Config):
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(to_dict(cfg), indent=2) + "\n```")

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, run_dir: Path, cfg: Config):
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "unmask"),
            name=run_dir.name,
            dir=str(run_dir),
            config=to_dict(cfg),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, cfg: Config):
        mlflow = _need("mlflow", "mlflow")
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store in the run (mlflow-skinny has no database backend); opt in to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "unmask"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        params = {k: str(v)[:500] for k, v in _flat(to_dict(cfg)).items()}
        mlflow.log_params(params)

    def log(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics(scalars(record), step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


KINDS = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}


def build_loggers(names: tuple[str, ...], run_dir: Path, cfg: Config) -> list[Logger]:
    """The trackers `names` asks for (`jsonl` is metrics.jsonl itself, always written)."""
    return [KINDS[n](run_dir, cfg) for n in dict.fromkeys(names) if n != "jsonl"]
