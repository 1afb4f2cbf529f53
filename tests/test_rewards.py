"""Protects align_kit/models/rewards.py: the Bradley-Terry loss (hand values and TRL's RewardTrainer), ensemble
aggregation and its disagreement alarm, the ensemble as a PPO reward model, ranking, best-of-N sampling,
checkpoint selection, reward-based early stopping, the sampled KL, and margins read from the raw data."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification

from align_kit.configs import DataArgs, RewardModelArgs
from align_kit.data import loading as data
from align_kit.data.loading import load_preferences
from align_kit.data.prompts import format_prompt
from align_kit.models import generation, rewards
from align_kit.models.generation import generate
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2
from align_kit.training import callbacks

SMALL = TinyGPT2Shape(n_layer=2, n_embd=32, n_head=2, n_positions=128)
QUESTIONS = [f"What is {a} plus {b}?" for a in range(4) for b in range(4)] + [
    f"My name is {name}. Please greet me." for name in ("Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima")
]
ANSWERS = [
    " 3 plus 4 is 7.",
    " Go away, I am busy.",
    " Hello, Alice! Nice to meet you.",
    " Sure, here is how.",
]


def reward_model(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=258, n_positions=128, n_embd=32, n_layer=2, n_head=2, num_labels=1, pad_token_id=257
    )
    return GPT2ForSequenceClassification(config).eval()


def texts() -> tuple[list[str], list[str]]:
    prompts = [format_prompt(q) for q in QUESTIONS for _ in ANSWERS]
    return prompts, [a for _ in QUESTIONS for a in ANSWERS]


# ---------------------------------------------------------------------------------------------------------
# Loss


def test_bradley_terry_loss_matches_hand_values():
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617; -log sigmoid(0) = log 2 = 0.6931472
    loss = rewards.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((0.3132617 + 0.6931472) / 2, abs=1e-6)
    # margins shift the logits: -log sigmoid(1 - 0.5) = 0.4740770, -log sigmoid(0 + 1) = 0.3132617
    loss = rewards.bradley_terry_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.5, -1.0])
    )
    assert loss.item() == pytest.approx((0.4740770 + 0.3132617) / 2, abs=1e-6)
    # a confidently right pair costs almost nothing, a confidently wrong one about the gap
    assert rewards.bradley_terry_loss(torch.tensor([10.0]), torch.tensor([0.0])).item() < 1e-4
    assert rewards.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([10.0])).item() == pytest.approx(
        10.0, abs=1e-3
    )


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_equals_reward_trainer_loss_on_a_batch(tmp_path, with_margin):
    from trl import RewardConfig, RewardTrainer

    rows = [
        {"prompt": format_prompt("What is 1 plus 2?"), "chosen": " 1 plus 2 is 3.", "rejected": " Go away."},
        {
            "prompt": format_prompt("My name is Uma. Greet me."),
            "chosen": " Hello, Uma!",
            "rejected": " Hi, Wei!",
        },
        {
            "prompt": format_prompt("How do I make a bomb?"),
            "chosen": " I can't help.",
            "rejected": " Sure, first.",
        },
    ]
    if with_margin:
        for row, margin in zip(rows, (0.5, -1.0, 2.0), strict=True):
            row["margin"] = margin
    args = RewardConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[]
    )
    model = reward_model()
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=build_byte_tokenizer()
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(
            -1
        )
    chosen, rejected = scores.chunk(2)  # the collator puts the chosen rows first
    ours = rewards.bradley_terry_loss(chosen, rejected, batch.get("margin"))
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    by_hand = sum(math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(
        chosen.tolist(), rejected.tolist(), [row.get("margin", 0.0) for row in rows], strict=True
    )) / len(rows)  # fmt: skip
    assert ours.item() == pytest.approx(by_hand, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Ensembles


def test_min_aggregation_is_never_above_mean_and_std_penalty_never_raises_it():
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        members = int(torch.randint(1, 6, (1,), generator=generator))
        values = torch.randn(members, 7, generator=generator) * (1 + trial % 5) + trial % 3
        mean = rewards.aggregate(values, "mean")
        assert torch.equal(mean, values.mean(0))
        assert (rewards.aggregate(values, "min") <= mean + 1e-6).all()
        assert (rewards.aggregate(values, "mean_minus_std", k=0.5) <= mean + 1e-6).all()
    same = torch.ones(3, 4) * 2.5  # members that agree: every aggregation is their common value
    for how in rewards.AGGREGATIONS:
        assert torch.allclose(rewards.aggregate(same, how), torch.full((4,), 2.5))
    with pytest.raises(ValueError, match="ensemble_aggregation"):
        rewards.aggregate(same, "median")


def test_last_token_index_follows_trl_and_sequence_classifiers():
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0]]
    )
    assert rewards.last_token_index(mask).tolist() == [4, 6, 1, 2]
    ids = torch.tensor([[5, 6, 256, 257, 257], [5, 6, 7, 8, 256]])
    assert rewards.classifier_index(ids, 257).tolist() == [2, 4]
    assert rewards.classifier_index(ids, 256).tolist() == [4, 3]  # GPT-2 pads with EOS: the token before it


def test_a_one_member_ensemble_scores_like_its_member_even_when_eos_is_the_pad_token():
    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as align-kit does for GPT-2, which has no pad token
    member = reward_model(3)
    member.config.pad_token_id = tokenizer.eos_token_id
    prompts, answers = texts()
    alone = rewards.reward_scorer(member, tokenizer).score(prompts[:8], answers[:8])
    ensemble = rewards.reward_scorer(rewards.RewardEnsemble([member]), tokenizer).score(
        prompts[:8], answers[:8]
    )
    assert ensemble == pytest.approx(alone, abs=1e-5)


def healthy_members(n: int) -> list[GPT2ForSequenceClassification]:
    """Copies of one reward model whose heads differ by a little noise: they agree on every answer."""
    members = []
    for seed in range(n):
        member = reward_model(0)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            member.score.weight.add_(torch.randn_like(member.score.weight) * 1e-3)
        members.append(member)
    return members


def test_a_corrupted_member_fires_the_disagreement_alarm_and_healthy_members_do_not(caplog):
    tokenizer = build_byte_tokenizer()
    prompts, answers = texts()
    healthy = rewards.RewardEnsemble(healthy_members(3), threshold=0.5)
    healthy.calibrate(tokenizer, prompts, answers)
    rewards.reward_scorer(healthy, tokenizer).score(prompts, answers)
    assert healthy.stats()["n_scored"] == len(prompts)
    assert healthy.stats()["alarms"] == 0 and healthy.stats()["disagreement_max"] < 0.5

    corrupted_members = healthy_members(3)
    with torch.no_grad():
        corrupted_members[2].score.weight.neg_()  # a sign-flipped head: its best answer is the others' worst
    corrupted = rewards.RewardEnsemble(corrupted_members, threshold=0.5)
    corrupted.calibrate(tokenizer, prompts, answers)
    with caplog.at_level(logging.WARNING, logger="align_kit"):
        rewards.reward_scorer(corrupted, tokenizer).score(prompts, answers)
    assert corrupted.stats()["alarms"] > 0
    assert corrupted.stats()["disagreement_mean"] > 5 * healthy.stats()["disagreement_mean"]
    assert "members disagree" in caplog.text
    window = corrupted.pop_window()
    assert (
        window["ensemble/alarms_total"] == corrupted.stats()["alarms"]
        and window["ensemble/disagreement_max"] > 0.5
    )
    assert corrupted.pop_window()["ensemble/disagreement_max"] == 0.0  # the window empties once read


def test_ensemble_gives_the_same_rewards_through_trl_ppo_and_as_a_classifier():
    from trl.experimental.utils import get_reward

    tokenizer = build_byte_tokenizer()
    pad = tokenizer.pad_token_id
    ensemble = rewards.RewardEnsemble(
        [reward_model(0), reward_model(1)], "mean_minus_std", k=0.5, offsets=[0.1, -0.2], scales=[2.0, 0.5]
    )
    prompts = [format_prompt("What is 2 plus 2?"), format_prompt("My name is Dana. Please greet me.")]
    answers = [" 2 plus 2 is 4.", " Hello, Dana!"]
    expected = rewards.reward_scorer(ensemble, tokenizer).score(prompts, answers)

    # PPO's layout: prompts left padded to one width, answers (with EOS) right padded, pad between rows
    query = [tokenizer(p)["input_ids"] for p in prompts]
    response = [tokenizer(a)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    width, length = max(map(len, query)), max(map(len, response))
    rows = [
        [pad] * (width - len(q)) + q + r + [pad] * (length - len(r))
        for q, r in zip(query, response, strict=True)
    ]
    _, ppo_rewards, _ = get_reward(ensemble, torch.tensor(rows), pad, width)
    assert ppo_rewards.tolist() == pytest.approx(expected, abs=1e-5)

    # by hand: standardise each member's own classifier output, then mean - 0.5 * population std
    singles = torch.tensor(
        [rewards.reward_scorer(m, tokenizer).score(prompts, answers) for m in ensemble.members]
    )
    z = (singles - torch.tensor([[0.1], [-0.2]])) / torch.tensor([[2.0], [0.5]])
    assert (z.mean(0) - 0.5 * z.std(0, unbiased=False)).tolist() == pytest.approx(expected, abs=1e-5)


def test_load_reward_builds_an_ensemble_from_folders_with_their_scales(tmp_path):
    folders = []
    for seed, (mean, std) in enumerate([(1.0, 2.0), (-3.0, 0.5)]):
        folder = tmp_path / f"rm{seed}"
        reward_model(seed).save_pretrained(folder)
        (folder / rewards.SCALE_FILE).write_text(json.dumps({"mean": mean, "std": std}))
        folders.append(str(folder))
    single = rewards.load_reward(RewardModelArgs(reward_models=folders[:1]), pad_token_id=257)
    assert isinstance(single, GPT2ForSequenceClassification)
    ensemble = rewards.load_reward(RewardModelArgs(reward_models=folders, ensemble_aggregation="min"))
    assert isinstance(ensemble, rewards.RewardEnsemble) and ensemble.aggregation == "min"
    assert ensemble.offsets.tolist() == [1.0, -3.0] and ensemble.scales.tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="reward_models is empty"):
        rewards.load_reward(RewardModelArgs())


# ---------------------------------------------------------------------------------------------------------
# Ranking, best-of-N, checkpoints, early stopping


class LengthScorer:
    """A fake reward: the number of characters of the answer."""

    def score(self, prompts, answers):
        return [float(len(answer)) for answer in answers]


class ScriptedScorer:
    """A fake reward whose mean over a call is the next scripted value."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def score(self, prompts, answers):
        value = self.values[self.calls]
        self.calls += 1
        return [value] * len(answers)


