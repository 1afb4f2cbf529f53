"""User-defined DPO losses for tests/test_losses.py: the DPO formula, and broken ones that must be refused.

Each takes (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta), (B,) tensors of summed
answer log-probabilities, as ``loss_function: "tests/assets/user_losses.py:<name>"`` names it.
"""

import torch
import torch.nn.functional as F


def dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected))."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def dpo_with_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO returning its own rewards: twice DPO's implicit ones, so a test can tell them apart."""
    losses = dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return (
        losses,
        2 * beta * (chosen_logps - ref_chosen_logps),
        2 * beta * (rejected_logps - ref_rejected_logps),
    )


def batch_mean(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Wrong shape: one number for the whole batch."""
    return dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta).mean()


def log_of_zero(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Non-finite: -log(0) for every pair."""
    return -torch.log(0 * chosen_logps.exp()) + 0 * rejected_logps


def constant(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """No gradient: the same number whatever the policy does."""
    return torch.full_like(chosen_logps, 0.5).detach()


def zero_gradient(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """A graph, but a zero gradient with respect to the policy."""
    return 0 * chosen_logps + 0 * rejected_logps + 1.0


not_a_function = 3
