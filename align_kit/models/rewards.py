"""Reward models: loading and scoring, ensembles, ranking, checkpoint selection, and measuring a policy.

A reward model r(x, y) is a sequence classifier with one output read at the last token of
``prompt + answer + EOS`` and trained with the Bradley-Terry loss (Ouyang et al. 2022, Eq. 1)

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m)        (m: optional margin, Touvron et al. 2023, Eq. 2)

Several reward models combine into a ``RewardEnsemble`` (mean, min, or mean - k * std of the members'
standardised rewards; Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"). It
fits wherever one reward model does: PPO (it exposes ``base_model_prefix`` and ``score``), best-of-N,
ranking and the reward-model judge (through ``scorer``). When its members disagree by more than a
threshold it logs an alarm and counts it, so that reward hacking is visible while it happens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.modeling_outputs import SequenceClassifierOutput

from align_kit.configs import AGGREGATIONS, RewardModelArgs
from align_kit.models.loading import default_device, load_reward_model

SCALE_FILE = "reward_scale.json"  # mean and std of held-out rewards, used to standardise ensemble members
logger = logging.getLogger("align_kit")


# ---------------------------------------------------------------------------------------------------------
# The loss


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of -log sigmoid(r_w - r_l - m) over the batch; all inputs (B,), output a scalar."""
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -nn.functional.logsigmoid(logits).mean()


# ---------------------------------------------------------------------------------------------------------
# Scoring and loading


class SequenceClassifierScorer:
    """A reward model (sequence classification, one label) scoring ``prompt + answer``.

    Texts are tokenized as TRL's RewardTrainer does in training (EOS appended), right-padded, and the
    model's own pooling picks the last non-pad token. ``score`` returns r(x, y) per pair.
    """

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int = 16, device: str | None = None, append_eos=True
    ):
        self.device = default_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.batch_size, self.append_eos = tokenizer, batch_size, append_eos
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        eos = self.tokenizer.eos_token if self.append_eos else ""
        texts = [p + a + eos for p, a in zip(prompts, answers, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                return_tensors="pt",
                add_special_tokens=False,
            ).to(self.device)
            out.extend(self.model(**batch).logits[:, 0].float().tolist())  # (B,)
        return out


def reward_scorer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32
) -> SequenceClassifierScorer:
    """``score(prompts, answers) -> list[float]`` for a reward model or an ensemble (EOS appended, as in
    RewardTrainer's training data)."""
    return SequenceClassifierScorer(model, tokenizer, batch_size=batch_size, append_eos=True)


def load_reward(args: RewardModelArgs, pad_token_id: int | None = None) -> nn.Module:
    """One reward model, or a ``RewardEnsemble`` when ``args.reward_models`` names several."""
    if not args.reward_models:
        raise ValueError("reward_models is empty: name at least one reward-model folder (recipes/reward.py)")
    if len(args.reward_models) == 1:
        return load_reward_model(args.reward_models[0], pad_token_id=pad_token_id)
    members = [load_reward_model(path, pad_token_id=pad_token_id) for path in args.reward_models]
    scales = [read_scale(path) for path in args.reward_models]
    return RewardEnsemble(
        members,
        args.ensemble_aggregation,
        args.ensemble_std_weight,
        args.disagreement_threshold,
        offsets=[mean for mean, _ in scales],
        scales=[std for _, std in scales],
    )


def read_scale(folder: str) -> tuple[float, float]:
    """(mean, std) of a reward model's held-out rewards; (0, 1) with a warning when it was not recorded."""
    path = Path(folder) / SCALE_FILE
    if not path.exists():
        logger.warning("%s has no %s: its rewards enter the ensemble unstandardised", folder, SCALE_FILE)
        return 0.0, 1.0
    values = json.loads(path.read_text())
    return float(values["mean"]), float(values["std"])


