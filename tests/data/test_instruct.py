"""Instruction data, SFT masking and the R2FT negatives and loss."""

from __future__ import annotations

import ast
import json
import math

import numpy as np
import pytest
import torch
from conftest import MASK, VOCAB, tiny_model

from unmask.config import Config, ConfigError, InstructConfig, ModelConfig
from unmask.data.corpus import DataError
from unmask.data.instruct import (
    Pair,
    encode_pairs,
    function_pairs,
    load_template,
    maskable_mask,
    read_pairs,
    response_mask,
    split_pairs,
    stdlib_function_pairs,
)
from unmask.models.transformer import DenoiserOutput
from unmask.schedules import LogLinear
from unmask.training.objectives import (
    Batch,
    Negative,
    corrupt,
    diffusion_loss,
    diffusion_token_nll,
    draw_negative,
    r2ft_loss,
    rejected_span,
)

SOURCE = '''
import functools

def plain(a, b=2):
    """Add.

    More text.
    """
    # a comment
    return a + b

@functools.cache
async def decorated(x):
    "One line."
    y = x * 2
    return y

class Box:
    def method(self):
        """Text
with a line at column 0."""
        if self:
            return 1
        return 2

def no_doc():
    return 3

def doc_only():
    """Nothing else."""
'''


def test_function_pairs_rejoin_into_parseable_code():
    pairs = function_pairs(SOURCE, "mod.py")
    assert [p.key.rsplit(":", 1)[1] for p in pairs] == ["plain", "decorated", "method"]
    for p in pairs:
        tree = ast.parse(p.prompt + p.response)
        fn = tree.body[0]
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(fn)
        assert p.prompt.rstrip().endswith(('"""', '"')) and p.response.strip()
        assert not p.prompt.startswith(" ")  # methods are dedented to column 0
    assert pairs[1].prompt.startswith("@functools.cache\nasync def decorated")
    assert pairs[0].response == "    # a comment\n    return a + b\n"


def test_stdlib_functions_are_valid_pairs_with_a_stable_split():
    pairs = stdlib_function_pairs(("json", "csv"))
    assert len(pairs) > 10
    for p in pairs:
        ast.parse(p.prompt + p.response)
        assert p.response.strip() and "def " in p.prompt
    a = split_pairs(pairs, 0.2, 0.2)
    b = split_pairs(list(reversed(pairs)), 0.2, 0.2)
    keys = lambda split: {s: sorted(p.key for p in v) for s, v in split.items()}  # noqa: E731
    assert keys(a) == keys(b)
    assert all(a.values())


def test_alpaca_and_chat_files_with_templates(tmp_path):
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "hola", "output": "hello"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records))
    for path in (jsonl, as_json):
        pairs = read_pairs(str(path), "alpaca")
        tmpl = load_template("alpaca")
        assert pairs[0].prompt == tmpl.prompt.format(instruction="Add 2 and 3.") and pairs[0].response == "5"
        assert "### Input:\nhola" in pairs[1].prompt
        assert pairs[2].prompt == "### user:\nhi\n\n### Response:\n" and pairs[2].response == "hello!"
    chat = read_pairs(str(jsonl), "chat")
    assert chat[2].prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert read_pairs(str(jsonl), "auto")[0].prompt == pairs[0].prompt  # auto = alpaca for files
    with pytest.raises(DataError, match="unknown template 'nope'"):
        read_pairs(str(jsonl), "nope")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "x", "output": "y"', r"data.jsonl:2: not valid JSON"),
        ('{"instruction": "x"}', r"data.jsonl:2: missing string field `output`"),
        ('{"output": "y"}', r"data.jsonl:2: missing string field `instruction`"),
        ('{"instruction": "x", "output": "  "}', r"data.jsonl:2: empty response \(`output`\)"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"data.jsonl:2: the last message must be"),
        ('{"messages": [{"role": "user"}]}', r"data.jsonl:2: `messages` must be"),
        ("[1, 2]", r"data.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_instruction_lines_are_named(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_pairs(str(path))


def test_bad_json_file_and_missing_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}]))
    with pytest.raises(DataError, match=r"data.json: record 2: empty response"):
        read_pairs(str(path))
    with pytest.raises(DataError, match="no such file"):
        read_pairs(str(tmp_path / "absent.json"))


