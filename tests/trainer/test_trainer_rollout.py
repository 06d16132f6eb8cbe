"""Rollout bookkeeping: response_mask is 1 exactly on sampled tokens, steps are the tool turns.

The scripted generator below plays known assistant turns (the task's reference solutions), so every token
of the trajectory is predictable; one test also runs a real tiny Qwen3 model through ``generate``.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from sod_kernels import step_ids_from_mask
from trainer.models import build_preset, hidden_states, lm_head_weight, output_head
from trainer.rollout import ChatFormat, GeneratedTurn, HFTurnGenerator, RolloutSettings, ToolObservation, run_rollouts
from trainer.sft import solution_turns
from trainer.task import FaultInjector, generate_problem
from trainer.tokenizer import build_task_tokenizer

SCRIPTED_LOGPROB = -0.25


class ArithmeticTool:
    """Test double of the sandbox: runs ``print(<int><op><int>)`` exactly, counts its calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, code: str) -> ToolObservation:
        self.calls.append(code)
        match = re.fullmatch(r"print\((-?\d+)([+\-*])(-?\d+)\)", code.strip())
        if match is None:
            return ToolObservation(output="SyntaxError: invalid syntax", ok=False)
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return ToolObservation(output=f"{a + b if op == '+' else a - b if op == '-' else a * b}\n")


class ReplayGenerator:
    """Plays scripted assistant turns: turn k of the conversation whose question is Q is ``script[Q][k]``.

    With a ``model``, the log-probs are the model's own (a forward pass over context + turn), so policy
    objectives see a consistent old policy; otherwise every token gets ``SCRIPTED_LOGPROB``.
    """

    def __init__(self, chat: ChatFormat, script: dict[str, list[str]], model=None, temperature: float = 1.0):
        self.chat = chat
        self.script = script
        self.model = model
        self.temperature = temperature
        self.calls = 0

    def __call__(self, contexts, max_new_tokens):
        self.calls += 1
        turns = []
        for context in contexts:
            text = self.chat.tokenizer.decode(context)
            question = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL).group(1)
            turn = text.count("<|im_start|>assistant\n") - 1
            ids = self.chat.assistant_turn_ids(self.script[question][turn])[:max_new_tokens]
            turns.append(GeneratedTurn(ids, self._logprobs(context, ids)))
        return turns

    @torch.no_grad()
    def _logprobs(self, context, ids):
        if self.model is None:
            return [SCRIPTED_LOGPROB] * len(ids)
        head = output_head(self.model)
        device = head.weight.device
        full = torch.tensor([list(context) + ids], device=device)
        hidden = hidden_states(self.model, full, torch.ones_like(full))[0, len(context) - 1:-1]
        logp = torch.log_softmax(head.logits(hidden) / self.temperature, dim=-1)
        return logp.gather(1, torch.tensor(ids, device=device)[:, None])[:, 0].tolist()


def scripted_setup(n: int, seed: int = 0):
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    problems = [generate_problem(seed, i) for i in range(n)]
    script = {p.question: solution_turns(p)[0] for p in problems}
    return tokenizer, chat, problems, script


def test_scripted_rollout_masks_and_steps():
    tokenizer, chat, problems, script = scripted_setup(6)
    tool = ArithmeticTool()
    settings = RolloutSettings(max_turns=6, max_new_tokens=40, max_total_tokens=1000, tool_workers=3)
    trajectories = run_rollouts(problems, list(range(6)), ReplayGenerator(chat, script), chat, tool, settings)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for problem, traj in zip(problems, trajectories):
        turns = script[problem.question]
        assert traj.finished and traj.reward == 1.0 and traj.final_answer == problem.answer
        assert traj.observations == list(problem.tool_outputs)
        # One step per assistant turn: tool calls, then the answer.
        assert len(traj.steps) == len(problem.solution_code) + 1 == len(turns)
        ids = torch.tensor(traj.token_ids)
        mask = torch.tensor(traj.response_mask)
        step_ids = step_ids_from_mask(mask[None])[0]
        assert int(step_ids.max()) + 1 == len(turns)
        for k, ((start, end), content) in enumerate(zip(traj.steps, turns)):
            # Exactly the scripted tokens (content + end-of-turn) are 1; they form step k.
            assert traj.token_ids[start:end] == chat.encode(content) + [im_end]
            assert mask[start:end].eq(1).all() and step_ids[start:end].eq(k).all()
        # Everything else (prompt, template tokens, tool outputs) is 0 and carries no log-prob.
        generated = torch.zeros_like(mask)
        for start, end in traj.steps:
            generated[start:end] = 1
        assert torch.equal(mask, generated)
        logp = torch.tensor(traj.sample_logprobs)
        assert torch.all(logp[mask == 0] == 0) and torch.all(logp[mask == 1] == SCRIPTED_LOGPROB)
        # The masked-out segments between steps are the template around the tool response.
        for k in range(len(traj.steps) - 1):
            between = tokenizer.decode(ids[traj.steps[k][1]:traj.steps[k + 1][0]].tolist())
            assert between == (f"\n<|im_start|>user\n<tool_response>{problem.tool_outputs[k]}</tool_response>"
                               f"<|im_end|>\n<|im_start|>assistant\n")
        assert traj.prompt_length == len(chat.prompt_ids(problem.question))
    assert len(tool.calls) == sum(len(p.solution_code) for p in problems)


