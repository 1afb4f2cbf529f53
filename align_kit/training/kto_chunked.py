"""KTO on chunked log-probabilities: the methods of ``losses.KTOTrainer`` (a ``trl.KTOTrainer``) that compute
the policy's, the reference's and the KL completions' summed answer log-probabilities with
``logprobs.answer_token_logps`` (no full-vocabulary logits), and KTO's loss from them.

TRL's KTO batch holds N answers, each labelled desirable or not, and, for ``loss_type: kto``, N "KL" rows
(each prompt with a batch neighbour's answer) whose log-ratio estimates the reference point z_0 of the paper
(Ethayarajh et al. 2024, Eq. 7); as in TRL, the KL rows run without gradient. A precomputed reference
(``precompute_ref_log_probs``) is kept in the run folder as DPO's is (``ChunkedLogps._cached_reference``).
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model

from align_kit.training.chunked import ChunkedLogps

CHUNKED_UNSUPPORTED = {  # setting -> why the chunked path cannot compute it
    "use_liger_kernel": "Liger has its own fused path",
    "router_aux_loss_coef": "the MoE router loss needs the router logits of TRL's own forward",
    "images": "image inputs go through TRL's own forward",
    "peft": "a PEFT model without ref_model: TRL switches the adapter off around its own forward",
    "compute_metrics": "TRL's prediction_step hands compute_metrics the full logits",
}


def kto_losses(
    loss_type: str, beta: float, logratios: torch.Tensor, z0: torch.Tensor, desirable: torch.Tensor
) -> torch.Tensor:
    """Per-answer losses (N,), before the desirable/undesirable weights, from the log-ratios
    r = log pi(y|x) - log pi_ref(y|x) (N,), the reference point z_0 (detached, a scalar) and the labels (N,).

    kto: KTO Eq. 7 with lambda_y factored out: 1 - sigma(beta (r - z_0)) for a desirable answer,
    1 - sigma(beta (z_0 - r)) for an undesirable one. apo_zero_unpaired: APO-zero (D'Oosterlinck et al. 2024,
    Eq. 7) on single answers: 1 - sigma(beta r) and sigma(beta r)."""
    if loss_type == "kto":
        return 1 - torch.sigmoid(beta * torch.where(desirable, logratios - z0, z0 - logratios))
    if loss_type == "apo_zero_unpaired":
        value = torch.sigmoid(beta * logratios)
        return torch.where(desirable, 1 - value, value)
    raise ValueError(f"loss_type {loss_type!r}: not a TRL 1.12 KTO loss type")


class ChunkedKTO(ChunkedLogps):
    """Methods of ``losses.KTOTrainer`` (a ``trl.KTOTrainer``) for ``args.logprob_chunk_size > 0``."""

    def _chunk_blockers(self) -> list[str]:
        blocked = {
            "use_liger_kernel": self.use_liger_kernel,
            "router_aux_loss_coef": self.aux_loss_enabled,
            "images": self._is_vision_dataset,
            "peft": self.ref_model is None and is_peft_model(self.model),
            "compute_metrics": self.compute_metrics is not None,
        }
        return [f"{name}: {CHUNKED_UNSUPPORTED[name]}" for name, value in blocked.items() if value]

    def _summed_logps(self, model, inputs, prefix: str = "") -> torch.Tensor:
        """log pi(y|x) summed over each row's answer tokens, (N,); prefix "KL_" for the KL rows."""
        return self._answer_logps(model, inputs, prefix).logps.sum(dim=1)

    def compute_ref_log_probs(self, model, inputs):
        """(answers, KL rows) summed log-probabilities under the reference ``model``, each (N,); the second is
        None without a KL estimate (apo_zero_unpaired)."""
        if not self.chunk_size:
            return super().compute_ref_log_probs(model, inputs)
        with torch.no_grad():
            answers = self._summed_logps(model, inputs)
            kl_rows = self._summed_logps(model, inputs, "KL_") if self.calculate_KL else None
        return answers, kl_rows

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """The reference's answer (and, for kto, KL-row) log-probabilities of every row, computed once and kept
        in the run folder (``_cached_reference``) instead of datasets' cache."""
        columns = ("ref_logps", "ref_KL_logps") if self.calculate_KL else ("ref_logps",)
        return self._cached_reference(dataset, name, batch_size, columns, calculate_kl=self.calculate_KL)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunk_size:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        desirable = inputs["label"].bool()  # (N,)
        if self.calculate_KL:
            with torch.no_grad():
                kl_logps = self._summed_logps(model, inputs, "KL_")
        policy = self._answer_logps(model, inputs)
        logps = policy.logps.sum(dim=1)  # (N,)
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(self.ref_model, inputs)
        gather = self.accelerator.gather_for_metrics
        if self.calculate_KL:  # z_0: the batch's mean KL-row log-ratio over all processes, >= 0 as a KL is
            z0 = gather((kl_logps - ref_kl_logps).mean().detach()).mean().clamp(min=0)
        else:
            z0 = torch.zeros((), device=logps.device)
        logratios = logps - ref_logps  # (N,)
        weights = torch.where(desirable, self.desirable_weight, self.undesirable_weight)
        loss = (weights * kto_losses(self.loss_type, self.beta, logratios, z0, desirable)).nanmean()
        self._log_metrics(mode, policy, inputs, desirable, z0, logps.detach(), self.beta * logratios.detach())
        return (loss, None) if return_outputs else loss

    def _log_metrics(self, mode, policy, inputs, desirable, z0, logps, rewards) -> None:
        """TRL's KTO metrics: kl, entropy, num_tokens, logits/*, rewards/*, logps/*; a chosen (rejected)
        metric only when some process has a desirable (undesirable) answer, as TRL."""
        metrics, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        metrics["kl"].append(z0.item())
        totals = self._answer_token_totals(mode, policy, inputs, desirable, accuracy=False)
        for name, (value, count) in totals.items():
            if count > 0:
                metrics[name].append(value / count)
            elif name == "entropy":
                metrics[name].append(0.0)
        means = {}
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            count = gather(rows.sum()).sum().item()
            if count > 0:
                means[side] = gather(rewards[rows].nansum()).nansum().item() / count
                metrics[f"rewards/{side}"].append(means[side])
                metrics[f"logps/{side}"].append(gather(logps[rows].nansum()).nansum().item() / count)
        if len(means) == 2:
            metrics["rewards/margins"].append(means["chosen"] - means["rejected"])