def test_encode_pairs_spans_tails_and_response_mask(tiny_data):
    tok = tiny_data.tokenizer
    pairs = [Pair("def f():\n", "    return 1\n", "a"), Pair("x" * 200, "y", "b"), Pair("q", "z" * 400, "c")]
    for eos, tail in (("tail", tok.eos_id), ("all", tok.eos_id), ("first", tok.pad_id)):
        rows, spans, dropped = encode_pairs(pairs, tok, 48, eos, max_prompt=24)
        assert dropped == 1 and rows.shape == (2, 48)
        p, r = tok.encode(pairs[0].prompt), tok.encode(pairs[0].response)
        a, e = spans[0]
        assert a == 1 + len(p) and e == a + len(r)
        assert rows[0, 0] == tok.bos_id and rows[0, 1:a].tolist() == p and rows[0, a:e].tolist() == r
        assert rows[0, e] == tok.eos_id and (rows[0, e + 1 :] == tail).all()
        assert spans[1, 1] == 48 and tok.eos_id not in rows[1].tolist()  # cut response: no [EOS]
        m = response_mask(spans, 48, eos)  # scored
        assert not m[0, :a].any() and not m[1, : spans[1, 0]].any() and m[0, a : e + 1].all()
        assert m[0, e + 1 :].all() == (eos == "all") and (m[0, e + 1 :].any() == (eos == "all"))
        k = maskable_mask(spans, 48, eos)  # maskable: the [EOS] tail too, except with `first`
        assert not k[0, :a].any() and k[0, a : e + 1].all() and k[0, e + 1 :].all() == (eos != "first")


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_sft_never_masks_or_scores_the_prompt(attention):
    model = tiny_model(attention, block_size=4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (4, 16), generator=g)
    spans = np.array([[3, 9], [5, 16], [1, 4], [8, 12]])
    loss_at = torch.as_tensor(response_mask(spans, 16, "first"))
    masked_ever = torch.zeros_like(loss_at)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        nll, _ = diffusion_token_nll(model, Batch(x0, loss_at), LogLinear(), g, (0.5, 1.0))
        assert (nll[~loss_at] == 0).all()
        masked_ever |= nll != 0
    assert masked_ever[loss_at].float().mean() > 0.9  # the response does get masked and scored


def _negatives(n: int, cfg: InstructConfig, L: int = 128):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        start = 2 + i % 20
        end = start + 1 + (7 * i) % 60
        yield start, end, draw_negative(start, end, L, cfg, g)


def test_negative_builder_unit_length_phase_and_one_eos():
    cfg = InstructConfig()
    L, eos = 128, 1000
    row = torch.arange(L) + 2000  # distinct tokens: the source of every rejected token is visible
    seen_g, seen_z = set(), set()
    for start, end, n in _negatives(400, cfg, L):
        assert start <= n.cut <= max(start, end - 1)
        assert 1 <= n.unit <= min(14, n.cut - 1) and 0 <= n.phase < n.unit
        assert n.span == min(n.span, L - n.cut) and (30 <= n.span <= 49 or n.span == L - n.cut)
        y = rejected_span(row, n, eos)
        assert len(y) == n.span and (y == eos).sum() == 1 and y[n.eos_at] == eos
        assert n.eos_at < n.span - 1  # never the span's last slot
        body = torch.cat([y[: n.eos_at], y[n.eos_at + 1 :]])
        expect = [int(row[n.cut - n.unit + (n.phase + j) % n.unit]) for j in range(n.span - 1)]
        assert body.tolist() == expect  # the last g visible tokens, tiled cyclically from the phase
        seen_g.add(n.unit)
        seen_z.add(n.span)
    assert seen_g == set(range(1, 15)) and set(range(30, 50)) <= seen_z  # the whole configured ranges


def test_negative_builder_respects_configured_ranges():
    cfg = InstructConfig(unit=(3, 3), span=(5, 6))
    for _, _, n in _negatives(50, cfg):
        assert n.unit == min(3, n.cut - 1) and n.span in (5, 6)


class FixedLogits(torch.nn.Module):
    """A stand-in denoiser whose logits are given; records the input it saw."""

    def __init__(self, logits: torch.Tensor, mask_id: int):
        super().__init__()
        self.logits, self.mask_id, self.seen = logits, mask_id, None

    def forward(self, tokens):
        self.seen = tokens
        return DenoiserOutput(self.logits, None)


