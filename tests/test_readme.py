"""The README's library example runs as written (only the checkpoint path is swapped for a tiny one)."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def _library_example() -> str:
    section = README.read_text().split("## Library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_decoding_example_runs(checkpoints):
    code = _library_example()
    assert 'load_checkpoint("runs/demo-bd3lm")' in code
    code = code.replace('"runs/demo-bd3lm"', repr(str(checkpoints["block_causal"])))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("block ") and " nfe " in line for line in lines)
    assert any("░" in line for line in lines) and "░" not in lines[-1]  # masks fill in, none left