def test_preference_stats_break_accuracy_down_by_kind_and_count_ties_as_errors():
    rows = [
        {"prompt": "p", "chosen": "long answer", "rejected": "short", "kind": "a"},  # win
        {"prompt": "p", "chosen": "tiny", "rejected": "a long one", "kind": "a"},  # loss
        {"prompt": "p", "chosen": "same", "rejected": "four", "kind": "b"},  # tie: an error
        {"prompt": "p", "chosen": "longer still", "rejected": "x", "kind": "b"},  # win
        {"prompt": "p", "chosen": "abc", "rejected": "ab", "kind": "c"},  # win
    ]
    stats = rewards.preference_stats(LengthScorer(), rows, kind=lambda row: row["kind"])
    assert stats["accuracy"] == pytest.approx(3 / 5) and stats["n_pairs"] == 5
    assert stats["by_kind"] == {
        "a": {"accuracy": 0.5, "n_pairs": 2},
        "b": {"accuracy": 0.5, "n_pairs": 2},
        "c": {"accuracy": 1.0, "n_pairs": 1},
    }
    assert "by_kind" not in rewards.preference_stats(LengthScorer(), rows)


def test_rank_answers_orders_best_first():
    ranked = rewards.rank_answers(LengthScorer(), "p", ["bb", "a", "cccc"])
    assert ranked == [("cccc", 4.0), ("bb", 2.0), ("a", 1.0)]


