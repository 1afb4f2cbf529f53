"""PPO pieces that TRL 1.12's experimental PPOTrainer lacks or hides: finding it, its left-padded prompt
data, the mask of answer tokens it trains on, and an entropy bonus added without changing its code."""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
from torch.utils.hooks import RemovableHandle

from align_kit.configs import ConfigError

# Why an interrupted PPO run is not resumed: TRL 1.12's PPOTrainer.train() takes no checkpoint, sets its step
# and episode counters to 0 and starts again at update 1; its checkpoints are never read back.
CANNOT_RESUME = (
    "TRL 1.12's PPOTrainer cannot resume (its train() starts again at update 1 and reads no checkpoint), "
    "so the interrupted run's updates would be redone from the start"
)


def ppo_classes() -> tuple[type, type]:
    """(PPOConfig, PPOTrainer) from trl 1.12's experimental namespace, or an error that says what to do."""
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as error:
        import trl

        raise ImportError(
            f"PPO needs trl 1.12.x: PPOTrainer was removed in trl 1.13 (installed: trl {trl.__version__}). "
            "Install trl==1.12.* for this recipe, or use recipes/dpo.py or recipes/best_of_n.py."
        ) from error
    return PPOConfig, PPOTrainer


def refuse_trl_model_paths(args) -> None:
    """PPOConfig's own model paths are not read: the recipe loads its models from align-kit's settings."""
    PPOConfig, _ = ppo_classes()
    unused = [
        name
        for name in ("sft_model_path", "reward_model_path")
        if getattr(args, name) != getattr(PPOConfig, name)
    ]
    if unused:
        raise ConfigError(
            f"{unused}: not read by this recipe; set model_name_or_path and reward_models instead"
        )


def answer_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_token_id: int | None
) -> torch.Tensor:
    """(B, R) answer tokens PPO trains on: real tokens up to and including the first stop token, before
    the first padding. Inputs (B, R) are the answer part of TRL's forward (padding masked out)."""
    real = attention_mask.bool()
    ended = ~real if stop_token_id is None else ~real | (input_ids == stop_token_id)
    before_end = (ended.long().cumsum(-1) - ended.long()) == 0  # nothing ended strictly earlier
    return before_end & real


def add_entropy_bonus(
    policy: torch.nn.Module,
    coef: float,
    context_length: int | Callable[[], int],
    temperature: float,
    stop_token_id: int | None,
    gradient_accumulation_steps: int,
) -> RemovableHandle:
    """Make TRL's PPO minimise L_clip + vf_coef * L_value - coef * H without changing its code.

    TRL computes its loss inside ``train()`` from the policy's logits x. A forward hook on the policy
    registers, on every forward that builds a graph (the PPO updates; rollouts, the reference and
    generation run without one), a gradient hook on x that adds d(-coef * H)/dx, where H is the mean
    entropy of pi(. | x / T) over the micro-batch's answer tokens (the mask TRL's policy loss averages
    over). With z = x / T, dH/dz = -p (log p + H_t). Forward values are untouched, so log-probabilities,
    ratios and TRL's logged statistics are unchanged; the gradient is divided by the accumulation steps
    as accelerate divides the loss. Answers start at ``context_length`` (a number, or a function giving the
    width of the batch being trained on, ``BatchWidth.get``): prompts must be left padded to exactly that
    width. Returns the handle; ``.remove()`` restores the plain policy.
    """
    scale = temperature + 1e-7  # TRL divides the training logits by this
    width = context_length if callable(context_length) else lambda: context_length

    def on_forward(module, args, kwargs, output):
        logits = output.logits  # (B, T, V)
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return None
        context_length = width()
        input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
        if logits.shape[1] <= context_length or not attention_mask[:, context_length - 1].all():
            raise ValueError(f"entropy bonus: prompts must be left padded to exactly {context_length} tokens")
        with torch.no_grad():
            log_p = torch.log_softmax(logits[:, context_length - 1 : -1].float() / scale, dim=-1)  # (B, R, V)
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1, keepdim=True)  # (B, R, 1)
            mask = answer_token_mask(
                input_ids[:, context_length:], attention_mask[:, context_length:], stop_token_id
            ).float()  # (B, R)
            weight = mask * coef / (mask.sum().clamp(min=1) * gradient_accumulation_steps)
            extra = (weight[..., None] * p * (log_p + entropy) / scale).to(logits.dtype)  # d(-coef H)/dx

        def add_bonus(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:, context_length - 1 : -1] += extra
            return grad

        logits.register_hook(add_bonus)
        return None

    return policy.register_forward_hook(on_forward, with_kwargs=True)


def prompt_dataset(tokenizer, prompts: list[str]) -> Dataset:
    """PPO's data: prompt token ids only, unpadded; ``left_pad`` pads each batch to its own longest prompt."""
    return Dataset.from_dict({"input_ids": tokenizer(prompts)["input_ids"]})


def left_pad(pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collator padding a batch of prompts on the left to the batch's longest one (TRL's PPO generates
    after the last prompt token and finds answers at the batch's width)."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        ids = [[pad_token_id] * (width - len(row["input_ids"])) + list(row["input_ids"]) for row in rows]
        return {"input_ids": torch.tensor(ids, dtype=torch.long)}

    return collate


class BatchWidth:
    """The prompt width of the batch TRL's PPO loop is working on, for the entropy bonus.

    Wraps the trainer's dataloader: TRL takes one batch, rolls it out and runs all its updates before taking
    the next, so the width recorded as a batch is handed over is the one its updates see (recording it at
    collation would not do: accelerate's loader collates one batch ahead)."""

    def __init__(self, dataloader):
        self.dataloader, self.width = dataloader, None

    def __iter__(self):
        for batch in self.dataloader:
            self.width = batch["input_ids"].shape[1]
            yield batch

    def __len__(self) -> int:
        return len(self.dataloader)

    def get(self) -> int:
        if self.width is None:
            raise RuntimeError("entropy bonus: no PPO batch has been taken yet")
        return self.width