def test_rollout_stops_at_max_turns_and_injects_faults():
    tokenizer, chat, problems, script = scripted_setup(8, seed=1)
    settings = RolloutSettings(max_turns=2, max_new_tokens=40, max_total_tokens=1000, tool_workers=1)
    faults = FaultInjector(1.0, seed=0)
    trajectories = run_rollouts(problems, list(range(8)), ReplayGenerator(chat, script), chat, ArithmeticTool(),
                                settings, faults=faults, fault_keys=(3,))
    for problem, traj in zip(problems, trajectories):
        assert len(traj.steps) == min(2, len(problem.solution_code) + 1)
        # Every executed observation was corrupted (rate 1) and recorded against its step.
        assert traj.fault_after_step == list(range(1, len(traj.observations) + 1))
        assert all(o != t for o, t in zip(traj.observations, problem.tool_outputs))
        if len(problem.solution_code) >= 2:
            assert not traj.finished and traj.final_answer is None and traj.reward == 0.0


@pytest.mark.parametrize("logprobs", ["logits", "forward"])
def test_real_tiny_model_rollout_logprobs_match_a_forward_pass(logprobs):
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    model = build_preset("tiny-student", tokenizer, seed=0).eval()
    problems = [generate_problem(0, i) for i in range(4)]
    generate = HFTurnGenerator(model, tokenizer.pad_token_id, chat.stop_ids, temperature=1.0, logprobs=logprobs)
    settings = RolloutSettings(max_turns=2, max_new_tokens=12, max_total_tokens=200)
    torch.manual_seed(0)
    trajectories = run_rollouts(problems, [0, 0, 1, 1], generate, chat, ArithmeticTool(), settings)
    for traj in trajectories:
        mask = torch.tensor(traj.response_mask)
        assert traj.response_mask[:traj.prompt_length] == [0] * traj.prompt_length
        assert int(mask.sum()) == sum(end - start for start, end in traj.steps) > 0
        ids = torch.tensor([traj.token_ids])
        with torch.no_grad():
            hidden = hidden_states(model, ids, torch.ones_like(ids))[0, :-1]
            logp = torch.log_softmax(hidden @ lm_head_weight(model).T, dim=-1)
        expected = logp.gather(1, ids[0, 1:, None])[:, 0]
        sampled = torch.tensor(traj.sample_logprobs[1:])
        on = mask[1:] == 1
        # The log-prob recorded at sampling time is that of the token at the same position.
        torch.testing.assert_close(sampled[on], expected[on], atol=2e-4, rtol=1e-4)
        assert torch.all(sampled[~on] == 0)
        for start, end in traj.steps:
            turn = traj.token_ids[start:end]
            assert len(turn) <= settings.max_new_tokens
            assert all(t not in chat.stop_ids for t in turn[:-1])


def test_logprob_passes_agree():
    """The log-probs read from generate's logits and from a second forward pass (the GPU default) agree, for
    left-padded contexts of different lengths, keyed sampling at a temperature and greedy decoding."""
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    seed = random.randrange(1 << 16)
    model = build_preset("tiny-student", tokenizer, seed=seed).eval()
    contexts = [chat.prompt_ids("What is 3+4?"), chat.prompt_ids("Compute 12*7-5 with the tool, please."),
                chat.prompt_ids("Add 1, 2 and 3.")]
    keys = [(seed, 0, i, 0) for i in range(len(contexts))]
    for temperature, row_keys in ((0.7, keys), (0.0, None)):
        turns = {mode: HFTurnGenerator(model, tokenizer.pad_token_id, chat.stop_ids, temperature, logprobs=mode)(
                     contexts, 12, keys=row_keys) for mode in ("logits", "forward")}
        for a, b in zip(turns["logits"], turns["forward"]):
            assert a.token_ids == b.token_ids and len(a.token_ids) > 0, (seed, temperature)
            np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
    with pytest.raises(ValueError, match="logprobs must be one of"):
        HFTurnGenerator(model, tokenizer.pad_token_id, chat.stop_ids, 1.0, logprobs="cache")