def preference_stats(
    scorer: Any, rows: list[dict], kind: Callable[[dict], str] | None = None
) -> dict[str, Any]:
    """Held-out preference accuracy P(r_w > r_l) (ties count as errors) and reward statistics.

    ``kind`` names each row's kind of comparison (for the embedded task, what is wrong with the rejected
    answer); ``by_kind`` then holds the accuracy per kind, so a mean that hides a kind at chance shows it.
    """
    prompts = [row["prompt"] for row in rows]
    chosen = torch.tensor(scorer.score(prompts, [row["chosen"] for row in rows]))  # (N,)
    rejected = torch.tensor(scorer.score(prompts, [row["rejected"] for row in rows]))  # (N,)
    margin = chosen - rejected
    both = torch.cat([chosen, rejected])
    stats: dict[str, Any] = {
        "accuracy": (margin > 0).float().mean().item(),
        "chosen_mean": chosen.mean().item(),
        "chosen_std": chosen.std(unbiased=False).item(),
        "rejected_mean": rejected.mean().item(),
        "rejected_std": rejected.std(unbiased=False).item(),
        "margin_mean": margin.mean().item(),
        "margin_std": margin.std(unbiased=False).item(),
        "mean": both.mean().item(),
        "std": both.std(unbiased=False).item(),
        "n_pairs": len(rows),
    }
    if kind is not None:
        wins: dict[str, list[bool]] = {}
        for row, won in zip(rows, (margin > 0).tolist(), strict=True):
            wins.setdefault(kind(row), []).append(won)
        stats["by_kind"] = {
            name: {"accuracy": sum(won) / len(won), "n_pairs": len(won)} for name, won in sorted(wins.items())
        }
    return stats


# ---------------------------------------------------------------------------------------------------------
# Ensembles


def aggregate(member_rewards: torch.Tensor, how: str, k: float = 1.0) -> torch.Tensor:
    """Combine (M, ...) member rewards over dim 0: mean, min, or mean - k * std (population std)."""
    if how == "mean":
        return member_rewards.mean(0)
    if how == "min":
        return member_rewards.min(0).values
    if how == "mean_minus_std":
        return member_rewards.mean(0) - k * member_rewards.std(0, unbiased=False)
    raise ValueError(f"ensemble_aggregation must be one of {AGGREGATIONS}, got {how!r}")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token before the first padding that follows the first real token:
    where TRL's PPO reads rewards (prompts left padded, answers right padded)."""
    mask = attention_mask.bool()  # (B, T)
    started = mask.cumsum(-1) > 0
    ended = started & ~mask
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device).expand_as(mask)
    first_pad = torch.where(ended, positions, torch.full_like(positions, width)).min(-1).values
    return first_pad - 1


