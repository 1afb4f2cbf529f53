"""Parsing a run's settings: one YAML file plus command-line overrides into the config dataclasses.

Every refusal is one ConfigError line naming the setting and where it came from; settings that parse but
cannot train as meant (``check_trainer_args``) are refused here too, before any data or model loads.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from align_kit import files
from align_kit.configs import ConfigError, GRPOArgs, RewardModelArgs, check_at_least
from align_kit.resources import find_config


def parse(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``--config file.yaml`` plus command-line overrides into ``dataclass_types``.

    The config is a path, or a shipped config named by its repository path or its name (``dpo_tiny``).
    Every refusal is a ConfigError naming the setting and where it came from (``file.yaml:LINE``, the file,
    or the command line): a file that is no YAML mapping, a key given twice, an unknown key, a value of the
    wrong type (``max_steps: 2.5``), a value a dataclass refuses, and a trainer setting that cannot train
    (``check_trainer_args``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    path, values, lines = None, {}, {}
    if "--config" in args:
        at = args.index("--config")
        if at + 1 == len(args):
            raise ConfigError("command line: --config needs a file or a shipped config name")
        try:
            path = str(find_config(args[at + 1]))
        except FileNotFoundError as error:
            raise ConfigError(f"--config: {error}", field="config") from None
        del args[at : at + 2]
        values, lines = load_yaml(path)
        set_environment(values.pop("env", {}), path)
    hints = field_types(dataclass_types)
    settle_bf16(values, args)
    unknown = sorted(str(key) for key in values if key not in hints)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; see --help for the accepted fields")
    for name, value in values.items():
        try:
            values[name] = check_value(name, value, *hints[name])
        except ConfigError as error:
            raise ConfigError(f"{path}:{lines[name]}: {error}", field=name) from None
    settings = Settings(path, values, lines, args, field_defaults(dataclass_types))
    source = settings.source

    def where(error: Exception) -> ConfigError:
        """The error prefixed with the place its setting (its ``field``) came from; the file (or the command
        line) for an error about no one setting, such as a trainer config's own ValueError."""
        field = getattr(error, "field", None)
        return ConfigError(f"{source(field) if field else path or 'command line'}: {error}", field=field)

    check_evaluation_is_on(settings)
    parser = _parser_class()(dataclass_types, allow_abbrev=False)  # --learning_rat is a typo, not a prefix
    parser.set_defaults_with_config(**values)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        if remaining:  # option names only: a mistyped --hub_tokn must not echo its token
            names = [arg.split("=", 1)[0] for arg in remaining if arg.startswith("-")]
            hidden = (
                " (values not shown)"
                if len(names) < len(remaining) or any("=" in a for a in remaining)
                else ""
            )
            raise ConfigError(
                f"command line: unknown argument(s) {names or ['(a value without an option)']}{hidden}; see --help"
            )
        for config in parsed:
            check_finite(config)
            check_trainer_args(config)
            grpo = any(
                isinstance(c, GRPOArgs) for c in parsed
            )  # GRPO names its reward models in reward_funcs
            if isinstance(config, RewardModelArgs) and not config.reward_models and not grpo:
                raise ConfigError(
                    "reward_models: none given; name at least one reward-model folder (recipes/reward.py writes one)",
                    field="reward_models",
                )
    except ConfigError as error:
        raise (error if str(error).startswith("command line:") else where(error)) from None
    except ValueError as error:  # a trainer config's own check in __post_init__ (transformers, TRL)
        if "support bf16" in str(error):  # transformers: bf16 on (TRL's default) without a bf16 GPU
            raise ConfigError(f"{source('bf16')}: {NO_BF16}", field="bf16") from None
        raise where(error) from None
    for config in parsed:  # for checks made later, before the run starts (runs.start)
        setattr(config, SOURCES, {f.name: source(f.name) for f in dataclasses.fields(config)})
        setattr(config, CONFIG_FILE, path)
    return tuple(parsed)


NO_BF16 = (
    "bf16: true (TRL's default when unset) needs a GPU with bf16, and none is visible here: set bf16: auto "
    "(bf16 where the GPU has it, float32 otherwise) or bf16: false, and use_cpu: true to train on the CPU"
)


