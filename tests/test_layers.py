"""The package's layers, written down once: a module may import its own layer and the ones below,
never one above. `unmask/__init__.py` (the lazy public API) sits outside the order."""

import ast
from pathlib import Path

import pytest

import unmask

# lowest first; a subpackage or a top-level module -> its layer
LAYERS = [
    {"config", "config_check", "decode_config", "config_io", "schedules", "precision", "integrity"},
    {"data"},
    {"models"},
    {"decoding"},
    {"training"},
    {"evaluation"},
    {"exporting"},
    {"serve"},
    {"bench"},
    {"repro"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
ROOT = Path(unmask.__file__).parent


def _unit(module: str) -> str:
    """`unmask.decoding.generate` -> `decoding`."""
    return module.split(".")[1]


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every `unmask.X` module imported anywhere in the file, function-level imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "unmask":  # `from unmask import masks` style
                out.extend((node.lineno, f"unmask.{a.name}") for a in node.names)
            elif node.module.startswith("unmask."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names if a.name.startswith("unmask."))
    return out


def test_every_module_has_a_layer():
    units = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()}
    assert units - {"configs"} <= set(LAYER_OF), f"modules with no layer: {units - set(LAYER_OF)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_from_a_higher_layer(path):
    own = LAYER_OF[path.relative_to(ROOT).parts[0].removesuffix(".py")]
    upward = [f"line {n}: {m}" for n, m in _imports(path) if LAYER_OF[_unit(m)] > own]
    assert not upward, f"{path.relative_to(ROOT)} imports from a higher layer: {upward}"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from unmask.training.loop import train\n")
    assert [m for _, m in _imports(bad)] == ["unmask.training.loop"]
    assert LAYER_OF[_unit("unmask.training.loop")] > LAYER_OF["models"]
