"""Datasets as users bring them: number answers written with separators or as fractions, text answers,
prompts given as chat messages, a reward function by import path, and rows that cannot train refused at
load time with the file and the line."""

from __future__ import annotations

import json
import sys

import pytest

from tests.trainer.test_trainer_rollout import ArithmeticTool, ReplayGenerator
from tests.trainer.test_trainer_train import make_trainer, small_config
from trainer.config import TrainConfig
from trainer.rollout import ChatFormat, RolloutSettings, run_rollouts
from trainer.task import (Problem, ProblemSource, extract_answer, load_dataset, load_reward_function, normalize_answer,
                          reward)
from trainer.tokenizer import build_task_tokenizer
from trainer.train import SODTrainer

CHAT = ChatFormat(build_task_tokenizer())
SETTINGS = RolloutSettings(max_turns=2, max_new_tokens=40, max_total_tokens=400, tool_workers=1)


def jsonl(tmp_path, rows, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def replay(problems, final_turns):
    """Roll ``problems`` out with a generator that answers each with its scripted text."""
    script = {p.question: [text] for p, text in zip(problems, final_turns)}
    return run_rollouts(problems, list(range(len(problems))), ReplayGenerator(CHAT, script), CHAT, ArithmeticTool(),
                        SETTINGS)


@pytest.mark.parametrize("answer, written", [
    ("1,000", "Answer: 1000"), ("1000", "Answer: 1,000 nuts."), ("3/4", "Answer: 0.75"), ("0.75", "Answer: 3/4"),
    ("-2.50", "Answer: -2.5"), ("12", "Answer: 12.0"), ("Paris", "Answer: paris."), ("x = 2", "Answer: x  =  2"),
    ("New York City", "so... Answer: new york city"),
])
def test_answers_that_are_not_plain_integers_earn_their_reward(answer, written):
    problem = Problem(question=f"Q {answer}", answer=answer)
    (trajectory,) = replay([problem], [written])
    assert trajectory.finished and trajectory.reward == 1.0, (trajectory.final_answer, answer)
    (wrong,) = replay([problem], ["Answer: 7/8 of something else"])
    assert wrong.reward == 0.0


def test_answer_parsing_and_normal_forms():
    assert extract_answer("Answer: 1 then Answer: Paris\nmore") == "Paris"
    assert extract_answer("Answer:   ") is None and extract_answer("nothing") is None
    assert [normalize_answer(t) for t in ("007", "12.0", "1,000", "3/4", "0.750", "1/3", " Paris. ")] == \
        ["7", "12", "1000", "0.75", "0.75", "1/3", "paris"]
    assert reward("4", "4,0") == 0.0  # "4,0" is no number (commas group digits in threes): compared as text
    assert reward("2", "2", answer_type="text") == 1.0 and reward("2.0", "2", answer_type="text") == 0.0
    assert reward(None, "1") == 0.0


def test_chat_message_prompts_are_sent_as_a_conversation(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "start 2, add 3."}]
    path = jsonl(tmp_path, [{"prompt": messages, "answer": "5"}, {"question": "start 1, add 1.", "answer": 2}])
    problems = load_dataset(path)
    assert problems[0].question == "start 2, add 3." and problems[0].messages == (("system", "Be brief."),
                                                                                  ("user", "start 2, add 3."))
    assert problems[1] == Problem(question="start 1, add 1.", answer="2")
    (trajectory, _) = replay(problems, ["Answer: 5", "Answer: 2"])
    text = CHAT.tokenizer.decode(trajectory.token_ids[:trajectory.prompt_length])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nstart 2, add 3.<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert "'role'" not in text and trajectory.reward == 1.0
    # A run's system prompt goes first unless the row brings its own system message.
    with_system = ChatFormat(CHAT.tokenizer, system_prompt="Use the tool.")
    assert CHAT.tokenizer.decode(with_system.prompt_ids("q", (("user", "q"),))).startswith(
        "<|im_start|>system\nUse the tool.<|im_end|>")
    assert "Use the tool." not in CHAT.tokenizer.decode(with_system.prompt_ids("q", problems[0].messages))


