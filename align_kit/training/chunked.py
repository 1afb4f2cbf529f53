"""What the trainers on chunked log-probabilities share (``dpo_chunked.ChunkedDPO``, ``kto_chunked.ChunkedKTO``):
whether ``args.logprob_chunk_size`` applies to this run (decided once, the log saying why not), and the
per-token metrics TRL logs from its full logits, totalled from the chunked pass (``logprobs.AnswerLogps``).
"""

from __future__ import annotations

import torch

from align_kit import console
from align_kit.models.logprobs import AnswerLogps, check_chunkable


class ChunkedLogps:
    """Mixed into a TRL trainer whose ``args`` has ``logprob_chunk_size``; the trainer's mixin names, in
    ``_chunk_blockers``, the settings of a run that its chunked path cannot compute."""

    @property
    def chunk_size(self) -> int:
        """``args.logprob_chunk_size``, or 0 (TRL's path, said in the log once) where the chunked path cannot
        apply. Decided on first use: TRL's ``__init__`` already computes a precomputed reference."""
        if "_chunk_size" not in self.__dict__:
            self._chunk_size = self._usable_chunk_size()
        return self._chunk_size

    def _chunk_blockers(self) -> list[str]:
        """``"setting: why"`` for each setting of this run that needs TRL's full logits."""
        return []

    def _usable_chunk_size(self) -> int:
        size = self.args.logprob_chunk_size
        if size == 0:
            return 0
        reasons = self._chunk_blockers()
        for model in (self.model, self.ref_model):
            problem = None if model is None else check_chunkable(model)
            if problem:
                reasons.append(problem)
        if reasons:
            console.log(
                f"logprob_chunk_size={size} not used, TRL's full-logits path instead ({'; '.join(reasons)})"
            )
            return 0
        return size

    def _answer_token_totals(
        self, mode: str, policy: AnswerLogps, inputs, chosen: torch.Tensor, accuracy: bool
    ) -> dict[str, tuple[float, float]]:
        """TRL's per-token metrics as (sum, answer tokens), each gathered over the processes: entropy over every
        row; logits/chosen (and mean_token_accuracy) over the rows ``chosen`` (N,) marks, logits/rejected over
        the others. Also counts num_tokens, as TRL does."""
        gather = self.accelerator.gather_for_metrics
        mask = inputs["completion_mask"][:, 1:].float()  # (N, T-1)
        totals = {
            "entropy": (policy.entropy.sum(), mask.sum()),
            "logits/chosen": (policy.mean_logit[chosen].sum(), mask[chosen].sum()),
            "logits/rejected": (policy.mean_logit[~chosen].sum(), mask[~chosen].sum()),
        }
        if accuracy:
            totals["mean_token_accuracy"] = (policy.correct[chosen].sum().float(), mask[chosen].sum())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return {
            name: (gather(value).sum().item(), gather(count).sum().item())
            for name, (value, count) in totals.items()
        }
