"""TRL's SFTTrainer with its chunked loss computed by ``logprobs.chunked_nll``.

TRL 1.12's default SFT loss (``loss_type: chunked_nll``) checkpoints each chunk of the LM head, so backward runs
the head's matmul and its log-softmax a second time; with GPT-2's 50,257-token vocabulary that is about a tenth
of a full SFT step's FLOPs. For a scalar NLL the logits' gradient is known in the forward (softmax - onehot),
so ``chunked_nll`` applies it there and keeps only dL/dh and dL/dW: same loss, gradients and logged metrics
(entropy, mean_token_accuracy), no (batch, length, vocabulary) tensor, and no recompute.

The swap is one patched ``forward`` on the model, put in place of the one TRL's ``__init__`` patches in, with
the same outputs (``num_correct_tokens``, ``entropy_sum``, ``num_valid_tokens``), so TRL's ``compute_loss`` and
its metrics run unchanged. ``logprob_chunk_size: 0``, another ``loss_type``, Liger, a PEFT model, an MoE
router loss or a model that rescales its logits keep TRL's path.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
import trl
from torch import nn
from trl.trainer.sft_trainer import _ChunkedCELMHeadOutput

from align_kit import console
from align_kit.models.logprobs import check_chunkable, chunked_nll
from align_kit.training.losses import check_logprob_chunk_size


@dataclass
class SFTConfig(trl.SFTConfig):
    """TRL's SFTConfig plus ``logprob_chunk_size``."""

    logprob_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Tokens per chunk of the LM head in the chunked_nll loss, whose gradient is made in the "
            "forward (align_kit/models/logprobs.py chunked_nll), so the head runs once forward and its logits "
            "are never recomputed. 0: TRL's chunked_nll (256 tokens a chunk, checkpointed). Only with "
            "loss_type chunked_nll (TRL's default); Liger, PEFT, MoE router losses and models that rescale "
            "logits keep TRL's path, as the log says."
        },
    )

    def __post_init__(self):
        check_logprob_chunk_size(self.logprob_chunk_size)
        super().__post_init__()


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose chunked_nll loss is ``chunked_nll`` when ``args.logprob_chunk_size > 0``."""

    def __init__(self, model, args: SFTConfig | None = None, *rest, **kwargs):
        unpatched = model.forward if isinstance(model, nn.Module) else None
        super().__init__(model, args, *rest, **kwargs)
        size = getattr(self.args, "logprob_chunk_size", 0)
        if unpatched is None or size == 0 or self.args.loss_type != "chunked_nll":
            return
        problem = self._chunk_blocker(model)
        if problem:
            console.log(f"logprob_chunk_size={size} not used, TRL's chunked_nll instead ({problem})")
            return
        patch_forward(model, unpatched, size)

    def _chunk_blocker(self, model: nn.Module) -> str | None:
        if self.args.use_liger_kernel:
            return "use_liger_kernel"
        if hasattr(model, "peft_config"):
            return "a PEFT model"
        if self.aux_loss_enabled or getattr(model.config, "output_router_logits", False):
            return "an MoE router loss"
        return check_chunkable(model)


def patch_forward(model: nn.Module, unpatched, chunk_size: int) -> None:
    """``model.forward`` with labels: the backbone, then the chunked NLL of its final hidden states; without
    labels (generation, labels-free evaluation): ``unpatched``, the forward before TRL patched it."""
    head = model.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return unpatched(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("use_cache", None)
        hidden = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).last_hidden_state  # (N, T, H)
        if shift_labels is None:  # position t predicts token t + 1
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        weight, bias = head.weight, head.bias
        if isinstance(weight, torch.distributed.tensor.DTensor):  # FSDP2: gather once, not per chunk
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        nll, correct, entropy, valid = chunked_nll(hidden, shift_labels, (weight, bias), chunk_size)
        if num_items_in_batch is None:  # the mean over this batch's label tokens
            num_items_in_batch = valid.clamp(min=1)
        loss = nll / torch.as_tensor(num_items_in_batch, device=nll.device)
        return _ChunkedCELMHeadOutput(
            loss=loss, logits=None, num_correct_tokens=correct, entropy_sum=entropy, num_valid_tokens=valid
        )

    forward.__signature__ = inspect.signature(type(model).forward)  # generate() and Trainer read it
    model.forward = types.MethodType(forward, model)
