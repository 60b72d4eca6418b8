"""Pretrained families: tiny random models in each family's own layout, against independent references."""

import json
import shutil

import pytest
import torch
from pretrained_layouts import BLOCK, FAMILIES, write_family, write_gpt2_like_tokenizer

from unmask.config import replace
from unmask.decoding.generate import DecodeError, final_state, generate
from unmask.decoding.plan import plan_decode
from unmask.decoding.presets import PRESETS, preset_config
from unmask.decoding.rng import row_generators
from unmask.decoding.sample import sample
from unmask.models.checkpoint import load_checkpoint
from unmask.models.pretrained.families import PretrainedError
from unmask.schedules import LogLinear

SHIFTED = {"dream", "fast-dllm-v2"}
BLOCK_CAUSAL = [f for f in FAMILIES if f in BLOCK]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    refs = {f: write_family(f, root / f) for f in FAMILIES}
    write_gpt2_like_tokenizer(root / "gpt2")
    return root, refs


def load(family_dirs, family, **kw):
    root, _ = family_dirs
    tok = root / "gpt2" if family in ("mdlm", "bd3lm") else None
    return load_checkpoint(root / family, tokenizer=tok, dtype="fp32", **kw)


def tokens(B=2, T=13, seed=0):
    return torch.randint(0, 44, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_native_reference(family_dirs, family):
    model = load(family_dirs, family).model
    x = tokens()
    with torch.no_grad():
        ours, ref = model(x).logits, family_dirs[1][family](x)
    if family in SHIFTED:  # canvas position i is predicted by the model's output at i - 1
        torch.testing.assert_close(ours[:, 1:], ref[:, :-1], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", BLOCK_CAUSAL)
def test_block_causal_cache_equals_full_pass(family_dirs, family):
    """Real block-causal decoding: prompt prefill, then per block a denoising call against the
    cache and a clean commit pass; each block's logits equal the uncached pass over everything."""
    model = load(family_dirs, family).model
    Lb = model.cfg.block_size
    x = tokens(T=4 * Lb)
    canvas = x.clone()
    canvas[:, 2 * Lb :] = model.mask_id  # blocks 2 and 3 still masked
    kv = model.new_cache(2, 4 * Lb, "cpu")
    with torch.no_grad():
        model(x[:, :Lb], cache=kv)
        kv.commit(Lb)
        for b in (1, 2, 3):
            lo, hi = b * Lb, (b + 1) * Lb
            noisy = canvas[:, lo:hi]
            cached = model(noisy, cache=kv).logits
            full = model(torch.cat([x[:, :lo], noisy], 1)).logits[:, lo:hi]
            torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
            model(x[:, lo:hi], cache=kv)  # commit the clean block
            kv.commit(Lb)


@pytest.mark.parametrize("family", BLOCK_CAUSAL)
def test_generate_with_cache_equals_without(family_dirs, family):
    loaded = load(family_dirs, family)
    prompt = tokens(T=6)
    outs = []
    for cache in ("prefix", "none"):
        cfg = preset_config("bd3lm", max_new_tokens=12)
        states = generate(
            loaded.model,
            plan_decode(
                loaded.model,
                replace(cfg, steps=12, cache=cache),
            ),
            prompt=prompt,
            generators=row_generators(0, [0, 1]),
        )
        outs.append(final_state(states).tokens)
    assert torch.equal(*outs)


@pytest.mark.parametrize("family", ["llada", "dream", "mdlm"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_bidirectional_caches_equal_the_full_pass_on_an_unchanged_canvas(family_dirs, family, cache):
    model = load(family_dirs, family).model
    x = tokens(T=16)
    lo, hi = 8, 12
    with torch.no_grad():
        full = model(x).logits
        kv = model.new_cache(2, 16, "cpu")
        model(x, cache=kv)
        if cache == "prefix":
            kv.commit(lo)
            part = model(x[:, lo:], cache=kv).logits[:, : hi - lo]
        else:
            kv.commit(16)
            kv.seek(lo)
            part = model(x[:, lo:hi], cache=kv).logits
            kv.seek(None)
    torch.testing.assert_close(part, full[:, lo:hi], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", [p for p in PRESETS if PRESETS[p].get("refresh") != "sampler"])
def test_every_preset_on_every_family(family_dirs, family, preset):
    model = load(family_dirs, family).model
    prompt = tokens(B=2, T=5, seed=1)
    cfg = preset_config(preset, max_new_tokens=8, steps=4)
    if cfg.ar_first_token and family != "fast-dllm-v2":  # that family's own loop, refused by name elsewhere
        with pytest.raises(DecodeError, match="ar_first_token|last output predicts"):
            final_state(
                generate(model, plan_decode(model, cfg), prompt=prompt, generators=row_generators(3, [0, 1]))
            )
        return
    if cfg.inputs == "renoise":  # DiffusionGemma's, for uniform-noise models only
        with pytest.raises(DecodeError, match="needs a uniform-noise model"):
            plan_decode(model, cfg)
        return
    run = [
        final_state(
            generate(
                model,
                plan_decode(
                    model,
                    replace(cfg, block_len=min(cfg.block_len, 8)),
                ),
                prompt=prompt,
                generators=row_generators(3, [0, 1]),
            )
        )
        for _ in range(2)
    ]
    final = run[0]
    assert torch.equal(final.tokens[:, :5], prompt)
    assert final.tokens.shape == (2, 13)
    if model.subs:  # models whose reference loops keep [MASK] in the softmax may leave one (as LLaDA's does)
        assert not (final.tokens == model.mask_id).any()
    assert torch.equal(run[1].tokens, final.tokens)


def llada_reference(
    model,
    prompt,
    *,
    steps,
    gen_length,
    block_length,
    mask_id,
    attention_mask=None,
    cfg_scale=0.0,
    remasking="low_confidence",
    generator=None,
):
    """LLaDA's published loop, written from its description: canvas = prompt + masks; steps split
    evenly over semi-AR blocks; per step x0 = argmax, ranked by the softmax probability of x0 over
    the full vocabulary ([MASK] included) or by a uniform draw (`random`), positions right of the
    block excluded, and the per-step count - the block's masks split evenly, the remainder to the
    first steps - committed. `attention_mask` [B, P] (left padding) is extended with ones and passed
    to the model; CFG runs a copy with the prompt masked and uses un + (s + 1)(cond - un)."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id)], 1)
    prompt_index = x != mask_id
    am = None
    if attention_mask is not None:
        am = torch.cat(
            [attention_mask, torch.ones(prompt.shape[0], gen_length, dtype=attention_mask.dtype)], 1
        )
    P = prompt.shape[1]
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n_masked = (x[:, lo:hi] == mask_id).sum(1)
        counts = torch.stack(
            [n_masked // per_block + (i < n_masked % per_block).long() for i in range(per_block)], 1
        )
        for i in range(per_block):
            with torch.no_grad():
                if cfg_scale > 0:
                    un_x = x.clone()
                    un_x[prompt_index] = mask_id
                    both = model(torch.cat([x, un_x]), None if am is None else torch.cat([am, am]))
                    cond, un = both.chunk(2)
                    logits = un + (cfg_scale + 1) * (cond - un)
                else:
                    logits = model(x, am)
            x0 = logits.argmax(-1)
            if remasking == "random":
                p = torch.rand(x0.shape, generator=generator, dtype=torch.float64)
            else:
                p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
            masked = x == mask_id
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, p, -torch.inf)
            conf[:, hi:] = -torch.inf
            for row in range(x.shape[0]):
                k = int(counts[row, i])
                if k:
                    idx = torch.topk(conf[row], k).indices
                    x[row, idx] = x0[row, idx]
    return x


@pytest.mark.parametrize("block_len", [8, 16])
def test_llada_preset_is_token_identical_to_the_reference_loop(family_dirs, block_len):
    model = load(family_dirs, "llada").model
    prompt = tokens(B=2, T=7, seed=4)
    native = family_dirs[1]["llada"]  # the independently built LlamaForCausalLM
    ref = llada_reference(
        lambda x, am: native(x, am),
        prompt.clone(),
        steps=8,
        gen_length=16,
        block_length=block_len,
        mask_id=model.mask_id,
    )
    cfg = preset_config("llada", max_new_tokens=16, steps=8, block_len=block_len, eos_fill=False)
    ours = final_state(
        generate(
            model,
            plan_decode(
                model,
                cfg,
            ),
            prompt=prompt,
            generators=row_generators(0, [0, 1]),
        )
    )
    assert torch.equal(ours.tokens, ref)


def test_chat_sampling_uses_the_template_and_stops_at_end_of_turn(family_dirs):
    loaded = load(family_dirs, "sdar")
    tok = loaded.tokenizer
    ids = tok.prompt_ids("w1 w2", chat=True)
    assert ids[0] == tok.token_id("<|user|>") and ids[-1] == tok.token_id("<|assistant|>")
    records = sample(
        loaded.model, tok, ["w1 w2"], preset_config("bd3lm", max_new_tokens=8), LogLinear(), chat=True
    )
    assert records[0]["prompt_tokens"] == len(ids)
    assert not set(records[0]["token_ids"]) & set(tok.stop_ids)


def test_mask_id_from_the_tokenizer_when_the_config_has_none(family_dirs):
    loaded = load(family_dirs, "fast-dllm-v2")  # its config.json has no mask_token_id
    assert loaded.model.mask_id == loaded.tokenizer.token_id("|<MASK>|")


# ---- bad inputs: each message names the file or field --------------------------------------------
def copy_family(family_dirs, family, tmp_path):
    dst = tmp_path / family
    shutil.copytree(family_dirs[0] / family, dst)
    return dst


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="config.json|model.safetensors"):
        load_checkpoint(tmp_path)


def test_unknown_family_lists_the_supported(family_dirs, tmp_path):
    d = copy_family(family_dirs, "sdar", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PretrainedError, match="model_type 'gpt2'.*supported: llada"):
        load_checkpoint(d)


def test_missing_shard_is_named(family_dirs, tmp_path):
    d = copy_family(family_dirs, "dream", tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    with pytest.raises(PretrainedError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(d)


def test_wrong_weight_shape_is_named(family_dirs, tmp_path):
    d = copy_family(family_dirs, "llada", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["mlp_hidden_size"] = 40
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PretrainedError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"):
        load_checkpoint(d)


def _edit(d, config=None, drop=(), add=None, rename=None):
    """Rewrite a copied directory: config.json fields, and weights dropped / added / renamed."""
    from safetensors.torch import load_file, save_file

    if config:
        raw = json.loads((d / "config.json").read_text())
        raw.update(config)
        (d / "config.json").write_text(json.dumps(raw))
    w = load_file(str(d / "model.safetensors"))
    w = {(rename or {}).get(k, k): v for k, v in w.items() if k not in drop}
    w.update(add or {})
    save_file(w, str(d / "model.safetensors"))


@pytest.mark.parametrize("family", ["dream", "fast-dllm-v2", "sdar"])
def test_a_tied_checkpoint_uses_its_embedding_as_the_output_layer(family_dirs, tmp_path, family):
    """`tie_word_embeddings: true` and no lm_head.weight (Qwen2.5-1.5B-based checkpoints ship so):
    the logits are the embedding's, as transformers' own class computes them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from unmask.models.pretrained.native import native_config

    d = copy_family(family_dirs, family, tmp_path)
    _edit(d, config={"tie_word_embeddings": True}, drop=("lm_head.weight",))
    model = load_checkpoint(d, dtype="fp32").model
    raw = json.loads((d / "config.json").read_text())
    from unmask.models.pretrained.families import detect

    hf = native_config(detect(raw), raw, "config.json")
    ref = AutoModelForCausalLM.from_config(hf)
    missing, _ = ref.load_state_dict(load_file(str(d / "model.safetensors")), strict=False)
    ref.tie_weights()
    assert missing == ["lm_head.weight"] and ref.lm_head.weight is ref.model.embed_tokens.weight
    torch.testing.assert_close(model.head.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)
    x = tokens(T=8)
    with torch.no_grad():
        out = model(x).logits
    assert torch.isfinite(out).all()
    # a tied config whose checkpoint ships a different output layer contradicts itself
    d2 = copy_family(family_dirs, family, tmp_path / "untied")
    _edit(d2, config={"tie_word_embeddings": True})
    with pytest.raises(PretrainedError, match="tie_word_embeddings is true.*lm_head.weight differs"):
        load_checkpoint(d2)


def test_an_untied_checkpoint_without_its_output_layer_says_how_to_tie_it(family_dirs, tmp_path):
    d = copy_family(family_dirs, "dream", tmp_path)
    _edit(d, drop=("lm_head.weight",))
    with pytest.raises(PretrainedError, match=r"missing \['lm_head.weight'\].*tie_word_embeddings true"):
        load_checkpoint(d)


def test_llada_without_mlp_hidden_size_uses_mlp_ratio(family_dirs, tmp_path):
    """OLMo's convention: mlp_hidden_size null -> mlp_ratio x d_model (here 1.5 x 32 = 48)."""
    base = load(family_dirs, "llada").model
    d = copy_family(family_dirs, "llada", tmp_path)
    _edit(d, config={"mlp_hidden_size": None, "mlp_ratio": 1.5})
    model = load_checkpoint(d, dtype="fp32").model
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)
    _edit(d, config={"mlp_ratio": 2})  # 64 wide: the weights say 48, and the error names them
    with pytest.raises(PretrainedError, match=r"mlp\.(gate|up|down)_proj"):
        load_checkpoint(d)


def test_llada_with_weight_tying_uses_wte_as_the_output_layer(family_dirs, tmp_path):
    d = copy_family(family_dirs, "llada", tmp_path)
    _edit(d, config={"weight_tying": True}, drop=("model.transformer.ff_out.weight",))
    model = load_checkpoint(d, dtype="fp32").model
    assert torch.equal(model.head.weight, model.tok_embed.weight)


def test_weights_the_config_does_not_describe_are_an_error(family_dirs, tmp_path):
    """No checkpoint weight is silently ignored: a config with fewer blocks / layers / experts than
    the checkpoint holds, or a stray tensor, is refused naming them."""
    d = copy_family(family_dirs, "bd3lm", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    _edit(d, config={"n_blocks": raw["n_blocks"] - 1})
    with pytest.raises(PretrainedError, match=r"n_blocks=1; the checkpoint also holds blocks \[1\]"):
        load_checkpoint(d, tokenizer=family_dirs[0] / "gpt2")
    d = copy_family(family_dirs, "mdlm", tmp_path)
    _edit(d, add={"backbone.extra.weight": torch.zeros(2)})
    with pytest.raises(PretrainedError, match="backbone.extra.weight"):
        load_checkpoint(d, tokenizer=family_dirs[0] / "gpt2")
    d = copy_family(family_dirs, "sdar", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    _edit(d, config={"num_hidden_layers": 1, "layer_types": ["full_attention"]})
    with pytest.raises(PretrainedError, match=r"unexpected \['model.layers.1"):
        load_checkpoint(d)
    _edit(d, config={"layer_types": ["full_attention"] * 3})  # transformers' own check, as our error
    with pytest.raises(PretrainedError, match="(?s)Qwen3Config refuses this config.*layer_types"):
        load_checkpoint(d)
    d = copy_family(family_dirs, "llada2", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    _edit(d, config={"num_experts": raw["num_experts"] - 1})
    with pytest.raises(PretrainedError, match="beyond config.json's num_experts"):
        load_checkpoint(d)


def test_unsupported_field_is_refused_by_name(family_dirs, tmp_path):
    d = copy_family(family_dirs, "llada2", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["use_qkv_bias"] = True
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PretrainedError, match="use_qkv_bias"):
        load_checkpoint(d)


def test_tokenizer_larger_than_the_model(family_dirs, tmp_path):
    d = copy_family(family_dirs, "mdlm", tmp_path)
    raw = json.loads((d / "config.json").read_text())
    with pytest.raises(PretrainedError, match="tokenizer"):
        load_checkpoint(d)  # MDLM ships no tokenizer: the message says to pass --tokenizer
    big = tmp_path / "big"
    big.mkdir()
    vocab = {f"t{i}": i for i in range(raw["vocab_size"] + 10)}
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(PretrainedError, match=f"{raw['vocab_size'] + 10} tokens but the model"):
        load_checkpoint(d, tokenizer=big)


def test_prompt_longer_than_the_model_allows(family_dirs):
    loaded = load(family_dirs, "mdlm")
    long = " ".join(["w1"] * (loaded.config.data.seq_len + 1))
    with pytest.raises(DecodeError, match="exceeds the model's maximum"):
        sample(
            loaded.model,
            loaded.tokenizer,
            [long],
            preset_config("mdlm", max_new_tokens=4),
            LogLinear(),
            max_len=loaded.config.data.seq_len,
        )


def fast_dllm_reference(model, prompt, *, gen_length, block_length, threshold, mask_id):
    """Fast-dLLM's threshold loop (no cache), from its description: per semi-AR block, until no
    mask is left, commit every masked position whose argmax probability exceeds the threshold, and
    at least the most confident one."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id)], 1)
    P = prompt.shape[1]
    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        while (x[:, lo:hi] == mask_id).any():
            with torch.no_grad():
                logits = model(x).logits
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
            masked = x == mask_id
            masked[:, hi:] = False
            conf = torch.where(masked, p, -torch.inf)
            for row in range(x.shape[0]):
                if not masked[row].any():
                    continue
                pick = (conf[row] > threshold) & masked[row]
                pick[conf[row].argmax()] = True
                x[row, pick] = x0[row, pick]
    return x


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fast_dllm_preset_is_token_identical_to_the_reference_loop(family_dirs, family):
    model = load(family_dirs, family).model
    prompt = tokens(B=2, T=7, seed=5)
    ref = fast_dllm_reference(
        model, prompt.clone(), gen_length=16, block_length=8, threshold=0.05, mask_id=model.mask_id
    )
    cfg = preset_config("fast-dllm", max_new_tokens=16, block_len=8, threshold=0.05, cache="none")
    ours = final_state(
        generate(
            model,
            plan_decode(
                model,
                cfg,
            ),
            prompt=prompt,
            generators=row_generators(0, [0, 1]),
        )
    )
    assert torch.equal(ours.tokens, ref)


@pytest.mark.parametrize("family", ["llada", "sdar", "bd3lm", "fast-dllm-v2"])
def test_eval_ppl_on_a_pretrained_directory(family_dirs, family, tmp_path):
    from unmask.evaluation.perplexity import heldout_perplexity

    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(
        "\n\n".join(
            " ".join(f"w{i}" for i in torch.randint(0, 40, (80,), generator=g).tolist()) for _ in range(30)
        )
    )
    loaded = load(family_dirs, family)
    kw = dict(loaded=loaded, data=str(text), seq_len=32, mc_samples=2, max_rows=4)
    if family == "fast-dllm-v2":
        with pytest.raises(PretrainedError, match="shifted block-causal"):
            heldout_perplexity(family_dirs[0] / family, **kw)
        return
    ppl = heldout_perplexity(family_dirs[0] / family, **kw)
    assert ppl.bound and ppl.rows == 4 and 1 < ppl.ppl < 10 * 64  # a random model: near-uniform, bounded


def test_public_load_pretrained_and_load_tokenizer(family_dirs):
    import unmask

    model = unmask.load_pretrained(family_dirs[0] / "fast-dllm-v2", dtype="fp32")
    tok = unmask.load_tokenizer(family_dirs[0] / "fast-dllm-v2")
    assert tok.mask_id == tok.token_id("|<MASK>|") and tok.stop_ids[0] == tok.token_id("<|im_end|>")
    assert model.cfg.attention == "block_causal" and model.cfg.block_size == BLOCK["fast-dllm-v2"]


def left_padded(seed=6):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 44, (n,), generator=g) for n in (7, 4, 5)]
    P = max(len(r) for r in rows)
    prompt = torch.full((len(rows), P), 44)  # a pad id; padding is hidden by the mask, never decoded
    mask = torch.zeros(len(rows), P, dtype=torch.bool)
    for i, r in enumerate(rows):
        prompt[i, P - len(r) :], mask[i, P - len(r) :] = r, True
    return prompt, mask


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_llada_unequal_prompts_and_cfg_match_the_reference_with_a_native_model(family_dirs, cfg_scale):
    """Left-padded batch (attention mask) and classifier-free guidance: our loop on the loaded
    model vs the reference loop on the independently built native Llama."""
    native = family_dirs[1]["llada"]
    model = load(family_dirs, "llada").model
    prompt, mask = left_padded()
    ref = llada_reference(
        lambda x, am: native(x, am),
        prompt.clone(),
        steps=8,
        gen_length=16,
        block_length=8,
        mask_id=model.mask_id,
        attention_mask=mask.long(),
        cfg_scale=cfg_scale,
    )
    cfg = preset_config("llada", max_new_tokens=16, steps=8, block_len=8, cache="none", cfg_scale=cfg_scale)
    ours = final_state(
        generate(
            model,
            plan_decode(
                model,
                cfg,
            ),
            prompt=prompt,
            prompt_mask=mask,
            generators=row_generators(0, [0, 1, 2]),
        )
    )
    assert torch.equal(ours.tokens, ref)
    assert torch.equal(ours.tokens[:, : prompt.shape[1]], prompt)  # pads stay pads


def test_left_padding_is_refused_for_block_causal_models(family_dirs):
    model = load(family_dirs, "sdar").model
    prompt, mask = left_padded()
    cfg = preset_config("bd3lm", max_new_tokens=8)
    with pytest.raises(DecodeError, match="bidirectional"):
        final_state(
            generate(
                model,
                plan_decode(
                    model,
                    cfg,
                ),
                prompt=prompt,
                prompt_mask=mask,
                generators=row_generators(0, [0, 1, 2]),
            )
        )
    with pytest.raises(DecodeError, match="cache none"):
        final_state(
            generate(
                model,
                plan_decode(
                    model,
                    replace(cfg, cfg_scale=1.0),
                ),
                prompt=prompt,
                generators=row_generators(0, [0, 1, 2]),
            )
        )


def test_random_remasking_commits_the_same_counts_in_a_seeded_order(family_dirs):
    model = load(family_dirs, "llada").model
    prompt = tokens(B=2, T=6, seed=8)
    cfg = preset_config("llada", max_new_tokens=16, steps=8, block_len=8, score="random")
    runs = [
        list(
            generate(
                model,
                plan_decode(
                    model,
                    cfg,
                ),
                prompt=prompt,
                generators=row_generators(seed, [0, 1]),
            )
        )
        for seed in (0, 0, 1)
    ]
    masks = [[int((s.tokens == model.mask_id).sum()) for s in run] for run in runs]
    assert masks[0] == masks[2] == [32 - 4 * (i + 1) for i in range(8)] + [0]  # 2 per row per step
    assert torch.equal(runs[0][-1].tokens, runs[1][-1].tokens)  # seeded
    orders = [torch.stack([(s.tokens != model.mask_id) for s in run]) for run in (runs[0], runs[2])]
    assert not torch.equal(*orders)  # a different seed, a different order


def test_dream_schedule_counts_follow_dreams_timesteps():
    """int(R (1 - s/t)) with t, s consecutive points of linspace(1, eps, S + 1); all at the last step."""
    from unmask.decoding.selectors import DreamSchedule, SelectContext

    S, R, eps = 5, 24, 1e-3
    times = torch.linspace(1, eps, S + 1, dtype=torch.float64)
    remaining, committed = R, []
    for k in range(S):
        masked = torch.zeros(1, 32, dtype=torch.bool)
        masked[0, :remaining] = True
        conf = torch.where(masked, torch.rand(1, 32, dtype=torch.float64), -torch.inf)
        c = SelectContext(
            conf, torch.ones(1, 32), torch.ones(1, 32), masked, k, S, torch.rand(1, 32).double()
        )
        n = int(DreamSchedule(eps=eps)(c).sum())
        expected = remaining if k == S - 1 else int(remaining * (1 - times[k + 1] / times[k]))
        assert n == expected
        committed.append(n)
        remaining -= n
    assert remaining == 0 and sum(committed) == R


def test_dream_preset_with_alg_temp_is_seeded(family_dirs):
    model = load(family_dirs, "dream").model
    prompt = tokens(B=2, T=6, seed=9)
    cfg = preset_config("dream", max_new_tokens=12, steps=6, alg_temp=0.5)
    out = [
        final_state(
            generate(
                model,
                plan_decode(
                    model,
                    cfg,
                ),
                prompt=prompt,
                generators=row_generators(s, [0, 1]),
            )
        ).tokens
        for s in (0, 0)
    ]
    assert torch.equal(*out) and not (out[0] == model.mask_id).any()


def test_adjust_sampler_trains_on_a_pretrained_directory_and_is_tied_to_its_weights(family_dirs, tmp_path):
    from unmask.models.adjust_sampler import load_sampler
    from unmask.models.checkpoint import CheckpointError
    from unmask.training.adjust import generate_trajectories, split_trajectories, train_sampler

    base_dir = family_dirs[0] / "llada"
    loaded = load(family_dirs, "llada")
    prompts = tokens(B=8, T=3, seed=10)
    traj = generate_trajectories(loaded.model, prompts, tmp_path / "traj", new_tokens=8, batch_size=4, seed=0)
    train, valid = split_trajectories(traj, 0.25)
    r = train_sampler(
        loaded.model,
        base_dir,
        train,
        valid,
        K=2,
        out=tmp_path / "sampler",
        steps=2,
        batch_size=4,
        eval_every=2,
        progress=False,
    )
    assert len(r["history"]) == 2
    meta = json.loads((tmp_path / "sampler" / "sampler.json").read_text())
    assert meta["base"] == str(base_dir) and meta["base_weights"] == "pretrained"
    sampler, _, k = load_sampler(tmp_path / "sampler", base_dir)
    records = sample(
        loaded.model,
        loaded.tokenizer,
        ["w1 w2"],
        preset_config("adjust", max_new_tokens=8, steps=8, rounds=2),
        LogLinear(),
        sampler=sampler,
    )
    assert k == 2 and records[0]["nfe"] <= 8
    other = copy_family(family_dirs, "llada", tmp_path)  # same layout, different weights
    write_family("llada", other, seed=1)
    with pytest.raises(CheckpointError, match="trained for base"):
        load_sampler(tmp_path / "sampler", other)


def _continued(family_dirs, tmp_path, **over):
    from unmask.config import Config, DataConfig, EvalConfig, LoraConfig, SoftMaskConfig, TrainConfig

    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(
        "\n\n".join(
            " ".join(f"w{i}" for i in torch.randint(0, 40, (120,), generator=g).tolist()) for _ in range(8)
        )
    )
    kw = dict(
        data=DataConfig(
            corpus=str(text),
            seq_len=32,
            valid_fraction=0.2,
            test_fraction=0.1,
            cache_dir=str(tmp_path / "cache"),
        ),
        train=TrainConfig(
            steps=4, batch_size=4, eval_every=2, save_every=2, out=str(tmp_path / "run"), warmup=1
        ),
        eval=EvalConfig(mc_samples=1, max_rows=4, batch_size=4),
        soft_mask=SoftMaskConfig(k=3),
        lora=LoraConfig(r=4),
    )
    return Config(**{**kw, **over})


def test_soft_mask_and_lora_train_on_a_frozen_pretrained_base(family_dirs, tmp_path):
    from safetensors.torch import load_file

    from unmask.training.loop import train

    base_dir = family_dirs[0] / "llada"
    before = {k: v.clone() for k, v in load(family_dirs, "llada").model.state_dict().items()}
    result = train(_continued(family_dirs, tmp_path), init=str(base_dir), progress=False)
    ckpt = result.run_dir / (result.run_dir / "latest").read_text().strip()
    base = json.loads((ckpt / "base.json").read_text())
    assert base["path"] == str(base_dir) and base["family"] == "llada"
    saved = load_file(str(ckpt / "model.safetensors"))  # only the additions, never a copy of the base
    assert saved and all(k.startswith("soft_mask.") or ".lora_" in k for k in saved)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())  # the adapters trained
    loaded = load_checkpoint(result.run_dir)
    assert loaded.model.soft_mask is not None
    state = loaded.model.state_dict()
    for k, v in before.items():  # the base weights are untouched
        if k in state and "lora_" not in k:
            assert torch.equal(state[k], v), k
    for k, v in saved.items():
        assert torch.equal(state[k], v)
    # soft inputs decode on it
    records = sample(
        loaded.model,
        loaded.tokenizer,
        ["w1 w2"],
        preset_config("llada", max_new_tokens=8, steps=4, block_len=8, inputs="soft"),
        LogLinear(),
    )
    assert records[0]["nfe"] <= 4


def test_a_run_on_a_pretrained_base_refuses_other_base_weights(family_dirs, tmp_path):
    from unmask.models.checkpoint import CheckpointError
    from unmask.training.loop import train

    base_dir = copy_family(family_dirs, "llada", tmp_path)
    result = train(_continued(family_dirs, tmp_path), init=str(base_dir), progress=False)
    write_family("llada", base_dir, seed=3)  # the base directory now holds other weights
    with pytest.raises(CheckpointError, match="weights"):
        load_checkpoint(result.run_dir)


def test_training_on_a_pretrained_base_needs_something_to_train(family_dirs, tmp_path):
    from unmask.config import ConfigError, LoraConfig, SoftMaskConfig
    from unmask.training.loop import train

    cfg = _continued(family_dirs, tmp_path, soft_mask=SoftMaskConfig(k=0), lora=LoraConfig(r=0))
    with pytest.raises(ConfigError, match="--soft-mask.k K .* --lora.r R"):
        train(cfg, init=str(family_dirs[0] / "llada"), progress=False)


def test_sft_then_r2ft_with_lora_on_a_pretrained_directory(family_dirs, tmp_path):
    """`unmask posttrain sft --checkpoint DIR --lora.r 4`, then R2FT on that run: both train adapters
    on the same frozen base and save only them."""
    from unmask.cli.main import main

    base_dir = family_dirs[0] / "llada"
    common = [
        "--train.steps",
        "2",
        "--train.eval_every",
        "2",
        "--train.save_every",
        "2",
        "--eval.max_rows",
        "4",
        "--eval.mc_samples",
        "1",
    ]
    main(
        [
            "posttrain",
            "sft",
            "--checkpoint",
            str(base_dir),
            "--out",
            str(tmp_path / "sft"),
            "--lora.r",
            "4",
            "--data.seq_len",
            "64",
            "--data.cache_dir",
            str(tmp_path / "cache"),
            *common,
        ]
    )
    main(
        ["posttrain", "r2ft", "--checkpoint", str(tmp_path / "sft"), "--out", str(tmp_path / "r2ft"), *common]
    )
    for run in ("sft", "r2ft"):
        ckpt = tmp_path / run / "ckpt-0000002"
        assert json.loads((ckpt / "base.json").read_text())["path"] == str(base_dir)
        assert (ckpt / "model.safetensors").stat().st_size < (
            base_dir / "model.safetensors"
        ).stat().st_size / 4
    assert load_checkpoint(tmp_path / "r2ft").config.instruct.stage == "r2ft"


def test_resume_a_run_on_a_pretrained_base(family_dirs, tmp_path):
    from dataclasses import replace

    from unmask.training.loop import train

    cfg = _continued(family_dirs, tmp_path)
    train(cfg, init=str(family_dirs[0] / "llada"), progress=False)
    saved = load_checkpoint(tmp_path / "run").config  # what `unmask train --resume` continues from
    longer = replace(saved, train=replace(saved.train, steps=6))
    result = train(longer, resume=True, progress=False)
    assert result.step == 6 and (result.run_dir / "ckpt-0000006" / "base.json").is_file()


class EosFirst(torch.nn.Module):
    """Wraps a model so that the first generated position is almost surely [EOS]."""

    def __init__(self, model, position, eos):
        super().__init__()
        self.inner, self.position, self.eos = model, position, eos
        self.cfg, self.vocab_size, self.mask_id, self.subs = (
            model.cfg,
            model.vocab_size,
            model.mask_id,
            model.subs,
        )
        self.new_cache, self.embed, self.noising = model.new_cache, model.embed, model.noising

    def forward(self, tokens=None, *, cache=None, embeds=None, key_mask=None):
        out = self.inner(tokens, cache=cache, embeds=embeds, key_mask=key_mask)
        out.logits[:, self.position, self.eos] += 100.0
        return out


def test_stop_token_knobs(family_dirs):
    """ban_stop: EOS / end of turn never proposed; defer_stop: committed only when nothing else is left."""
    loaded = load(family_dirs, "llada")
    tok = loaded.tokenizer
    prompt = torch.tensor([tok.prompt_ids("w1 w2 w3")])
    P = prompt.shape[1]
    model = EosFirst(loaded.model, P, tok.eos_id)

    def run(**over):
        cfg = preset_config("llada", max_new_tokens=8, steps=8, block_len=8, **over)
        plan = plan_decode(model, cfg, schedule=LogLinear(), tokenizer=tok)
        states = generate(model, plan, prompt=prompt, generators=row_generators(0, [0]))
        return [int(s.tokens[0, P]) for s in states]  # the first generated position after each step

    plain, banned, deferred = run(), run(ban_stop=True), run(defer_stop=True)
    assert plain[0] == tok.eos_id  # committed at the first step (the most confident position)
    assert tok.eos_id not in banned and banned[-1] != model.mask_id
    assert deferred[-2] == tok.eos_id and all(t == model.mask_id for t in deferred[:-2])  # the last step


def test_generation_configs_eos_ids_are_stop_ids_too(family_dirs, tmp_path):
    """Where the family's own `generate` stops (`generation_config.json`'s eos_token_id, an id or a
    list) is where ours stops as well; a malformed one is an error naming the file."""
    import shutil

    from unmask.models.pretrained.load import load_tokenizer

    path = tmp_path / "sdar"
    shutil.copytree(family_dirs[0] / "sdar", path)
    before = load_tokenizer(path).stop_ids
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [before[0], 7, 9]}))
    assert load_tokenizer(path).stop_ids == (*before, 7, 9)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert load_tokenizer(path).stop_ids == (*before, 11)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "eos"}))
    with pytest.raises(PretrainedError, match="generation_config.json: eos_token_id"):
        load_tokenizer(path)
