"""The ``python -m trainer`` command line: argument errors, output-folder guards, log formats and Ctrl-C."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.test_trainer_rollout import ArithmeticTool
from tests.trainer.test_trainer_train import make_trainer
from trainer.__main__ import INTERRUPTED_EXIT, train_main
from trainer.checkpoint import CHECKPOINT_NAME, METRICS_NAME

ROOT = Path(__file__).resolve().parents[2]


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--updates", "2", "--prompts-per-step", "2", "--rollouts-per-prompt", "1", "--max-new-tokens", "8",
            "--max-turns", "2", "--checkpoint-every", "1", "--tool-workers", "1", "--output-dir", str(out), *extra]


def exit_code(argv, capsys) -> tuple[int, str, str]:
    """Run ``train_main`` in this process; (exit status, stdout, stderr)."""
    try:
        code = train_main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("flag, value, expected", [
    ("--objective", "sft", ["invalid choice: 'sft'", "'kl'", "'pg'"]),
    ("--step-divergence", "klx", ["invalid choice: 'klx'", "'kl'", "'sampled'", "'none'"]),
    ("--divergence", "js", ["invalid choice: 'js'", "'reverse_kl'", "'forward_kl'"]),
    ("--log-format", "xml", ["invalid choice: 'xml'", "'text'", "'json'"]),
    ("--tool-fault-rate", "1.5", ["probability in [0, 1]", "'1.5'"]),
    ("--tool-fault-rate", "-0.1", ["probability in [0, 1]"]),
    ("--tool-fault-rate", "often", ["probability in [0, 1]", "'often'"]),
])
def test_bad_values_are_argparse_errors_listing_the_choices(tmp_path, capsys, flag, value, expected):
    code, out, err = exit_code(tiny_args(tmp_path / "run", flag, value), capsys)
    assert code == 2 and "usage: python -m trainer" in err and flag in err
    assert all(text in err for text in expected), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_bad_config_file_value_is_an_argparse_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("objective: sft\n")
    code, _, err = exit_code(tiny_args(tmp_path / "run", "--config", str(path)), capsys)
    assert code == 2 and "objective must be one of" in err and "Traceback" not in err


def test_resume_without_a_checkpoint_creates_nothing(tmp_path, capsys):
    code, _, err = exit_code(tiny_args(tmp_path / "missing" / "run", "--resume"), capsys)
    assert code == 2 and "no checkpoint" in err and "without --resume" in err
    assert not (tmp_path / "missing").exists()


def test_text_log_without_a_terminal_and_the_folder_guards(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = exit_code(tiny_args(out), capsys)
    assert code == 0, stderr
    assert "\r" not in stdout + stderr  # no progress-bar redraws in a log file
    lines = stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines if line.startswith("[")] == ["[1/2]", "[2/2]"]
    assert "update=1" in lines[-1] and "loss=" in lines[-1]
    saved = (out / CHECKPOINT_NAME).read_bytes()

    # A fresh start into the folder of a finished run is refused and changes nothing ...
    code, _, err = exit_code(tiny_args(out, "--seed", "1"), capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (out / CHECKPOINT_NAME).read_bytes() == saved
    # ... and so is a resume under other settings (one line naming the field, no traceback) ...
    code, _, err = exit_code(tiny_args(out, "--resume", "--seed", "1", "--updates", "3"), capsys)
    assert code == 2 and "seed: 0 -> 1" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / CHECKPOINT_NAME).read_bytes() == saved
    # ... while --overwrite starts again from scratch.
    code, stdout, err = exit_code(tiny_args(out, "--seed", "1", "--overwrite", "--updates", "1"), capsys)
    assert code == 0, err
    assert [json.loads(line)["update"] for line in (out / METRICS_NAME).read_text().splitlines()] == [0]
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["config"]["seed"] == 1


def test_json_log_format_is_one_object_a_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_code(tiny_args(out, "--updates", "1"), capsys)[0] == 0
    code, stdout, err = exit_code(tiny_args(out, "--resume", "--log-format", "json", "--eval-prompts", "2"), capsys)
    assert code == 0, err
    events = [json.loads(line) for line in stdout.splitlines()]
    assert {e["event"] for e in events} == {"message", "update", "eval"}
    assert [e["update"] for e in events if e["event"] == "update"] == [1]  # resumed after update 0
    assert any("resumed from" in e["message"] for e in events if e["event"] == "message")
    assert "\r" not in stdout + err


class InterruptingTool(ArithmeticTool):
    """Raises KeyboardInterrupt (as Ctrl-C does) inside a tool-call thread once update ``at`` starts."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at
        self.trainer = None

    def __call__(self, code):
        if self.trainer.step >= self.at:
            raise KeyboardInterrupt
        return super().__call__(code)