def bf16_available() -> bool:
    """Whether a visible GPU computes in bf16 (Ampere or newer, or ROCm/XPU that report it)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def settle_bf16(values: dict[str, Any], args: list[str]) -> None:
    """``bf16: auto`` in the file or ``--bf16 auto`` becomes true where a GPU supports bf16 (and the run is not
    told use_cpu), false otherwise: one config file for A100s, T4s and laptops. A CPU with native bf16
    (AVX512-BF16, AMX) stays float32: on this project's 2-core machine autocast cuts step time to 0.56 (SFT)
    and 0.53 (DPO) of float32's, but it moved the demo's PPO and best-of-8 figures outside their float32 CIs
    (README, "Lean training"); ``bf16: true`` with ``use_cpu: true`` still runs CPU autocast for those who
    want it."""
    on_cpu = _true(_given(values, args, "use_cpu", False))

    def settled() -> str:  # asked only when a setting says auto: importing torch's CUDA check costs time
        return "true" if bf16_available() and not on_cpu else "false"

    if isinstance(values.get("bf16"), str) and values["bf16"].lower() == "auto":
        values["bf16"] = settled() == "true"
    for at, arg in enumerate(args):
        if arg == "--bf16" and at + 1 < len(args) and args[at + 1].lower() == "auto":
            args[at + 1] = settled()
        elif arg.lower() == "--bf16=auto":
            args[at] = f"--bf16={settled()}"


def _on_command_line(args: list[str], name: str) -> bool:
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in args)


def _given(values: dict[str, Any], args: list[str], name: str, default: Any) -> Any:
    """A setting as given before parsing: the last ``--name value`` on the command line, else the file's."""
    given = default if name not in values else values[name]
    for at, arg in enumerate(args):
        if arg == f"--{name}" and at + 1 < len(args):
            given = args[at + 1]
        elif arg.startswith(f"--{name}="):
            given = arg.split("=", 1)[1]
    return given


def _true(value: Any) -> bool:
    """Whether a setting as given reads as true to argparse's bool type (a YAML bool, or a word)."""
    return value is True or str(value).lower() in TRUE_WORDS


