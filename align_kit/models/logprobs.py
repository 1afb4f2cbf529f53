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


def _linear(hidden, weight, bias, dtype: torch.dtype) -> torch.Tensor:
    """(K, V) float32 logits, the matmul in ``dtype`` (``weight`` and ``bias`` already cast to it). Call it
    with autocast off: forward and recompute then agree, and the float32 statistics around it stay float32."""
    return nn.functional.linear(hidden.to(dtype), weight, bias).float()


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _logits_grad(
    exp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, dtype
) -> torch.Tensor:
    """a * exp + b * onehot(y) for (K, V) float32 ``exp`` and per-row (K,) ``a`` and ``b``, in ``dtype``. Float32
    overwrites ``exp``; a narrower dtype is written in the same pass as the product, the label entries made in
    float32 first, so every entry rounds once."""
    a, b, labels = a.unsqueeze(-1), b.unsqueeze(-1), labels.unsqueeze(-1)
    if dtype == exp.dtype:
        return exp.mul_(a).scatter_add_(-1, labels, b)
    at_label = exp.gather(-1, labels).mul_(a).add_(b)
    grad = torch.mul(exp, a, out=torch.empty(exp.shape, dtype=dtype, device=exp.device))
    return grad.scatter_(-1, labels, at_label.to(dtype))


def _softmax_statistics(logits: torch.Tensor, labels: torch.Tensor):
    """From (K, V) float32 logits z, which it overwrites with z - max z: logsumexp(z), z_y, argmax z == y and the
    entropy, each (K,), and exp(z - max z) (K, V) with its row sums Z e^{-max z}, which a gradient needs."""
    top, best = logits.max(dim=-1)
    label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    shifted = logits.sub_(top.unsqueeze(-1))  # in place: z - max z
    exp = shifted.exp()
    partition = exp.sum(dim=-1)  # Z e^{-max z}
    log_partition = partition.log()
    expected = torch.bmm(exp.unsqueeze(1), shifted.unsqueeze(2)).view(-1) / partition  # E_p[z - max z]
    entropy = log_partition - expected  # H = log Z - E_p[z]
    return top + log_partition, label_logit, best == labels, entropy, exp, partition


class _HeadLogps(torch.autograd.Function):
    """log pi(y | h) = z_y - logsumexp(z) with z = h W^T + b, for rows h of one chunk. The (K, V) logits live only
    inside ``forward`` and again inside ``backward``, which recomputes them and applies the log-softmax gradient
    d log pi(y) / dz = onehot(y) - softmax(z) directly, so autograd never keeps a vocabulary-sized tensor. The
    forward also returns the detached statistics TRL logs: entropy, mean logit and whether argmax z == y.
    Under autocast the matmuls run in its dtype (the head's weight cast once and kept for backward) and
    everything else in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        dtype = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            cast_weight, cast_bias = weight.to(dtype), _cast(bias, dtype)
            logits = _linear(hidden, cast_weight, cast_bias, dtype)  # (K, V); two such blocks at most below
            mean_logit = logits.mean(dim=-1)
            logsumexp, label_logit, correct, entropy, _, _ = _softmax_statistics(logits, labels)
            logps = label_logit - logsumexp
        ctx.save_for_backward(hidden, cast_weight, cast_bias, labels, logsumexp)
        ctx.dtype = dtype
        ctx.mark_non_differentiable(entropy, mean_logit, correct)
        return logps, entropy, mean_logit, correct

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, bias, labels, logsumexp = ctx.saved_tensors  # weight and bias in ctx.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            logits = _linear(hidden, weight, bias, ctx.dtype)
            probs = logits.sub_(logsumexp.unsqueeze(-1)).exp_()  # softmax(z), in place
            grad = _logits_grad(probs, -grad_logps, grad_logps, labels, ctx.dtype)  # g (onehot - softmax)
            del logits, probs
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad @ weight).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad.T @ hidden.to(ctx.dtype)).float()
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(dim=0).float()
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


class _HeadNLL(torch.autograd.Function):
    """The summed next-token NLL of rows h of ``hidden``, sum_t [logsumexp(z_t) - z_t[y_t]] with z = h W^T + b,
    ``chunk_size`` rows at a time, with its gradient made in the same pass. For a scalar loss the logits'
    gradient is known in the forward, d sum / dz = softmax(z) - onehot(y), so each chunk turns it straight into
    dL/dh = (softmax - onehot) W and dL/dW += (softmax - onehot)^T h: no logits are kept for backward and none
    are recomputed (the chunked path of ``_HeadLogps`` runs the head matmul a second time). Backward scales the
    saved gradients by the incoming scalar, so it runs once per forward. Also returns the detached statistics
    TRL's SFT logs: argmax hits and the entropy sum. Precision as ``_HeadLogps``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):
        dtype = _compute_dtype(hidden)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = grad_bias = None  # the first chunk's, then summed
        nll = hidden.new_zeros((), dtype=torch.float32)
        entropy = hidden.new_zeros((), dtype=torch.float32)
        correct = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            cast_weight, cast_bias = weight.to(dtype), _cast(bias, dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                rows, y = hidden[start : start + chunk_size].to(dtype), labels[start : start + chunk_size]
                logits = _linear(rows, cast_weight, cast_bias, dtype)  # (K, V)
                logsumexp, label_logit, hits, chunk_entropy, exp, partition = _softmax_statistics(logits, y)
                del logits  # now z - max z, no longer needed
                nll += (logsumexp - label_logit).sum()
                entropy += chunk_entropy.sum()
                correct += hits.sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                grad = _logits_grad(exp, partition.reciprocal(), torch.full_like(partition, -1.0), y, dtype)
                del exp  # grad = softmax - onehot
                if want_hidden:
                    grad_hidden[start : start + chunk_size] = grad @ cast_weight
                if want_weight:
                    part = grad.T @ rows  # (V, H)
                    grad_weight = part.to(weight.dtype) if grad_weight is None else grad_weight.add_(part)
                if want_bias:
                    part = grad.sum(dim=0)
                    grad_bias = part.to(bias.dtype) if grad_bias is None else grad_bias.add_(part)
        if want_weight and grad_weight is None:  # no row: the sum is 0, so is its gradient
            grad_weight = torch.zeros_like(weight)
        if want_bias and grad_bias is None:
            grad_bias = torch.zeros_like(bias)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct, entropy)
        return nll, correct, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll, *_):
        if ctx.grads is None:
            raise RuntimeError(
                "_HeadNLL's gradients were made in its forward and are used once; no retain_graph"
            )
        grads, ctx.grads = ctx.grads, None
        return *(None if g is None else g.mul_(grad_nll) for g in grads), None, None


def chunked_nll(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Linear | tuple[torch.Tensor, torch.Tensor | None],
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed NLL of next-token ``labels`` (N, T) from final hidden states (N, T, H) already aligned with
    them (position t predicts labels[t]; -100 ignored) -> (summed NLL, argmax hits, entropy sum, valid tokens),
    each a scalar. Only the valid rows reach the head (``_HeadNLL``); no (N, T, V) tensor is made and the head's
    matmul runs once forward and twice (dh, dW) in backward, as with full logits. ``head`` is the LM head or its
    (weight, bias)."""
    weight, bias = (head.weight, head.bias) if isinstance(head, nn.Module) else head
    valid = labels != -100
    rows = hidden[valid]  # (K, H)
    nll, correct, entropy = _HeadNLL.apply(rows, weight, bias, labels[valid], chunk_size)
    return nll, correct, entropy, valid.sum()
