"""``python -m trainer [train] [flags]`` trains; ``python -m trainer demo [flags]`` runs the embedded demo;
``python -m trainer experiment [flags]`` runs the controlled tool-fault experiment (OPD against SOD).

Nothing is downloaded: models are built-in presets or local folders, datasets local files.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

# Refuse any hub access: models and tokenizers must be local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP worker threads sleep instead of spinning while they wait: with 2 cores shared with the sandboxed tool
# processes (and anything else), spinning threads made tiny-model steps several times slower.  Must be set
# before torch is imported (it is imported lazily below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import add_config_arguments, config_from_args  # noqa: E402


def train_main(argv: list[str]) -> None:
    """Parse config flags, build the trainer and run it with a progress bar."""
    from .tools import describe_sandbox, sandbox_executor
    from .train import build_trainer, format_metrics

    parser = argparse.ArgumentParser(prog="python -m trainer", description="On-policy SOD distillation with "
                                     "sandboxed multi-turn Python tool rollouts.")
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    print(describe_sandbox())
    executor = sandbox_executor(config.tool_timeout_s, config.sandbox_allow_missing)
    trainer = build_trainer(config, executor, log=tqdm.write)
    bar = tqdm(total=config.updates, desc=f"{config.objective}/{config.step_divergence}")

    def progress(metrics):
        bar.n = metrics["update"] + 1
        bar.refresh()
        if (metrics["update"] + 1) % config.log_every == 0:
            tqdm.write(format_metrics(metrics))

    trainer.train(progress)
    bar.close()
    if config.eval_prompts:
        from .train import evaluate

        problems = [trainer.problems.held_out(i) for i in range(config.eval_prompts)]
        result = evaluate(trainer.student, trainer.teacher, trainer.tokenizer, trainer.chat, executor, problems,
                          trainer.settings)
        print(f"held-out accuracy {result.accuracy:.4f}, student-teacher KL {result.kl:.4f}")


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``demo`` / ``experiment`` / ``train`` (the default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from .demo import run_demo

        run_demo(argv[1:])
    elif argv and argv[0] == "experiment":
        from .experiment import run_experiment

        run_experiment(argv[1:])
    elif argv and argv[0] == "train":
        train_main(argv[1:])
    else:
        train_main(argv)


if __name__ == "__main__":
    main()
