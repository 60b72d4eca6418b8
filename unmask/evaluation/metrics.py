"""Sample-quality metrics on token (or word) sequences: unigram entropy, rep-n, distinct-n, the
longest repeated span."""

from __future__ import annotations

import numpy as np


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical token distribution of one sample (0 for an empty one)."""
    if not ids:
        return 0.0
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def rep_n(ids: list[int], n: int) -> float:
    """Fraction of a sample's n-grams that repeat an earlier n-gram of the same sample:
    1 - #distinct n-grams / #n-grams (0 when it has no n-gram)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(samples: list[list], n: int) -> float:
    """Distinct n-grams across all samples / all n-grams (1 = no n-gram repeats anywhere)."""
    grams = [tuple(s[i : i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_repeated_span(seq: list) -> int:
    """Length of the longest run of items that occurs at least twice in `seq` (overlaps allowed)."""

    def repeats(length: int) -> bool:
        seen = set()
        for i in range(len(seq) - length + 1):
            gram = tuple(seq[i : i + length])
            if gram in seen:
                return True
            seen.add(gram)
        return False

    lo, hi = 0, max(len(seq) - 1, 0)  # a repeat of length k implies one of every length < k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if repeats(mid) else (lo, mid - 1)
    return lo


def repetition(samples: list[list]) -> dict[str, float]:
    """rep-2..4 (mean over samples), distinct-1..4 (across samples), longest repeated span (mean)."""
    out = {f"rep{n}": float(np.mean([rep_n(s, n) for s in samples])) for n in (2, 3, 4)}
    out |= {f"distinct{n}": distinct_n(samples, n) for n in (1, 2, 3, 4)}
    out["longest_repeat"] = float(np.mean([longest_repeated_span(s) for s in samples]))
    return out
