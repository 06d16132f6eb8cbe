"""The built-in task: problems are deterministic, the solver and the exact-match reward are right."""

import json
import random
import re

import numpy as np
import pytest

from trainer.sft import solution_turns
from trainer.task import (FaultInjector, Problem, ProblemSource, corrupt_observation, extract_answer,
                          extract_tool_call, generate_problem, held_out_problem, load_dataset, normalize_answer,
                          reward, solve)

N_PROBLEMS = 300


def _python_value(code: str) -> str:
    """What the solution's print statement shows, computed independently with Python's own arithmetic."""
    match = re.fullmatch(r"print\((.*)\)", code)
    assert match, code
    return str(eval(match.group(1), {"__builtins__": {}}))  # the task only emits '<int><op><int>'


def test_solver_and_reward_are_exact_on_generated_problems():
    for index in range(N_PROBLEMS):
        problem = generate_problem(3, index)
        assert solve(problem) == problem.answer
        assert reward(problem.answer, problem.answer) == 1.0
        assert reward(str(int(problem.answer) + 1), problem.answer) == 0.0
        assert reward(None, problem.answer) == 0.0
        # Every intermediate tool output is what Python prints for the step's code.
        assert [_python_value(code) for code in problem.solution_code] == list(problem.tool_outputs)
        assert problem.tool_outputs[-1] == problem.answer
        # The numbers the chain's text states are the operands the solution uses.
        if problem.question.startswith("start"):
            stated = [int(x) for x in re.findall(r"\d+", problem.question)]
            operands = [int(re.fullmatch(r"print\(-?\d+[+\-*](\d+)\)", code).group(1))
                        for code in problem.solution_code]
            assert stated[1:] == operands


def test_problems_are_a_pure_function_of_seed_and_index():
    assert generate_problem(5, 11) == generate_problem(5, 11)
    first = [generate_problem(5, i) for i in range(50)]
    other_seed = [generate_problem(6, i) for i in range(50)]
    assert first != other_seed
    assert held_out_problem(5, 0) != generate_problem(5, 0)
    kinds = {p.question.startswith("start") for p in first}
    assert kinds == {True, False}  # both arithmetic chains and word problems occur
    steps = {len(p.solution_code) for p in first}
    assert len(steps) >= 3  # one, two and three tool calls occur


def test_reference_solution_turns_replay_the_tool_outputs():
    problem = generate_problem(1, 4)
    turns, observations = solution_turns(problem)
    assert observations == list(problem.tool_outputs)
    assert turns[-1] == f"Answer: {problem.answer}"
    assert [extract_tool_call(t) for t in turns[:-1]] == list(problem.solution_code)
    # Noise changes an operand and every later observation follows the wrong call consistently.
    noisy_turns, noisy_obs = solution_turns(problem, noise_rate=1.0, rng=random.Random(0))
    assert noisy_turns[:-1] != turns[:-1]
    for turn, observed in zip(noisy_turns[:-1], noisy_obs):
        assert _python_value(extract_tool_call(turn)) == observed
    assert noisy_turns[-1] == f"Answer: {noisy_obs[-1]}"


def test_answer_and_tool_call_parsing():
    assert extract_answer("so Answer: 42") == "42"
    assert extract_answer("Answer: 1 then Answer: -7") == "-7"
    assert extract_answer("no answer here") is None
    assert normalize_answer(" 007 ") == "7"
    assert normalize_answer("12.0") == "12"
    assert reward("12.0", "12") == 1.0
    assert extract_tool_call("<tool_call>print(1+2)</tool_call>") == "print(1+2)"
    qwen = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
    assert extract_tool_call(qwen) == "print(6*7)"
    as_string = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
    assert extract_tool_call(as_string) == "print(1)"
    assert extract_tool_call("<tool_call>print(5)") == "print(5)"  # cut at the stop token
    assert extract_tool_call("Answer: 3") is None


def test_fault_injection_is_deterministic_and_respects_the_rate():
    assert corrupt_observation("49", np.random.default_rng(0)) != "49"
    assert re.fullmatch(r"-?\d+", corrupt_observation("49", np.random.default_rng(1)))
    assert "Error" in corrupt_observation("no digits", np.random.default_rng(0))
    never, always = FaultInjector(0.0, seed=1), FaultInjector(1.0, seed=1)
    assert never.maybe_corrupt("12", 0, 0, 0) == ("12", False)
    corrupted, faulted = always.maybe_corrupt("12", 0, 0, 0)
    assert faulted and corrupted != "12"
    assert always.maybe_corrupt("12", 0, 0, 0) == (corrupted, True)
    half = FaultInjector(0.5, seed=2)
    hits = sum(half.maybe_corrupt("10", 0, i, 0)[1] for i in range(400))
    assert 150 < hits < 250
    with pytest.raises(ValueError, match="tool_fault_rate"):
        FaultInjector(1.5, seed=0)


def test_local_jsonl_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": f"what is {i}+1?", "answer": str(i + 1)} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems = load_dataset(path)
    assert problems[3] == Problem(question="what is 3+1?", answer="4")
    source = ProblemSource(seed=0, dataset=str(path))
    train = {source.train(i).question for i in range(len(source.train_ids))}
    held = {source.held_out(i).question for i in range(len(source.held_out_ids))}
    assert train.isdisjoint(held) and len(train | held) == 20
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}))
    with pytest.raises(ValueError, match="'answer'"):
        load_dataset(bad)
    with pytest.raises(ValueError, match="dataset must"):
        load_dataset(tmp_path / "missing.jsonl")