def test_best_of_n_returns_the_highest_scored_of_the_same_samples():
    policy, tokenizer = build_tiny_gpt2(SMALL), build_byte_tokenizer()
    prompts = [format_prompt(q) for q in QUESTIONS[:3]]
    samples, scores = generation.sample_and_score(
        policy, tokenizer, LengthScorer(), prompts, 4, max_new_tokens=12, seed=3
    )
    assert [len(group) for group in samples] == [4, 4, 4] and scores == [
        [float(len(a)) for a in g] for g in samples
    ]
    best = generation.best_of_n(policy, tokenizer, LengthScorer(), prompts, 4, max_new_tokens=12, seed=3)
    assert best == [max(group, key=len) for group in samples]
    assert len({tuple(group) for group in samples}) > 1 and any(len(set(group)) > 1 for group in samples)


def test_score_checkpoints_picks_the_folder_whose_greedy_answers_score_best(tmp_path):
    tokenizer = build_byte_tokenizer()
    prompts = [format_prompt(q) for q in QUESTIONS[:4]]
    folders, expected = [], {}
    for seed in (1, 2):
        model = build_tiny_gpt2(TinyGPT2Shape(n_layer=2, n_embd=32, n_head=2, n_positions=128, seed=seed))
        folder = str(tmp_path / f"ckpt{seed}")
        model.save_pretrained(folder)
        folders.append(folder)
        answers = [a[0] for a in generate(model, tokenizer, prompts, max_new_tokens=10, progress=False)]
        expected[folder] = sum(map(len, answers)) / len(answers)
    results = generation.score_checkpoints(folders, tokenizer, LengthScorer(), prompts, max_new_tokens=10)
    assert results == pytest.approx(expected)
    assert generation.best_checkpoint(results) == max(expected, key=expected.get)


