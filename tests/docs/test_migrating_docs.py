"""docs/migrating.md: every Python block runs (each checks its own claim with asserts) and prints the numbers
it compares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "migrating.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks(DOC.read_text())


def test_the_page_has_its_four_examples():
    assert len(BLOCKS) == 4
    assert "LigerFusedLinearJSDLoss" in BLOCKS[0] and "hard_loss_weight=0.5" in BLOCKS[0]
    assert "padded" in BLOCKS[1]
    assert "generalized_jsd_loss" in BLOCKS[2]
    assert "SODDistillationConfig" in BLOCKS[3]


@pytest.mark.parametrize("index", range(4))
def test_each_block_runs_and_its_checks_hold(index, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index].replace("/tmp/sod-migration", str(tmp_path / "run"))
    exec(compile(code, f"{DOC.name} block {index + 1}", "exec"), {"__name__": "migrating_doc"})
    out = capsys.readouterr().out
    if index == 0:
        assert re.search(r"Liger \d+\.\d+  ours \d+\.\d+", out)
    if index == 1:
        assert re.search(r"true \d+\.\d+  ours \d+\.\d+  Liger \d+\.\d+", out)
    if index == 2:
        assert out.count("GKD") == 4
