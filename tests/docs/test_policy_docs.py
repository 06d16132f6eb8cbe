"""docs/policy_gradient.md: every Python block runs, in order, and prints what the page claims."""

import re
from pathlib import Path

import pytest
import torch

import sod_kernels

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy_gradient.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_block_runs_and_the_sketches_match_the_loop(capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 3  # own loop, verl, TRL
    namespace: dict = {"__name__": "policy_gradient_doc"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out

    # Epoch 0: the policy has not moved, so ratio = 1 and the loss is minus the token-mean advantage.
    ns = namespace
    m = ns["mask"].double()
    minus_mean_advantage = -(ns["inputs"].advantages.double() * m).sum() / m.sum()
    epoch0 = re.search(r"epoch 0: loss (-?[\d.]+) ratio ([\d.]+)", out)
    assert epoch0 is not None
    assert float(epoch0.group(1)) == pytest.approx(minus_mean_advantage.item(), abs=1e-4)
    assert float(epoch0.group(2)) == 1.0
    epoch1 = re.search(r"epoch 1: loss (-?[\d.]+) ratio ([\d.]+) kl\(old\|\|new\) ([\d.e+-]+)", out)
    assert epoch1 is not None and float(epoch1.group(3)) > 0
    assert "steps per row [2, 2, 2, 2, 2, 2, 2, 2]" in out

    # The verl and TRL sketches give the loss of the full (shifted) tensors on the current student.
    student = ns["student"]
    with torch.no_grad():
        full = sod_kernels.fused_sod_policy_loss(student.hidden_states(ns["input_ids"])[:, :-1],
                                                 student.lm_head.weight, ns["targets"], ns["old_logprobs"],
                                                 ns["inputs"].advantages, ns["mask"])
        verl_loss, metrics = ns["sod_actor_loss"](student.hidden_states(ns["input_ids"]), student.lm_head.weight,
                                                  ns["batch"])
        trl_loss = ns["sod_grpo_loss"](student.hidden_states(ns["input_ids"]), student.lm_head.weight,
                                       ns["trl_inputs"])
    assert verl_loss.item() == pytest.approx(full.item(), rel=1e-6)
    assert trl_loss.item() == pytest.approx(full.item(), rel=1e-6)
    assert set(metrics) == {"actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"}