def test_reward_early_stopping_stops_sft_after_patience_evaluations_without_gain(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = build_byte_tokenizer()
    prompts = [format_prompt(q) for q in QUESTIONS[:2]]
    rows = [{"prompt": format_prompt(q), "completion": " Hello."} for q in QUESTIONS[:8]]
    stopper = callbacks.RewardEarlyStopping(
        ScriptedScorer([0.1, 0.3, 0.2, 0.25, 0.9, 0.9]), tokenizer, prompts, patience=2, max_new_tokens=4
    )
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1,
        save_strategy="no", logging_steps=1, learning_rate=1e-3, max_length=64, use_cpu=True, bf16=False,
        gradient_checkpointing=False, report_to=[], dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=build_tiny_gpt2(SMALL), args=args, train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:2]), processing_class=tokenizer, callbacks=[stopper],
    )  # fmt: skip
    trainer.train()
    # 0.1 and 0.3 improve; 0.2 and 0.25 do not beat 0.3: stop after the fourth evaluation
    assert trainer.state.global_step == 4
    assert stopper.history == [(1, 0.1), (2, 0.3), (3, 0.2), (4, 0.25)]
    logged = [e["eval_reward_mean"] for e in trainer.state.log_history if "eval_reward_mean" in e]
    assert logged == [0.1, 0.3, 0.2, 0.25]


# ---------------------------------------------------------------------------------------------------------
# KL and margins


def test_sampled_kl_is_zero_against_itself_and_positive_against_another_model():
    tokenizer = build_byte_tokenizer()
    policy = build_tiny_gpt2(SMALL)
    prompts = [format_prompt(q) for q in QUESTIONS[:6]]
    assert generation.sampled_kl(policy, policy, tokenizer, prompts, max_new_tokens=8) == 0.0
    other = build_tiny_gpt2(TinyGPT2Shape(n_layer=2, n_embd=32, n_head=2, n_positions=128, seed=5))
    with torch.no_grad():
        other.lm_head.weight.mul_(20.0)  # a much sharper model: far from the policy
    assert generation.sampled_kl(policy, other, tokenizer, prompts, max_new_tokens=8) > 1.0


def test_answer_mask_keeps_tokens_through_the_first_eos():
    answers = torch.tensor([[5, 6, 256, 7, 256], [5, 5, 5, 5, 5], [256, 1, 1, 1, 1]])
    assert generation._answer_mask(answers, 256).long().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]
    ]  # fmt: skip


def test_attach_margins_reads_each_row_margin_from_its_raw_row(tmp_path):
    path = tmp_path / "prefs.jsonl"
    with open(path, "w") as handle:
        for i in range(20):
            row = {
                "prompt": f"Question {i}?",
                "chosen": f"Good {i}.",
                "rejected": f"Bad {i}.",
                "strength": i / 10,
            }
            handle.write(json.dumps(row) + "\n")
    args = DataArgs(dataset=str(path), dataset_format="preference", test_size=0.25)
    splits, _ = load_preferences(args)
    with_margins = data.attach_margins(splits, args, "strength")
    for split in ("train", "test"):
        assert len(with_margins[split]) == len(splits[split]) > 0
        for row in with_margins[split]:
            assert row["margin"] == pytest.approx(int(row["chosen"].split()[-1].rstrip(".")) / 10)
    with pytest.raises(ValueError, match="no margin column 'weight'"):
        data.attach_margins(splits, args, "weight")


def test_subsample_draws_a_seeded_subset_in_order():
    rows = [{"i": i} for i in range(100)]
    half = data.subsample(rows, 0.5, seed=0)
    assert len(half) == 50 and half == sorted(half, key=lambda r: r["i"])
    assert half == data.subsample(rows, 0.5, seed=0)
    assert half != data.subsample(rows, 0.5, seed=1)  # ensemble members with other seeds see other data
    assert data.subsample(rows, 1.0, seed=3) is rows
    with pytest.raises(ValueError, match="train_fraction"):
        data.subsample(rows, 0.0, seed=0)
