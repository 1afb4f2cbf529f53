"""Generating answers and measuring a policy by them.

Batched generation (left padding, KV cache, stop at EOS); sampling N answers and keeping the best by
reward (best-of-N); the mean reward of greedy answers, of a policy or of saved checkpoints; the sampled
KL between a policy and its reference; and the embedded task's oracle scores.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align_kit.configs import ModelArgs
from align_kit.data.task import judge_answer
from align_kit.models import adapters
from align_kit.models.loading import load_model
from align_kit.models.logprobs import answer_token_logps, check_chunkable

ANSWER_CHUNK = 1024  # answer tokens per LM-head chunk in answer_logprobs


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[list[str]]:
    """Completions for each prompt: ``num_return_sequences`` strings per prompt, prompt text removed.

    Prompts are left padded so every row's last real token sits at the same position, and each
    completion is cut at its first EOS.
    """
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[list[str]] = []
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="generate", disable=not progress, leave=False):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            sampled = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                top_k=0 if do_sample else None,
                num_return_sequences=num_return_sequences,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )  # (B * R, T_prompt + T_new)
            new_tokens = sampled[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i in range(0, len(texts), num_return_sequences):
                outputs.append(texts[i : i + num_return_sequences])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def oracle_scores(prompts: list[str], answers: list[str]) -> dict[str, float | int | dict[str, float]]:
    """Mean oracle score overall and per family of the embedded task."""
    by_family: dict[str, list[float]] = defaultdict(list)
    for prompt, answer in zip(prompts, answers, strict=True):
        verdict = judge_answer(prompt, answer)
        by_family[verdict.family].append(verdict.score)
    scores = [s for values in by_family.values() for s in values]
    return {
        "oracle": sum(scores) / len(scores),
        "n": len(scores),
        "by_family": {family: sum(v) / len(v) for family, v in sorted(by_family.items())},
    }


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first (ties keep the earlier index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def sample_and_score(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Any,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[list[list[str]], list[list[float]]]:
    """``n`` sampled completions per prompt and their rewards, both (P, n)."""
    samples = generate(
        policy, tokenizer, list(prompts), max_new_tokens, batch_size, do_sample=True, temperature=temperature,
        top_p=top_p, num_return_sequences=n, seed=seed, progress=False,
    )  # fmt: skip
    flat = scorer.score(
        [p for p, group in zip(prompts, samples, strict=True) for _ in group], [a for g in samples for a in g]
    )
    return samples, [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def best_of_n(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Any,
    prompts: Sequence[str],
    n: int,
    **sampling: Any,
) -> list[str]:
    """Best-of-N sampling (no training): for each prompt, the highest-reward of ``n`` sampled answers;
    ``sampling`` takes ``sample_and_score``'s settings (max_new_tokens, batch_size, temperature, top_p, seed).

    Its KL to ``policy`` is at most log n - (n - 1) / n nats (Stiennon et al. 2020, App. G.3).
    """
    samples, rewards = sample_and_score(policy, tokenizer, scorer, prompts, n, **sampling)
    return [group[top_k(r, 1)[0]] for group, r in zip(samples, rewards, strict=True)]


def greedy_reward(
    policy: nn.Module, tokenizer: PreTrainedTokenizerBase, scorer: Any, prompts: Sequence[str], max_new_tokens: int = 48,
    batch_size: int = 64,
) -> tuple[float, list[str], list[float]]:  # fmt: skip
    """Mean reward of the greedy answers to ``prompts``, with the answers and their rewards."""
    answers = [
        a[0] for a in generate(policy, tokenizer, list(prompts), max_new_tokens, batch_size, progress=False)
    ]
    rewards = scorer.score(list(prompts), answers)
    return sum(rewards) / max(len(rewards), 1), answers, rewards


def score_checkpoints(
    folders: Sequence[str], tokenizer: PreTrainedTokenizerBase, scorer: Any, prompts: Sequence[str],
    max_new_tokens: int = 48, batch_size: int = 64,
) -> dict[str, float]:  # fmt: skip
    """Mean reward of each checkpoint's greedy answers to held-out prompts; pick the best with ``max``."""
    results = {}
    for folder in folders:
        model = load_model(ModelArgs(model_name_or_path=str(folder)))
        results[str(folder)] = greedy_reward(model, tokenizer, scorer, prompts, max_new_tokens, batch_size)[0]
        del model
    return results


