"""Instruction data: prompt/response pairs, prompt templates, and rows for SFT and R2FT.

Sources (`--instruct.data`):
- `stdlib-functions[:mod,...]`: the embedded default. Every function and method of the standard
  library's sources that has a docstring and a body; prompt = decorators + signature + docstring,
  response = the rest of the body (the HumanEval format), dedented to column 0.
- an Alpaca-format `.json` (a list of records) or `.jsonl` file: `instruction`, optional `input`,
  `output`; or chat records `{"messages": [{"role": ..., "content": ...}, ...]}` whose last message
  is the assistant's reply (the response; earlier turns form the prompt);
- `hf:ORG/NAME[:CONFIG]`: the same record shapes from a Hugging Face dataset (optional `datasets`).

Templates are data (unmask/templates.toml). The split is decided by a hash of each pair's key
(file:line, dataset index, or source path + line + name), like the pre-training corpus.

A row is `[BOS] prompt response [EOS] tail` cut to L tokens; the tail is [EOS] (`eos = tail`,
`all`) or [PAD] (`eos = first`). `spans[i] = (a, e)`: the response starts at a, its [EOS] is at e
(e = L when the response was cut). Maskable positions: `[a, L)` (tail, all) or `[a, e]` (first);
scored positions: `[a, e]` (tail, first) or `[a, L)` (all). So with `tail` the model sees training
canvases like inference canvases (it must itself decide where the answer ends) while the loss is
not dominated by padding.
"""

from __future__ import annotations

import ast
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unmask.config import Config
from unmask.data.corpus import (
    SPLITS,
    DataError,
    PreparedData,
    _read_text,
    _split_of,
    load_hf_dataset,
    stdlib_files,
)
from unmask.data.tokenizer import Tokenizer

TEMPLATES_FILE = Path(__file__).parent / "templates.toml"


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    key: str  # where it came from: `file:line`, `hf:NAME:index`, `path:line:name`


@dataclass(frozen=True)
class Template:
    prompt: str
    prompt_with_input: str
    turn: str
    assistant: str

    def alpaca(self, instruction: str, input: str = "") -> str:
        if input.strip():
            return self.prompt_with_input.format(instruction=instruction, input=input)
        return self.prompt.format(instruction=instruction)

    def chat(self, turns: list[dict[str, str]]) -> str:
        """The prompt before the final assistant reply: every earlier turn, then `assistant`."""
        return "".join(self.turn.format(role=t["role"], content=t["content"]) for t in turns) + self.assistant


def templates() -> dict[str, Template]:
    raw = tomllib.loads(TEMPLATES_FILE.read_text())
    return {name: Template(**fields) for name, fields in raw.items()}


def load_template(name: str, data: str = "") -> Template:
    """A template by name; `auto` is `code` for stdlib-functions and `alpaca` otherwise."""
    if name == "auto":
        name = "code" if data.startswith("stdlib-functions") else "alpaca"
    known = templates()
    if name not in known:
        raise DataError(
            f"--instruct.template: unknown template {name!r} (known: {', '.join(sorted(known))}; "
            f"add one to {TEMPLATES_FILE})"
        )
    return known[name]


# ---------------------------------------------------------------------------------------------
# stdlib-functions: (signature + docstring, body) pairs via `ast`


def _strip_indent(lines: list[str], indent: str) -> str:
    """Remove the definition's own indentation from every line that starts with it (lines inside
    multi-line strings that are indented less are left alone)."""
    return "".join(ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines)


def function_pairs(source: str, key: str) -> list[Pair]:
    """The (header + docstring, body) pair of every documented function in `source` whose body has
    a statement after the docstring, starting on a later line; pairs that do not re-join into
    parseable code are skipped."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
            continue
        if ast.get_docstring(node) is None or node.body[1].lineno <= node.body[0].end_lineno:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        doc_end, end = node.body[0].end_lineno, node.end_lineno
        first = lines[start]
        indent = first[: len(first) - len(first.lstrip())]
        prompt = _strip_indent(lines[start:doc_end], indent)
        response = _strip_indent(lines[doc_end:end], indent)
        if not response.endswith("\n"):
            response += "\n"
        try:
            ast.parse(prompt + response)
        except SyntaxError:
            continue
        out.append(Pair(prompt, response, f"{key}:{node.lineno}:{node.name}"))
    return out


def stdlib_function_pairs(modules: tuple[str, ...] = ()) -> list[Pair]:
    return [p for rel, path in stdlib_files(modules) for p in function_pairs(_read_text(path), rel)]


# ---------------------------------------------------------------------------------------------
# Alpaca / chat records


def record_pair(record: Any, where: str, template: Template) -> Pair:
    """One Alpaca or chat record -> Pair; `where` (file:line) names it in every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message must be the assistant's reply, got role {msgs[-1]['role']!r}"
            )
        prompt, response = template.chat(msgs[:-1]), msgs[-1]["content"]
        field = "messages[-1].content"
    else:
        for name in ("instruction", "output"):
            if not isinstance(record.get(name), str):
                raise DataError(
                    f"{where}: missing string field `{name}` (Alpaca records need "
                    "`instruction` and `output`; chat records need `messages`)"
                )
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise DataError(f"{where}: field `input` must be a string")
        if not record["instruction"].strip():
            raise DataError(f"{where}: empty `instruction`")
        prompt, response, field = template.alpaca(record["instruction"], extra), record["output"], "output"
    if not response.strip():
        raise DataError(f"{where}: empty response (`{field}`)")
    return Pair(prompt, response, where)


