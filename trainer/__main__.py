"""``python -m trainer COMMAND [flags]``: ``train`` trains, ``demo`` runs the embedded demo, ``experiment`` runs
the controlled tool-fault experiment (OPD against SOD); ``python -m trainer --help`` lists them and
``python -m trainer COMMAND --help`` shows each one's flags.  Flags without a command (``python -m trainer
--updates 4``) train.

``torchrun --standalone --nproc-per-node=N -m trainer train [flags]`` trains data-parallel over N ranks: CPU
ranks through gloo, or with ``--device cuda`` one GPU a rank through NCCL (see :mod:`trainer.distributed`).
Rank 0 prints and writes the logs; the other ranks print nothing (errors that every rank finds alike, such as
a bad flag, are printed once, by rank 0).

A machine that lacks a sandbox protection is refused in one line (exit status 2) naming what is missing, how
to get it, and the ``--sandbox-allow-missing NAME ...`` flag that runs without it.

Nothing is downloaded: models are built-in presets or local folders, datasets local files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import traceback

# Refuse any hub access: models and tokenizers must be local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP worker threads sleep instead of spinning while they wait: with 2 cores shared with the sandboxed tool
# processes (and anything else), spinning threads made tiny-model steps several times slower.  Must be set
# before torch is imported (it is imported lazily below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Progress bars only on a terminal: off one, Hugging Face libraries draw none either (read when they load).
if not (sys.stdout.isatty() and sys.stderr.isatty()):
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from .config import add_config_arguments, config_from_args  # noqa: E402

INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT
USAGE_EXIT = 2  # argparse's status for a bad command line; also a refused sandbox
PROG = "python -m trainer"
COMMANDS = {  # name -> the one line of ``python -m trainer --help``
    "train": "distil a student from a teacher with SOD (or plain OPD) on sandboxed tool-using rollouts",
    "demo": "the embedded demo: a tiny teacher and student built on the CPU, distilled over 3 seeds",
    "experiment": "the controlled tool-fault experiment: OPD against SOD when a tool call fails",
}


class RunLog:
    """The command line's output: metrics every ``log_every`` updates and messages, as text or JSON lines.

    text: readable lines; a tqdm progress bar only when stdout and stderr are both terminals (a log file
    or pipe gets plain ``[update/total]`` lines, never carriage-return bar redraws).  json: one JSON object
    per line with an ``event`` key (``message``, ``update``, ``eval``, ``interrupted``).
    """

    def __init__(self, log_format: str, total: int, label: str, log_every: int, stream=None):
        self.json = log_format == "json"
        self.stream = stream or sys.stdout
        self.total = total
        self.log_every = log_every
        self.bar = None
        interactive = self.stream.isatty() and sys.stderr.isatty()
        if not self.json and interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def event(self, name: str, text: str, **fields) -> None:
        """A line: ``text`` in text mode, ``{"event": name, **fields}`` in JSON mode."""
        self._write(json.dumps({"event": name, **fields}) if self.json else text)

    def message(self, text: str) -> None:
        """A free-form message (start-up information, resume notes)."""
        self.event("message", text, message=text)

    def update(self, metrics: dict) -> None:
        """One finished update: advance the bar; every ``log_every`` updates (and the last) log a line."""
        from .train import format_metrics

        done = metrics["update"] + 1
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        if done % self.log_every == 0 or done == self.total:
            self.event("update", f"[{done}/{self.total}] {format_metrics(metrics)}", **metrics)

    def close(self) -> None:
        """Close the progress bar (if any)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resume_command(argv: list[str], world_size: int | None = None) -> str:
    """The command that continues the run started by ``argv`` (its flags plus ``--resume``); under torchrun
    (``world_size`` given) a torchrun command with as many ranks."""
    launcher = ["python", "-m"] if world_size is None else \
        ["torchrun", "--standalone", f"--nproc-per-node={world_size}", "-m"]
    return shlex.join([*launcher, "trainer", "train", *argv, *([] if argv[-1:] == ["--resume"] else ["--resume"])])


