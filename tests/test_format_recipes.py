"""Protects the datasets users bring through the real recipes and the evaluation: conversational files with an
explicit and an implicit prompt, a TL;DR comparisons file (DPO) and an instruction file (SFT) keep every valid
row; a tokenizer with a chat template trains on template-rendered tokens and tiny-gpt2 on the hh format, the
choice recorded in run_config.json; the evaluation of that run renders its held-out prompts (multi-turn too)
the same way, while the judges read the plain conversation."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from conftest import ASSETS, ScriptedJudge, load_recipe, tiny_run_args

from align_kit.configs import DataArgs
from align_kit.data.loading import load_preferences, load_sft
from align_kit.data.prompts import instruction_of
from align_kit.evaluation.pipeline import evaluate_systems
from align_kit.models import generation
from align_kit.models.loading import load_tokenizer

TEMPLATE = ASSETS / "tiny_chat_template.jinja"


def record_training_batches(patch: pytest.MonkeyPatch) -> list:
    """Every training batch's (input_ids, attention_mask) from now on: wraps transformers' training step,
    which the TRL trainers call with the collated batch."""
    batches = []
    original = transformers.Trainer.training_step

    def spy(self, model, inputs, *args, **kwargs):
        batches.append((inputs["input_ids"].detach().cpu(), inputs["attention_mask"].detach().cpu()))
        return original(self, model, inputs, *args, **kwargs)

    patch.setattr(transformers.Trainer, "training_step", spy)
    return batches


@pytest.fixture
def trained_tokens(monkeypatch):
    return record_training_batches(monkeypatch)


def decoded(batches, tokenizer) -> set[str]:
    return {
        tokenizer.decode(ids[mask.bool()].tolist())
        for input_ids, masks in batches
        for ids, mask in zip(input_ids, masks, strict=True)
    }


@pytest.fixture(scope="module")
def template_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny GPT-2 with a byte tokenizer that has a chat template."""
    folder = tmp_path_factory.mktemp("tiny_chat_model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = TEMPLATE.read_text()
    tokenizer.save_pretrained(folder)
    return folder


def one_step(name: str, out, asset: str, **overrides) -> tuple[dict, dict]:
    """One training step of recipes/<name>.py on a tests/assets file: (metrics, its data_counts.json)."""
    args = {"max_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "test_size": 0.25}
    metrics = load_recipe(name).main(tiny_run_args(out, dataset=ASSETS / asset, **{**args, **overrides}))
    return metrics, json.loads((out / "data_counts.json").read_text())


def chat_template_used(out) -> str:
    return json.loads((out / "run_config.json").read_text())["chat_template_used"]


def expected_sequences(dataset, tokenizer, eos: str, **data) -> set[str]:
    """prompt + answer (+ the EOS the trainer appends when the answer lacks one) of every training row."""
    splits, _ = load_preferences(DataArgs(dataset=str(dataset), test_size=0.25, **data), tokenizer)
    return {
        row["prompt"] + row[key] + ("" if row[key].endswith(eos) else eos)
        for row in splits["train"]
        for key in ("chosen", "rejected")
    }


@pytest.fixture(scope="module")
def template_run(template_model_dir, tmp_path_factory):
    """DPO on conversational rows with an explicit prompt, multi-turn kept, with the templated tokenizer."""
    out = tmp_path_factory.mktemp("runs") / "dpo_chat"
    with pytest.MonkeyPatch.context() as patch:
        batches = record_training_batches(patch)
        _, counts = one_step(
            "dpo",
            out,
            "chat_preference_tiny.jsonl",
            model_name_or_path=template_model_dir,
            single_turn="false",
        )
    return out, batches, counts


def test_explicit_prompt_conversations_train_through_the_tokenizers_template(
    template_run, template_model_dir
):
    out, batches, counts = template_run
    assert counts["kept"]["train"] + counts["kept"]["test"] == 8  # every valid row, the multi-turn one too
    assert counts["dataset_format"] == {
        "requested": "auto",
        "train": "chat-preference",
        "test": "chat-preference",
    }
    assert sum(counts["dropped"]["train"].values()) == 5
    assert counts["chat_template"] == "tokenizer" and chat_template_used(out) == "tokenizer"
    tokenizer = load_tokenizer(str(template_model_dir))
    seen = decoded(batches, tokenizer)
    expected = expected_sequences(
        ASSETS / "chat_preference_tiny.jsonl", tokenizer, tokenizer.eos_token, single_turn=False
    )
    assert len(seen) == 2 * counts["kept"]["train"] and seen == expected  # every pair, chosen and rejected
    assert all(text.startswith("<|") for text in seen)  # no hh marker opens any sequence
    splits, _ = load_preferences(
        DataArgs(dataset=str(ASSETS / "chat_preference_tiny.jsonl"), test_size=0.25, single_turn=False),
        tokenizer,
    )
    multi = next(r for r in splits["train"] + splits["test"] if r["source_row"] == 11)
    assert multi["prompt"] == (
        "<|user|>Hi<|assistant|>Hello! How can I help?<|endoftext|><|user|>Tell me a joke.<|assistant|>"
    )


def test_implicit_prompt_conversations_train_on_the_hh_format_with_tiny_gpt2(tmp_path, trained_tokens):
    out = tmp_path / "dpo_transcripts"
    _, counts = one_step("dpo", out, "chat_transcripts_tiny.jsonl")
    assert counts["kept"]["train"] + counts["kept"]["test"] == 6
    assert counts["dataset_format"]["train"] == "chat-transcripts"
    assert counts["chat_template"] == "hh" and chat_template_used(out) == "hh"
    tokenizer = load_tokenizer("tiny-gpt2")
    seen = decoded(trained_tokens, tokenizer)
    assert seen == expected_sequences(ASSETS / "chat_transcripts_tiny.jsonl", tokenizer, tokenizer.eos_token)
    assert all(text.startswith(("\n\nHuman: ", "Be kind.\n\nHuman: ")) for text in seen)  # the hh format


def test_tldr_comparisons_train_with_dpo(tmp_path):
    metrics, counts = one_step(
        "dpo",
        tmp_path / "dpo_tldr",
        "tldr_comparisons_tiny.jsonl",
        dataset_format="tldr-comparisons",
        max_length=256,
    )
    assert counts["kept"]["train"] + counts["kept"]["test"] == 5
    assert counts["dropped"]["train"] == {
        "bad_choice": 1,
        "not_text": 1,
        "not_two_summaries": 1,
        "identical_answers": 1,
    }
    assert len([e for e in metrics["log_history"] if "loss" in e]) == 1


def test_instruction_rows_train_with_sft(tmp_path, trained_tokens):
    _, counts = one_step("sft", tmp_path / "sft_instruction", "instruction_tiny.jsonl")
    assert counts["kept"]["train"] + counts["kept"]["test"] == 7
    assert counts["dataset_format"]["train"] == "instruction"
    tokenizer = load_tokenizer("tiny-gpt2")
    splits, _ = load_sft(DataArgs(dataset=str(ASSETS / "instruction_tiny.jsonl"), test_size=0.25), tokenizer)
    expected = {row["prompt"] + row["completion"] + tokenizer.eos_token for row in splits["train"]}
    assert decoded(trained_tokens, tokenizer) == expected and len(expected) == counts["kept"]["train"]


def test_the_evaluation_renders_prompts_as_each_system_was_trained(
    template_run, tiny_model_dir, tmp_path, monkeypatch
):
    """A multi-turn held-out conversation: the template run generates from its template rendering, a plain
    model (no run, no template) from the hh text, and the judge reads the plain conversation."""
    run_dir, _, _ = template_run
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ASSETS / "chat_preference_tiny.jsonl", data / "train.jsonl")
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a bird."},
    ]
    test_rows = [
        {"prompt": conversation, "chosen": [{"role": "assistant", "content": "A robin."}], "rejected": [{"role": "assistant", "content": "A cat."}]},
        {"prompt": [{"role": "user", "content": "Name a fish."}], "chosen": [{"role": "assistant", "content": "A trout."}], "rejected": [{"role": "assistant", "content": "A dog."}]},
    ]  # fmt: skip
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    generated = []
    original = generation.generate

    def spy(model, tokenizer, prompts, **kwargs):
        generated.append(list(prompts))
        return original(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    judged = []

    def verdict(item):
        judged.append(item.prompt)
        return "tie"

    summary = evaluate_systems(
        {"chat": str(run_dir), "plain": str(tiny_model_dir)},
        "chat",
        [ScriptedJudge(verdict, "recorder", batch_size=8)],
        tmp_path / "eval",
        dataset=str(data),
        single_turn=False,
        n_prompts=2,
        max_new_tokens=3,
        batch_size=4,
        n_honeypots=1,
        n_human=2,
        n_boot=20,
        progress=False,
    )
    assert summary["n_prompts"] == 2
    multi_hh = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a bird.\n\nAssistant:"
    single_hh = "\n\nHuman: Name a fish.\n\nAssistant:"
    assert generated[0] == [
        "<|user|>Hi<|assistant|>Hello!<|endoftext|><|user|>Name a bird.<|assistant|>",
        "<|user|>Name a fish.<|assistant|>",
    ]
    assert generated[1] == [
        multi_hh,
        single_hh,
    ]  # the plain model: hh, as 'auto' gives a tokenizer without a template
    assert set(judged) == {multi_hh, single_hh}
    assert instruction_of(multi_hh) == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Name a bird.\n\nAssistant:"
    rows = [
        json.loads(line)
        for line in (tmp_path / "eval" / "generations" / "chat.jsonl").read_text().splitlines()
    ]
    assert {r["prompt"] for r in rows} == {multi_hh, single_hh} and all(
        r["chat_template"].startswith("tokenizer:") for r in rows
    )
