"""The kernel properties `unmask.models.invariant` builds on, checked on this machine's kernels.

Each op must give a row the same bits whatever else its call holds: more rows (batch-mates, the
rest of an uncached prefix), more keys beyond the ones the row sees, or a different place in the
tensor. `tests/decoding/test_invariance.py` reruns this file under every SIMD path and thread count
the suite exercises.
"""

import torch
from torch import nn

from unmask.models import invariant, masks


def test_linear_rows_do_not_depend_on_the_call_size():
    torch.manual_seed(0)
    for K, N in [(32, 96), (86, 32), (256, 768)]:
        layer = nn.Linear(K, N, bias=False)
        x = torch.randn(300, K)
        with torch.inference_mode():
            full = invariant.linear(layer, x)
            for M in list(range(1, 60)) + [63, 64, 65, 129]:
                for lo in (0, 7):
                    assert torch.equal(invariant.linear(layer, x[lo : lo + M]), full[lo : lo + M]), (
                        K,
                        N,
                        M,
                        lo,
                    )
            x3 = x[:24].view(3, 8, K)  # [B, T, K] inputs flatten to rows
            assert torch.equal(invariant.linear(layer, x3[:, 2:5]), full[:24].view(3, 8, N)[:, 2:5])


def test_attention_of_a_query_ignores_keys_it_does_not_see_and_batch_mates():
    torch.manual_seed(0)
    B, H, Dh = 3, 4, 8
    for S, L in [(12, 4), (150, 4), (200, 16)]:  # up to four chunks of keys
        q, k, v = (torch.randn(B, H, S, Dh) for _ in range(3))
        pos = torch.arange(S)
        mask = masks.dense_mask(masks.block_causal(L), pos, pos)
        with torch.inference_mode():
            full = invariant.attention(q, k, v, mask)
            for lo in range(0, S, L):
                hi = min(lo + L, S)  # the cached block: its queries against exactly the visible keys
                alone = invariant.attention(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[lo:hi, :hi])
                assert torch.equal(alone, full[:, :, lo:hi]), (S, lo)
            assert torch.equal(invariant.attention(q[1:2], k[1:2], v[1:2], mask), full[1:2])
            causal = masks.dense_mask(masks.causal, pos, pos)
            whole = invariant.attention(q, k, v, causal)
            for t in [t for t in (0, 1, 63, 64, S - 1) if t < S]:
                s = slice(0, t + 1)
                one = invariant.attention(q[:, :, t : t + 1], k[:, :, s], v[:, :, s], causal[t : t + 1, s])
                assert torch.equal(one, whole[:, :, t : t + 1]), (S, t)
            reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-6)


def test_the_probed_row_counts():
    for dtype in (torch.float32, torch.bfloat16):  # bf16: the GEMMs of CPU autocast
        served = invariant._served_rows(torch.get_num_threads(), dtype)
        assert served == sorted(served) and served[-1] == invariant.PROBE_ROWS + 1
    for M in range(1, 2 * invariant.PROBE_ROWS):
        rows = invariant.gemm_rows(M)
        assert rows >= M and invariant.gemm_rows(rows) == rows


def test_attention_rows_do_not_depend_on_the_query_count():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 48, 16) for _ in range(3))
    everything = torch.ones(48, 48, dtype=torch.bool)
    with torch.inference_mode():
        full = invariant.attention(q, k, v, everything)
        for T in range(1, 25):
            for lo in (0, 5):
                alone = invariant.attention(q[:, :, lo : lo + T], k, v, everything[lo : lo + T])
                assert torch.equal(alone, full[:, :, lo : lo + T]), T


def test_unmasked_attention_rows_do_not_depend_on_batch_mates():
    torch.manual_seed(4)
    for H, Dh, T in [(1, 32, 5), (1, 8, 9), (2, 8, 16), (2, 64, 13), (4, 8, 300)]:
        q, k, v = (torch.randn(4, H, T, Dh) for _ in range(3))
        with torch.inference_mode():
            full = invariant.attention(q, k, v, None)
            for b in range(4):
                row = slice(b, b + 1)
                assert torch.equal(invariant.attention(q[row], k[row], v[row], None), full[row])


def test_key_masks_hide_left_padding_like_sdpa():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[0, :3] = False
    mask = masks.with_key_mask(None, key_mask, 10)[:, None]  # [B, 1, T, S]
    with torch.inference_mode():
        ours = invariant.attention(q, k, v, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-6)


def test_activations_do_not_depend_on_the_place_in_the_tensor():
    x = torch.randn(5000) * 4
    with torch.inference_mode():
        for name, fn in [
            ("silu", invariant.silu),
            ("gelu", invariant.gelu),
            ("sigmoid", invariant.sigmoid),
            ("gelu-tanh", lambda x: invariant.gelu(x, "tanh")),
        ]:
            full = fn(x)
            for lo in range(0, 40, 3):
                for n in (1, 2, 3, 5, 7, 8, 13, 17, 33):
                    assert torch.equal(fn(x[lo : lo + n].clone()), full[lo : lo + n]), (name, lo, n)
            reference = {
                "silu": torch.nn.functional.silu,
                "gelu": torch.nn.functional.gelu,
                "sigmoid": torch.sigmoid,
                "gelu-tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
            }[name]
            torch.testing.assert_close(full, reference(x), rtol=1e-5, atol=1e-6)


def test_row_sums_are_each_rows_own():
    torch.manual_seed(2)
    for V in (67, 40_000, 151_000):
        x = torch.rand(8, V)
        full = invariant.row_sum(x)
        for n in (1, 2, 3):
            assert torch.equal(invariant.row_sum(x[:n]), full[:n]), (V, n)
        torch.testing.assert_close(full, x.sum(-1))


def test_routing_reaches_modules_we_do_not_own_only_on_the_invariant_path(monkeypatch):
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        fused = layer(x)
        with invariant.routed(x):
            routed = layer(x)  # 3 rows: padded to a row count the large-call kernel serves
            by_name = nn.functional.linear(x, layer.weight, bias=layer.bias)
        assert torch.equal(routed, invariant.linear(layer, x)) and torch.equal(by_name, routed)
        torch.testing.assert_close(routed, fused)
        with invariant.routed(x):
            a = nn.functional.scaled_dot_product_attention(
                *(torch.randn(1, 2, 5, 4) for _ in range(3)), is_causal=True
            )
        assert a.shape == (1, 2, 5, 4)
    padded = []
    monkeypatch.setattr(invariant, "_gemm", lambda x, fn: padded.append(x.shape) or fn(x))
    with torch.inference_mode(), invariant.routed(x):
        layer(x)
    assert padded == [(3, 8)]
    with invariant.routed(x.requires_grad_()):  # autograd on: nothing routed
        layer(x).sum().backward()
    assert padded == [(3, 8)] and layer.weight.grad is not None


def test_training_keeps_the_fused_kernels():
    layer = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    assert not invariant.active(x) or not torch.is_grad_enabled()
    invariant.linear(layer, x).sum().backward()  # autograd through the ordinary path
    assert x.grad is not None
    with torch.inference_mode():
        assert invariant.active(torch.zeros(1))