def test_r2ft_loss_hand_computed():
    # Vocabulary {0, 1, 2, EOS=3, MASK=4}; row [BOS=0] 1 2 | 1 2 [EOS] with the answer at [3, 5).
    V, mask, eos = 5, 4, 3
    x0 = torch.tensor([[0, 1, 2, 1, 2, 3]])
    logits = torch.zeros(1, 6, V)
    logits[0, :, 1] = math.log(2.0)  # p(1) = 2/5, p(0) = p(2) = p(3) = 1/5 (mask excluded)
    model = FixedLogits(logits, mask)
    neg = Negative(cut=3, unit=1, span=3, phase=0, eos_at=1)  # y_l = [2, EOS, 2] at positions 3..5
    cfg = InstructConfig()
    out = r2ft_loss(model, Batch(x0, x0 >= 0, torch.tensor([[3, 5]])), cfg, eos, torch.Generator(), [neg])
    assert model.seen.tolist() == [[0, 1, 2, mask, mask, mask]]
    lp_w = (math.log(2 / 5) + math.log(1 / 5) + math.log(1 / 5)) / 3  # y_w = 1, 2, EOS
    lp_l = (math.log(1 / 5) * 3) / 3  # y_l = 2, EOS, 2
    expect = -math.log(1 / (1 + math.exp(-(lp_w - lp_l)))) - 0.1 * lp_w
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    assert out.extras["margin"] == pytest.approx(lp_w - lp_l, rel=1e-6) and out.extras["accuracy"] == 1.0
    cfg2 = InstructConfig(b_w=2.0, b_l=0.5, gamma=0.3, b_a=0.0)
    out2 = r2ft_loss(model, Batch(x0, x0 >= 0, torch.tensor([[3, 5]])), cfg2, eos, torch.Generator(), [neg])
    assert out2.loss.item() == pytest.approx(math.log1p(math.exp(-(2 * lp_w - 0.5 * lp_l - 0.3))), rel=1e-6)


def test_r2ft_loss_trains_a_real_model_and_needs_spans():
    model = tiny_model("bidirectional").train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK - 2, (4, 64), generator=g)
    spans = torch.tensor([[8, 40], [10, 64], [5, 30], [20, 50]])
    out = r2ft_loss(model, Batch(x0, x0 >= 0, spans), InstructConfig(), MASK - 1, g)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.tokens == 4
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="spans"):
        r2ft_loss(model, Batch(x0, x0 >= 0), InstructConfig(), MASK - 1, g)
    assert VOCAB > MASK


def test_instruct_config_checks():
    with pytest.raises(ConfigError, match="instruct.stage.*bidirectional"):
        Config(model=ModelConfig(attention="block_causal"), instruct=InstructConfig(stage="r2ft"))
    with pytest.raises(ConfigError, match="instruct.stage"):
        Config(model=ModelConfig(attention="causal"), instruct=InstructConfig(stage="sft"))
    with pytest.raises(ConfigError, match="instruct.unit"):
        InstructConfig(unit=(0, 3))
    Config(model=ModelConfig(attention="block_causal"), instruct=InstructConfig(stage="sft"))


def test_posttrain_sft_then_r2ft_cli(checkpoints, tmp_path, capsys):
    """`unmask posttrain sft` then `r2ft` on a tiny MDLM: runs, logs the R2FT terms, keeps loss
    off the prompt, and refuses a block-causal model for R2FT."""
    from unmask.cli.main import main
    from unmask.models.checkpoint import load_checkpoint

    common = [
        "--data.seq_len",
        "256",
        "--instruct.max_prompt",
        "224",
        "--train.batch_size",
        "4",
        "--eval.max_rows",
        "8",
        "--train.precision",
        "fp32",
    ]
    sft, r2ft = tmp_path / "sft", tmp_path / "r2ft"
    main(
        [
            "posttrain",
            "sft",
            "--checkpoint",
            str(checkpoints["bidirectional"]),
            "--data",
            "stdlib-functions:json,csv,email",
            "--out",
            str(sft),
            "--train.steps",
            "3",
            *common,
        ]
    )
    cfg = load_checkpoint(sft).config
    assert cfg.instruct.stage == "sft" and cfg.instruct.data == "stdlib-functions:json,csv,email"
    main(
        [
            "posttrain",
            "r2ft",
            "--checkpoint",
            str(sft),
            "--out",
            str(r2ft),
            "--train.steps",
            "2",
            "--instruct.span",
            "5",
            "9",
        ]
    )
    records = [json.loads(x) for x in (r2ft / "metrics.jsonl").read_text().splitlines()]
    assert {"chosen_logp", "rejected_logp", "margin", "accuracy"} <= set(records[0])
    assert load_checkpoint(r2ft).config.instruct.span == (5, 9)
    assert "checkpoint:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(
            [
                "posttrain",
                "r2ft",
                "--checkpoint",
                str(checkpoints["block_causal"]),
                "--out",
                str(tmp_path / "x"),
                *common,
            ]
        )
    assert e.value.code == 2 and "bidirectional" in capsys.readouterr().err


