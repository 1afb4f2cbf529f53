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
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.modeling_outputs import SequenceClassifierOutput

from align_kit import adapters
from align_kit.configs import AGGREGATIONS, DataArgs, RewardModelArgs

SCORE_HEAD_FILE = "score_head.safetensors"  # the new head of a reward model trained with an adapter
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
# Loading, saving and scoring


def load_reward_model(
    name_or_path: str, torch_dtype: str = "float32", pad_token_id: int | None = None
) -> PreTrainedModel:
    """A sequence classifier with one output from a causal-LM folder (its ``score`` head is new) or
    from a reward-model folder. A folder saved with an adapter is rebuilt on its base model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from align_kit.models import resolve

    folder = Path(resolve(name_or_path))
    if (folder / adapters.CONFIG_NAME).exists():
        adapter_args, base_model = adapters.read_adapter_config(folder)
        model = load_reward_model(base_model, torch_dtype, pad_token_id)  # the base may itself be adapted
        if not adapters.has_adapters(model):
            adapters.inject_adapters(model, adapter_args)
        adapters.load_adapter_weights(model, folder)
        if (folder / SCORE_HEAD_FILE).exists():
            model.score.load_state_dict(load_file(str(folder / SCORE_HEAD_FILE)))
        return model
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=1, dtype=getattr(torch, torch_dtype)
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # the classifier reads r at the last non-pad token
    return model


def load_trainable_reward_model(
    model_args: Any, adapter_args: Any, pad_token_id: int | None
) -> PreTrainedModel:
    """The reward model to train, as ``models.load_policy`` gives a policy: a new adapter is injected with
    the base frozen (and ``adapter_path`` weights loaded into it), a saved adapter is continued; the
    score head always trains (it is new, and no adapter parameter)."""
    model = load_reward_model(model_args.model_name_or_path, model_args.torch_dtype, pad_token_id)
    if not adapters.has_adapters(model) and adapters.inject_adapters(model, adapter_args):
        if adapter_args.adapter_path:
            adapters.load_adapter_weights(model, adapter_args.adapter_path)
    if adapters.has_adapters(model):
        adapters.freeze_non_adapter(model)
        model.score.requires_grad_(True)
    return model


def save_score_head(state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Next to adapter weights, save the reward head too (it is trained but is no adapter parameter);
    ``state`` is the full state dict ``runs.save_model`` returns."""
    from safetensors.torch import save_file

    head = {
        k.removeprefix("score."): v.detach().cpu().contiguous()
        for k, v in state.items()
        if k.startswith("score.")
    }
    if not head:
        raise ValueError("the state dict has no score.* entries: not a sequence-classification reward model")
    save_file(head, str(Path(folder) / SCORE_HEAD_FILE))


def reward_scorer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32):
    """``score(prompts, answers) -> list[float]`` for a reward model or an ensemble (EOS appended, as in
    RewardTrainer's training data)."""
    from align_kit.judge_backends import SequenceClassifierScorer

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


def subsample(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded random ``fraction`` of ``rows`` (all of them at 1.0), in their original order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), max(1, round(fraction * len(rows)))))
    return [row for i, row in enumerate(rows) if i in keep]


def attach_margins(splits: dict[str, list[dict]], data_args: DataArgs, column: str) -> dict[str, list[dict]]:
    """Add ``margin`` to every cleaned row from the raw source row it came from (``source_row``)."""
    from align_kit.data import DataError, load_raw

    raw = load_raw(data_args)
    sources = {"train": data_args.train_split, "test": data_args.test_split}
    out = {}
    for split, rows in splits.items():
        source = sources[split] if sources[split] in raw else data_args.train_split  # test made from train
        name, dataset = raw[source]
        if column not in dataset.column_names:
            raise DataError(f"{name}: no margin column {column!r}; the file has {dataset.column_names}")
        values = dataset[column]
        out[split] = [{**row, "margin": float(values[row["source_row"]])} for row in rows]
    return out


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
# Ranking, best-of-N, checkpoint selection


def rank_answers(scorer: Any, prompt: str, answers: Sequence[str]) -> list[tuple[str, float]]:
    """The answers to one prompt with their rewards, best first."""
    rewards = scorer.score([prompt] * len(answers), list(answers))
    return sorted(zip(answers, rewards, strict=True), key=lambda pair: pair[1], reverse=True)


