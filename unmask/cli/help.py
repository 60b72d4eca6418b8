"""Help text for the config fields a command accepts as `--section.field=value`: every field with its
default and its one-line doc, read from the docstrings under the fields in `unmask/config.py`."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect

from unmask import config


@functools.cache
def field_docs() -> dict[str, dict[str, str]]:
    """{dataclass name: {field: first line of the docstring written under it}}."""
    tree = ast.parse(inspect.getsource(config))
    docs: dict[str, dict[str, str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        own = docs.setdefault(cls.name, {})
        for a, b in zip(cls.body, cls.body[1:], strict=False):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                own[a.target.id] = " ".join(b.value.value.split())
    return docs


def section_help(name: str, section: object) -> list[str]:
    """`[name]` then one line per field: `--name.field=default  doc`."""
    docs = field_docs().get(type(section).__name__, {})
    lines = [f"  [{name}]"]
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(f"    --{name}.{f.name}={shown}\n        {docs.get(f.name, '')}")
    return lines


def config_help(sections: tuple[str, ...] | None = None, shorthands: tuple[str, ...] = ()) -> str:
    """Help for the shorthands and the config sections a command takes (all when `sections` is None)."""
    cfg = config.Config()
    names = sections or tuple(f.name for f in dataclasses.fields(cfg))
    lines = []
    if shorthands:
        lines += ["shorthands:", *(f"  {s}" for s in shorthands), ""]
    lines.append(
        "config fields (--section.field=value or --section.field value; the defaults shown are "
        "the built-in ones, a --config file or checkpoint changes them):"
    )
    for name in names:
        lines += section_help(name, getattr(cfg, name))
    return "\n".join(lines)
