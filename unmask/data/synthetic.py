"""Synthetic corpora with known answers: `--data synthetic:NAME[,key=value...]`.

Each is deterministic by its seed, any size, and has an exact validity metric (`unmask eval
validity`), so a decoding method's effect can be checked where the right answer is known:

- `codebook` — documents are runs of chunks, each chunk one of `codewords` fixed words of `chunk`
  symbols. Exact sequential sampling from a well-trained model gives valid chunks; committing several
  positions of one chunk in a single step from their *marginals* mixes codewords and breaks chunks
  (what ADJUST's refresh must repair). Metric: fraction of valid chunks.
- `markov` — a sparse Markov chain: each symbol has `succ` allowed successors (uniform), so most
  masked positions become confident once a neighbour is known. Metric: rate of forbidden bigrams.

Symbols are written as space-separated words (`c17`), so any tokenizer sees them whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


class SyntheticError(ValueError):
    """A bad `synthetic:` spec; the message names the option."""


@dataclass(frozen=True)
class Codebook:
    codewords: int = 16  # distinct words
    chunk: int = 4  # symbols per word
    alphabet: int = 24  # distinct symbols
    docs: int = 2000  # documents
    length: int = 32  # chunks per document
    seed: int = 0

    def words(self) -> np.ndarray:
        """[codewords, chunk] symbol ids (distinct words)."""
        rng = np.random.default_rng(self.seed)
        out: dict[tuple[int, ...], None] = {}
        while len(out) < self.codewords:
            out[tuple(rng.integers(0, self.alphabet, self.chunk).tolist())] = None
        return np.array(list(out))

    def documents(self) -> list[str]:
        words = self.words()
        rng = np.random.default_rng(self.seed + 1)
        picks = rng.integers(0, self.codewords, (self.docs, self.length))
        return [" ".join(f"c{s}" for s in words[row].ravel()) for row in picks]

    def validity(self, text: str) -> tuple[int, int]:
        """(valid chunks, chunks) of a text at its best alignment (the first chunk may be cut)."""
        symbols = _symbols(text, "c")
        valid_words = {tuple(w) for w in self.words().tolist()}
        best = (0, 0)
        for offset in range(self.chunk):
            chunks = [
                tuple(symbols[i : i + self.chunk])
                for i in range(offset, len(symbols) - self.chunk + 1, self.chunk)
            ]
            score = (sum(c in valid_words for c in chunks), len(chunks))
            if score[1] and (best[1] == 0 or score[0] / score[1] > best[0] / best[1]):
                best = score
        return best


@dataclass(frozen=True)
class Markov:
    vocab: int = 64  # distinct symbols
    succ: int = 3  # allowed successors per symbol
    docs: int = 2000
    length: int = 96  # symbols per document
    seed: int = 0

    def successors(self) -> np.ndarray:
        """[vocab, succ] the allowed next symbols of each symbol."""
        rng = np.random.default_rng(self.seed)
        return np.stack([rng.choice(self.vocab, self.succ, replace=False) for _ in range(self.vocab)])

    def documents(self) -> list[str]:
        nxt = self.successors()
        rng = np.random.default_rng(self.seed + 1)
        out = []
        for _ in range(self.docs):
            s = [int(rng.integers(self.vocab))]
            for c in rng.integers(0, self.succ, self.length - 1):
                s.append(int(nxt[s[-1], c]))
            out.append(" ".join(f"m{x}" for x in s))
        return out

    def validity(self, text: str) -> tuple[int, int]:
        """(allowed bigrams, bigrams) of a text."""
        symbols = _symbols(text, "m")
        allowed = {(a, int(b)) for a, row in enumerate(self.successors()) for b in row}
        pairs = list(zip(symbols, symbols[1:], strict=False))
        return sum(p in allowed for p in pairs), len(pairs)


def _symbols(text: str, prefix: str) -> list[int]:
    """Symbol ids of the words of `text`; any other word counts as an invalid symbol (-1)."""
    out = []
    for w in text.split():
        body = w[len(prefix) :]
        out.append(int(body) if w.startswith(prefix) and body.isdigit() else -1)
    return out


TASKS = {"codebook": Codebook, "markov": Markov}


def parse(spec: str):
    """`synthetic:NAME[,key=value...]` -> the task object."""
    name, *options = spec.removeprefix("synthetic:").split(",")
    if name not in TASKS:
        raise SyntheticError(f"corpus {spec!r}: unknown synthetic task {name!r}; known: {', '.join(TASKS)}")
    cls = TASKS[name]
    known = {f.name for f in fields(cls)}
    values = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or key not in known:
            raise SyntheticError(
                f"corpus {spec!r}: option {opt!r} is not key=value with key in {sorted(known)}"
            )
        try:
            values[key] = int(value)
        except ValueError as e:
            raise SyntheticError(f"corpus {spec!r}: {key}={value!r} is not an integer") from e
    task = cls(**values)
    if isinstance(task, Codebook) and task.alphabet**task.chunk < task.codewords:
        raise SyntheticError(
            f"corpus {spec!r}: {task.alphabet}^{task.chunk} symbol strings cannot make "
            f"{task.codewords} distinct codewords"
        )
    if isinstance(task, Markov) and not 1 <= task.succ <= task.vocab:
        raise SyntheticError(f"corpus {spec!r}: succ must be in [1, vocab={task.vocab}], got {task.succ}")
    return task


def documents(spec: str) -> list[tuple[str, str]]:
    """Keyed documents of a synthetic corpus (keys decide the train/validation/test split)."""
    return [(f"{spec}#{i}", doc) for i, doc in enumerate(parse(spec).documents())]


def validity(spec: str, texts: list[str]) -> dict[str, float]:
    """The task's exact metric over `texts`: codebook -> valid chunk fraction, markov -> forbidden
    bigram rate (and the counts behind them)."""
    task = parse(spec)
    good, total = (sum(x) for x in zip(*(task.validity(t) for t in texts), strict=True)) if texts else (0, 0)
    if isinstance(task, Codebook):
        return {"valid_chunks": good / max(total, 1), "chunks": total}
    return {"forbidden_bigram_rate": 1 - good / max(total, 1), "bigrams": total}
