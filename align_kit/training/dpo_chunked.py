"""DPO on chunked log-probabilities: TRL's loss terms from summed answer log-probabilities, and the trainer
methods that compute those log-probabilities without full-vocabulary logits (``logprobs.answer_token_logps``)
and keep the precomputed reference in the run folder (``ref_cache``). ``losses.DPOTrainer`` mixes them in.
"""

from __future__ import annotations

import math

import torch

from align_kit.models.logprobs import AnswerLogps
from align_kit.training.chunked import ChunkedLogps

# TRL's loss terms from summed log-probabilities (the chunked path never holds the logits TRL's code reads)


CHUNKED_UNSUPPORTED = {  # setting -> why the chunked path cannot compute it
    "use_weighting": "WPO's weights need logsumexp(2 * logits) over the vocabulary",
    "ld_alpha": "LD-DPO splits each answer's log-probabilities at the shorter answer's length",
    "f_divergence_type": "only reverse_kl (DPO's log-ratio) is written here",
    "use_liger_kernel": "Liger has its own fused path",
}


def dpo_term(
    loss_type: str,
    beta: float,
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    lengths: tuple[torch.Tensor, torch.Tensor],
    chosen_nll: torch.Tensor,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """One of TRL 1.12's ``loss_type`` terms per pair, (B,), from (chosen, rejected, ref_chosen, ref_rejected)
    summed answer log-probabilities, each (B,); lengths are answer token counts (B,), ``chosen_nll`` the mean
    token NLL of the chosen answers (for "sft"). Papers as cited in TRL's DPOTrainer; lengths normalise as TRL."""
    logsig, eps = torch.nn.functional.logsigmoid, label_smoothing
    chosen, rejected, ref_chosen, ref_rejected = logps
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected  # log pi/pi_ref
    z = beta * (chosen_ratio - rejected_ratio)  # DPO's beta * (h_w - h_l)
    per_token = chosen_ratio / lengths[0].clamp(min=1) - rejected_ratio / lengths[1].clamp(min=1)
    if loss_type == "sigmoid":  # DPO, Eq. 7
        return -logsig(z)
    if loss_type == "hinge":  # SLiC
        return torch.relu(1 - z)
    if loss_type == "ipo":  # IPO, Eq. 17, on per-token log-ratios
        return (per_token - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -logsig(beta * per_token)
    if loss_type == "exo_pair":  # EXO, Eq. 16: KL(softmax(z, 0) || (1 - eps, eps))
        return torch.sigmoid(z) * (logsig(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            logsig(-z) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return (
            -logsig(beta * chosen_ratio)
            - 0.5 * logsig(-beta * chosen_ratio)
            - 0.5 * logsig(-beta * rejected_ratio)
        )
    if loss_type == "robust":  # rDPO: unbiased under label flips with probability eps
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -logsig(beta * chosen_ratio) - logsig(-beta * rejected_ratio)
    if loss_type == "sppo_hard":  # SPPO with P(win) = 1 for the chosen answer
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):  # AOT: sorted log-ratios, paired or not
        if loss_type == "aot":
            delta = torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values
        else:
            delta = torch.sort(chosen_ratio).values - torch.sort(rejected_ratio).values
        return -(1 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
    if loss_type == "apo_zero":  # APO, Eq. 7
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":  # APO, Eq. 8
        return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":  # DiscoPOP, Eq. 5
        mix = torch.sigmoid(z / discopop_tau)
        return -logsig(z) * (1 - mix) + torch.exp(-z) * mix
    if loss_type == "sft":
        return chosen_nll.expand(chosen.shape[0])
    raise ValueError(f"loss_type {loss_type!r}: not a TRL 1.12 DPO loss type")


class ChunkedDPO(ChunkedLogps):
    """Methods of ``losses.DPOTrainer`` (a ``trl.DPOTrainer``) for ``args.logprob_chunk_size > 0``."""

    def _chunk_blockers(self) -> list[str]:
        args = self.args
        blocked = {
            "use_weighting": args.use_weighting,
            "ld_alpha": args.ld_alpha is not None,
            "f_divergence_type": args.f_divergence_type != "reverse_kl",
            "use_liger_kernel": args.use_liger_kernel,
        }
        return [f"{name}: {CHUNKED_UNSUPPORTED[name]}" for name, value in blocked.items() if value]

    def compute_ref_log_probs(self, model, inputs):
        """The reference pair (chosen, rejected), each (B,); ``model`` is the reference to run."""
        if not self.chunk_size:
            return super().compute_ref_log_probs(model, inputs)
        with torch.no_grad():
            ref = self._answer_logps(model, inputs)
        return ref.logps.sum(dim=1).chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """The reference pair of every row, computed once and kept in the run folder (``_cached_reference``)."""
        args = self.args
        return self._cached_reference(
            dataset, name, batch_size, ("ref_chosen_logps", "ref_rejected_logps"),
            truncation_mode=args.truncation_mode, padding_free=args.padding_free, ld_alpha=args.ld_alpha,
        )  # fmt: skip

    def _chunked_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]  # (2B, T), chosen rows first
        policy = self._answer_logps(model, inputs)
        chosen_logps, rejected_logps = policy.logps.sum(dim=1).chunk(2, dim=0)  # (B,) each
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(model, inputs)
        self._log_token_metrics(mode, policy, inputs)
        if self.user_loss is not None:
            loss = self._user_loss(mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
            return (loss, None) if return_outputs else loss
        logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        lengths = completion_mask.sum(dim=1).chunk(2, dim=0)
        chosen_tokens = completion_mask[: len(chosen_logps), 1:].sum()
        chosen_nll = -policy.logps[: len(chosen_logps)].sum() / chosen_tokens.clamp(min=1)
        loss = sum(
            weight
            * dpo_term(
                loss_type,
                self.beta,
                logps,
                lengths,
                chosen_nll,
                self.args.label_smoothing,
                self.args.discopop_tau,
            ).mean()
            for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True)
        )
        self._log_pair_metrics(
            mode,
            chosen_logps,
            rejected_logps,
            self.beta * (chosen_logps - ref_chosen_logps),
            self.beta * (rejected_logps - ref_rejected_logps),
        )
        return (loss, None) if return_outputs else loss

    def _log_token_metrics(self, mode: str, policy: AnswerLogps, inputs) -> None:
        """TRL's token metrics (entropy, logits/chosen, logits/rejected, mean_token_accuracy, num_tokens),
        from the answer tokens the chunked pass saw; the chosen answers are the first half of the rows."""
        rows = len(inputs["completion_mask"])
        chosen = torch.arange(rows, device=policy.logps.device) < rows // 2
        for name, (value, count) in self._answer_token_totals(mode, policy, inputs, chosen, True).items():
            self._metrics[mode][name].append(value / count if count > 0 else 0.0)
