"""Per-row random streams: row r of a batch draws from its own generator (seeded by the sample's
global index), so a row's output never depends on which rows share its batch."""

from __future__ import annotations

import torch


def row_generators(seed: int, rows: range | list[int]) -> list[torch.Generator]:
    """Row r's generator: seeded by `seed * 1_000_003 + r`, taken mod 2**64 so that every seed in
    [0, 2**63) is valid (the streams of seeds below ~1.8e13 are unchanged by the modulus)."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + r) % (1 << 64)) for r in rows]


def row_uniform(
    generators: list[torch.Generator],
    n: int,
    device: torch.device | str = "cpu",
    rows: list[bool] | None = None,
) -> torch.Tensor:
    """[B, n] float64 uniforms in [0, 1), row b from generators[b]. With `rows`, only the rows marked
    True draw (the others get zeros and their streams do not move): a row that has nothing left to
    decide must not consume draws that it would not consume decoded alone."""
    draw = [True] * len(generators) if rows is None else rows
    u = [
        torch.rand(n, generator=g, dtype=torch.float64) if d else torch.zeros(n, dtype=torch.float64)
        for g, d in zip(generators, draw, strict=True)
    ]
    return torch.stack(u).to(device)
