"""TRL 1.12's experimental online DPO trainer with the reference passed in and positions that follow the
padding.

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", Alg. 1) samples two
answers y_1, y_2 ~ pi_theta(.|x) per prompt at every step, lets a labeller say which is better, and takes a
DPO step on that fresh pair: loss = -log sigmoid(beta * [(log pi/pi_ref)(y_w) - (log pi/pi_ref)(y_l)]).
TRL's trainer asks reward functions for a score of each answer (the higher is y_w, the first on a tie); a
reward model, an ensemble, the oracle, a ``module:function``, or a pairwise judge
(``labelling.PairwiseLabeller``) all fit there.

``OnlineDPOTrainerWithReference`` requires the reference (TRL would deep-copy the policy, which after SFT
can run the policy's own patched forward; see TRL-NOTES) and puts ``grpo.positions_from_padding`` on the
policy and the reference: TRL left-pads prompts and scores the sampled answers without ``position_ids``, so
GPT-2 would read every shorter prompt of a batch at shifted positions.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns at import otherwise

from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402

from align_kit.training.grpo import positions_from_padding  # noqa: E402

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainerWithReference"]


class OnlineDPOTrainerWithReference(OnlineDPOTrainer):
    """``OnlineDPOTrainer(..., ref_model=reference)`` with positions from the padding (handles in
    ``position_hooks``). Refuses vLLM generation, which would bypass the hooks and the adapters."""

    def __init__(self, *, model: nn.Module, ref_model: nn.Module, args: OnlineDPOConfig, **kwargs: Any):
        if ref_model is None:
            raise ValueError("ref_model: pass the reference explicitly (see models.policy_and_reference)")
        if args.use_vllm:
            raise ValueError(
                "use_vllm: not supported with align-kit's adapters and position fix; set it false"
            )
        self.position_hooks = [positions_from_padding(model), positions_from_padding(ref_model)]
        super().__init__(model=model, ref_model=ref_model, args=args, **kwargs)
