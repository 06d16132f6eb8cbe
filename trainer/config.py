"""Trainer configuration: one dataclass, filled from defaults, the run folder's saved config (``--resume``),
a JSON/YAML file, then command-line flags.

Every value, whatever its source, is converted to the field's annotated type (``pydantic``'s lax mode:
``"false"`` / ``"no"`` / ``0`` are False, ``"3e-4"`` is a float, ``2.7`` is not an int) or refused with an
error naming the field and where the value came from; :meth:`TrainConfig.validate` then refuses every value
the losses, the optimizer or the rollouts would refuse later (``ValueError`` naming the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

OBJECTIVES = ("kl", "pg")
STEP_DIVERGENCES = ("kl", "sampled", "none")
DIVERGENCES = ("reverse_kl", "forward_kl")
LOG_FORMATS = ("text", "json")
ROLLOUT_RNGS = ("shared", "per_trajectory")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes
SAVED_CONFIG_NAME = "config.json"  # a run folder's record of its settings (written when a run starts)
# Fields that say how to start this invocation, not what the run computes: never taken from a saved config.
INVOCATION_FIELDS = frozenset({"resume", "overwrite", "allow_config_change", "output_dir"})


@dataclass
class TrainConfig:
    """Everything a training run needs.  Field comments are the CLI help."""

    student: str = "tiny-student"  # preset name (tiny-student, tiny-teacher) or a local HF model folder
    teacher: str = "tiny-teacher"  # preset name or a local HF model folder (same tokenizer as the student)
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen teacher's weights and forward pass
    dataset: str | None = None  # local .jsonl/.json/.parquet of prompts and answers; None = built-in task
    reward_fn: str | None = None  # "module:function" called as f(final message, answer) -> reward; None = built-in
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
    resume: bool = False  # continue the run in output_dir under its saved settings (flags override them)
    overwrite: bool = False  # start fresh in an output_dir that holds a run, deleting its checkpoints and logs
    allow_config_change: bool = False  # resume even though settings differ from the checkpoint's (listed)
    student_init: str | None = None  # optional checkpoint/model folder whose weights start the student
    eval_prompts: int = 0  # held-out prompts evaluated at the end (0 = skip)
    log_every: int = 1  # print metrics every N updates
    log_format: str = "text"  # text: readable lines (a progress bar on a terminal) | json: one object a line
    threads: int = 2  # torch CPU threads
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda if a GPU is visible); under torchrun cuda = GPU LOCAL_RANK

    def validate(self) -> "TrainConfig":
        """Convert every field to its annotated type, then raise ``ValueError`` naming the first field whose
        value the run would refuse later (a loss, the optimizer, the sampler); return self."""
        for name, value in convert_fields(dataclasses.asdict(self), "config").items():
            object.__setattr__(self, name, value)
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        positive = ("updates", "prompts_per_step", "rollouts_per_prompt", "micro_batch_size", "max_turns",
                    "max_new_tokens", "max_total_tokens", "checkpoint_every", "log_every", "threads",
                    "tool_workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_updates", "eval_prompts", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # Floats: (lowest, lowest allowed?, highest, highest allowed?); every one must be finite.
        bounds = {"epsilon": (0.0, False, None, False), "delta": (0.0, True, None, False),
                  "coef": (None, False, None, False), "clip_low": (0.0, True, 1.0, False),
                  "clip_high": (0.0, True, None, False), "dual_clip": (1.0, False, None, False),
                  "lr": (0.0, False, None, False), "weight_decay": (0.0, True, None, False),
                  "grad_clip": (None, False, None, False), "temperature": (0.0, False, None, False),
                  "tool_timeout_s": (0.0, False, None, False), "tool_fault_rate": (0.0, True, 1.0, True)}
        for name, (low, low_ok, high, high_ok) in bounds.items():
            _check_range(name, getattr(self, name), low, low_ok, high, high_ok)
        for k, beta in enumerate(self.betas):
            _check_range(f"betas[{k}]", beta, 0.0, True, 1.0, False)
        for name in ("student", "teacher", "output_dir"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if self.reward_fn is not None:
            from .task import load_reward_function

            load_reward_function(self.reward_fn)
        from .placement import check_device_spec

        check_device_spec(self.device)
        return self

    def to_dict(self) -> dict:
        """JSON-serialisable dictionary of the fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dictionary, converting each value to its field's type; unknown keys and values that do
        not convert are an error naming them and ``source`` (e.g. the file they came from)."""
        return cls(**convert_fields(values, source)).validate()


def _check_range(name: str, value: float, low, low_ok: bool, high, high_ok: bool) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is finite and within the bounds (None: unbounded)."""
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_ok else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_ok else '<'} {high:g}")
    inside = math.isfinite(value)
    if inside and low is not None:
        inside = value >= low if low_ok else value > low
    if inside and high is not None:
        inside = value <= high if high_ok else value < high
    if not inside:
        where = f" {' and '.join(parts)}" if parts else ""
        raise ValueError(f"{name} must be a finite number{where}, got {value}")


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


