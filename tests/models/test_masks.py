import torch

from unmask.models import masks


def test_block_causal_structure():
    idx = torch.arange(8)
    m = masks.dense_mask(masks.block_causal(4), idx, idx)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    expected[4:, :] = True
    assert torch.equal(m, expected)


def test_block_size_one_is_causal_and_full_block_is_bidirectional():
    idx = torch.arange(6)
    assert torch.equal(
        masks.dense_mask(masks.block_causal(1), idx, idx), masks.dense_mask(masks.causal, idx, idx)
    )
    assert masks.dense_mask(masks.block_causal(6), idx, idx).all()


def test_bd3_train_mask_quadrants():
    L, Lb = 8, 2
    idx = torch.arange(2 * L)
    m = masks.dense_mask(masks.bd3_train(L, Lb), idx, idx)
    blk = (idx % L) // Lb
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L
            if qn and kn:
                want = blk[q] == blk[k]
            elif qn and not kn:
                want = blk[q] > blk[k]
            elif not qn and not kn:
                want = blk[q] >= blk[k]
            else:
                want = False
            assert bool(m[q, k]) == bool(want), (q, k)
