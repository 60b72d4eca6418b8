"""`unmask export`: trained runs written in the families' layouts, read back by unmask's loader and
by transformers' own classes (fp32: the same logits), their tokenizers, configs, cards, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from pretrained_layouts import additive_block_mask

transformers = pytest.importorskip("transformers")

from unmask.cli.main import main  # noqa: E402
from unmask.config import Config, EvalConfig, ModelConfig, SoftMaskConfig, TrainConfig, replace  # noqa: E402
from unmask.decoding.generate import final_state, generate  # noqa: E402
from unmask.decoding.plan import plan_decode  # noqa: E402
from unmask.decoding.presets import preset_config  # noqa: E402
from unmask.decoding.rng import row_generators  # noqa: E402
from unmask.exporting import ExportError, export  # noqa: E402
from unmask.exporting.layouts import pick  # noqa: E402
from unmask.models.checkpoint import load_checkpoint  # noqa: E402
from unmask.training.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def qk_runs(tiny_data_cfg, tiny_data, tmp_path_factory):
    """Runs with the options the Qwen3-style layouts need: q/k norm, grouped-query attention, an eps."""
    root = tmp_path_factory.mktemp("qk")
    out = {}
    for kind in ("block_causal", "causal"):
        cfg = Config(
            data=tiny_data_cfg,
            eval=EvalConfig(max_rows=16),
            model=ModelConfig(
                attention=kind,
                block_size=4,
                dim=32,
                n_layers=1,
                n_heads=4,
                kv_heads=2,
                qk_norm=True,
                norm_eps=1e-6,
            ),  # fmt: skip
            train=TrainConfig(steps=4, batch_size=4, lr=3e-3, precision="fp32", out=str(root / kind)),
        )
        train(cfg, data=tiny_data, progress=False)
        out[kind] = root / kind
    return out


def runs(checkpoints, qk_runs) -> dict[str, object]:
    return {
        "bidirectional": checkpoints["bidirectional"],
        "block_causal": checkpoints["block_causal"],
        "causal": checkpoints["causal"],
        "block_causal+qk": qk_runs["block_causal"],
        "causal+qk": qk_runs["causal"],
    }


CASES = [  # run, format, the family it loads back as
    ("bidirectional", "llada", "llada"),
    ("block_causal", "llada2", "llada2"),
    ("block_causal+qk", "sdar", "sdar"),
    ("block_causal+qk", "llada2", "llada2"),
    ("causal", "llama", "llama"),
    ("causal+qk", "qwen3", "qwen3"),
]


def tokens(vocab: int, B=2, T=12) -> torch.Tensor:
    return torch.randint(0, vocab - 1, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("run,fmt,family", CASES, ids=[f"{r}-{f}" for r, f, _ in CASES])
def test_an_export_loads_back_with_the_same_logits(checkpoints, qk_runs, tmp_path, run, fmt, family):
    source = load_checkpoint(runs(checkpoints, qk_runs)[run])
    with pytest.warns(UserWarning, match="SGLang") if fmt in ("sdar", "llada2") else _nothing():
        out = export(source, tmp_path / fmt, format=fmt, dtype="fp32")
    back = load_checkpoint(out, dtype="fp32")
    assert back.state["pretrained"]["family"] == family
    assert back.model.cfg.attention == source.model.cfg.attention
    if source.model.cfg.attention == "block_causal":
        assert back.model.cfg.block_size == source.model.cfg.block_size
    x = tokens(source.model.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x).logits, source.model(x).logits, rtol=0, atol=1e-5)
    assert back.tokenizer.mask_id == source.tokenizer.mask_id == back.model.mask_id
    assert back.tokenizer.encode("def f(x): return x") == source.tokenizer.encode("def f(x): return x")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize(
    "run,fmt,cls",
    [
        ("block_causal+qk", "sdar", "Qwen3ForCausalLM"),
        ("causal", "llama", "LlamaForCausalLM"),
        ("causal+qk", "qwen3", "Qwen3ForCausalLM"),
    ],
)
def test_transformers_own_class_reads_the_export(checkpoints, qk_runs, tmp_path, run, fmt, cls):
    """The native class built from config.json alone, weights loaded strictly, run with the family's
    attention (causal, or SDAR's block mask), gives the run's logits."""
    source = load_checkpoint(runs(checkpoints, qk_runs)[run])
    with pytest.warns(UserWarning) if fmt == "sdar" else _nothing():
        out = export(source, tmp_path / fmt, format=fmt, dtype="fp32")
    raw = json.loads((out / "config.json").read_text())
    config_cls = {"Qwen3ForCausalLM": transformers.Qwen3Config, "LlamaForCausalLM": transformers.LlamaConfig}[
        cls
    ]
    config = config_cls(
        **{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "block_size")}
    )
    if fmt != "sdar":
        assert type(transformers.AutoConfig.from_pretrained(out)).__name__ == config_cls.__name__
    native = getattr(transformers, cls)(config).eval()
    from safetensors.torch import load_file

    native.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = tokens(source.model.vocab_size)
    with torch.no_grad():
        if fmt == "sdar":
            native.config.is_causal = False
            mask = additive_block_mask(x.shape[1], raw["block_size"])
            got = native(input_ids=x, attention_mask=mask.expand(x.shape[0], -1, -1, -1)).logits
        else:
            got = native(input_ids=x).logits
        torch.testing.assert_close(got, source.model(x).logits, rtol=0, atol=1e-5)


def test_tokenizer_config_card_and_generation_config(checkpoints, tmp_path):
    source = load_checkpoint(checkpoints["bidirectional"])
    out = export(source, tmp_path / "llada", dtype="fp32")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = source.tokenizer
    ids = (tok.mask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert ids == (ours.mask_id, ours.bos_id, ours.eos_id, ours.pad_id)
    text = "import os\ndef main():\n    return 1"
    assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llada" and raw["mask_token_id"] == ours.mask_id
    assert transformers.PretrainedConfig.from_pretrained(out).to_dict()["d_model"] == source.config.model.dim
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == ours.eos_id and gen.bos_token_id == ours.bos_id
    card = (out / "README.md").read_text()
    assert f"{source.state['val_ppl']:.3f}" in card and str(source.state["step"]) in card
    assert "bidirectional" in card and source.config.data.corpus in card


def test_a_sharded_export_loads(checkpoints, tmp_path):
    source = load_checkpoint(checkpoints["causal"])
    out = export(source, tmp_path / "sharded", format="llama", dtype="fp32", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    back = load_checkpoint(out, dtype="fp32")
    x = tokens(source.model.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back.model(x).logits, source.model(x).logits, rtol=0, atol=1e-5)


def test_an_export_samples_through_unmask(checkpoints, tmp_path, capsys):
    source = load_checkpoint(checkpoints["causal"])
    out = export(source, tmp_path / "llama", dtype="fp32")
    main(
        ["sample", "--checkpoint", str(out), "--prompt", "def f(", "--max-new-tokens", "6", "--dtype", "fp32"]
    )
    assert "def f(" in capsys.readouterr().out


def test_refusals_name_the_field(checkpoints, qk_runs, tmp_path, capsys):
    block = load_checkpoint(checkpoints["block_causal"]).config
    with pytest.raises(ExportError, match="model.qk_norm"):
        pick("sdar", block)
    with pytest.raises(ExportError, match="model.attention: a block_causal run cannot be written as llada"):
        pick("llada", block)
    with pytest.raises(ExportError, match="model.mlp"):
        pick("auto", replace(block, model=replace(block.model, mlp="gelu")))
    with pytest.raises(ExportError, match="soft_mask.k"):
        pick("auto", replace(block, soft_mask=SoftMaskConfig(k=3)))
    with pytest.raises(ExportError, match="model.qk_norm: llama layers have no per-head q/k norm"):
        pick("llama", load_checkpoint(qk_runs["causal"]).config)
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(checkpoints["block_causal"]), "--format", "sdar", "--out",
              str(tmp_path / "x")])  # fmt: skip
    assert e.value.code == 2 and "model.qk_norm" in capsys.readouterr().err and not (tmp_path / "x").exists()
    out = export(load_checkpoint(checkpoints["causal"]), tmp_path / "once")
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export(load_checkpoint(checkpoints["causal"]), out)


def test_old_checkpoints_without_the_new_fields_load_unchanged(checkpoints, tmp_path):
    import shutil

    from unmask.models.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoints["block_causal"])
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    raw = json.loads((old / "config.json").read_text())
    for key in ("kv_heads", "qk_norm", "norm_eps"):
        raw["model"].pop(key)
    (old / "config.json").write_text(json.dumps(raw))
    (old / "manifest.json").unlink()  # checkpoints of that version had none
    a, b = load_checkpoint(ckpt), load_checkpoint(old)
    x = tokens(a.model.vocab_size)
    with torch.no_grad():
        assert torch.equal(a.model(x).logits, b.model(x).logits)
    plan = plan_decode(b.model, preset_config("bd3lm", max_new_tokens=8, steps=8))
    gens = lambda: row_generators(0, [0, 1])  # noqa: E731
    same = [final_state(generate(m.model, plan, prompt=x[:, :3], generators=gens())).tokens for m in (a, b)]
    assert torch.equal(*same)


def test_grouped_query_attention_caches_exactly(qk_runs):
    model = load_checkpoint(qk_runs["block_causal"]).model
    assert model.blocks[0].attn.n_kv_heads == 2 and model.new_cache(1, 8, "cpu").k[0].shape[1] == 2
    x = tokens(model.vocab_size, T=5)
    outs = []
    for cache in ("auto", "none"):
        plan = plan_decode(model, preset_config("bd3lm", max_new_tokens=12, steps=12, cache=cache))
        outs.append(final_state(generate(model, plan, prompt=x, generators=row_generators(0, [0, 1]))).tokens)
    assert torch.equal(*outs)


def test_a_tokenizer_with_a_family_mask_token_keeps_it(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    from unmask.data.tokenizer import Tokenizer

    vocab = {"a": 0, "b": 1, "<|MASK|>": 2}
    hf = HF(models.WordLevel(vocab, unk_token="a"))
    tok = Tokenizer(hf)
    assert tok.mask_id == 2 and hf.token_to_id("[MASK]") is None and tok.bos_id is not None


def test_a_run_on_a_qwen3_style_tokenizer_exports_an_sdar_directory_sglang_can_serve(
    tiny_data_cfg, tmp_path, recwarn
):
    """A tokenizer whose `<|MASK|>` sits at 151669 (Qwen3 / SDAR's id): the run keeps it as its mask,
    and the SDAR export carries SGLang's built-in mask id and block size, with no warning."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    words = [f"w{i}" for i in range(151669)]
    vocab = {w: i for i, w in enumerate(words)} | {"<|MASK|>": 151669}
    hf = HF(models.WordLevel(vocab, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<|MASK|>"])
    (tmp_path / "qwen3-tok").mkdir()
    hf.save(str(tmp_path / "qwen3-tok" / "tokenizer.json"))
    data = replace(tiny_data_cfg, tokenizer=str(tmp_path / "qwen3-tok"))
    cfg = Config(
        data=data,
        eval=EvalConfig(max_rows=4, mc_samples=1),
        model=ModelConfig(
            attention="block_causal", block_size=4, dim=16, n_layers=1, n_heads=2, qk_norm=True
        ),
        train=TrainConfig(steps=1, batch_size=2, lr=1e-3, precision="fp32", out=str(tmp_path / "run")),
    )
    train(cfg, progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.model.mask_id == 151669
    out = export(loaded, tmp_path / "sdar", dtype="fp32")  # auto: sdar (block-causal, q/k norm)
    assert not [w for w in recwarn if "SGLang" in str(w.message)]
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["SDARForCausalLM"] and raw["mask_token_id"] == 151669
    assert raw["block_size"] == 4 and raw["vocab_size"] > 151669
    assert "can be served as is" in (out / "README.md").read_text()


def test_an_sft_run_exports_its_chat_template(checkpoints, tmp_path):
    import dataclasses

    source = load_checkpoint(checkpoints["bidirectional"])
    sft = dataclasses.replace(
        source, config=replace(source.config, instruct=replace(source.config.instruct, stage="sft"))
    )
    out = export(sft, tmp_path / "chat", dtype="fp32")
    turns = [{"role": "user", "content": "write a parser"}]
    hf = transformers.AutoTokenizer.from_pretrained(out)
    rendered = hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert rendered == source.tokenizer.hf.id_to_token(source.tokenizer.bos_id) + source.tokenizer.chat(turns)
    back = load_checkpoint(out, dtype="fp32")
    assert back.tokenizer.prompt_ids("write a parser", chat=True) == source.tokenizer.prompt_ids(
        "write a parser", chat=True
    )
