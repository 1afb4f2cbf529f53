"""Batched generation (left padding, KV cache, stop at EOS) and the embedded task's oracle evaluation."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    from align_kit.task import judge_answer

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
