"""The DPO loss family: TRL's ``loss_type`` terms checked when the config is parsed, user-defined losses,
and KTO's settings checked the same way.

A user-defined loss is one function of the summed answer log-probabilities of a batch of pairs::

    def loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
        # each (B,): log pi(y|x) summed over the answer's tokens, under the policy and the reference
        return per_example_losses                      # (B,)
        # or (per_example_losses, chosen_rewards, rejected_rewards), each (B,), for the logged rewards

named in a DPO config as ``loss_function: "package.module:function"`` or ``"path/to/file.py:function"``.
It replaces TRL's ``loss_type`` terms; ``DPOTrainer`` computes the four inputs, the mean of the losses is
the batch loss, and TRL's pair metrics (rewards/*, logps/*) are logged as for TRL's own losses.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trl
from trl.trainer.utils import selective_log_softmax

from align_kit.configs import ConfigError
from align_kit.models.generation import answer_logprobs
from align_kit.training.dpo_chunked import ChunkedDPO
from align_kit.training.kto_chunked import ChunkedKTO

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip  # TRL 1.12, trl/trainer/dpo_trainer.py DPOTrainer._compute_loss
LABEL_SMOOTHED = {"exo_pair", "robust", "aot", "aot_unpaired"}  # the loss types that read label_smoothing
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
TERM_ONLY_SETTINGS = ("loss_weights", "ld_alpha", "use_weighting", "use_liger_kernel")
PROBE_BATCH = 4

LossFunction = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class LossFunctionError(ConfigError):
    """A user-defined loss that cannot be loaded or whose output is unusable (one line, naming it)."""


# ---------------------------------------------------------------------------------------------------------
# User-defined losses


def load_loss_function(spec: str) -> LossFunction:
    """The callable named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise LossFunctionError(
            f"loss_function={spec!r}: expected 'package.module:function' or 'path/to/file.py:function'"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise LossFunctionError(f"loss_function={spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"align_kit_user_loss_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's file: any error it raises is reported, in one line
            raise LossFunctionError(f"loss_function={spec!r}: {path} fails to import: {error!r}") from error
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise LossFunctionError(
                f"loss_function={spec!r}: cannot import module {target!r}: {error}"
            ) from error
    function = getattr(module, name, None)
    if not callable(function):
        raise LossFunctionError(f"loss_function={spec!r}: {target} has no function {name!r}")
    return function


def split_output(
    spec: str, output, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(losses, chosen_rewards, rejected_rewards) from a loss function's output, each checked to be (B,)
    and the losses finite; rewards are None when the function returns the losses alone."""
    if isinstance(output, tuple):
        if len(output) != 3:
            raise LossFunctionError(
                f"loss_function={spec!r}: returned a tuple of {len(output)}; expected losses or "
                "(losses, chosen_rewards, rejected_rewards)"
            )
        parts = dict(zip(("losses", "chosen_rewards", "rejected_rewards"), output, strict=True))
    else:
        parts = {"losses": output}
    for what, value in parts.items():
        if not isinstance(value, torch.Tensor) or value.shape != (batch_size,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise LossFunctionError(
                f"loss_function={spec!r}: {what} has shape {shape}; expected one value per pair, ({batch_size},)"
            )
    losses = parts["losses"]
    if not torch.isfinite(losses).all():
        bad = losses.detach()[~torch.isfinite(losses.detach())][0].item()
        raise LossFunctionError(f"loss_function={spec!r}: returned a non-finite loss ({bad})")
    return losses, parts.get("chosen_rewards"), parts.get("rejected_rewards")


def probe_loss_function(spec: str, function: LossFunction, beta: float) -> None:
    """Call the loss on random pairs (seeded, the global RNG untouched) and check its output: shape, finite
    values, and a non-zero gradient with respect to the policy's log-probabilities."""
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = (-torch.empty(PROBE_BATCH).uniform_(5.0, 60.0, generator=generator) for _ in range(2))
    ref_chosen = chosen + torch.randn(PROBE_BATCH, generator=generator)
    ref_rejected = rejected + torch.randn(PROBE_BATCH, generator=generator)
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    try:
        output = function(chosen, rejected, ref_chosen, ref_rejected, beta)
    except Exception as error:  # the user's code: report whatever it raises, in one line
        raise LossFunctionError(f"loss_function={spec!r}: raised {error!r} on a test batch") from error
    losses, _, _ = split_output(spec, output, PROBE_BATCH)
    if not losses.requires_grad:
        raise LossFunctionError(
            f"loss_function={spec!r}: its losses have no gradient (computed without the log-probabilities, "
            "or detached)"
        )
    grads = torch.autograd.grad(losses.sum(), (chosen, rejected), allow_unused=True)
    if all(g is None or not g.abs().sum() > 0 for g in grads):
        raise LossFunctionError(
            f"loss_function={spec!r}: its gradient with respect to the policy's log-probabilities is zero"
        )


def answer_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """log pi(y|x) summed over the completion tokens of each row: logits (N, T, V), ids and mask (N, T) -> (N,)."""
    per_token = selective_log_softmax(logits[:, :-1, :], input_ids[:, 1:])  # (N, T-1): token t+1 given <= t
    return per_token.masked_fill(completion_mask[:, 1:] == 0, 0.0).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------
# Configs


def _loss_type_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def logprob_chunk_size_field(fallbacks: str):
    """The ``logprob_chunk_size`` field of DPOConfig and KTOConfig; ``fallbacks`` names the settings that keep
    TRL's path."""
    return field(
        default=1024,
        metadata={
            "help": "Answer tokens per chunk when computing log-probabilities from the final hidden states and "
            "the LM head, each chunk's logits recomputed in backward, so no (batch, length, vocabulary) logits "
            "tensor exists (align_kit/models/logprobs.py). 0: TRL's path (full logits). Not in TRL 1.12; on by "
            "default because the full logits are what runs out of memory. TRL's path is used, and the log says "
            f"so, with {fallbacks}, or a model that rescales its logits after the head."
        },
    )


def check_logprob_chunk_size(value) -> None:
    if not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"logprob_chunk_size: {value!r} must be a whole number >= 0 (0: TRL's path)",
            field="logprob_chunk_size",
        )


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig plus ``loss_function``, with every setting that would make the loss infinite,
    constant or silently ignored refused when the config is built (that is, when a YAML is parsed)."""

    loss_type: list[str] | None = field(
        default=None,
        metadata={
            "help": f"TRL loss term(s), combined with loss_weights: any of {', '.join(DPO_LOSS_TYPES)}. "
            "None: ['sigmoid'] (TRL's default), unless loss_function is set. Differs from TRL's default so "
            "that setting both loss_type and loss_function can be refused."
        },
    )
    loss_function: str | None = field(
        default=None,
        metadata={
            "help": "A user-defined loss replacing the loss_type terms: 'package.module:function' or "
            "'path/to/file.py:function', called as f(chosen_logps, rejected_logps, ref_chosen_logps, "
            "ref_rejected_logps, beta) on (B,) summed answer log-probabilities; returns per-pair losses (B,) "
            "or (losses, chosen_rewards, rejected_rewards). See align_kit/training/losses.py."
        },
    )
    logprob_chunk_size: int = logprob_chunk_size_field(
        "use_weighting, ld_alpha, an f_divergence_type other than reverse_kl or use_liger_kernel"
    )

    def __post_init__(self):
        self.loss_type = _loss_type_list(self.loss_type)
        check_logprob_chunk_size(self.logprob_chunk_size)
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise ConfigError(
                f"beta: {self.beta} must be above 0 (every DPO loss scales or divides by beta; at 0 the loss "
                "is constant)",
                field="beta",
            )
        if self.loss_function is not None:
            self._check_loss_function()
        else:
            self.loss_type = self.loss_type or ["sigmoid"]
            self._check_loss_terms()
        super().__post_init__()

    def _check_loss_function(self) -> None:
        spec = self.loss_function
        ignored = [name for name in TERM_ONLY_SETTINGS if getattr(self, name) not in (None, False)]
        if self.loss_type:
            ignored.append("loss_type")
        if self.label_smoothing != 0.0:
            ignored.append("label_smoothing")
        if self.f_divergence_type != "reverse_kl":
            ignored.append("f_divergence_type")
        if ignored:
            raise ConfigError(
                f"loss_function={spec!r} replaces TRL's loss terms, so {', '.join(sorted(ignored))} would be "
                "ignored: unset it",
                field="loss_function",
            )
        probe_loss_function(spec, load_loss_function(spec), self.beta)

    def _check_loss_terms(self) -> None:
        types, weights = self.loss_type, self.loss_weights
        unknown = [t for t in types if t not in DPO_LOSS_TYPES]
        if unknown:
            raise ConfigError(
                f"loss_type: unknown {unknown}; TRL 1.12 has {', '.join(DPO_LOSS_TYPES)}", field="loss_type"
            )
        if weights is not None:
            if len(weights) != len(types):
                raise ConfigError(
                    f"loss_weights={weights}: {len(weights)} weight(s) for {len(types)} loss_type term(s) {types}",
                    field="loss_weights",
                )
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
                raise ConfigError(
                    f"loss_weights={weights}: weights must be finite and >= 0, and not all 0 (a negative weight "
                    "maximises its term, which is unbounded)",
                    field="loss_weights",
                )
        smoothing = self.label_smoothing
        if "exo_pair" in types and not 0.0 < smoothing < 0.5:
            raise ConfigError(
                f"loss_type exo_pair needs 0 < label_smoothing < 0.5, got {smoothing}: EXO takes log(epsilon) "
                "and log(1 - epsilon) (infinite at 0), and epsilon >= 0.5 prefers the rejected answer; the "
                "EXO paper uses 1e-3",
                field="loss_type",
            )
        if (LABEL_SMOOTHED - {"exo_pair"}) & set(types) and not 0.0 <= smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing={smoothing} with loss_type {types}: the flip probability must lie in "
                "[0, 0.5) (robust divides by 1 - 2 epsilon; at 0.5 or above the rejected answer is preferred)",
                field="label_smoothing",
            )
        if smoothing != 0.0 and not LABEL_SMOOTHED & set(types):
            raise ConfigError(
                f"label_smoothing={smoothing} has no effect on loss_type {types}; only "
                f"{', '.join(sorted(LABEL_SMOOTHED))} read it",
                field="label_smoothing",
            )
        if "discopop" in types and not self.discopop_tau > 0:
            raise ConfigError(
                f"discopop_tau={self.discopop_tau}: DiscoPOP divides by tau; it must be > 0",
                field="discopop_tau",
            )
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ConfigError(
                f"f_divergence_type={self.f_divergence_type!r}: one of {', '.join(F_DIVERGENCES)}",
                field="f_divergence_type",
            )
        if self.f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ConfigError(
                f"f_divergence_type={self.f_divergence_type!r} applies only to loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {types}",
                field="f_divergence_type",
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(
                f"ld_alpha={self.ld_alpha}: must lie in [0, 1] (LD-DPO's verbose-token weight)",
                field="ld_alpha",
            )
        if self.use_weighting and {"aot", "aot_unpaired"} & set(types):
            raise ConfigError(
                "use_weighting with loss_type aot/aot_unpaired: those losses sort the batch, which would "
                "misalign the per-pair weights",
                field="use_weighting",
            )


@dataclass
class KTOConfig(trl.KTOConfig):
    """TRL's KTOConfig with the settings that make the loss constant or unbounded refused when parsed, plus
    ``logprob_chunk_size`` (as DPOConfig's; kto_chunked.py)."""

    logprob_chunk_size: int = logprob_chunk_size_field(
        "use_liger_kernel, a MoE router loss, image inputs, a PEFT model without ref_model or compute_metrics"
    )

    def __post_init__(self):
        check_logprob_chunk_size(self.logprob_chunk_size)
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise ConfigError(
                f"beta: {self.beta} must be above 0 (at 0 the KTO loss is constant)", field="beta"
            )
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"{name}={value}: must be > 0 (0 drops that half of the data, a negative weight maximises it)",
                    field=name,
                )
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------
# The trainer


class DPOTrainer(ChunkedDPO, trl.DPOTrainer):
    """TRL's DPOTrainer with two additions.

    - ``args.logprob_chunk_size > 0`` (the default): the policy's and the reference's answer log-probabilities
      come from ``logprobs.answer_token_logps`` (no full-vocabulary logits), and the loss is ``dpo_term``'s
      weighted terms or the user's ``loss_function``; TRL's metrics are logged from the same pass.
    - ``args.loss_function``: that loss replaces the ``loss_type`` terms, and TRL's pair metrics (rewards/*,
      logps/*) are logged for it.

    With ``logprob_chunk_size: 0`` and no loss function it is TRL's trainer unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        spec = self.args.loss_function
        self.user_loss = None if spec is None else load_loss_function(spec)

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        reference = self.ref_model if self.ref_model is not None else model  # None: a PEFT adapter
        return self.compute_ref_log_probs(reference, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.chunk_size:
            return self._chunked_loss(model, inputs, return_outputs)
        if self.user_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        model_inputs = {
            k: v
            for k, v in inputs.items()
            if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        }
        outputs = model(**model_inputs, use_cache=False)
        logps = answer_logps(outputs.logits, inputs["input_ids"], inputs["completion_mask"])  # (2B,)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # the batch is [chosen rows, rejected rows]
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(model, inputs)
        loss = self._user_loss(mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        return (loss, outputs) if return_outputs else loss

    def _user_loss(
        self, mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    ) -> torch.Tensor:
        output = self.user_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta)
        losses, chosen_rewards, rejected_rewards = split_output(
            self.args.loss_function, output, len(chosen_logps)
        )
        if torch.is_grad_enabled() and not losses.requires_grad:
            raise LossFunctionError(f"loss_function={self.args.loss_function!r}: its losses have no gradient")
        if chosen_rewards is None:  # DPO's implicit reward, beta * log(pi / pi_ref)
            chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps)
            rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps)
        self._log_pair_metrics(mode, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
        return losses.mean()

    def _log_pair_metrics(self, mode, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> None:
        """TRL's pair metrics, each gathered over the processes and averaged by ``DPOTrainer.log``."""
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach(),
        }
        for name, value in values.items():
            self._metrics[mode][name].append(self.accelerator.gather(value).mean().item())


class KTOTrainer(ChunkedKTO, trl.KTOTrainer):
    """TRL's KTOTrainer; with ``args.logprob_chunk_size > 0`` (the default) the policy's, the reference's and the
    KL rows' answer log-probabilities come from ``logprobs.answer_token_logps`` (no full-vocabulary logits) and
    the loss from ``kto_chunked.kto_losses``, with TRL's metrics logged from the same pass. With
    ``logprob_chunk_size: 0`` it is TRL's trainer unchanged."""


# ---------------------------------------------------------------------------------------------------------
# DPO's implicit reward on held-out pairs


def pair_logps(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], answers: list[str]
) -> torch.Tensor:
    """log pi(y|x) summed over each answer's tokens and its EOS, (N,); prompts left padded."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = [
        ids + [tokenizer.eos_token_id] for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]
    ]
    width, answer_width = max(map(len, prompt_ids)), max(map(len, answer_ids))
    sequences = torch.full((len(prompts), width + answer_width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(sequences)
    for i, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        sequences[i, width - len(prompt) : width + len(answer)] = torch.tensor(prompt + answer)
        mask[i, width - len(prompt) : width + len(answer)] = 1
    device = next(model.parameters()).device
    logprobs = answer_logprobs(model, sequences.to(device), mask.to(device), width)  # (N, A)
    return (logprobs * mask[:, width:].to(device)).sum(-1)


@torch.no_grad()
def implicit_reward_accuracy(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict],
    batch_size: int = 32,
) -> float:
    """Fraction of pairs whose chosen answer gets the higher DPO implicit reward log pi/pi_ref (times beta)."""
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [r["prompt"] for r in batch]
        margins = []
        for key in ("chosen", "rejected"):
            answers = [r[key] for r in batch]
            margins.append(
                pair_logps(policy, tokenizer, prompts, answers)
                - pair_logps(reference, tokenizer, prompts, answers)
            )
        correct += int((margins[0] > margins[1]).sum())
    return correct / max(len(rows), 1)
