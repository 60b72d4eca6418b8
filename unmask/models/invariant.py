"""Batch- and path-invariant inference ops: a row's numbers never depend on its call's shape.

The decode loop promises that a row's tokens do not depend on its batch-mates and that the exact
KV cache changes nothing. Both compare the *same* row computed inside calls of different shapes
(batch 1 vs N; a cached block of L' queries vs the same queries inside the full uncached prefix),
and a categorical draw or a ranking flips on a last-bit difference. CPU kernels give such
differences (measured, docs/results.md, "Batch and cache invariance"):

- fp32 GEMM (MKL): rows of a call with fewer than 12 rows take another kernel (1-3 rows on one
  thread; 1-11 except multiples of 4 on two), and differ from the same rows in a larger call;
- SDPA's CPU kernel blocks its keys by the query count, so a cached block's attention differs from
  the same queries in the uncached pass, and with few rows x heads it also splits its work
  differently for a batch of one;
- vectorised SiLU, GELU and sigmoid compute a tensor's scalar tail differently from its body, so a
  value depends on where it sits in the tensor;
- a reduction along rows of a tensor with fewer rows than threads is split between the threads.

So under inference on CPU (no autograd) the models call these instead: GEMMs whose row count is
one the large-call kernel serves (`gemm_rows`, probed on the machine; other counts are padded with
zero rows), attention as GEMMs over fixed chunks of absolute key positions with such query counts
(so each query's sums run over the same keys in the same order however many queries and keys share
the call),
activations composed of ops whose SIMD and scalar paths agree (`exp`, `tanh`, `erf`, IEEE
arithmetic), and long row reductions with at least one row per thread. Training keeps the fused
kernels (autograd on), and so does CUDA, whose kernels are not covered by this construction.
`tests/models/test_invariant.py` checks each kernel property on the machine it runs on, under every
SIMD path and thread count the suite exercises.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

PROBE_ROWS = 48  # row counts probed for the large-call GEMM kernel; larger calls always use it
KEY_CHUNK = 64  # attention keys summed per chunk (GEMM reductions this short never split)
SCORES_BUDGET = 1 << 24  # attention score elements per chunk of queries (64 MiB in fp32)
GRAIN = 32768  # ATen's parallel grain: smaller reductions never split between threads


_FUSED = [False]  # set inside `fused()`


def active(x: torch.Tensor) -> bool:
    """Whether the invariant path applies: inference (no autograd) on a CPU tensor."""
    return not _FUSED[0] and x.device.type == "cpu" and not torch.is_grad_enabled()


@contextmanager
def fused() -> Iterator[None]:
    """Inference on the fused kernels (SDPA, MKL at any row count) inside the block: what the
    invariant path costs is measured against it (`unmask bench invariance`); batch and cache
    invariance are not promised there."""
    before = _FUSED[0]
    _FUSED[0] = True
    try:
        yield
    finally:
        _FUSED[0] = before


_SERVED: dict[tuple[int, torch.dtype], list[int]] = {}  # (threads, GEMM dtype) -> served row counts


def _served_rows(threads: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """Row counts M <= PROBE_ROWS whose rows come out of `F.linear` and batched `matmul` in `dtype`
    bit-equal to the same rows in a large call, probed once per thread count and dtype (a few ms).
    On this project's AVX2 EPYC in fp32: M >= 12 or a multiple of 4 on two threads, M >= 4 on one;
    the kernel choice is MKL's (oneDNN's for bf16) and differs between CPUs, so it is measured
    here rather than assumed."""
    key = (threads, dtype)
    if key not in _SERVED:
        g = torch.Generator().manual_seed(0)
        ok = set(range(1, PROBE_ROWS + 1))
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            for K, N in ((32, 96), (128, 40)):
                x = torch.randn(4 * PROBE_ROWS, K, generator=g).to(dtype)
                w = torch.randn(N, K, generator=g).to(dtype)
                full = F.linear(x, w)
                ok = {M for M in ok if torch.equal(F.linear(x[:M], w), full[:M])}
            q = torch.randn(3, 4 * PROBE_ROWS, 16, generator=g).to(dtype)
            kt = torch.randn(3, 16, 70, generator=g).to(dtype)
            full = q @ kt
            ok = {M for M in ok if torch.equal(q[:, :M] @ kt, full[:, :M])}
        _SERVED[key] = sorted(ok) + [PROBE_ROWS + 1]
    return _SERVED[key]


def gemm_rows(M: int, dtype: torch.dtype = torch.float32) -> int:
    """The row count a GEMM of M rows in `dtype` runs with: the smallest count >= M that the
    large-call kernel serves on this machine (M itself past PROBE_ROWS); extra rows are zero padding."""
    if M > PROBE_ROWS:
        return M
    return next(m for m in _served_rows(torch.get_num_threads(), dtype) if m >= M)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on `x` runs in: CPU autocast's when it is on, else x's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [M, ...] with zero rows appended up to `rows`."""
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + x.shape[1:])]) if rows > x.shape[0] else x


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for x [..., K]; on the invariant path every row goes through the large-call GEMM."""
    return _gemm(x, layer) if active(x) else layer(x)


def _gemm(x: torch.Tensor, fn) -> torch.Tensor:
    """fn(x) for a row-wise GEMM `fn` of x [..., K], its rows padded to a count `gemm_rows` allows."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    M = rows.shape[0]
    n = gemm_rows(M, _gemm_dtype(x))
    if n == M:
        return fn(x)
    return fn(_pad_rows(rows, n))[:M].reshape(*x.shape[:-1], -1)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, T, Dh], k/v [B, H, S, Dh] (scale 1/sqrt(Dh) by
    default); mask None, bool (True = attend) or additive float, [T, S] / [B, 1|H, T, S]. Off the
    invariant path: SDPA.

    A query's sums must not depend on how many keys its call holds beyond the ones it sees (a
    cached block holds exactly its visible keys; the same query in the uncached pass holds the
    whole canvas, the rest masked): the keys are cut into chunks of `KEY_CHUNK` absolute positions
    (the last one zero-padded), each chunk is reduced on its own (one fixed-length sum, one GEMM
    with K = KEY_CHUNK), and the chunks are added in order, so keys a query does not see add
    exact zeros. Unmasked calls take the same path: SDPA's CPU kernel is not batch-invariant
    either when rows x heads are few (a batch of one row with one head, measured)."""
    if not active(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    B, H, T, Dh = q.shape
    S = k.shape[2]
    n = -(-S // KEY_CHUNK)  # key chunks
    Sp = n * KEY_CHUNK
    if Sp > S:  # zero keys and values; their scores are set to -inf below
        k = torch.cat([k, k.new_zeros(B, H, Sp - S, Dh)], dim=2)
        v = torch.cat([v, v.new_zeros(B, H, Sp - S, Dh)], dim=2)
    q = q * (1.0 / math.sqrt(Dh) if scale is None else scale)
    kt = k.transpose(-1, -2)  # [B, H, Dh, Sp]: GEMMs of every call see whole chunks of keys
    rows = max(PROBE_ROWS + 1, SCORES_BUDGET // max(1, B * H * Sp))  # queries per pass of the loop
    out = []
    for lo in range(0, T, rows):
        hi = min(lo + rows, T)
        nq = gemm_rows(hi - lo, _gemm_dtype(q))  # padded query rows (attending everywhere) are sliced off
        qc = q[:, :, lo:hi]
        if nq > hi - lo:
            qc = torch.cat([qc, qc.new_zeros(B, H, nq - (hi - lo), Dh)], dim=2)
        scores = qc @ kt  # [B, H, nq, Sp]
        blocked = None  # [.., nq, S] keys the query must not see
        if mask is not None:
            m = mask[..., lo:hi, :]
            if nq > hi - lo:  # padded queries attend everywhere
                pad = m.shape[:-2] + (nq - (hi - lo), S)
                m = torch.cat([m, m.new_ones(pad) if m.dtype == torch.bool else m.new_zeros(pad)], dim=-2)
            if m.dtype == torch.bool:
                blocked = ~m
                scores[..., :S].masked_fill_(blocked, -torch.inf)
            else:
                scores[..., :S] += m
                blocked = m <= torch.finfo(m.dtype).min  # transformers' "no" in additive masks
        scores[..., S:] = -torch.inf
        # exp of scores at most 87 below the row's max: exp of a far smaller (or -inf) input takes
        # the CPU's slow underflow path (2.5x slower, measured); what would underflow is set to an
        # exact 0 below, so unseen keys still add exact zeros
        e = scores.sub_(scores.amax(-1, keepdim=True)).clamp_min_(-87.0).exp_()
        e[..., S:] = 0.0
        if blocked is not None:
            e[..., :S].masked_fill_(blocked, 0.0)
        total = e.view(B, H, nq, n, KEY_CHUNK).sum(-1).cumsum(-1)[..., -1:]  # [B, H, nq, 1]
        pv = e[..., :KEY_CHUNK] @ v[:, :, :KEY_CHUNK]  # [B, H, nq, Dh], then the chunks in order
        for c in range(1, n):
            pv = (
                pv
                + e[..., c * KEY_CHUNK : (c + 1) * KEY_CHUNK] @ v[:, :, c * KEY_CHUNK : (c + 1) * KEY_CHUNK]
            )
        out.append((pv / total)[:, :, : hi - lo])
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention`'s signature on `attention` (inference: no dropout)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    if is_causal:
        T, S = q.shape[-2], k.shape[-2]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    return attention(q, k, v, attn_mask, scale)


class _Routed(torch.overrides.TorchFunctionMode):
    """Sends the calls of code we do not own (transformers' modeling files) to the invariant ops.
    Every torch call of the forward passes here, so the common case (not a routed function) is
    one set lookup."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _ROUTED:
            return func(*args, **kwargs)
        if args and isinstance(args[0], torch.Tensor) and active(args[0]):
            if func is F.linear:  # (input, weight, bias), positional or by name
                given = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
                weight, bias = given["weight"], given.get("bias")
                return _gemm(given["input"], lambda rows: F.linear(rows, weight, bias))
            if func is F.scaled_dot_product_attention and not kwargs.get("dropout_p"):
                return _sdpa(*args, **kwargs)
            if func is F.silu:
                return silu(args[0])
            if func in (torch.sigmoid, torch.Tensor.sigmoid):
                return sigmoid(args[0])
            if func is F.gelu:
                return gelu(args[0], kwargs.get("approximate", "none"))
        return func(*args, **kwargs)


_ROUTED = frozenset(
    {F.linear, F.scaled_dot_product_attention, F.silu, torch.sigmoid, torch.Tensor.sigmoid, F.gelu}
)


@contextmanager
def routed(x: torch.Tensor) -> Iterator[None]:
    """Inside the block, `F.linear`, SDPA, SiLU, sigmoid and GELU calls of any module run the
    invariant ops when `x` (the forward's input) is on the invariant path (the pretrained adapters
    wrap transformers' forward); elsewhere (training, CUDA) nothing is routed."""
    if not active(x):
        yield
        return
    with _Routed():
        yield


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x)) if active(x) else torch.sigmoid(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x)) if active(x) else F.silu(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if not active(x):
        return F.gelu(x, approximate=approximate)
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1 + torch.erf(x * (1 / math.sqrt(2))))


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] sum over V in each row's own serial order, however few rows there are."""
    N, V = x.shape
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or N >= threads or N * V < GRAIN:
        return x.sum(-1)
    return _pad_rows(x, threads).sum(-1)[:N]
