"""Trainer callbacks the configs ask for: early stopping on the evaluation metric, or in SFT on a reward
model's mean score of greedy answers to held-out prompts."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase, TrainerCallback

from align_kit.configs import EarlyStoppingArgs
from align_kit.console import log
from align_kit.models.generation import greedy_reward
from align_kit.models.loading import load_reward_model
from align_kit.models.rewards import reward_scorer

logger = logging.getLogger("align_kit")


def trainer_callbacks(
    stopping: EarlyStoppingArgs, tokenizer: Any = None, held_out_prompts: list[str] | None = None
) -> list:
    """Trainer callbacks asked for by the config: early stopping on the evaluation loss (or another
    ``metric_for_best_model``), or on a reward model's score of greedy held-out answers."""
    if stopping.reward_stopping_model is None:
        if stopping.early_stopping_patience is None:
            return []
        return [EarlyStoppingCallback(stopping.early_stopping_patience, stopping.early_stopping_threshold)]

    if stopping.early_stopping_patience is None:
        raise ValueError("reward_stopping_model needs early_stopping_patience (evaluations without a gain)")
    if tokenizer is None:
        raise ValueError("reward_stopping_model is an SFT option (recipes/sft.py)")
    if not held_out_prompts:
        raise ValueError("reward_stopping_model needs held-out prompts, and the data has no test split")
    model = load_reward_model(stopping.reward_stopping_model, pad_token_id=tokenizer.pad_token_id)
    prompts = held_out_prompts[: stopping.reward_stopping_prompts]
    log(f"reward early stopping: {len(prompts)} held-out prompts scored by {stopping.reward_stopping_model}")
    return [
        RewardEarlyStopping(
            reward_scorer(model.eval(), tokenizer),
            tokenizer,
            prompts,
            patience=stopping.early_stopping_patience,
            threshold=stopping.early_stopping_threshold,
            max_new_tokens=stopping.reward_stopping_max_new_tokens,
        )
    ]


class RewardEarlyStopping(TrainerCallback):
    """Stops training when the mean reward of greedy answers to held-out prompts has not improved by more
    than ``threshold`` for ``patience`` evaluations in a row. Runs at every evaluation (``eval_strategy``);
    the value is added to the evaluation metrics as ``eval_reward_mean`` and to the log history."""

    def __init__(
        self,
        scorer: Any,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        patience: int = 2,
        threshold: float = 0.0,
        max_new_tokens: int = 48,
        batch_size: int = 64,
    ):
        self.scorer, self.tokenizer, self.prompts = scorer, tokenizer, list(prompts)
        self.patience, self.threshold = patience, threshold
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.best = -math.inf
        self.bad_evaluations = 0
        self.history: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if args.eval_strategy == "no":
            raise ValueError("reward early stopping runs at evaluations: set eval_strategy to steps or epoch")

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        mean, _, _ = greedy_reward(
            model, self.tokenizer, self.scorer, self.prompts, self.max_new_tokens, self.batch_size
        )
        self.history.append((state.global_step, mean))
        state.log_history.append({"eval_reward_mean": mean, "step": state.global_step})
        if metrics is not None:
            metrics["eval_reward_mean"] = mean
        if mean > self.best + self.threshold:
            self.best, self.bad_evaluations = mean, 0
        else:
            self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            logger.info(
                "reward early stopping: no gain over %.4f for %d evaluations", self.best, self.patience
            )
            control.should_training_stop = True
        return control
