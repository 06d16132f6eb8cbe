"""Trainer configuration: one dataclass, filled from defaults, a JSON/YAML file, then command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

OBJECTIVES = ("kl", "pg")
STEP_DIVERGENCES = ("kl", "sampled", "none")
DIVERGENCES = ("reverse_kl", "forward_kl")
LOG_FORMATS = ("text", "json")
ROLLOUT_RNGS = ("shared", "per_trajectory")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes


@dataclass
class TrainConfig:
    """Everything a training run needs.  Field comments are the CLI help."""

    student: str = "tiny-student"  # preset name (tiny-student, tiny-teacher) or a local HF model folder
    teacher: str = "tiny-teacher"  # preset name or a local HF model folder (same tokenizer as the student)
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen teacher's weights and forward pass
    dataset: str | None = None  # local .jsonl/.parquet of prompts and answers; None = built-in task
    objective: str = "kl"  # kl: fused_sod_loss; pg: GRPO + SOD advantages + fused_sod_policy_loss
    divergence: str = "reverse_kl"  # per-token divergence of the kl objective
    step_divergence: str = "kl"  # kl | sampled | none (none = plain OPD baseline)
    epsilon: float = 1e-6  # SOD epsilon
    delta: float = 0.2  # SOD weight cap is 1 + delta
    coef: float = 1.0  # distillation coefficient
    clip_low: float = 0.2  # pg: PPO clip epsilon below
    clip_high: float = 0.28  # pg: PPO clip epsilon above
    dual_clip: float = 3.0  # pg: dual-clip constant c
    lr: float = 1e-3  # AdamW learning rate
    warmup_updates: int = 0  # linear learning-rate warm-up over this many updates (0: constant)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # max gradient norm (<= 0 disables)
    updates: int = 20  # number of optimizer updates
    prompts_per_step: int = 8  # distinct prompts per update
    rollouts_per_prompt: int = 2  # rollouts per prompt (a GRPO group)
    micro_batch_size: int = 16  # trajectories per forward/backward (gradient accumulation)
    max_turns: int = 5  # assistant turns per rollout
    max_new_tokens: int = 32  # tokens per assistant turn
    max_total_tokens: int = 512  # longest trajectory
    temperature: float = 1.0  # sampling temperature (also the loss temperature)
    rollout_rng: str = "shared"  # shared: one torch-RNG draw per batch | per_trajectory: a stream per trajectory
    tool_timeout_s: float = 10.0  # sandbox timeout per tool call
    tool_workers: int = 4  # concurrent sandboxed tool calls
    tool_fault_rate: float = 0.0  # probability that a tool observation is corrupted
    sandbox_allow_missing: tuple[str, ...] = ()  # protections the sandbox may run without (passed through)
    system_prompt: str | None = None  # system message describing the tool and answer format (None: none)
    tools_schema: bool = False  # pass the python tool's JSON schema to the chat template (Qwen3-style models)
    seed: int = 0  # seeds models (presets), sampling, problems and faults
    output_dir: str = "runs/train"  # metrics, step logs, checkpoints
    checkpoint_every: int = 10  # updates between checkpoints (the last update is always saved)
    resume: bool = False  # continue from output_dir/checkpoint.pt (the settings must match the checkpoint's)
    overwrite: bool = False  # start fresh in an output_dir that holds a run, deleting its checkpoints and logs
    allow_config_change: bool = False  # resume even though settings differ from the checkpoint's (listed)
    student_init: str | None = None  # optional checkpoint/model folder whose weights start the student
    eval_prompts: int = 0  # held-out prompts evaluated at the end (0 = skip)
    log_every: int = 1  # print metrics every N updates
    log_format: str = "text"  # text: readable lines (a progress bar on a terminal) | json: one object a line
    threads: int = 2  # torch CPU threads
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda if a GPU is visible); under torchrun cuda = GPU LOCAL_RANK

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field; return self."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.step_divergence not in STEP_DIVERGENCES:
            raise ValueError(f"step_divergence must be one of {STEP_DIVERGENCES}, got {self.step_divergence!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.rollout_rng not in ROLLOUT_RNGS:
            raise ValueError(f"rollout_rng must be one of {ROLLOUT_RNGS}, got {self.rollout_rng!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        positive = ("updates", "prompts_per_step", "rollouts_per_prompt", "micro_batch_size", "max_turns",
                    "max_new_tokens", "max_total_tokens", "checkpoint_every", "log_every", "threads",
                    "tool_workers")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epsilon", "lr", "tool_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for on-policy sampling, got {self.temperature}")
        if not 0.0 <= self.tool_fault_rate <= 1.0:
            raise ValueError(f"tool_fault_rate must lie in [0, 1], got {self.tool_fault_rate}")
        if self.warmup_updates < 0:
            raise ValueError(f"warmup_updates must be >= 0, got {self.warmup_updates}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts must be >= 0, got {self.eval_prompts}")
        from .placement import check_device_spec

        check_device_spec(self.device)
        return self

    def to_dict(self) -> dict:
        """JSON-serialisable dictionary of the fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dictionary; unknown keys are an error naming them."""
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(names)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted).validate()


def read_config_file(path: str | Path) -> dict:
    """A JSON (``.json``) or YAML (``.yaml`` / ``.yml``) mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file must end in .json, .yaml or .yml, got {str(path)!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field names to values")
    return data


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def probability(text: str) -> float:
    """argparse type of a probability: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


# Fields whose flags take one of a fixed set of values, and fields with a stricter argparse type.
CHOICES = {"objective": OBJECTIVES, "step_divergence": STEP_DIVERGENCES, "divergence": DIVERGENCES,
           "log_format": LOG_FORMATS, "rollout_rng": ROLLOUT_RNGS, "teacher_dtype": TEACHER_DTYPES}
TYPES = {"tool_fault_rate": probability}


def _comment_help() -> dict[str, str]:
    """Per-field help text taken from the trailing comments of the dataclass source."""
    import inspect

    help_text = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", '"', "def")):
            name = stripped.split(":", 1)[0].strip()
            help_text[name] = stripped.split("#", 1)[1].strip()
    return help_text


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per config field (dashes for underscores), all defaulting to "not given"."""
    help_text = _comment_help()
    parser.add_argument("--config", help="JSON or YAML file of config fields (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs = {"default": argparse.SUPPRESS, "help": f"{help_text.get(f.name, '')} (default: {default})"}
        if f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], **kwargs)
        elif f.name in TYPES:
            parser.add_argument(flag, type=TYPES[f.name], **kwargs)
        elif isinstance(default, bool):
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool, **kwargs)
        elif isinstance(default, tuple):
            element = float if default and isinstance(default[0], float) else str
            parser.add_argument(flag, nargs="*", type=element, **kwargs)
        elif isinstance(default, int):
            parser.add_argument(flag, type=int, **kwargs)
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or ``base``), then the ``--config`` file, then explicit flags."""
    values = (base or TrainConfig()).to_dict()
    config_file = getattr(args, "config", None)
    if config_file:
        values.update(read_config_file(config_file))
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)