def field_defaults(dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """Field name -> default over several config dataclasses (a field without one is left out)."""
    out = {}
    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
    return out


@dataclasses.dataclass
class Settings:
    """The settings before TRL's configs parse them: the file's values and key lines, the command line, and
    the fields' defaults; where each came from."""

    path: str | None
    values: dict[str, Any]
    lines: dict[str, int]
    args: list[str]
    defaults: dict[str, Any]

    def given(self, name: str) -> bool:
        """Whether the file or the command line sets ``name`` (otherwise its default applies)."""
        return name in self.values or _on_command_line(self.args, name)

    def value(self, name: str) -> Any:
        """``name`` as given (the command line over the file), else its default."""
        return _given(self.values, self.args, name, self.defaults.get(name))

    def source(self, name: str) -> str:
        """Where a setting came from: the command line, the file and line, or the file's defaults."""
        if _on_command_line(self.args, name):
            return "command line"
        if name in self.lines:
            return f"{self.path}:{self.lines[name]}"
        return self.path or "command line"


def check_evaluation_is_on(settings: Settings) -> None:
    """Early stopping and load_best_model_at_end act on evaluations: with eval_strategy no they cannot work
    (transformers would say so only after data and model load, or in its own words). The fix is in the message."""
    if "eval_strategy" not in settings.defaults:  # not a trainer's settings
        return
    strategy = settings.value("eval_strategy")
    if str(getattr(strategy, "value", strategy)).lower() != "no":
        return
    needs = []
    patience = settings.value("early_stopping_patience")
    if str(patience).lstrip("+").isdigit() and int(patience) >= 1:  # others: the field's own check says why
        needs.append(("early_stopping_patience", patience, "stops on evaluations", "null"))
    if _true(settings.value("load_best_model_at_end")):
        needs.append(("load_best_model_at_end", "true", "keeps the best evaluated checkpoint", "false"))
    if needs:
        place = {
            name: settings.source(name) if settings.given(name) else "default"
            for name in ("eval_strategy", *(need[0] for need in needs))
        }
        first, *others = needs
        what = f"{first[0]}: {first[1]} {first[2]}" + "".join(
            f" and {name}: {value} ({place[name]}) {does}" for name, value, does, _ in others
        )
        off = " ".join(f"--{name} {none}" for name, _, _, none in needs)
        raise ConfigError(
            f"{place[first[0]]}: {what}, but eval_strategy is no ({place['eval_strategy']}): add {off} to "
            "train without evaluation, or set eval_strategy: steps (with eval_steps) to keep them",
            field=first[0],
        )


SOURCES = "_setting_sources"  # attribute parse() gives each config: field -> where its value came from
CONFIG_FILE = "_config_file"  # attribute parse() gives each config: the --config file it read, resolved


def config_file(config: Any) -> str | None:
    """The file ``parse`` read ``config`` from (a shipped name resolved to its path), or None."""
    return getattr(config, CONFIG_FILE, None)


def setting_source(config: Any, name: str) -> str:
    """Where ``parse`` found the value of ``config.name`` ('file.yaml:7', 'command line'), or 'default'."""
    return getattr(config, SOURCES, {}).get(name, "default")


@functools.cache
def _parser_class() -> type:
    """TRL's parser, with argparse's usage-and-exit replaced by a ConfigError (one line, not 300 options).
    Built on first use: importing TRL takes seconds and most modules import this one."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message: str) -> typing.NoReturn:
            match = re.match(r"argument --(\w+)[^:]*: invalid (\w+) value: (.*)", message)
            if match and match.group(2) in ARGPARSE_TYPES:
                name, kind, value = match.groups()
                message = f"--{name} must be {ARGPARSE_TYPES[kind]}, got {value}"
            raise ConfigError(f"command line: {message}")

    return Parser


MIN_LENGTH = (
    8  # tokens: a short prompt, its template and an answer; below it every real row is cut to nothing
)
ARGPARSE_TYPES = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (lines {first[key]} and {line})",
                    key_node.start_mark,
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """A config file's top-level mapping and the line of each key; ConfigError for text that is not UTF-8,
    not YAML, not a mapping, empty, or has a key twice."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        values = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{at}: not valid YAML: {problem}") from None
    if values is None:
        raise ConfigError(f"{path}: the file holds no settings")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of setting: value, got a {type(values).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    return values, lines


def set_environment(env: Any, path: str) -> None:
    """A config's ``env:`` mapping (TRL's convention) sets environment variables."""
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: env must be a mapping of VARIABLE: value, got {env!r}")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def field_types(dataclass_types: tuple[type, ...]) -> dict[str, tuple[Any, bool]]:
    """Field name -> (type hint, whether its default is None) over several config dataclasses."""
    out = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (hints[f.name], f.default is None)
    return out


SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
TRUE_WORDS = {"true", "yes", "t", "y", "1"}  # what argparse's bool type (transformers' string_to_bool) reads
BOOL_WORDS = TRUE_WORDS | {"false", "no", "f", "n", "0"}


def check_value(name: str, value: Any, hint: Any, none_default: bool = False) -> Any:
    """A YAML value checked against its field's type: ConfigError("max_steps must be an integer, got 2.5"),
    or the value (one item for a list field is made a list). Strings are what argparse converts later, so
    a string must read as the type (``learning_rate: 1e-3`` is a string to YAML and a number to argparse)."""
    if value is None and none_default:
        return value
    wanted = _wanted(value, hint)
    if wanted is not None:
        shown = "null (an empty value)" if value is None else repr(value)
        note = ""
        if isinstance(value, bool):
            note = " (YAML reads unquoted yes/no/on/off as true/false: quote it)"
        raise ConfigError(f"{name} must be {wanted}, got {shown}{note}", field=name)
    arms = [arm for arm in typing.get_args(hint) if arm is not type(None)] or [hint]
    if (
        len(arms) == 1
        and typing.get_origin(arms[0]) is list
        and not isinstance(value, list)
        and value is not None
    ):
        return [value]
    return value


def _wanted(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits ``hint``, else what the field takes ('an integer')."""
    origin, arms = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arms:
            return None
        if any(isinstance(arm, type) and issubclass(arm, enum.Enum) for arm in arms):
            arms = tuple(arm for arm in arms if arm is not str)  # transformers reads the string as the enum
        wanted = [_wanted(value, arm) for arm in arms if arm is not type(None)]
        return None if None in wanted else " or ".join(dict.fromkeys(wanted))
    if origin is Literal:
        return None if value in arms else f"one of {list(arms)}"
    if origin is list or hint is list:
        item = arms[0] if arms else Any
        items = value if isinstance(value, list) else [value]
        problems = [_wanted(v, item) for v in items]
        return None if all(p is None for p in problems) else f"a list of {getattr(item, '__name__', item)}"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [member.value for member in hint]
        return None if value in choices or isinstance(value, hint) else f"one of {choices}"
    if hint not in SCALARS:
        return None  # a type argparse and the dataclass check themselves
    if value is None:
        return SCALARS[hint]
    if hint is bool:
        fits = isinstance(value, bool) or (isinstance(value, str) and value.lower() in BOOL_WORDS)
    elif isinstance(value, bool):
        fits = False
    elif hint is str:
        fits = isinstance(value, str)
    else:
        fits = isinstance(value, int) or (hint is float and isinstance(value, float))
        fits = fits or (isinstance(value, str) and _reads_as(hint, value))
    return None if fits else SCALARS[hint]


def _reads_as(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


# Trainer configs whose beta may be 0 (no KL term); in DPO, KTO and the rest, beta divides or scales the
# implicit reward, and 0 or less cannot train.
BETA_MAY_BE_ZERO = ("GRPOConfig", "RLOOConfig")


def check_finite(config: Any) -> None:
    """ConfigError for a NaN or infinite number in any float setting (``.nan`` compares false with every bound,
    so the range checks would pass it), unless it is the field's own default."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, value in vars(config).items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number) and defaults.get(name) != number:
                raise ConfigError(f"{name}: {number} is not a finite number (NaN and infinities are refused)")


def check_trainer_args(args: Any) -> None:
    """Settings of a transformers/TRL trainer config that transformers accepts but that cannot train as meant:
    no training step, negative sizes and rates, beta <= 0 (ConfigError naming the field)."""
    from transformers import TrainingArguments

    if not isinstance(args, TrainingArguments):
        return
    if hasattr(args, "total_episodes"):  # TRL's online trainers count episodes, not steps
        if args.total_episodes is not None and args.total_episodes < 1:
            raise ConfigError(
                f"total_episodes: {args.total_episodes} gives no training step", field="total_episodes"
            )
        if args.total_episodes is None and args.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs: {args.num_train_epochs} gives no training step", field="num_train_epochs"
            )
    else:
        if args.max_steps == 0 or args.max_steps < -1:
            raise ConfigError(
                f"max_steps: {args.max_steps} must be a positive number of steps, or -1 to train num_train_epochs",
                field="max_steps",
            )
        if args.max_steps == -1 and args.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs: {args.num_train_epochs} gives no training step (max_steps is -1)",
                field="num_train_epochs",
            )
    check_at_least(args, 1, "per_device_train_batch_size", "per_device_eval_batch_size")
    check_at_least(args, 1, "gradient_accumulation_steps", "save_total_limit")
    check_at_least(args, 0, "learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "seed")
    for name in ("max_length", "max_prompt_length", "num_ppo_epochs", "num_mini_batches", "response_length"):
        if hasattr(args, name):  # TRL fields of some trainers only
            check_at_least(args, 1, name)
    prompt_room = getattr(args, "max_prompt_length", None)
    if getattr(args, "max_length", None) is not None and (
        args.max_length < MIN_LENGTH or (prompt_room is not None and args.max_length <= prompt_room)
    ):
        room = (
            f"max_prompt_length {prompt_room}"
            if prompt_room is not None and args.max_length >= MIN_LENGTH
            else ""
        )
        raise ConfigError(
            f"max_length: {args.max_length} leaves no room for an answer{' after ' + room if room else ''}: "
            f"every row would be cut to nothing (at least {MIN_LENGTH} tokens)"
        )
    for strategy, steps in (("logging", "logging_steps"), ("save", "save_steps"), ("eval", "eval_steps")):
        chosen, value = getattr(args, f"{strategy}_strategy"), getattr(args, steps)
        if getattr(chosen, "value", chosen) == "steps" and value is not None and value <= 0:
            raise ConfigError(f"{steps}: {value} must be above 0 with {strategy}_strategy steps", field=steps)
    if hasattr(args, "beta"):
        zero_ok = any(cls.__name__ in BETA_MAY_BE_ZERO for cls in type(args).__mro__)
        if args.beta < 0 or (args.beta == 0 and not zero_ok):
            raise ConfigError(
                f"beta: {args.beta} must be above 0{' (or 0: no KL term)' if zero_ok else ''}", field="beta"
            )
    if hasattr(args, "kl_coef") and args.kl_coef < 0:
        raise ConfigError(f"kl_coef: {args.kl_coef} must not be negative", field="kl_coef")
    if hasattr(args, "temperature") and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"temperature: {args.temperature} must be above 0", field="temperature")


def to_dict(*configs: Any) -> dict[str, Any]:
    """Flat, JSON-safe dict of several config dataclasses (for the run directory)."""
    out: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        out.update(values)
    return json.loads(json.dumps(out, default=str))


def save_resolved(path: str, *configs: Any) -> None:
    """Write the resolved configuration of a run as JSON, whole or not at all."""
    files.write_json(path, to_dict(*configs), indent=2, sort_keys=True)
