"""The README's runnable examples run and print what they claim."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs(capsys):
    runpy.run_path(str(ROOT / "examples/quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "loss" in out and "steps per row        [3, 1]" in out and "step weights w_k" in out


README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_runnable_examples():
    assert len(README_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_python_block_runs(index, capsys):
    exec(compile(README_BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip()
