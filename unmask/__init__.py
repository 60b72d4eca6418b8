"""unmask: masked and block diffusion language models — training, fast decoding, measurement."""

from unmask.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unmask.config import Config, ConfigError, DataConfig, EvalConfig, ModelConfig, NoiseConfig, TrainConfig
from unmask.config_io import load_config
from unmask.data import DataError, load_corpus, prepare_data
from unmask.kv_cache import KVCache
from unmask.metrics import Perplexity, evaluate_perplexity
from unmask.model import DenoiserOutput, Transformer, build_model
from unmask.objectives import Batch, LossOutput, ar_loss, diffusion_loss
from unmask.schedules import build_schedule
from unmask.tokenizer import Tokenizer
from unmask.train import train

__all__ = [
    "Batch", "CheckpointError", "Config", "ConfigError", "DataConfig", "DataError", "DenoiserOutput",
    "EvalConfig", "KVCache", "LossOutput", "ModelConfig", "NoiseConfig", "Perplexity", "Tokenizer",
    "TrainConfig", "Transformer", "ar_loss", "build_model", "build_schedule", "diffusion_loss",
    "evaluate_perplexity", "load_checkpoint", "load_config", "load_corpus", "prepare_data",
    "save_checkpoint", "train",
]