class Silent(io.TextIOBase):
    """A text stream that drops what is written (the output of ranks > 0)."""

    def write(self, text: str) -> int:
        return len(text)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors exit with status 2 without printing when ``quiet`` (ranks > 0 of a
    torchrun job: rank 0 prints the same error)."""

    quiet = False

    def error(self, message):
        if self.quiet:
            self.exit(2)
        super().error(message)


def fail(parser: argparse.ArgumentParser, log: RunLog | None, error: Exception | str) -> int:
    """Print ``error`` as one ``prog: error: ...`` line on stderr (not on a quiet rank); returns exit status 2."""
    if log is not None:
        log.close()
    if not getattr(parser, "quiet", False):
        print(f"{parser.prog}: error: {error}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def check_protection_names(parser: argparse.ArgumentParser, names) -> None:
    """One line and exit status 2 (argparse's) for a ``--sandbox-allow-missing`` name that is no protection."""
    from .sandbox import unknown_protections

    error = unknown_protections(names)
    if error is not None:
        parser.exit(USAGE_EXIT, None if getattr(parser, "quiet", False) else f"{parser.prog}: error: {error}\n")


def sandbox_refusal(prog: str, error) -> int:
    """Print a refused sandbox (:class:`trainer.sandbox.SandboxUnavailableError`) as one line; returns 2."""
    print(f"{prog}: error: {error.one_line()}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def package_version() -> str:
    """The installed version of sod-kernels (the checkout's own when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sod-kernels")
    except PackageNotFoundError:
        from sod_kernels import __version__

        return __version__


def top_parser() -> argparse.ArgumentParser:
    """``python -m trainer``: the commands with one line each, ``--version``."""
    parser = Parser(prog=PROG, description="On-policy SOD distillation of small tool-using agents, with "
                    "sandboxed multi-turn Python tool rollouts.",
                    formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=28, width=120),
                    epilog=f"Run '{PROG} COMMAND --help' for a command's flags.  Flags without a command train.")
    parser.add_argument("--version", action="version", version=f"%(prog)s (sod-kernels {package_version()})")
    commands = parser.add_subparsers(dest="command", title="commands", required=True)
    for name, line in COMMANDS.items():
        commands.add_parser(name, help=line, add_help=False)
    return parser


def train_main(argv: list[str]) -> int:
    """Parse config flags, build the trainer and run it; returns the exit status (130 after Ctrl-C).

    Bad flags and a folder that cannot be used (``--resume`` without a checkpoint, a fresh start into a
    folder holding a run without ``--overwrite``) are argparse errors (exit 2) and create nothing; a refused
    or unreadable checkpoint is a one-line error (exit 2).  Under torchrun (``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK`` set) the process group is joined after these checks and left at the end.
    """
    parser = Parser(prog=f"{PROG} train", description="On-policy SOD distillation with sandboxed multi-turn "
                    "Python tool rollouts.  Flags override the --config file, which overrides the defaults.")
    parser.quiet = os.environ.get("RANK", "0") != "0"
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    check_protection_names(parser, getattr(args, "sandbox_allow_missing", ()))
    try:
        config = config_from_args(args)
        from .checkpoint import check_output_dir
        from .distributed import check_batch_split, env_context
        from .placement import resolve_device

        context = env_context()
        if context is not None:
            check_batch_split(config, context.world_size)
        device = resolve_device(config.device, None if context is None else context.local_rank)
        check_output_dir(config)
    except ValueError as error:  # a config value, the batch split, the device or the output folder: one line
        return fail(parser, None, error)
    if context is None:
        return _train(parser, config, argv, None)
    from .distributed import init_process_group, shutdown

    init_process_group(context, device)
    code = None
    try:
        code = _train(parser, config, argv, context)
    finally:
        shutdown(clean=code == 0)
    return code


def _train(parser: argparse.ArgumentParser, config, argv: list[str], context) -> int:
    """Build the trainer, train, evaluate (see :func:`train_main`); returns the exit status."""
    quiet = context is not None and not context.is_main
    log = RunLog(config.log_format, config.updates, f"{config.objective}/{config.step_divergence}",
                 config.log_every, stream=Silent() if quiet else None)
    trainer = None
    try:
        from .checkpoint import CheckpointError
        from .sandbox import SandboxUnavailableError
        from .tools import describe_sandbox, sandbox_executor
        from .train import build_trainer

        log.message(describe_sandbox())
        try:
            executor = sandbox_executor(config.tool_timeout_s, config.sandbox_allow_missing)
        except SandboxUnavailableError as error:
            return fail(parser, log, error.one_line())
        try:
            options = {} if context is None else {"dist": context}
            trainer = build_trainer(config, executor, log=log.message, **options)
        except ValueError as error:  # a model or dataset that cannot be used
            return fail(parser, log, error)
        try:
            trainer.train(log.update)
        except CheckpointError as error:  # unreadable checkpoints, or a resume under other settings
            return fail(parser, log, error)
        log.close()
        if config.eval_prompts:
            from .train import evaluate

            policy = trainer.rollout_model()  # under torchrun: gathered on every rank, evaluated by rank 0
            if trainer.is_main:
                problems = [trainer.problems.held_out(i) for i in range(config.eval_prompts)]
                result = evaluate(policy, trainer.teacher, trainer.tokenizer, trainer.chat, executor,
                                  problems, trainer.settings)
                log.event("eval", f"held-out accuracy {result.accuracy:.4f}, student-teacher KL {result.kl:.4f}",
                          accuracy=result.accuracy, kl=result.kl, prompts=len(problems))
    except KeyboardInterrupt:
        log.close()
        saved = trainer.saved_step if trainer is not None else 0
        where = os.path.join(config.output_dir, "checkpoint.pt" if context is None else "checkpoint.dcp")
        world = None if context is None else context.world_size
        if saved:
            text = (f"interrupted: {saved} of {config.updates} updates are saved in {where}; continue with: "
                    f"{resume_command(argv, world)}")
        else:
            text = (f"interrupted: no update was saved yet (the first checkpoint comes after update "
                    f"{min(config.checkpoint_every, config.updates)}); start again with --overwrite")
        log.event("interrupted", text, saved_updates=saved, updates=config.updates,
                  resume=resume_command(argv, world) if saved else None)
        return INTERRUPTED_EXIT
    return 0


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``demo`` / ``experiment`` / ``train`` (also flags without a command); exit with the run's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("demo", "experiment"):
        from .sandbox import SandboxUnavailableError

        if argv[0] == "demo":
            from .demo import run_demo as run
        else:
            from .experiment import run_experiment as run
        try:
            run(argv[1:])
        except SandboxUnavailableError as error:
            sys.exit(sandbox_refusal(f"{PROG} {argv[0]}", error))
        return
    if not argv or (argv[0] != "train" and (not argv[0].startswith("-") or argv[0] in ("-h", "--help",
                                                                                        "--version"))):
        top_parser().parse_args(argv)  # --help, --version, or a short error for a missing or unknown command
        return
    rank = "WORLD_SIZE" in os.environ  # a torchrun rank
    try:
        code = train_main(argv[1:] if argv and argv[0] == "train" else argv)
    except SystemExit:  # a bad flag or folder: refused before the process group exists
        raise
    except BaseException:
        if not rank:
            raise
        traceback.print_exc()
        code = 1
    if code == INTERRUPTED_EXIT or rank:
        # Leave at once.  After Ctrl-C: tool-call threads still waiting on a sandboxed process would otherwise
        # be joined at exit (a second Ctrl-C there prints a concurrent.futures traceback); sandboxed processes
        # die with us.  A torchrun rank, after leaving the process group: FSDP2's device mesh, which DTensor's
        # caches keep alive, holds the group, so its gloo threads outlive destroy_process_group; one of them
        # can need the GIL during interpreter shutdown and abort the process (SIGABRT, "terminate called
        # without an active exception") after a run that succeeded.  Every file is closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
