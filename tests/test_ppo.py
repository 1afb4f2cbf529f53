"""Protects recipes/ppo.py: a clear error without trl 1.12's PPOTrainer; the entropy bonus adds exactly
the gradient of -c * H to TRL's loss over the answer tokens TRL trains on; and a few PPO updates on CPU
(full fine-tuning with one reward model and the entropy bonus; an adapter with a reward ensemble) move
the policy, log TRL's statistics and the ensemble's disagreement, and write the policy, samples and a
report with the KL to the reference."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import load_recipe, max_change, recipe_argv

from align_kit.configs import ModelArgs
from align_kit.models import adapters
from align_kit.models.loading import EMBEDDED_NAME, TinyGPT2Shape, build_tiny_gpt2, load_model
from align_kit.training import ppo as ppo_lib

EOS, PAD = 256, 257


@pytest.fixture(scope="module")
def ppo():
    return load_recipe("ppo")


def test_missing_ppo_trainer_gives_a_clear_error(ppo, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo", None)  # what trl >= 1.13 looks like
    with pytest.raises(ImportError, match=r"PPO needs trl 1\.12\.x: PPOTrainer was removed in trl 1\.13"):
        ppo_lib.ppo_classes()


def test_answer_token_mask_matches_trl_padding_mask_by_hand(ppo):
    ids = torch.tensor(
        [[20, 21, EOS, 9, 9, 9], [30, 31, 32, 33, 34, 35], [40, 0, 0, 0, 0, 0], [EOS, 0, 0, 0, 0, 0]]
    )
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    expected = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert ppo_lib.answer_token_mask(ids, real, EOS).long().tolist() == expected
    no_stop = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert ppo_lib.answer_token_mask(ids, real, None).long().tolist() == no_stop


def ppo_style_loss(policy, query_responses, context_length, advantages, temperature, entropy_coef=0.0):
    """A policy-gradient loss computed the way TRL's PPO update reads the policy (padding masked to 0,
    positions from the mask, logits sliced and divided in place by T), plus an optional explicit entropy term."""
    attention_mask = query_responses != PAD
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    output = policy(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True
    )
    logits = output.logits[:, context_length - 1 : -1]
    logits /= temperature + 1e-7
    responses = query_responses[:, context_length:]
    logprobs = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float)
    loss = -(advantages * logprobs * mask).sum() / mask.sum()
    if entropy_coef:
        p = torch.softmax(logits, -1)
        entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)  # (B, R)
        loss = loss - entropy_coef * (entropy * mask).sum() / mask.sum()
    return loss


def test_entropy_bonus_adds_exactly_the_entropy_gradient(ppo):
    torch.manual_seed(0)
    policy = build_tiny_gpt2(
        TinyGPT2Shape(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    ).eval()  # no dropout, as in PPO
    context, temperature, coef, accumulation = 5, 0.7, 0.3, 2
    queries = torch.tensor([[PAD, PAD, 10, 11, 12], [13, 14, 15, 16, 17], [PAD, 18, 19, 20, 21]])
    responses = torch.tensor(
        [[20, 21, EOS, 9, 9, 9], [30, 31, 32, 33, 34, 35], [40, PAD, PAD, PAD, PAD, PAD]]
    )
    query_responses = torch.cat([queries, responses], 1)
    advantages = torch.randn(3, 6)

    def gradients(entropy_coef, hook):
        policy.zero_grad()
        handle = (
            ppo_lib.add_entropy_bonus(policy, coef, context, temperature, EOS, accumulation) if hook else None
        )
        loss = ppo_style_loss(policy, query_responses, context, advantages, temperature, entropy_coef)
        (loss / accumulation).backward()  # accelerate divides the loss by the accumulation steps
        if handle:
            handle.remove()
        return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    loss_hooked, hooked = gradients(0.0, hook=True)
    loss_plain, plain = gradients(0.0, hook=False)
    _, explicit = gradients(coef, hook=False)
    assert torch.equal(loss_hooked, loss_plain)  # forward values are untouched
    assert max((hooked[n] - explicit[n]).abs().max().item() for n in hooked) < 1e-6
    assert (
        max((hooked[n] - plain[n]).abs().max().item() for n in hooked) > 1e-4
    )  # and the bonus is not nothing
    assert not policy._forward_hooks  # removing the handle restores the plain policy

    with torch.no_grad():  # rollouts, the reference and generation: no graph, no bonus, no check
        handle = ppo_lib.add_entropy_bonus(policy, coef, context + 1, temperature, EOS, accumulation)
        ppo_style_loss(policy, query_responses, context, advantages, temperature)
    handle.remove()
    handle = ppo_lib.add_entropy_bonus(policy, coef, context - 3, temperature, EOS, accumulation)
    with pytest.raises(ValueError, match="left padded to exactly 2 tokens"):
        ppo_style_loss(policy, query_responses, context, advantages, temperature)
    handle.remove()


def test_each_ppo_batch_is_left_padded_to_its_own_longest_prompt_and_the_bonus_reads_that_width():
    collate = ppo_lib.left_pad(PAD)
    batches = [[{"input_ids": [5, 6]}, {"input_ids": [7]}], [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [9]}]]
    padded = [collate(rows)["input_ids"].tolist() for rows in batches]
    assert padded == [[[5, 6], [PAD, 7]], [[1, 2, 3, 4], [PAD, PAD, PAD, 9]]]
    width = ppo_lib.BatchWidth([collate(rows) for rows in batches])
    with pytest.raises(RuntimeError, match="no PPO batch"):
        width.get()
    seen = [(batch["input_ids"].shape[1], width.get()) for batch in width]
    assert seen == [(2, 2), (4, 4)] and len(width) == 2


def ppo_args(out, reward_models, **overrides) -> list[str]:
    values = {
        "model_name_or_path": EMBEDDED_NAME,
        "dataset": "embedded",
        "embedded_train_size": "48",
        "embedded_test_size": "24",
        "output_dir": str(out),
        "total_episodes": "16",
        "per_device_train_batch_size": "4",
        "gradient_accumulation_steps": "2",
        "num_ppo_epochs": "2",
        "learning_rate": "1e-3",
        "response_length": "12",
        "stop_token": "eos",
        "missing_eos_penalty": "1.0",
        "num_sample_generations": "0",
        "report_prompts": "4",
        "report_max_new_tokens": "8",
        "logging_steps": "1",
        "save_strategy": "no",
        "seed": "0",
        **overrides,
    }
    return recipe_argv(values, "--reward_models", *reward_models)


def test_ppo_full_fine_tuning_with_entropy_bonus_moves_the_policy_and_reports(ppo, reward_folders, tmp_path):
    out = tmp_path / "ppo"
    metrics = ppo.main(ppo_args(out, reward_folders[:1], entropy_coef=0.01))
    steps = [e for e in metrics["log_history"] if "objective/kl" in e]
    assert len(steps) == 2 and all(
        {"objective/scores", "policy/entropy_avg", "loss/policy_avg"} <= set(e) for e in steps
    )
    for name in ("run_complete.json", "model.safetensors", "tokenizer.json", "samples.json"):
        assert (out / name).exists()
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    assert max_change(trained, load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))) > 1e-4
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 4 and all(isinstance(s["reward"], float) for s in samples)
    report = metrics["report"]
    assert report["n_prompts"] == 4 and isinstance(report["kl_to_reference"], float)
    assert "ensemble" not in metrics


def test_ppo_with_an_adapter_and_a_reward_ensemble(ppo, reward_folders, tmp_path):
    out = tmp_path / "ppo_adapter"
    metrics = ppo.main(
        ppo_args(out, reward_folders, adapter="residual", adapter_rank=4, disagreement_threshold=0.5)
    )
    assert (out / adapters.WEIGHTS_NAME).exists() and not (out / "model.safetensors").exists()
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    start = load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))
    with adapters.adapters_disabled(trained):  # the base stayed frozen: adapter off gives the start model
        ids = torch.tensor([[72, 105, 33, 32, 87]])
        assert torch.equal(trained(ids).logits, start(ids).logits)
    assert not torch.equal(trained(ids).logits, start(ids).logits)  # the adapter learned something
    ensemble = metrics["ensemble"]
    assert ensemble["n_scored"] >= 16 and ensemble["disagreement_mean"] > 0
    logged = [e for e in metrics["log_history"] if "ensemble/disagreement_mean" in e]
    assert len(logged) == 2 and logged[-1]["ensemble/alarms_total"] == ensemble["alarms"]


def test_trl_only_model_paths_are_refused(ppo, reward_folders, tmp_path):
    with pytest.raises(ValueError, match="reward_model_path"):
        ppo.main(ppo_args(tmp_path / "x", reward_folders[:1], reward_model_path="some/rm"))