def test_ctrl_c_inside_concurrent_tool_calls_is_one_line(tmp_path, capsys, monkeypatch):
    tool = InterruptingTool(at=1)

    def build(config, executor, log):
        trainer = make_trainer(config, replay=True)
        trainer.executor, trainer.log, tool.trainer = tool, log, trainer
        return trainer

    monkeypatch.setattr("trainer.train.build_trainer", build)
    monkeypatch.setattr("trainer.tools.sandbox_executor", lambda *args, **kwargs: None)
    argv = ["--updates", "3", "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "10",
            "--max-turns", "4", "--max-total-tokens", "300", "--checkpoint-every", "1", "--tool-workers", "2",
            "--output-dir", str(tmp_path / "run")]
    code, stdout, err = exit_code(argv, capsys)
    assert code == INTERRUPTED_EXIT and len(tool.calls) > 0
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: 1 of 3 updates are saved in {tmp_path / 'run' / CHECKPOINT_NAME}")
    assert last.endswith(shlex.join(["python", "-m", "trainer", "train", *argv, "--resume"]))
    assert "Traceback" not in err


def _interruptible() -> None:
    """In the child before exec: SIGINT delivered and at its default, as from a terminal.  A child inherits an
    ignored or blocked SIGINT from its parent (a test-runner worker may have either), and Python then installs
    no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_sigint_stops_a_real_run_with_one_line_and_it_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    # Far more updates than can run before the signal arrives, however slowly this test reads the output.
    argv = tiny_args(out, "--updates", "100000")
    process = subprocess.Popen([sys.executable, "-m", "trainer", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("[3/100000]"):
                process.send_signal(signal.SIGINT)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines += stdout.splitlines()
    assert process.returncode == INTERRUPTED_EXIT, stderr
    assert "Traceback" not in stderr and "\r" not in stderr + "".join(lines), stderr
    last = lines[-1].strip()
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=True)["step"]
    assert saved >= 3
    assert last == (f"interrupted: {saved} of 100000 updates are saved in {out / CHECKPOINT_NAME}; continue with: "
                    + shlex.join(["python", "-m", "trainer", "train", *argv, "--resume"]))
    code, stdout, err = exit_code([*argv, "--resume", "--updates", str(saved + 1)], capsys)
    assert code == 0, err
    assert [json.loads(line)["update"] for line in (out / METRICS_NAME).read_text().splitlines()] == \
        list(range(saved + 1))


# --- the command line explains itself ----------------------------------------------------------------------
def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_help_lists_every_command_with_one_line():
    done = run_cli("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m trainer")
    for command in ("train", "demo", "experiment"):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split()) > 3, line
    assert "--version" in done.stdout


def test_each_command_has_its_own_help(capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m trainer train")
    for command in ("demo", "experiment"):
        done = run_cli(command, "--help")
        assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m trainer {command}")
        assert "--sandbox-allow-missing" in done.stdout


@pytest.mark.parametrize("argv", [["dmeo"], ["trian", "--updates", "2"], []])
def test_a_mistyped_or_missing_command_is_a_short_error(argv):
    done = run_cli(*argv)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3 and "python -m trainer: error:" in done.stderr
    if argv:
        assert f"invalid choice: '{argv[0]}'" in done.stderr and "'demo'" in done.stderr


def test_version_prints_the_package_version():
    from importlib.metadata import version

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"python -m trainer (sod-kernels {version('sod-kernels')})"


@pytest.fixture
def lacking_libseccomp(monkeypatch):
    """This machine's sandbox without the syscall filter, as on a machine without libseccomp."""
    import trainer.sandbox as sandbox

    reason = "cannot load libseccomp; install the system library libseccomp (Debian and Ubuntu: libseccomp2)"
    caps = sandbox.sandbox_capabilities().without(sandbox.SYSCALL_FILTER, reason)
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: caps)
    return reason


@pytest.mark.parametrize("command", ["train", "demo", "experiment"])
def test_a_missing_protection_is_refused_in_one_line_naming_the_flag(command, tmp_path, capsys, lacking_libseccomp):
    from trainer.__main__ import main

    argv = {"train": ["train", *tiny_args(tmp_path / "run")],
            "demo": ["demo", "--output-dir", str(tmp_path / "demo")],
            "experiment": ["experiment", "--output-dir", str(tmp_path / "experiment")]}[command]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m trainer {command}: error: "), err
    assert "syscall_filter" in lines[0] and lacking_libseccomp in lines[0]
    assert lines[0].endswith("add --sandbox-allow-missing syscall_filter")
    assert "SandboxPolicy" not in err and ".ci" not in err


@pytest.mark.parametrize("command", ["train", "demo", "experiment"])
def test_a_misspelled_protection_is_a_short_error(command, tmp_path):
    done = run_cli(command, "--output-dir", str(tmp_path / "run"), "--sandbox-allow-missing", "netwrok")
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3
    assert "'netwrok'" in done.stderr and "network_isolation" in done.stderr
    assert not (tmp_path / "run").exists()
