"""Conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"), a user-defined loss.

Each pair's label is trusted with probability 1 - epsilon, so the DPO target is smoothed:

    L = -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta),   delta = h_w - h_l,

h the log-ratio log pi(y|x) - log pi_ref(y|x) of the chosen (w) and rejected (l) answer. Unlike DPO, whose loss
falls for ever as the margin grows, cDPO is minimal at the finite margin beta delta = log((1 - eps) / eps), so a
pair that is already won stops pulling the policy away from the reference. TRL 1.12's `sigmoid` has no such
smoothing (its `robust` loss is a different, unbiased correction). Use it with

    loss_function: recipes/losses/cdpo.py:loss
"""

import torch.nn.functional as F

EPSILON = 0.1  # probability that a pair's preference label is flipped


def loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-pair cDPO losses, (B,), from summed answer log-probabilities, each (B,)."""
    logits = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))  # (B,)
    return -(1 - EPSILON) * F.logsigmoid(logits) - EPSILON * F.logsigmoid(-logits)
