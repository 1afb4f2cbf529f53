"""TRL's GRPOTrainer with the reference model passed in, and with positions that follow the padding.

GRPO (Shao et al. 2024, Eq. 3) maximises the clipped group-relative advantage minus ``beta`` times the KL
to a reference pi_ref. TRL 1.12's GRPOTrainer needs two corrections here:

- With ``beta > 0`` it builds pi_ref itself by reloading ``model.config._name_or_path``: for a model built
  from a config that fails, and for a fine-tuned folder it can silently be another model.
  ``GRPOTrainerWithReference`` takes pi_ref explicitly (a second load from disk, or
  ``adapters.AdapterOffReference``; see ``models.policy_and_reference``): TRL is built with ``beta = 0``
  so that it loads nothing, then the reference and the real ``beta`` are set for TRL's training step.
- It left-pads prompts and samples with positions counted from the first real token (``generate`` makes
  them from the attention mask), but computes the log-probabilities it trains on without
  ``position_ids``, so a model with absolute position embeddings (GPT-2) reads every shorter prompt of a
  batch at shifted positions: measured on the demo's SFT model, log pi(refusal) -81.8 instead of -3.4.
  ``positions_from_padding`` gives such calls the positions ``generate`` used.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp


def _fill_positions(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    mask = kwargs.get("attention_mask")
    tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if kwargs.get("position_ids") is None and mask is not None and tokens is not None and not args:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T_mask), 0 at the first real token
        kwargs["position_ids"] = positions[:, -tokens.shape[1] :]  # the last T positions (after a cache)
    return args, kwargs


def positions_from_padding(model: nn.Module) -> RemovableHandle:
    """Make every keyword call of ``model`` that passes an attention mask but no ``position_ids`` use
    positions counted over the mask, as ``generate`` does. Right-padded and unpadded batches get 0..T-1,
    what they got before. Returns the handle; ``.remove()`` restores the plain model."""
    return model.register_forward_pre_hook(_fill_positions, with_kwargs=True)


class GRPOTrainerWithReference(GRPOTrainer):
    """``GRPOTrainer(..., ref_model=reference)``, with ``positions_from_padding`` on the policy and the
    reference (handles in ``position_hooks``; they stay, harmless, after training). The reference is
    prepared for the run's device or sharding, and is kept with ``beta = 0`` too (TRL does not use it
    then), so reports can measure the KL.

    Not combined with ``sync_ref_model`` (it would rewrite the reference), ``use_liger_kernel`` or
    ``cast_lm_head_to_fp32`` (TRL sets those up for its own reference at construction).
    """

    def __init__(self, *, model: nn.Module, ref_model: nn.Module, args: GRPOConfig, **kwargs: Any):
        unsupported = [
            n for n in ("sync_ref_model", "use_liger_kernel", "cast_lm_head_to_fp32") if getattr(args, n)
        ]
        if unsupported:
            raise ValueError(f"{unsupported}: not supported with an explicit reference model; set them false")
        self.position_hooks = [positions_from_padding(model), positions_from_padding(ref_model)]
        beta, args.beta = args.beta, 0.0  # TRL loads no reference of its own
        try:
            super().__init__(model=model, args=args, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        if self.is_deepspeed_enabled:
            self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
        elif self.is_fsdp_enabled:
            self.ref_model = prepare_fsdp(ref_model, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)
