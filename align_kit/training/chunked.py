"""What the trainers on chunked log-probabilities share (``dpo_chunked.ChunkedDPO``, ``kto_chunked.ChunkedKTO``):
whether ``args.logprob_chunk_size`` applies to this run (decided once, the log saying why not), the
per-token metrics TRL logs from its full logits, totalled from the chunked pass (``logprobs.AnswerLogps``), and
the precomputed reference kept in the run folder (``ref_cache``).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from align_kit import console
from align_kit.models.logprobs import AnswerLogps, answer_token_logps, check_chunkable
from align_kit.training import ref_cache


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

    def _answer_logps(self, model, inputs, prefix: str = "") -> AnswerLogps:
        """``answer_token_logps`` of the rows ``inputs[prefix + "input_ids"]`` under the run's mixed precision:
        the head runs after the model's forward, where accelerate's autocast does not reach, while TRL's path
        runs it inside (a bf16 or fp16 matmul, as the rest of the model)."""
        with self.accelerator.autocast():
            return answer_token_logps(
                model,
                inputs[f"{prefix}input_ids"],
                inputs[f"{prefix}attention_mask"],
                inputs[f"{prefix}completion_mask"],
                self.chunk_size,
            )

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

    def _cached_reference(self, dataset, name: str, batch_size: int, columns: tuple[str, ...], **settings):
        """TRL's precomputed reference (``precompute_ref_log_probs``), but kept in ``<output_dir>/ref_logps``
        under a key of the data, the reference's weights and every setting that changes the values (``settings``
        adds the trainer's own), and computed with ``compute_ref_log_probs``, so through the chunked path when it
        is on. ``columns`` names the tensors ``compute_ref_log_probs`` returns, in order."""
        args = self.args
        reference = self.ref_model if self.ref_model is not None else self.model
        settings = {
            "chunk_size": self.chunk_size, "max_length": args.max_length, "bf16": args.bf16, "fp16": args.fp16,
            "pad_to_multiple_of": args.pad_to_multiple_of, "batch_size": batch_size,
            "reference": type(reference).__name__, **settings,
        }  # fmt: skip
        key = ref_cache.cache_key(dataset, reference, settings)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        return ref_cache.precomputed(
            dataset, name, args.output_dir, key, loader,
            lambda batch: self.compute_ref_log_probs(reference, batch)[: len(columns)],
            self.accelerator, console.log, columns,
        )  # fmt: skip