def _file_records(path: Path) -> list[tuple[str, Any]]:
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return [(f"{path}: record {i}", r) for i, r in enumerate(records, start=1)]
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON: {e.msg}") from e
        return out
    raise DataError(f"--instruct.data {path}: unsupported file type (use .json or .jsonl)")


def _hf_records(spec: str) -> list[tuple[str, Any]]:
    ds = load_hf_dataset(spec, "--instruct.data")
    split = ds["train"] if "train" in ds else next(iter(ds.values()))
    return [(f"{spec}:{i}", dict(r)) for i, r in enumerate(split)]


def read_pairs(spec: str, template: str = "auto") -> list[Pair]:
    """Every pair of an instruction source (see the module docstring)."""
    if spec == "stdlib-functions" or spec.startswith("stdlib-functions:"):
        modules = tuple(m for m in spec.removeprefix("stdlib-functions").lstrip(":").split(",") if m)
        pairs = stdlib_function_pairs(modules)
    else:
        tmpl = load_template(template, spec)
        if spec.startswith("hf:"):
            records = _hf_records(spec)
        else:
            path = Path(spec)
            if not path.is_file():
                raise DataError(
                    f"--instruct.data {spec!r}: no such file (and not `stdlib-functions` or `hf:NAME`)"
                )
            records = _file_records(path)
        pairs = [record_pair(r, where, tmpl) for where, r in records]
    if template != "auto" and spec.startswith("stdlib-functions"):
        tmpl = load_template(template)
        pairs = [Pair(tmpl.alpaca(p.prompt), p.response, p.key) for p in pairs]
    if not pairs:
        raise DataError(f"--instruct.data {spec!r} holds no prompt/response pairs")
    return pairs


def split_pairs(pairs: list[Pair], valid_fraction: float, test_fraction: float) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in pairs:
        out[_split_of(p.key, valid_fraction, test_fraction)].append(p)
    return out


def load_pairs(cfg: Config) -> dict[str, list[Pair]]:
    """The configured pairs, split by key hash with the data config's fractions."""
    return split_pairs(
        read_pairs(cfg.instruct.data, cfg.instruct.template), cfg.data.valid_fraction, cfg.data.test_fraction
    )


# ---------------------------------------------------------------------------------------------
# rows


def encode_pairs(
    pairs: list[Pair], tokenizer: Tokenizer, seq_len: int, eos: str, max_prompt: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows [N, L], spans [N, 2] (response start, its [EOS] position or L), and how many pairs were
    dropped because their prompt ([BOS] included) is longer than `max_prompt` (0: L // 2)."""
    limit = max_prompt or seq_len // 2
    tail = tokenizer.pad_id if eos == "first" else tokenizer.eos_id
    prompts = tokenizer.encode_batch([p.prompt for p in pairs])
    responses = tokenizer.encode_batch([p.response for p in pairs])
    rows, spans, dropped = [], [], 0
    for p_ids, r_ids in zip(prompts, responses, strict=True):
        a = 1 + len(p_ids)
        if a > limit or a >= seq_len:
            dropped += 1
            continue
        row = np.full(seq_len, tail, dtype=np.int64)
        seq = [tokenizer.bos_id, *p_ids, *r_ids, tokenizer.eos_id][:seq_len]
        row[: len(seq)] = seq
        rows.append(row)
        spans.append((a, min(a + len(r_ids), seq_len)))
    if not rows:
        return np.zeros((0, seq_len), np.int64), np.zeros((0, 2), np.int64), dropped
    return np.stack(rows), np.asarray(spans, dtype=np.int64), dropped


def response_mask(spans: np.ndarray, seq_len: int, eos: str) -> np.ndarray:
    """[N, L] bool: the positions that carry loss — never the prompt."""
    pos = np.arange(seq_len)
    after = pos >= spans[:, :1]
    return after if eos == "all" else after & (pos <= spans[:, 1:2])


def maskable_mask(spans: np.ndarray, seq_len: int, eos: str) -> np.ndarray:
    """[N, L] bool: the positions that may be masked: the whole response region, its [EOS] tail
    included, except with `first` (whose [PAD] tail stays visible)."""
    pos = np.arange(seq_len)
    after = pos >= spans[:, :1]
    return after & (pos <= spans[:, 1:2]) if eos == "first" else after


def prepare_instruct(
    cfg: Config,
    tokenizer: Tokenizer,
    splits: tuple[str, ...] = ("train", "validation"),
    *,
    verbose: bool = False,
) -> PreparedData:
    """Rows and spans of the configured pairs, per split (errors if a split ends up empty)."""
    pairs = load_pairs(cfg)
    rows, spans = {}, {}
    for split in splits:
        r, s, dropped = encode_pairs(
            pairs[split], tokenizer, cfg.data.seq_len, cfg.instruct.eos, cfg.instruct.max_prompt
        )
        if len(r) == 0:
            raise DataError(
                f"--instruct.data {cfg.instruct.data!r}: no {split} pairs fit rows of "
                f"{cfg.data.seq_len} tokens ({len(pairs[split])} pairs, {dropped} with a prompt "
                "too long); raise --data.seq_len or --instruct.max_prompt"
            )
        rows[split], spans[split] = r, s
        if verbose:
            cut = int((s[:, 1] >= cfg.data.seq_len).sum())
            print(
                f"{split}: {len(r)} pairs ({dropped} dropped: prompt too long; {cut} responses cut at "
                f"{cfg.data.seq_len} tokens)",
                flush=True,
            )
    return PreparedData(tokenizer, rows, spans)