def test_json_array_and_parquet_files(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": "a", "answer": "1"}, {"question": "b", "answer": 0.5}]))
    assert [p.answer for p in load_dataset(path)] == ["1", "0.5"]
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pyarrow.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"}], "answer": "Paris"}])
    pq.write_table(table, tmp_path / "data.parquet")
    (problem,) = load_dataset(tmp_path / "data.parquet")
    assert problem.messages == (("user", "hi"),) and problem.answer == "Paris"


BAD_ROWS = [
    ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n{"question": "c", "answer": 3,, }',
     "line 3 column", "not valid JSON"),
    ('[1, 2]', "line 1", "must be a JSON object"),
    ('{"question": "a"}', "line 1", "needs a prompt"),
    ('{"question": "a", "answer": ["1"]}', "line 1", "'answer' must be a string or a finite number"),
    ('{"question": "a", "answer": true}', "line 1", "'answer' must be a string or a finite number"),
    ('{"question": "a", "answer": "  "}', "line 1", "'answer' is empty"),
    ('{"question": "a", "answer": "step 1\\nstep 2\\n42"}', "line 1", "spans several lines"),
    ('{"question": "a", "answer": "Paris", "answer_type": "number"}', "line 1", "is not a number"),
    ('{"question": "a", "answer": "1", "answer_type": "int"}', "line 1", "'answer_type' must be one of"),
    ('{"question": {"text": "a"}, "answer": "1"}', "line 1", "must be a string or a list of chat messages"),
    ('{"question": "", "answer": "1"}', "line 1", "'question' is empty"),
    ('{"prompt": [], "answer": "1"}', "line 1", "empty list of chat messages"),
    ('{"prompt": [{"role": "user"}], "answer": "1"}', "line 1", "message 0 must be an object"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "answer": "1"}', "line 1", "has role 'bot'"),
    ('{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": "1"}',
     "line 1", "the last message must be the user's"),
]


@pytest.mark.parametrize("text, where, what", BAD_ROWS, ids=[what for _, _, what in BAD_ROWS])
def test_rows_that_cannot_train_are_refused_with_file_and_line(tmp_path, text, where, what):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n\n" + text)  # blank lines are skipped but count in the numbering
    where = "line 5 column" if where == "line 3 column" else "line 3"
    with pytest.raises(ValueError) as info:
        load_dataset(path)
    message = str(info.value)
    assert str(path) in message and where in message and what in message, message


def test_a_reward_function_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(response, answer):\n    return 0.5 if answer.lower() in response.lower() else -1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    function = load_reward_function("my_rewards:score")
    settings = RolloutSettings(**{**SETTINGS.__dict__, "reward_fn": function})
    problems = [Problem("q1", "Paris"), Problem("q2", "line one\nline two")]
    script = {"q1": ["The capital is PARIS."], "q2": ["nothing"]}
    trajectories = run_rollouts(problems, [0, 1], ReplayGenerator(CHAT, script), CHAT, ArithmeticTool(), settings)
    assert [t.reward for t in trajectories] == [0.5, -1.0]
    assert trajectories[0].final_text == "The capital is PARIS."
    # With a reward function, answers may be any text (the function scores them).
    path = jsonl(tmp_path, [{"question": "a", "answer": "step 1\nstep 2"}])
    assert ProblemSource(0, str(path), reward_fn="my_rewards:score").records[0].answer == "step 1\nstep 2"
    with pytest.raises(ValueError, match="reward_fn .*has no callable 'nope'"):
        TrainConfig(reward_fn="my_rewards:nope").validate()
    with pytest.raises(ValueError, match="reward_fn must be 'module:function'"):
        TrainConfig(reward_fn="my_rewards").validate()
    sys.modules.pop("my_rewards", None)


def test_the_run_reports_rows_loaded_and_scored(tmp_path):
    rows = [{"question": f"q{i}", "answer": answer} for i, answer in enumerate(["1", "1,000", "3/4", "Paris", 5])]
    path = jsonl(tmp_path, rows + [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x = 2"}])
    lines = []
    base = make_trainer(small_config(tmp_path, "run"))
    SODTrainer(small_config(tmp_path, "run", dataset=str(path)), base.student, base.teacher, base.tokenizer,
               ArithmeticTool(), log=lines.append)
    (report,) = [line for line in lines if line.startswith("dataset")]
    assert "6 rows loaded (5 for training, 1 held out; 1 given as chat messages)" in report
    assert "the reward can score 6 of 6: 4 number answers" in report and "2 text answers" in report
    assert ProblemSource(0).describe().startswith("problems: the built-in tool-use task")
