"""Reward functions for GRPO, built from the specs a config lists in ``reward_funcs``.

Each spec gives one function with GRPO's reward-function signature, ``f(prompts, completions, **kwargs)
-> list[float]`` (TRL also passes ``completion_ids``, ``trainer_state`` and any dataset columns), and
GRPO sums them with ``reward_weights``:

- ``oracle``: the embedded task's exact checker (``task.oracle_score``, 1.0 or 0.0).
- a reward-model folder (recipes/reward.py): r(x, y) scored by ``rewards.reward_scorer``, EOS appended
  as in training and wherever else align-kit scores answers. TRL's own reward-model path would score
  ``prompt + completion`` without the EOS at which our reward models read r.
- ``ensemble:<folder>,<folder>[,...]``: a ``rewards.RewardEnsemble`` of those folders, combined with the
  config's ``ensemble_aggregation`` (and ``ensemble_std_weight``, ``disagreement_threshold``), exactly as
  PPO and best-of-N load ``reward_models``. One ensemble per run, so its disagreement logs under one name.
- ``module:function``: a function imported from an importable module (installed, or on PYTHONPATH).

Reward models share the policy's tokenizer, as in PPO and best-of-N. A spec that fits none of these is
an error naming its position and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from align_kit.configs import ConfigError, RewardModelArgs
from align_kit.data.task import OracleScorer
from align_kit.models import rewards
from align_kit.models.loading import load_reward_model

ENSEMBLE_PREFIX = "ensemble:"
_FUNCTION_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)")
RewardFunc = Callable[..., list[float]]


class ScorerReward:
    """A scorer (``score(prompts, answers) -> list[float]``) as a GRPO reward function. ``__name__`` is what
    TRL logs it as (``rewards/<name>/mean``); ``model`` is the reward model or ensemble, if any."""

    def __init__(self, name: str, scorer: Any, model: Any = None):
        self.__name__, self.scorer, self.model = name, scorer, model

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **unused: Any) -> list[float]:
        return self.scorer.score(list(prompts), list(completions))


class WeightedRewards:
    """sum_i w_i f_i(x, y) of GRPO reward functions as a scorer, for reports (a None reward counts 0, as
    TRL's nansum does)."""

    def __init__(self, funcs: Sequence[RewardFunc], weights: Sequence[float] | None, tokenizer: Any):
        self.funcs, self.tokenizer = list(funcs), tokenizer
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        ids = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        totals = [0.0] * len(answers)
        for func, weight in zip(self.funcs, self.weights, strict=True):
            values = func(prompts=list(prompts), completions=list(answers), completion_ids=ids)
            totals = [t + weight * (v or 0.0) for t, v in zip(totals, values, strict=True)]
        return totals


def spec_error(index: int, spec: str, problem: str) -> ConfigError:
    return ConfigError(f"reward_funcs[{index}] = {spec!r}: {problem}")


def import_function(index: int, spec: str) -> RewardFunc:
    """``module:function``, checked to be callable and to take GRPO's keyword arguments."""
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise spec_error(index, spec, f"cannot import {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise spec_error(index, spec, f"module {module_name!r} has no function {function_name!r}")
    kinds = {p.kind for p in inspect.signature(function).parameters.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        raise spec_error(
            index, spec, "the function must accept **kwargs (GRPO passes prompts, completions, completion_ids, "
            "trainer_state and the dataset's columns by keyword)",
        )  # fmt: skip
    return function


def build_reward_func(
    index: int, spec: str, reward_args: RewardModelArgs, tokenizer: PreTrainedTokenizerBase
) -> RewardFunc:
    """The reward function for one spec (see the module docstring)."""
    if spec == "oracle":
        return ScorerReward("oracle", OracleScorer())
    if spec.startswith(ENSEMBLE_PREFIX):
        members = [m.strip() for m in spec.removeprefix(ENSEMBLE_PREFIX).split(",") if m.strip()]
        if len(members) < 2:
            raise spec_error(
                index, spec, "an ensemble needs at least two reward-model folders, comma separated"
            )
        missing = [m for m in members if not Path(m).is_dir()]
        if missing:
            raise spec_error(index, spec, f"no such reward-model folder(s) {missing}")
        args = dataclasses.replace(reward_args, reward_models=members)
        ensemble = rewards.load_reward(args, tokenizer.pad_token_id).eval().requires_grad_(False)
        return ScorerReward("ensemble", rewards.reward_scorer(ensemble, tokenizer), ensemble)
    if Path(spec).is_dir():
        model = load_reward_model(spec, pad_token_id=tokenizer.pad_token_id)
        model.eval().requires_grad_(False)
        return ScorerReward(Path(spec).name or "reward_model", rewards.reward_scorer(model, tokenizer), model)
    if _FUNCTION_SPEC.fullmatch(spec):
        return import_function(index, spec)
    raise spec_error(
        index, spec, "not 'oracle', an existing reward-model folder, 'ensemble:<folder>,<folder>' or "
        "'module:function'",
    )  # fmt: skip


def build_reward_funcs(
    specs: Sequence[str],
    reward_args: RewardModelArgs,
    tokenizer: PreTrainedTokenizerBase,
    weights: Sequence[float] | None = None,
) -> tuple[list[RewardFunc], rewards.RewardEnsemble | None]:
    """The reward functions for ``specs`` (TRL logs each under a distinct name) and the run's ensemble,
    if one of them is (for ``rewards.DisagreementCallback`` and the final statistics)."""
    if not specs:
        raise ConfigError("reward_funcs is empty: name at least one ('oracle', a reward-model folder, ...)")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"reward_weights has {len(weights)} values for {len(specs)} reward_funcs")
    if sum(spec.startswith(ENSEMBLE_PREFIX) for spec in specs) > 1:
        raise ConfigError("reward_funcs: one ensemble per run; list all its members in one 'ensemble:' spec")
    funcs = [build_reward_func(i, spec, reward_args, tokenizer) for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for func in funcs:
        name = getattr(func, "__name__", type(func).__name__)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1 and isinstance(func, ScorerReward):
            func.__name__ = f"{name}_{seen[name]}"
    ensemble = next(
        (f.model for f in funcs if isinstance(getattr(f, "model", None), rewards.RewardEnsemble)), None
    )
    return funcs, ensemble
