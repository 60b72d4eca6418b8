import pytest
import torch
from conftest import MASK, VOCAB, tiny_model

from unmask.config import ConfigError, ModelConfig
from unmask.models.kv_cache import KVCache


def test_output_shapes_and_embeds_hook():
    model = tiny_model("bidirectional")
    x = torch.randint(0, VOCAB - 1, (2, 12))
    out = model(x)
    assert out.logits.shape == (2, 12, VOCAB) and out.hidden.shape == (2, 12, 32)
    again = model(embeds=model.embed(x))
    assert torch.equal(out.logits, again.logits)


def test_causal_model_ignores_the_future():
    model = tiny_model("causal")
    x = torch.randint(0, VOCAB - 1, (1, 10))
    y = x.clone()
    y[0, 7:] = 3
    assert torch.allclose(model(x).logits[:, :7], model(y).logits[:, :7], atol=1e-6)


@pytest.mark.parametrize("attention,block", [("block_causal", 4), ("causal", 1)])
def test_cached_logits_equal_uncached(attention, block):
    """Block by block against the cache == one uncached pass over the whole sequence."""
    model = tiny_model(attention, block_size=block)
    x = torch.randint(0, VOCAB - 1, (2, 16))
    x[:, 12:14] = MASK
    full = model(x).logits
    cache = KVCache(2, 2, 4, 8, 16)
    step = 4
    for start in range(0, 16, step):
        # Denoise the block twice (scratch writes) before committing: the prefix stays fixed.
        model(torch.full((2, step), MASK), cache=cache)
        out = model(x[:, start : start + step], cache=cache).logits
        assert torch.allclose(out, full[:, start : start + step], atol=1e-5)
        cache.commit(step)


def test_kv_cache_overflow_and_bad_commit():
    cache = KVCache(1, 1, 1, 2, 4)
    with pytest.raises(ValueError, match="overflow"):
        cache.write(0, torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))
    with pytest.raises(ValueError, match="cannot commit"):
        cache.commit(5)


def test_bad_model_config_names_the_flag():
    with pytest.raises(ConfigError, match="--model.dim"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError, match="--model.block_size"):
        ModelConfig(block_size=0)