def best_checkpoint(results: dict[str, float]) -> str:
    """The folder with the highest mean reward in ``score_checkpoints``'s results."""
    return max(results, key=results.__getitem__)


def _answer_mask(answers: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, A) mask of answer tokens up to and including the first EOS."""
    is_eos = (answers == eos_token_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def answer_logprobs(
    model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> torch.Tensor:
    """log p(y_t | x, y_<t) of every answer token, (B, A); prompts left padded to ``prompt_width``.
    Computed a chunk of tokens at a time from the final hidden states (``logprobs``), never as (B, A, V)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions
    if check_chunkable(model) is None:
        answers = torch.zeros_like(sequences)
        answers[:, prompt_width:] = 1
        per_token = answer_token_logps(
            model, sequences, attention_mask, answers, ANSWER_CHUNK, position_ids=position_ids
        ).logps  # (B, T-1)
        return per_token[:, prompt_width - 1 :]
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    logprobs = torch.log_softmax(logits[:, prompt_width - 1 : -1].float(), dim=-1)  # (B, A, V)
    return logprobs.gather(-1, sequences[:, prompt_width:, None]).squeeze(-1)


@torch.no_grad()
def sample_with_log_ratios(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[list[str], list[float]]:
    """One answer per prompt sampled from ``policy`` at temperature 1 (no truncation), and each answer's
    log pi(y|x) - log pi_ref(y|x) summed over its tokens up to and including EOS: the k1 KL sample."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = policy.training
    policy.eval()
    answers: list[str] = []
    ratios: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            batch = batch.to(next(policy.parameters()).device)
            width = batch["input_ids"].shape[1]
            sequences = policy.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip  # (B, width + A)
            new = sequences[:, width:]  # (B, A)
            mask = _answer_mask(new, tokenizer.eos_token_id)  # tokens up to and including the first EOS
            attention_mask = torch.cat([batch["attention_mask"].bool(), mask], dim=1)
            log_ratio = answer_logprobs(policy, sequences, attention_mask, width) - answer_logprobs(
                reference, sequences, attention_mask, width
            )  # (B, A)
            ratios += (log_ratio * mask).sum(-1).tolist()
            answers += tokenizer.batch_decode(
                new.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
        policy.train(was_training)
    return answers, ratios


@torch.no_grad()
def sampled_kl(
    policy: PreTrainedModel,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """KL(pi || pi_ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)] in nats per answer, estimated
    with one answer per prompt sampled at temperature 1 without truncation (so y really comes from pi);
    log-probabilities sum over the answer's tokens up to and including EOS (``sample_with_log_ratios``)."""
    _, ratios = sample_with_log_ratios(
        policy, reference, tokenizer, prompts, max_new_tokens, batch_size, seed
    )
    return sum(ratios) / max(len(ratios), 1)


def policy_report(
    policy: PreTrainedModel,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    scorer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    seed: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy-answer reward of the policy and of its reference, and the sampled KL between them, on
    held-out prompts; with the policy's answers and rewards as samples to log."""
    policy_mean, answers, policy_rewards = greedy_reward(policy, tokenizer, scorer, prompts, max_new_tokens)
    if isinstance(reference, adapters.AdapterOffReference):  # holds no weights: generate with the adapter off
        with adapters.adapters_disabled(reference.policy):
            reference_mean = greedy_reward(reference.policy, tokenizer, scorer, prompts, max_new_tokens)[0]
    else:
        reference_mean = greedy_reward(reference, tokenizer, scorer, prompts, max_new_tokens)[0]
    report = {
        "reward_policy": policy_mean,
        "reward_reference": reference_mean,
        "kl_to_reference": sampled_kl(policy, reference, tokenizer, prompts, max_new_tokens, seed=seed),
        "n_prompts": len(prompts),
    }
    samples = [
        {"prompt": p, "answer": a, "reward": r}
        for p, a, r in zip(prompts, answers, policy_rewards, strict=True)
    ]
    return report, samples