def sample_and_score(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Any,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[list[list[str]], list[list[float]]]:
    """``n`` sampled completions per prompt and their rewards, both (P, n)."""
    from align_kit.generation import generate

    samples = generate(
        policy, tokenizer, list(prompts), max_new_tokens, batch_size, do_sample=True, temperature=temperature,
        top_p=top_p, num_return_sequences=n, seed=seed, progress=False,
    )  # fmt: skip
    flat = scorer.score(
        [p for p, group in zip(prompts, samples, strict=True) for _ in group], [a for g in samples for a in g]
    )
    return samples, [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def best_of_n(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Any,
    prompts: Sequence[str],
    n: int,
    **sampling: Any,
) -> list[str]:
    """Best-of-N sampling (no training): for each prompt, the highest-reward of ``n`` sampled answers;
    ``sampling`` takes ``sample_and_score``'s settings (max_new_tokens, batch_size, temperature, top_p, seed).

    Its KL to ``policy`` is at most log n - (n - 1) / n nats (Stiennon et al. 2020, App. G.3).
    """
    samples, rewards = sample_and_score(policy, tokenizer, scorer, prompts, n, **sampling)
    return [group[max(range(n), key=r.__getitem__)] for group, r in zip(samples, rewards, strict=True)]


def greedy_reward(
    policy: nn.Module, tokenizer: PreTrainedTokenizerBase, scorer: Any, prompts: Sequence[str], max_new_tokens: int = 48,
    batch_size: int = 64,
) -> tuple[float, list[str], list[float]]:  # fmt: skip
    """Mean reward of the greedy answers to ``prompts``, with the answers and their rewards."""
    from align_kit.generation import generate

    answers = [
        a[0] for a in generate(policy, tokenizer, list(prompts), max_new_tokens, batch_size, progress=False)
    ]
    rewards = scorer.score(list(prompts), answers)
    return sum(rewards) / max(len(rewards), 1), answers, rewards


def score_checkpoints(
    folders: Sequence[str], tokenizer: PreTrainedTokenizerBase, scorer: Any, prompts: Sequence[str],
    max_new_tokens: int = 48, batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    """Mean reward of each checkpoint's greedy answers to held-out prompts; pick the best with ``max``."""
    from align_kit.configs import ModelArgs
    from align_kit.models import load_model

    results = {}
    for folder in folders:
        model = load_model(ModelArgs(model_name_or_path=str(folder)))
        results[str(folder)] = greedy_reward(model, tokenizer, scorer, prompts, max_new_tokens, batch_size)[0]
        del model
    return results


def best_checkpoint(results: dict[str, float]) -> str:
    """The folder with the highest mean reward in ``score_checkpoints``'s results."""
    return max(results, key=results.__getitem__)


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


# ---------------------------------------------------------------------------------------------------------
# Measuring a policy against its reference


def _answer_mask(answers: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, A) mask of answer tokens up to and including the first EOS."""
    is_eos = (answers == eos_token_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def answer_logprobs(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> torch.Tensor:
    """log p(y_t | x, y_<t) of every answer token, (B, A); prompts left padded to ``prompt_width``."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    logprobs = torch.log_softmax(logits[:, prompt_width - 1 : -1].float(), dim=-1)  # (B, A, V)
    return logprobs.gather(-1, sequences[:, prompt_width:, None]).squeeze(-1)


@torch.no_grad()
def sampled_kl(
    policy: PreTrainedModel,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """KL(pi || pi_ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)] in nats per answer, estimated
    with one answer per prompt sampled at temperature 1 without truncation (so y really comes from pi);
    log-probabilities sum over the answer's tokens up to and including EOS."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = policy.training
    policy.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            batch = batch.to(policy.device)
            width = batch["input_ids"].shape[1]
            sequences = policy.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            mask = _answer_mask(sequences[:, width:], tokenizer.eos_token_id)  # (B, A)
            attention_mask = torch.cat([batch["attention_mask"].bool(), mask], dim=1)
            log_ratio = answer_logprobs(policy, sequences, attention_mask, width) - answer_logprobs(
                reference, sequences, attention_mask, width
            )  # (B, A)
            total += (log_ratio * mask).sum().item()
            count += sequences.shape[0]
    finally:
        tokenizer.padding_side = side
        policy.train(was_training)
    return total / max(count, 1)


def policy_report(
    policy: PreTrainedModel,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy-answer reward of the policy and of its reference, and the sampled KL between them, on
    held-out prompts; with the policy's answers and rewards as samples to log."""
    policy_mean, answers, policy_rewards = greedy_reward(policy, tokenizer, scorer, prompts, max_new_tokens)
    if isinstance(reference, adapters.AdapterOffReference):  # holds no weights: generate with the adapter off
        with adapters.adapters_disabled(reference.policy):
            reference_mean = greedy_reward(reference.policy, tokenizer, scorer, prompts, max_new_tokens)[0]
    else:
        reference_mean = greedy_reward(reference, tokenizer, scorer, prompts, max_new_tokens)[0]
    report = {
        "reward_policy": policy_mean,
        "reward_reference": reference_mean,
        "kl_to_reference": sampled_kl(policy, reference, tokenizer, prompts, max_new_tokens, seed=seed),
        "n_prompts": len(prompts),
    }
    samples = [
        {"prompt": p, "answer": a, "reward": r}
        for p, a, r in zip(prompts, answers, policy_rewards, strict=True)
    ]
    return report, samples