def classifier_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of the rightmost token that is not padding: where a Hugging Face sequence classifier
    pools (with EOS as padding, as for GPT-2, that is the token before the appended EOS)."""
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class RewardEnsemble(nn.Module):
    """Several reward models as one. Member i's reward is standardised, z_i = (r_i - offset_i) / scale_i,
    and the members are combined by ``aggregate``.

    - PPO: TRL calls ``getattr(model, model.base_model_prefix)(input_ids, attention_mask, position_ids, ...)``
      and applies ``model.score`` to ``hidden_states[-1]``. Here that call returns the combined per-token
      rewards (B, T, 1) as the "hidden state" and ``score`` is the identity.
    - Anywhere else: ``forward(input_ids, attention_mask)`` pools where its members' classifiers pool
      (``classifier_index``), logits (B, 1).

    Every call measures the disagreement, the std of the z_i at the scored token, and counts the answers
    above ``threshold`` (an alarm; see ``stats``). The combined reward is in units of the members' std,
    while a single reward model's is raw: retune PPO's ``kl_coef`` when switching between the two.
    """

    base_model_prefix = "per_token_rewards"

    def __init__(
        self,
        members: Sequence[PreTrainedModel],
        aggregation: str = "mean",
        k: float = 1.0,
        threshold: float = 1.0,
        offsets: Sequence[float] | None = None,
        scales: Sequence[float] | None = None,
    ):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        aggregate(torch.zeros(1, 1), aggregation)  # fail now on an unknown aggregation
        self.members = nn.ModuleList(members)
        self.aggregation, self.k, self.threshold = aggregation, k, threshold
        self.register_buffer("offsets", torch.tensor(offsets or [0.0] * len(members)), persistent=False)
        self.register_buffer("scales", torch.tensor(scales or [1.0] * len(members)), persistent=False)
        self.score = nn.Identity()
        self.reset_stats()

    @property
    def config(self):
        return self.members[0].config

    def reset_stats(self) -> None:
        self.n_scored, self.n_alarms, self.sum_std, self.max_std = 0, 0, 0.0, 0.0
        self._window: list[float] = []  # disagreements since the last ``pop_window``

    def member_rewards(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Standardised per-token rewards z_i of every member, (M, B, T)."""
        out = []
        for member in self.members:
            backbone = getattr(member, member.base_model_prefix)
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (B, T, d)
            out.append(member.score(hidden).squeeze(-1).float())  # (B, T)
        rewards = torch.stack(out)  # (M, B, T)
        return (rewards - self.offsets[:, None, None]) / self.scales[:, None, None]

    def per_token_rewards(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        **unused: Any,
    ) -> SimpleNamespace:
        """TRL's PPO entry point: combined rewards at every position, as ``hidden_states[-1]`` (B, T, 1)."""
        z = self.member_rewards(input_ids, attention_mask, position_ids)  # (M, B, T)
        rows = torch.arange(z.shape[1], device=z.device)
        self._record(z[:, rows, last_token_index(attention_mask)])
        return SimpleNamespace(hidden_states=(aggregate(z, self.aggregation, self.k).unsqueeze(-1),))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused: Any
    ) -> SequenceClassifierOutput:
        """Combined reward of each sequence at its last non-pad token, logits (B, 1)."""
        z = self.member_rewards(input_ids, attention_mask)  # (M, B, T)
        rows = torch.arange(z.shape[1], device=z.device)
        pooled = z[:, rows, classifier_index(input_ids, self.config.pad_token_id)]  # (M, B)
        self._record(pooled)
        return SequenceClassifierOutput(logits=aggregate(pooled, self.aggregation, self.k).unsqueeze(-1))

    @torch.no_grad()
    def _record(self, pooled: torch.Tensor) -> None:
        """Disagreement (population std over members) of each answer (M, B); alarm above the threshold."""
        std = pooled.detach().float().std(0, unbiased=False)  # (B,)
        alarms = int((std > self.threshold).sum())
        self.n_scored += std.numel()
        self.n_alarms += alarms
        self.sum_std += std.sum().item()
        self.max_std = max(self.max_std, std.max().item())
        self._window.extend(std.tolist())
        if alarms:
            logger.warning(
                "reward ensemble: members disagree (std %.2f > %.2f) on %d of %d answers (%d alarms so far); "
                "the policy may be exploiting a reward model",
                std.max().item(), self.threshold, alarms, std.numel(), self.n_alarms,
            )  # fmt: skip

    def stats(self) -> dict[str, float | int]:
        """Disagreement over everything scored so far."""
        return {
            "n_scored": self.n_scored,
            "disagreement_mean": self.sum_std / max(self.n_scored, 1),
            "disagreement_max": self.max_std,
            "alarms": self.n_alarms,
        }

    def pop_window(self) -> dict[str, float | int]:
        """Disagreement since the previous call (for per-step logs)."""
        window, self._window = self._window, []
        return {
            "ensemble/disagreement_mean": sum(window) / max(len(window), 1),
            "ensemble/disagreement_max": max(window, default=0.0),
            "ensemble/alarms_total": self.n_alarms,
        }

    @torch.no_grad()
    def calibrate(
        self, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]
    ) -> None:
        """Set each member's offset and scale to the mean and std of its raw rewards on these answers."""
        self.offsets.zero_()
        self.scales.fill_(1.0)
        batch = tokenizer(
            [p + a + tokenizer.eos_token for p, a in zip(prompts, answers, strict=True)],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        ).to(self.offsets.device)
        z = self.member_rewards(batch["input_ids"], batch["attention_mask"])  # raw rewards here, (M, B, T)
        rows = torch.arange(z.shape[1], device=z.device)
        pooled = z[:, rows, classifier_index(batch["input_ids"], self.config.pad_token_id)]  # (M, B)
        self.offsets.copy_(pooled.mean(1))
        self.scales.copy_(pooled.std(1, unbiased=False).clamp(min=1e-6))


class DisagreementCallback(TrainerCallback):
    """Adds the ensemble's disagreement since the previous log to every log entry."""

    def __init__(self, ensemble: RewardEnsemble):
        self.ensemble = ensemble

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:
            state.log_history[-1].update(self.ensemble.pop_window())


# ---------------------------------------------------------------------------------------------------------
# Ranking


def rank_answers(scorer: Any, prompt: str, answers: Sequence[str]) -> list[tuple[str, float]]:
    """The answers to one prompt with their rewards, best first."""
    rewards = scorer.score([prompt] * len(answers), list(answers))
    return sorted(zip(answers, rewards, strict=True), key=lambda pair: pair[1], reverse=True)
