"""Judges of an evaluation from their specs and settings, checked before anything is generated: the config
and template read, the model folder there and finished, the API key set, the endpoint accepting a
connection. A problem stops the evaluation with one line per judge, unless the judge is optional."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from align_kit.configs import ConfigError
from align_kit.evaluation.answers import fingerprint, missing_local, split_spec, unfinished_run
from align_kit.evaluation.settings import EvalArgs
from align_kit.judges.backends import build_judge
from align_kit.judges.config import JudgeConfig, read_judge_config, read_template

LOCAL_BACKENDS = ("reward_model", "hf_logits")  # judges that load a model from disk
MODEL_BACKENDS = ("reward_model", "hf_logits", "openai")  # judges that take a `model`


class JudgeSetupError(ConfigError):
    """Judges that cannot work, found before anything is generated: one line per problem."""


def judge_config(spec: str, args: EvalArgs) -> JudgeConfig:
    """A judge spec ('name', 'name=model', a path) read with its settings from the evaluation:
    ``judge.yaml`` < ``=model`` < ``judge_model`` / ``judge_dtype`` < ``judge_overrides[name]`` (setting
    the same key both ways is an error)."""
    name, model = split_spec(spec)
    config = read_judge_config(name, **({"model": model} if model else {}))
    general: dict[str, Any] = {}
    if args.judge_model is not None and config.backend in MODEL_BACKENDS:
        general["model"] = args.judge_model
    if args.judge_dtype is not None and config.backend in LOCAL_BACKENDS:
        general["torch_dtype"] = args.judge_dtype
    specific = (args.judge_overrides or {}).get(name, {})
    both = sorted(set(general) & set(specific))
    if both:
        raise ValueError(f"{both} set both by judge_model/judge_dtype and by judge_overrides[{name}]")
    if general or specific:
        config = read_judge_config(name, **({"model": model} if model else {}), **general, **specific)
    return config


def endpoint_problem(base_url: str, timeout: float) -> str | None:
    """Why nothing would answer at ``base_url`` (a TCP connection to its host and port, bounded by
    ``timeout`` seconds including the name lookup), or None when something accepts the connection."""
    parts = urlsplit(base_url)
    if not parts.hostname:
        return f"base_url {base_url!r} names no host"
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    worker = threading.Thread(target=connect, daemon=True)  # a hung name lookup is left behind, not waited on
    worker.start()
    worker.join(timeout + 0.5)
    if outcome.get("ok"):
        return None
    if "error" in outcome:
        error = outcome["error"]
        return f"nothing listening at {host}:{port} ({base_url}): {getattr(error, 'strerror', None) or error}"
    return f"no answer from {host}:{port} within {timeout:g} s ({base_url})"


def judge_problems(config: JudgeConfig, args: EvalArgs) -> list[str]:
    """What stops a judge from working, found without loading or asking it: a missing or unfinished local
    model, an unset API key, an endpoint that accepts no connection, an unreadable template."""
    problems = []
    if config.template:
        try:
            read_template(config.template)
        except (OSError, ValueError) as error:
            problems.append(f"template: {error}")
    if config.backend in LOCAL_BACKENDS and config.model:
        if missing_local(config.model) or unfinished_run(config.model):
            problems.append(f"its model {config.model} does not exist or is unfinished")
    if config.backend == "openai":
        if config.api_key_env and not os.environ.get(config.api_key_env):
            problems.append(f"set the environment variable {config.api_key_env} (its API key)")
        if config.base_url:
            problem = endpoint_problem(config.base_url, args.judge_connect_timeout)
            problems += [problem] if problem else []
    return problems


def prepare_judges(specs: Sequence[str | Any], args: EvalArgs, notes: list[str]) -> list[Any]:
    """Judges from specs, or objects with the Judge protocol (used as is), every one checked first.

    A judge with a problem (``judge_problems``, or a config that does not read) is left out with a note
    when ``args.optional_judges`` names it; otherwise JudgeSetupError lists every problem of every judge,
    one per line. Backends load their models on first use, so a rerun answered from the cache loads none.
    """
    names = [split_spec(s)[0] for s in specs if isinstance(s, str)]
    for setting, given in (
        ("optional_judges", args.optional_judges),
        ("judge_overrides", args.judge_overrides),
    ):
        unknown = sorted(set(given or ()) - set(names))
        if unknown:
            raise JudgeSetupError(f"{setting} names {unknown}, which are not among the judges {names}")
    if args.judge_model is not None:
        takers = [s for s in specs if isinstance(s, str) and _backend(s) in MODEL_BACKENDS]
        if len(takers) > 1:
            raise JudgeSetupError(
                f"judge_model applies to one judge, but {takers} all take a model: use judge_overrides"
            )
    out, problems = [], []
    for spec in specs:
        if not isinstance(spec, str):
            out.append(spec)
            continue
        name = split_spec(spec)[0]
        try:
            config = judge_config(spec, args)
            found = judge_problems(config, args)
        except (OSError, ValueError) as error:
            found = [str(error)]
        if found and name in args.optional_judges:
            notes.append(f"judge {name} skipped: {'; '.join(found)}")
            continue
        if found:
            problems += [f"judge {name}: {problem}" for problem in found]
            continue
        if (
            config.backend in LOCAL_BACKENDS
            and config.model
            and not fingerprint(config.model).startswith("hub:")
        ):
            # verdicts are cached by the judge's settings: the weights' fingerprint retires them on retraining
            config = dataclasses.replace(config, cache_tag=f"{config.cache_tag}{fingerprint(config.model)}")
        out.append(build_judge(config))
    if problems:
        raise JudgeSetupError(
            "judges not ready (nothing was generated; fix them or list them in optional_judges):\n  "
            + "\n  ".join(problems)
        )
    judge_names = [j.name for j in out]
    if len(set(judge_names)) != len(judge_names):
        raise ValueError(f"two judges share a name: {judge_names}; set `name` in one judge.yaml")
    return out


def _backend(spec: str) -> str | None:
    try:
        return read_judge_config(split_spec(spec)[0]).backend
    except (OSError, ValueError):
        return None  # reported with the judge's other problems
