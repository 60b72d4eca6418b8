"""Tokenizers: train a byte-level BPE on a corpus (HF `tokenizers`) or load a local HF tokenizer.

Every tokenizer `unmask` uses has the four special tokens the diffusion models need:
`[MASK]` (the absorbing state), `[BOS]`, `[EOS]` and `[PAD]`. A loaded tokenizer that lacks
them gets them added (so its vocabulary grows by the missing ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = {"mask": "[MASK]", "bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]"}
# a loaded tokenizer that already has a diffusion family's mask token keeps it as the mask (Qwen3 /
# SDAR, LLaDA2 / Dream, LLaDA), so the mask id is the family's (what SGLang hard-codes for SDAR)
MASK_ALIASES = ("<|MASK|>", "<|mask|>", "<|mdm_mask|>")


class TokenizerError(ValueError):
    """A tokenizer could not be built or loaded; the message names the path."""


class Tokenizer:
    """A HF `tokenizers.Tokenizer` plus the special ids the models use."""

    def __init__(self, hf: HFTokenizer):
        names = dict(SPECIALS)
        if hf.token_to_id(SPECIALS["mask"]) is None:
            names["mask"] = next((t for t in MASK_ALIASES if hf.token_to_id(t) is not None), SPECIALS["mask"])
        missing = [tok for tok in names.values() if hf.token_to_id(tok) is None]
        if missing:
            hf.add_special_tokens(missing)
        self.hf = hf
        self.mask_id, self.bos_id, self.eos_id, self.pad_id = (
            hf.token_to_id(names[k]) for k in ("mask", "bos", "eos", "pad")
        )
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE whose vocabulary (specials included) has `vocab_size` ids."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or a HF tokenizer directory containing one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(
                f"no tokenizer.json at {path} (expected a local HF tokenizer directory or file)"
            )
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot read tokenizer {file}: {e}") from e

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def to_str(self) -> str:
        return self.hf.to_str()

    @property
    def fingerprint(self) -> str:
        """Stable hash of the tokenizer's full definition (keys token caches)."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    # -- use ----------------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_id,)

    chat_template = "chat"  # the name of the repo's template in data/templates.toml

    def chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """A conversation as text through the repo's `chat` template (`data/templates.toml`, what
        SFT with `--instruct.template chat` trains on): every turn, then the assistant's opening."""
        from unmask.data.instruct import load_template

        template = load_template("chat")
        if add_generation_prompt:
            return template.chat(messages)
        return "".join(template.turn.format(role=m["role"], content=m["content"]) for m in messages)

    def prompt_ids(self, text: str, *, chat: bool = False) -> list[int]:
        """`[BOS] + tokens` (one [BOS]: a text that already opens with it keeps just that one);
        with `chat`, the text as one user turn of the `chat` template."""
        if chat:
            return self.encode_chat(self.chat([{"role": "user", "content": text}]))
        ids = self.encode(text)
        return ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids]

    def encode_chat(self, rendered: str) -> list[int]:
        """The ids of a conversation `chat()` rendered: `[BOS]` + its tokens, as SFT encodes them."""
        return self.prompt_ids(rendered)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for specials): turns nats/token into bits/byte."""
        specials = {self.mask_id, self.bos_id, self.eos_id, self.pad_id}
        # Byte-level BPE: every character of a token's string stands for exactly one byte.
        # Other tokenizers: decode the id alone (exact for whole-character pieces).
        byte_level = isinstance(self.hf.decoder, decoders.ByteLevel)
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in specials:
                continue
            if byte_level:
                out[i] = len(self.hf.id_to_token(i))
            else:
                out[i] = len(self.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out
