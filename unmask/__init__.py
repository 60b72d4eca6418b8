"""unmask: masked and block diffusion language models — training, fast decoding, measurement.

The public API, one name per job (the README's library section shows each in use):

    from unmask import load_checkpoint, preset_config, build_decoder, generate

Names are imported on first use (PEP 562), so `import unmask` and `unmask --help` do not pay for
torch until something that needs it is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it, grouped by the layer it belongs to
_PUBLIC: dict[str, str] = {
    # configuration
    "Config": "unmask.config",
    "DecodeConfig": "unmask.config",
    "ConfigError": "unmask.config",
    "load_config": "unmask.config_io",
    # data
    "prepare_data": "unmask.data.corpus",
    "load_corpus": "unmask.data.corpus",
    "DataError": "unmask.data.corpus",
    "Tokenizer": "unmask.data.tokenizer",
    # models
    "Transformer": "unmask.models.transformer",
    "build_model": "unmask.models.transformer",
    "DenoiserOutput": "unmask.models.transformer",
    "KVCache": "unmask.models.kv_cache",
    "load_checkpoint": "unmask.models.checkpoint",
    "export": "unmask.exporting",
    "save_checkpoint": "unmask.models.checkpoint",
    "CheckpointError": "unmask.models.checkpoint",
    "load_pretrained": "unmask.models.pretrained.load",
    "load_tokenizer": "unmask.models.pretrained.load",
    "PretrainedError": "unmask.models.pretrained.families",
    "build_schedule": "unmask.schedules",
    # training
    "train": "unmask.training.loop",
    "Batch": "unmask.training.objectives",
    "diffusion_loss": "unmask.training.objectives",
    "ar_loss": "unmask.training.objectives",
    # decoding
    "generate": "unmask.decoding.generate",
    "plan_decode": "unmask.decoding.plan",
    "DecodeState": "unmask.decoding.state",
    "Decoder": "unmask.decoding.decoder",
    "build_decoder": "unmask.decoding.presets",
    "preset_config": "unmask.decoding.presets",
    "PRESETS": "unmask.decoding.presets",
    "sample": "unmask.decoding.sample",
    "render": "unmask.decoding.sample",
    # evaluation
    "evaluate_perplexity": "unmask.training.perplexity",
    "Perplexity": "unmask.training.perplexity",
    "generative_perplexity": "unmask.evaluation.reference",
    "mauve_score": "unmask.evaluation.reference",
    "load_reference": "unmask.evaluation.reference",
    "repetition": "unmask.evaluation.metrics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'unmask' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily
    from unmask.config import Config, ConfigError, DecodeConfig
    from unmask.config_io import load_config
    from unmask.data.corpus import DataError, load_corpus, prepare_data
    from unmask.data.tokenizer import Tokenizer
    from unmask.decoding.decoder import Decoder
    from unmask.decoding.generate import generate
    from unmask.decoding.plan import plan_decode
    from unmask.decoding.presets import PRESETS, build_decoder, preset_config
    from unmask.decoding.sample import render, sample
    from unmask.decoding.state import DecodeState
    from unmask.evaluation.metrics import repetition
    from unmask.evaluation.reference import generative_perplexity, load_reference, mauve_score
    from unmask.exporting import export
    from unmask.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from unmask.models.kv_cache import KVCache
    from unmask.models.pretrained.families import PretrainedError
    from unmask.models.pretrained.load import load_pretrained, load_tokenizer
    from unmask.models.transformer import DenoiserOutput, Transformer, build_model
    from unmask.schedules import build_schedule
    from unmask.training.loop import train
    from unmask.training.objectives import Batch, ar_loss, diffusion_loss
    from unmask.training.perplexity import Perplexity, evaluate_perplexity