def test_hf_instruction_data_error_names_the_flag():
    try:
        import datasets  # noqa: F401
    except ImportError:
        match = r"--instruct.data 'hf:tatsu-lab/alpaca' needs the optional `datasets` package"
    else:
        match = r"--instruct.data 'hf:tatsu-lab/alpaca': could not load the Hugging Face dataset"
    with pytest.raises(DataError, match=match):
        read_pairs("hf:tatsu-lab/alpaca")


def test_r2ft_chosen_term_is_the_mean_over_the_whole_answer_and_its_eos():
    """Cut inside the answer: the visible answer prefix contributes log pi = 0 but counts in the
    mean (the authors' normalisation), so mean_A = sum over [c, e] / |[a, e]|."""
    V, mask, eos = 5, 4, 3
    x0 = torch.tensor([[0, 1, 2, 1, 2, 3]])  # answer 2 1 2 at [2, 5), its [EOS] at 5
    logits = torch.zeros(1, 6, V)
    logits[0, :, 1] = math.log(2.0)  # p(1) = 2/5, others 1/5
    model = FixedLogits(logits, mask)
    neg = Negative(cut=3, unit=1, span=3, phase=0, eos_at=1)
    out = r2ft_loss(
        model,
        Batch(x0, x0 >= 0, torch.tensor([[2, 5]])),
        InstructConfig(b_a=0.0),
        eos,
        torch.Generator(),
        [neg],
    )
    lp_w = (math.log(2 / 5) + math.log(1 / 5) + math.log(1 / 5)) / 4  # positions 3, 4, 5 over |A| = 4
    lp_l = math.log(1 / 5)
    assert out.extras["chosen_logp"] == pytest.approx(lp_w, rel=1e-6)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-(lp_w - lp_l))), rel=1e-6)


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_sft_tail_rows_mask_the_eos_tail_but_score_only_the_answer_and_first_eos(attention):
    model = tiny_model(attention, block_size=4)
    x0 = torch.randint(0, MASK, (3, 16), generator=torch.Generator().manual_seed(1))
    spans = np.array([[3, 9], [5, 12], [2, 6]])
    maskable = torch.as_tensor(maskable_mask(spans, 16, "tail"))
    scored = torch.as_tensor(response_mask(spans, 16, "tail"))
    batch = Batch(x0, maskable, torch.as_tensor(spans), scored)
    tail_masked = torch.zeros_like(scored)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        nll, _ = diffusion_token_nll(model, batch, LogLinear(), g, (0.5, 1.0))
        assert (nll[~scored] == 0).all()  # nothing past the first [EOS] is scored
        xt, masked = corrupt(x0, maskable, torch.full((3, 1), 0.9), LogLinear(), MASK, g)
        assert not masked[~maskable].any()
        tail_masked |= masked & maskable & ~scored
    assert tail_masked.any()  # ... but the tail does get masked, as at inference
    out = diffusion_loss(model, batch, LogLinear(), torch.Generator(), (0.5, 1.0))
    assert out.tokens == int(scored.sum())


def test_r2ft_runs_inside_a_fresh_warmup_at_a_fraction_of_sfts_lr(checkpoints):
    from unmask.training.posttrain import R2FT_LR_FRACTION, instruct_config

    sft = instruct_config(checkpoints["bidirectional"], "sft", out="x")
    r2ft = instruct_config(checkpoints["bidirectional"], "r2ft", out="y")
    base_lr = instruct_config(checkpoints["bidirectional"], "sft", out="x").train.lr
    assert r2ft.train.lr == pytest.approx(base_lr * R2FT_LR_FRACTION) and r2ft.train.lr < sft.train.lr
    assert r2ft.train.steps <= r2ft.train.warmup and r2ft.train.weight_decay > 0
    assert sft.instruct.eos == "tail"
