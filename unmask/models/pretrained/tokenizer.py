"""`PretrainedTokenizer`: a local Hugging Face tokenizer with the special ids the decoders need.

Loaded offline (`local_files_only`, never remote code): `AutoTokenizer` when the directory's
tokenizer class is a transformers one, else the directory's `tokenizer.json` (Dream, SDAR and
LLaDA2 name remote tokenizer classes whose fast files are standard). The mask id comes from the
model's config when the tokenizer does not declare it (LLaDA), and each family's BOS / EOS /
end-of-turn tokens are known, so `--chat` answers stop where the model's authors stop them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unmask.models.pretrained.families import Family, PretrainedError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class PretrainedTokenizer:
    def __init__(self, hf, *, mask_id: int, family: Family, path: Path):
        self.hf, self.family, self.path = hf, family, path
        self.mask_id = mask_id
        self.bos_id = hf.bos_token_id
        stops = [self.token_id(t) for t in family.stop_tokens]
        self.eos_id = (
            hf.eos_token_id
            if hf.eos_token_id is not None
            else next((s for s in stops if s is not None), None)
        )
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(hf)
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.eos_id, *stops) if i is not None))

    def token_id(self, token: str) -> int | None:
        """The id of a token string, or None when the vocabulary does not have it."""
        i = self.hf.convert_tokens_to_ids(token)
        return None if i is None or i == self.hf.unk_token_id and token != self.hf.unk_token else i

    @property
    def fingerprint(self) -> str:
        vocab = json.dumps(sorted(self.hf.get_vocab().items()), ensure_ascii=False)
        return hashlib.sha256(vocab.encode()).hexdigest()[:16]

    @property
    def chat_template(self) -> str | None:
        """The authors' Jinja chat template, when the tokenizer ships one."""
        return getattr(self.hf, "chat_template", None) or None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """A conversation as text through the tokenizer's own chat template (the model authors')."""
        if not self.has_chat_template:
            raise PretrainedError(f"{self.path}: this tokenizer has no chat template; drop --chat")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_ids(self, text: str, *, chat: bool = False) -> list[int]:
        """A prompt as the model's authors feed it: with `chat`, one user turn of the chat template
        (generation prompt added); else the text, opened by the tokenizer's BOS where the family
        prepends one and the text does not already start with it (a rendered chat template)."""
        if chat:
            return self.encode_chat(self.chat([{"role": "user", "content": text}]))
        ids = self.encode(text)
        if not self.family.prepend_bos or self.bos_id is None or ids[:1] == [self.bos_id]:
            return ids
        return [self.bos_id, *ids]

    def encode_chat(self, rendered: str) -> list[int]:
        """The ids of a conversation `chat()` rendered: its tokens as they are (the template writes
        whatever BOS the authors feed)."""
        return self.encode(rendered)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special tokens)."""
        specials = set(self.hf.all_special_ids) | {self.mask_id}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in specials:
                out[i] = len(self.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out


def _load_hf(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # it warns that config.json's model_type is not a tokenizer's
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as first:  # remote tokenizer classes, odd configs: fall back to tokenizer.json
        file = path / "tokenizer.json"
        if not file.is_file():
            raise PretrainedError(f"cannot load the tokenizer in {path}: {first}") from first
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text())
        specials = {
            k: v
            for k, v in config.items()
            if k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token") and isinstance(v, str)
        }
        hf = PreTrainedTokenizerFast(tokenizer_file=str(file), **specials)
        template = config.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        hf.chat_template = template
        return hf
    finally:
        logging.set_verbosity(verbosity)


def open_tokenizer(
    path: str | Path,
    *,
    family: Family,
    mask_id: int,
    model_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> PretrainedTokenizer:
    """The tokenizer in `path`; checked against the model's vocabulary size when given."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        hint = (
            "; MDLM/BD3-LM checkpoints ship none: pass --tokenizer DIR with a local GPT-2 tokenizer"
            if not family.tokenizer_shipped
            else "; pass --tokenizer DIR"
        )
        raise PretrainedError(f"no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)}){hint}")
    tok = PretrainedTokenizer(_load_hf(path), mask_id=mask_id, family=family, path=path)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise PretrainedError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the model in "
            f"{model_dir or path} only {vocab_size}: they do not belong together"
        )
    return tok
