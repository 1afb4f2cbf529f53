"""Per-token log-probabilities of answer tokens without a (batch, length, vocabulary) logits tensor.

A causal LM's log pi(y_t | y_<t) needs the logits only at the answer positions, and only one row at a time:
``log_softmax(h_t W^T + b)[y_{t+1}]``. ``answer_token_logps`` runs the model with ``logits_to_keep=1`` and
``output_hidden_states=True`` (so the model itself makes a (B, 1, V) logits tensor), keeps the final hidden
states of the answer positions, and applies the LM head to ``chunk_size`` of them at a time. Each chunk is one
``_HeadLogps`` call: its logits are freed after the forward and recomputed in the backward, which applies the
log-softmax gradient in place, so at most one (chunk_size, V) block of logits exists at any moment, and the
statistics below cost no second pass.

The same pass gives the statistics TRL's DPO trainer logs from the full logits (entropy, mean logit, argmax
accuracy), computed on the same answer tokens, so switching paths changes no logged metric.

The model is called through its own ``forward`` (works through DDP, ``AdapterOffReference`` and adapters); the
head is ``get_output_embeddings()`` of the unwrapped model. Models that rescale or soft-cap logits after the head
(``logit_scale``, ``final_logit_softcapping``) are refused by ``check_chunkable``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AnswerLogps:
    """Per-token results on a (N, T) batch, each (N, T-1) and zero outside the answer mask (token t+1 given <= t)."""

    logps: torch.Tensor  # log pi(y_{t+1} | y_<=t), differentiable
    entropy: torch.Tensor  # entropy of pi(. | y_<=t), detached
    mean_logit: torch.Tensor  # mean over the vocabulary of the logits, detached
    correct: torch.Tensor  # argmax == y_{t+1}, detached (bool)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module that owns the LM head: through DDP/accelerate's ``.module`` and AdapterOffReference's ``.policy``."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        policy = model.__dict__.get("policy")  # AdapterOffReference keeps its policy outside the registry
        if isinstance(policy, nn.Module):
            model = policy
            continue
        return model


def check_chunkable(model: nn.Module) -> str | None:
    """Why the chunked path cannot reproduce this model's logits, or None when it can."""
    owner = unwrapped(model)
    head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"{type(owner).__name__} has no nn.Linear output head (get_output_embeddings)"
    config = getattr(owner, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            return f"{type(owner).__name__} rescales its logits after the head ({name})"
    return None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where autocast is on (bf16 on CPU or GPU), else hidden's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _logits(hidden, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """(K, V) float32 logits with the matmul in ``dtype``, outside autocast so forward and recompute agree."""
    with torch.autocast(hidden.device.type, enabled=False):
        cast_bias = None if bias is None else bias.to(dtype)
        return nn.functional.linear(hidden.to(dtype), weight.to(dtype), cast_bias).float()


class _HeadLogps(torch.autograd.Function):
    """log pi(y | h) = z_y - logsumexp(z) with z = h W^T + b, for rows h of one chunk. The (K, V) logits live only
    inside ``forward`` and again inside ``backward``, which recomputes them and applies the log-softmax gradient
    d log pi(y) / dz = onehot(y) - softmax(z) directly, so autograd never keeps a vocabulary-sized tensor. The
    forward also returns the detached statistics TRL logs: entropy, mean logit and whether argmax z == y."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        dtype = _compute_dtype(hidden)
        logits = _logits(hidden, weight, bias, dtype)  # (K, V); two such blocks at most exist below
        label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        mean_logit = logits.mean(dim=-1)
        top, best = logits.max(dim=-1)
        correct = best == labels
        shifted = logits.sub_(top.unsqueeze(-1))  # in place: z - max z
        exp = shifted.exp()
        partition = exp.sum(dim=-1)  # Z e^{-max z}
        logsumexp = top + partition.log()
        logps = label_logit - logsumexp
        expected = torch.bmm(exp.unsqueeze(1), shifted.unsqueeze(2)).view(-1) / partition  # E_p[z - max z]
        entropy = partition.log() - expected  # H = log Z - E_p[z]
        ctx.save_for_backward(hidden, weight, bias, labels, logsumexp)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(entropy, mean_logit, correct)
        return logps, entropy, mean_logit, correct

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, bias, labels, logsumexp = ctx.saved_tensors
        logits = _logits(hidden, weight, bias, ctx.dtype)
        grad = logits.sub_(logsumexp.unsqueeze(-1)).exp_().mul_(-grad_logps.unsqueeze(-1))  # -g softmax(z)
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad_logps.unsqueeze(-1))  # + g onehot(y)
        grad = grad.to(ctx.dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad @ weight.to(ctx.dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.T @ hidden.to(ctx.dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None


def chunked_head_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Linear,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (K, H), labels (K,) -> log-prob of each label, entropy, mean logit, argmax hit; each (K,), computed
    ``chunk_size`` rows at a time by ``_HeadLogps`` (logits recomputed in backward)."""
    if hidden.shape[0] == 0:  # no answer token in the batch
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    parts = [
        _HeadLogps.apply(
            hidden[start : start + chunk_size], head.weight, head.bias, labels[start : start + chunk_size]
        )
        for start in range(0, hidden.shape[0], chunk_size)
    ]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def answer_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    chunk_size: int,
    **model_kwargs,
) -> AnswerLogps:
    """Per-token log-probabilities of the answer tokens of a (N, T) batch; ``answer_mask`` (N, T) marks the
    answer tokens (TRL's ``completion_mask``). No (N, T, V) tensor is made at any point."""
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **model_kwargs,
    )
    target = answer_mask[:, 1:].bool()  # (N, T-1)
    hidden = outputs.hidden_states[-1][:, :-1][target]  # (K, H): final layer, after the last norm
    del outputs  # the other layers' hidden states go now (without gradient nothing else holds them)
    labels = input_ids[:, 1:][target]  # (K,)
    head = unwrapped(model).get_output_embeddings()
    logps, entropy, mean_logit, correct = chunked_head_logps(hidden, labels, head, chunk_size)
    full = hidden.new_zeros(target.shape, dtype=torch.float32)
    return AnswerLogps(
        logps=full.masked_scatter(target, logps),
        entropy=full.detach().masked_scatter(target, entropy),
        mean_logit=full.detach().masked_scatter(target, mean_logit),
        correct=torch.zeros_like(target).masked_scatter(target, correct),
    )