@functools.cache
def _adapter(name: str):
    from pydantic import TypeAdapter

    return TypeAdapter(_field_types()[name])


def convert_fields(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` with each value converted to the annotated type of its :class:`TrainConfig` field.

    ``source`` names where the values came from (``config file 'run.yaml'``, ``command line``...).  Raises
    ``ValueError`` naming the source and the field for an unknown key, a value that does not convert
    (``"abc"`` for a float, ``2.7`` for an int, ``"maybe"`` for a bool, one number for ``betas``), or a
    boolean given for a number.
    """
    from pydantic import ValidationError

    names = _field_types()
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown}; known: {sorted(names)}")
    converted = {}
    for name, value in values.items():
        if isinstance(value, bool) and names[name] is not bool:
            raise ValueError(f"{source}: {name} must be {_type_name(names[name])}, not a boolean ({value!r})")
        try:
            converted[name] = _adapter(name).validate_python(value)
        except ValidationError as error:
            first = error.errors()[0]
            reason = first["msg"][0].lower() + first["msg"][1:]
            if first.get("loc"):
                reason = f"item {'/'.join(map(str, first['loc']))}: {reason}"
            raise ValueError(f"{source}: {name} must be {_type_name(names[name])}, got {value!r} ({reason})") from None
    return converted


TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", str | None: "string (or null)",
              tuple[float, float]: "list of two numbers", tuple[str, ...]: "list of strings"}


def _type_name(hint) -> str:
    """``"an integer"``, ``"a list of two numbers"``...: what a field takes, with its article."""
    name = TYPE_NAMES.get(hint) or str(hint).replace("typing.", "")
    return ("an " if name[0] in "aeiou" else "a ") + name


def read_config_file(path: str | Path) -> dict:
    """A JSON (``.json``) or YAML (``.yaml`` / ``.yml``) mapping of config fields, as the file holds them
    (:func:`convert_fields` types them).  A missing or unparsable file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"config file {str(path)!r}{where} is not valid YAML: "
                             f"{getattr(error, 'problem', None) or error}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {str(path)!r} line {error.lineno} column {error.colno} is not valid "
                             f"JSON: {error.msg}") from None
    else:
        raise ValueError(f"config file must end in .json, .yaml or .yml, got {str(path)!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field names to values")
    return data


def read_saved_config(output_dir: str | Path) -> dict | None:
    """The settings a run folder recorded when its run started (``output_dir/config.json``), typed, without
    the :data:`INVOCATION_FIELDS` and without keys this version no longer has; None when there is none."""
    path = Path(output_dir) / SAVED_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--resume: the saved config {str(path)!r} is unreadable ({error}); restore it or "
                         f"start a new run") from None
    if not isinstance(data, dict):
        raise ValueError(f"--resume: the saved config {str(path)!r} is not a mapping of field names to values")
    known = {f.name for f in fields(TrainConfig)}
    kept = {k: v for k, v in data.items() if k in known and k not in INVOCATION_FIELDS}
    return convert_fields(kept, f"saved config {str(path)!r}")


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
    """One ``--flag`` per config field (dashes for underscores), all defaulting to "not given"; a boolean
    field is a pair ``--flag`` / ``--no-flag``."""
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
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
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
    """Defaults (or ``base``), then with ``resume`` the run folder's saved config (:func:`read_saved_config`),
    then the ``--config`` file, then explicit flags; each source's values are typed and checked
    (``ValueError`` naming the field and the source)."""
    values = (base or TrainConfig()).to_dict()
    given = {}
    config_file = getattr(args, "config", None)
    if config_file:
        given.update(convert_fields(read_config_file(config_file), f"config file {str(config_file)!r}"))
    names = {f.name for f in fields(TrainConfig)}
    given.update(convert_fields({k: v for k, v in vars(args).items() if k in names}, "command line"))
    if given.get("resume", values["resume"]):
        saved = read_saved_config(given.get("output_dir", values["output_dir"]))
        values.update(saved or {})
    values.update(given)
    return TrainConfig.from_dict(values)
