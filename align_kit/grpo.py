"""TRL's GRPOTrainer with the reference model passed in.

GRPO (Shao et al. 2024, Eq. 3) maximises the clipped group-relative advantage minus ``beta`` times the KL
to a reference pi_ref. With ``beta > 0``, TRL 1.12's GRPOTrainer builds pi_ref itself by reloading
``model.config._name_or_path``: for a model built from a config that fails, and for a fine-tuned folder
it can silently be another model. ``GRPOTrainerWithReference`` takes pi_ref explicitly (a second load
from disk, or ``adapters.AdapterOffReference``; see ``models.policy_and_reference``): TRL is built with
``beta = 0`` so that it loads nothing, then the reference and the real ``beta`` are set, and TRL's
training step uses them as its own.
"""

from __future__ import annotations

from torch import nn
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp


class GRPOTrainerWithReference(GRPOTrainer):
    """``GRPOTrainer(..., ref_model=reference)``. The reference is prepared for the run's device or
    sharding; it is kept with ``beta = 0`` too (TRL does not use it then), so reports can measure the KL.

    Not combined with ``sync_ref_model`` (it would rewrite the reference), ``use_liger_kernel`` or
    ``cast_lm_head_to_fp32`` (TRL sets those up for its own reference at construction).
    """

    def __init__(self, *args, ref_model: nn.Module, **kwargs):
        config = kwargs["args"]
        unsupported = [
            n for n in ("sync_ref_model", "use_liger_kernel", "cast_lm_head_to_fp32") if getattr(config, n)
        ]
        if unsupported:
            raise ValueError(f"{unsupported}: not supported with an explicit reference model; set them false")
        beta, config.beta = config.beta, 0.0  # TRL loads no reference of its own
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.beta = beta
        self.beta = beta
        if self.is_deepspeed_enabled:
            self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
        elif self.is_fsdp_enabled:
            self.ref_model = prepare_fsdp(ref_model, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)
