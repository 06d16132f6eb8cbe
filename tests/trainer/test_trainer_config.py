"""Config files and flags: every value typed (or refused naming the field and the file), impossible values
refused before any model is built (exit 2, one error line), --flag / --no-flag booleans, and --resume
reusing the run folder's saved settings."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.trainer.test_trainer_rollout import ArithmeticTool
from tests.trainer.test_trainer_train import make_trainer
from trainer.__main__ import train_main
from trainer.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME
from trainer.config import TrainConfig, add_config_arguments, config_from_args


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def exit_code(argv, capsys) -> tuple[int, str, str]:
    try:
        code = train_main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if the command line gets as far as loading a model, a tokenizer or the sandbox."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model, tokenizer or sandbox was loaded")

    for name in ("trainer.models.load_model", "trainer.models.load_tokenizer", "trainer.train.load_model",
                 "trainer.train.load_tokenizer", "trainer.tools.sandbox_executor"):
        monkeypatch.setattr(name, refuse)


@pytest.fixture
def test_tool(monkeypatch):
    """Real training runs from the command line with the arithmetic test tool instead of the sandbox."""
    monkeypatch.setattr("trainer.tools.sandbox_executor", lambda *args, **kwargs: ArithmeticTool())
    monkeypatch.setattr("trainer.tools.describe_sandbox", lambda: "sandbox: the arithmetic test tool")


@pytest.mark.parametrize("text, field, value", [
    ('{"overwrite": "false"}', "overwrite", False),
    ('{"overwrite": "true"}', "overwrite", True),
    ('{"resume": "no"}', "resume", False),
    ('{"tools_schema": 0}', "tools_schema", False),
    ('{"updates": 3.0}', "updates", 3),
    ('{"updates": "4"}', "updates", 4),
    ('{"lr": "3e-4"}', "lr", 3e-4),
    ('{"betas": ["0.8", 0.95]}', "betas", (0.8, 0.95)),
    ('{"sandbox_allow_missing": ["seccomp"]}', "sandbox_allow_missing", ("seccomp",)),
])
def test_json_values_are_converted_to_the_field_types(tmp_path, text, field, value):
    config = parse("--config", write(tmp_path, "run.json", text), "--output-dir", str(tmp_path / "out"))
    assert getattr(config, field) == value and type(getattr(config, field)) is type(value)


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    # PyYAML reads 3e-4 (no dot) as a string and "no" as a string ("yes"/"no" are YAML 1.1 booleans only unquoted).
    path = write(tmp_path, "run.yaml", "lr: 3e-4\nresume: 'no'\noverwrite: 'false'\nupdates: 5\ndelta: .5\n")
    config = parse("--config", path)
    assert (config.lr, config.resume, config.overwrite, config.updates, config.delta) == (3e-4, False, False, 5, 0.5)
    assert isinstance(config.lr, float)


@pytest.mark.parametrize("text, expected", [
    ('{"updates": 2.7}', ["updates", "integer", "2.7"]),
    ('{"lr": "fast"}', ["lr", "'fast'"]),
    ('{"resume": "maybe"}', ["resume", "bool", "'maybe'"]),
    ('{"updates": true}', ["updates", "boolean"]),
    ('{"betas": [0.9]}', ["betas", "[0.9]"]),
    ('{"student": 7}', ["student", "str"]),
    ('{"sandbox_allow_missing": "seccomp"}', ["sandbox_allow_missing"]),
    ('{"no_such_field": 1}', ["no_such_field", "unknown"]),
    ('{"updates": 2,}', ["line 1 column", "not valid JSON"]),
    ('[1, 2]', ["mapping"]),
])
def test_values_that_do_not_convert_are_refused_naming_field_and_file(tmp_path, text, expected):
    path = write(tmp_path, "run.json", text)
    with pytest.raises(ValueError) as info:
        parse("--config", path)
    message = str(info.value)
    assert "run.json" in message and all(part in message for part in expected), message


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "run.yaml", "updates: 2\nlr: [1\n")
    with pytest.raises(ValueError, match=r"run\.yaml' line 3 .*not valid YAML"):
        parse("--config", path)


def test_string_false_overwrite_does_not_delete_a_run(tmp_path, capsys, no_models):
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS_NAME).write_text('{"update": 0}\n')
    (out / CHECKPOINT_NAME).write_bytes(b"previous run")
    config = write(tmp_path, "run.json", json.dumps({"overwrite": "false", "output_dir": str(out)}))
    code, _, err = exit_code(["--config", config], capsys)
    assert code == 2 and "already holds a run" in err and "Traceback" not in err
    assert (out / CHECKPOINT_NAME).read_bytes() == b"previous run" and (out / METRICS_NAME).exists()


IMPOSSIBLE = [
    ("--delta", "nan", "delta must be a finite number >= 0"),
    ("--epsilon", "inf", "epsilon must be a finite number > 0"),
    ("--temperature", "inf", "temperature must be a finite number > 0"),
    ("--coef", "inf", "coef must be a finite number"),
    ("--clip-low", "1.5", "clip_low must be a finite number >= 0 and < 1"),
    ("--clip-high", "-0.1", "clip_high must be a finite number >= 0"),
    ("--dual-clip", "0.5", "dual_clip must be a finite number > 1"),
    ("--betas", "0.9", "betas"),
    ("--betas", "0.9 1.0", "betas[1] must be a finite number >= 0 and < 1"),
    ("--lr", "inf", "lr must be a finite number > 0"),
    ("--weight-decay", "-0.1", "weight_decay must be a finite number >= 0"),
    ("--grad-clip", "nan", "grad_clip must be a finite number"),
    ("--tool-timeout-s", "inf", "tool_timeout_s must be a finite number > 0"),
    ("--seed", "-1", "seed must be >= 0"),
    ("--student", " ", "student must not be empty"),
    ("--reward-fn", "no_such_module_xyz:score", "reward_fn 'no_such_module_xyz:score': cannot import"),
]


@pytest.mark.parametrize("flag, value, message", IMPOSSIBLE, ids=[f"{f}={v}" for f, v, _ in IMPOSSIBLE])
def test_impossible_values_exit_2_before_any_model_is_built(tmp_path, capsys, no_models, flag, value, message):
    out = tmp_path / "run"
    values = value.split(" ") if value.strip() and " " in value else [value]
    code, stdout, err = exit_code(["--output-dir", str(out), flag, *values], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("python -m trainer train: error: ") \
        and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_impossible_values_in_a_config_file_name_the_field(tmp_path):
    for text, message in [("delta: .nan\n", "delta must be a finite number"),
                          ("dual_clip: 0.5\n", "dual_clip must be a finite number > 1"),
                          ("betas: [0.9]\n", "betas")]:
        with pytest.raises(ValueError, match=message):
            parse("--config", write(tmp_path, "run.yaml", text))
    with pytest.raises(ValueError, match="clip_low"):
        TrainConfig(clip_low=1.0).validate()


def test_booleans_are_flag_pairs(tmp_path):
    assert parse("--resume").resume is True and parse("--no-resume").resume is False
    assert parse("--tools-schema").tools_schema is True and parse("--no-tools-schema").tools_schema is False
    config = write(tmp_path, "run.yaml", "overwrite: true\ntools_schema: true\n")
    overridden = parse("--config", config, "--no-overwrite", "--no-tools-schema")
    assert (overridden.overwrite, overridden.tools_schema) == (False, False)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "false"])  # a boolean flag takes no value
    assert "--no-allow-config-change" in parser.format_help()


def test_resume_reuses_the_saved_config_unless_a_flag_overrides_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = TrainConfig(objective="pg", seed=3, updates=5, lr=2e-3, betas=(0.8, 0.9), output_dir="elsewhere",
                        overwrite=True).to_dict()
    (out / CONFIG_NAME).write_text(json.dumps(saved))
    config = parse("--output-dir", str(out), "--resume")
    assert (config.objective, config.seed, config.updates, config.lr, config.betas) == ("pg", 3, 5, 2e-3, (0.8, 0.9))
    # The invocation's own settings never come from the folder: where it is, and resume / overwrite.
    assert (config.output_dir, config.resume, config.overwrite) == (str(out), True, False)
    # Flags, then a --config file, override the saved settings.
    assert parse("--output-dir", str(out), "--resume", "--updates", "7").updates == 7
    file = write(tmp_path, "more.yaml", f"output_dir: {out}\nresume: true\nseed: 4\n")
    assert (parse("--config", file).seed, parse("--config", file, "--seed", "6").seed) == (4, 6)
    # A fresh start uses the defaults, not the folder's settings.
    assert parse("--output-dir", str(out)).objective == "kl"
    # A damaged saved config is an error naming it.
    (out / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="saved config .*config.json"):
        parse("--output-dir", str(out), "--resume")


def test_resume_from_the_command_line_continues_under_the_saved_settings(tmp_path, capsys, test_tool):
    out = tmp_path / "run"
    first = ["--updates", "1", "--prompts-per-step", "2", "--rollouts-per-prompt", "1", "--max-new-tokens", "6",
             "--max-turns", "2", "--tool-workers", "1", "--seed", "5", "--lr", "0.005", "--output-dir", str(out)]
    code, _, err = exit_code(first, capsys)
    assert code == 0, err
    # Only the folder and the new length: the seed and learning rate are the saved ones (else: refused).
    code, stdout, err = exit_code(["--output-dir", str(out), "--resume", "--updates", "2"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout
    assert [json.loads(line)["update"] for line in (out / METRICS_NAME).read_text().splitlines()] == [0, 1]
    assert json.loads((out / CONFIG_NAME).read_text())["seed"] == 5


def test_a_model_that_cannot_be_used_is_one_error_line(tmp_path, capsys, test_tool):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    code, _, err = exit_code(["--student", str(folder), "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "has no config.json" in err
    (folder / "config.json").write_text("{}")  # a folder with a config but no tokenizer
    code, _, err = exit_code(["--student", str(folder), "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "cannot load its tokenizer" in err and len(err.strip().splitlines()) == 1, err


def test_make_trainer_still_takes_python_values(tmp_path):
    # Values set in Python are typed too: an int learning rate is a float, a list of betas a tuple.
    config = TrainConfig(lr=1, betas=[0.9, 0.99], output_dir=str(tmp_path / "x")).validate()
    assert isinstance(config.lr, float) and config.betas == (0.9, 0.99)
    assert make_trainer(config).optimizer.param_groups[0]["betas"] == (0.9, 0.99)
