"""Protects the loss sweep (recipes/loss_sweep.py, align_kit/loss_lab/sweep.py): loss specs become the right recipe
settings, every member is trained by its recipe and evaluated on the same prompts, the ranked table (JSON with
CIs, Markdown, plot) is written, a rerun reuses finished members, and one loss given as source code is trained
and evaluated as the discovery loop asks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import load_recipe

from align_kit.loss_lab.sweep import Sweep, override_groups, parse_member
from align_kit.training.losses import implicit_reward_accuracy, pair_logps

pytestmark = pytest.mark.usefixtures("one_thread_and_a_frozen_heap")

DPO_SIGMOID = """
import torch.nn.functional as F


def dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    margin = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin)
"""


@pytest.mark.parametrize(
    ("spec", "recipe", "settings", "name"),
    [
        ("ipo", "dpo", {"loss_type": ["ipo"]}, "ipo-b0.2"),
        ("sigmoid+sft", "dpo", {"loss_type": ["sigmoid", "sft"]}, "sigmoid+sft-b0.2"),
        (
            "0.8*sigmoid + 0.2*sft",
            "dpo",
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]},
            "0.8sigmoid+0.2sft-b0.2",
        ),
        (
            "exo_pair[label_smoothing=0.001]",
            "dpo",
            {"loss_type": ["exo_pair"], "label_smoothing": 0.001},
            None,
        ),
        (
            "recipes/losses/cdpo.py:loss",
            "dpo",
            {"loss_function": "recipes/losses/cdpo.py:loss"},
            "cdpo.loss-b0.2",
        ),
        ("pkg.mod:f", "dpo", {"loss_function": "pkg.mod:f"}, "pkg.mod.f-b0.2"),
        ("kto", "kto", {"loss_type": "kto"}, "kto-b0.2"),
        (
            "kto[learning_rate=1e-5, desirable_weight=2]",
            "kto",
            {"loss_type": "kto", "learning_rate": 1e-5},
            None,
        ),
        ("apo_zero_unpaired", "kto", {"loss_type": "apo_zero_unpaired"}, None),
    ],
)
def test_loss_specs_become_recipe_settings(spec, recipe, settings, name):
    member = parse_member(spec, 0.2)
    assert member.recipe == recipe and member.settings["beta"] == 0.2
    assert settings.items() <= member.settings.items()
    assert name is None or member.name == name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dpo", "'dpo' is not a TRL DPO loss type"),
        ("sigmoid+kto", "'kto' is not a TRL DPO loss type"),
        ("ipo[beta=0.3]", "bad member setting 'beta=0.3'"),
        ("ipo[label_smoothing]", "bad member setting"),
        ("ipo]", "expected 'loss' or 'loss"),
    ],
)
def test_malformed_loss_specs_are_refused_naming_them(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_member(spec, 0.1)


def test_command_line_overrides_are_grouped_by_key():
    argv = ["--config", "x.yaml", "--max_steps", "3", "--betas", "0.1", "0.5", "--seed=2", "--use_cpu"]
    assert override_groups(argv) == [
        ("max_steps", ["3"]),
        ("betas", ["0.1", "0.5"]),
        ("seed", ["2"]),
        ("use_cpu", []),
    ]


@torch.no_grad()
def test_pair_logps_of_a_left_padded_batch_equal_each_pair_alone(micro_model_dir):
    from align_kit.configs import ModelArgs
    from align_kit.models.loading import load_model, load_tokenizer

    model, tokenizer = (
        load_model(ModelArgs(model_name_or_path=str(micro_model_dir))).eval(),
        load_tokenizer(str(micro_model_dir)),
    )
    prompts = ["\n\nHuman: Hi, I am Ann.\n\nAssistant:", "\n\nHuman: 2 + 2?\n\nAssistant:"]
    answers = [" Hello, Ann!", " It is 4, as two plus two makes four."]
    batched = pair_logps(model, tokenizer, prompts, answers)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        p = tokenizer(prompt)["input_ids"]
        ids = p + tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)  # (T-1, V)
        alone = logprobs[torch.arange(len(p) - 1, len(ids) - 1), torch.tensor(ids[len(p) :])].sum()
        assert batched[i].item() == pytest.approx(alone.item(), abs=1e-4)
    rows = [{"prompt": p, "chosen": a, "rejected": " No."} for p, a in zip(prompts, answers, strict=True)]
    assert implicit_reward_accuracy(model, model, tokenizer, rows) == 0.0  # equal rewards never rank


SWEEP = {
    "losses": ["sigmoid", "kto"],
    "betas": [0.1],
    "judges": ["oracle"],
    "n_prompts": 8,
    "max_new_tokens": 16,
    "reward_pairs": 8,
    "kl_prompts": 8,
    "n_boot": 200,
    "dataset": "embedded",
    "embedded_train_size": 48,
    "embedded_test_size": 24,
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "learning_rate": 1.0e-2,
    "max_length": 160,
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "seed": 0,
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "dataloader_num_workers": 0,
}


@pytest.fixture(scope="module")
def sweep_run(micro_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    config = folder / "sweep.yaml"
    header = f"# accelerate launch recipes/loss_sweep.py --config {config}\n"
    config.write_text(header + yaml.safe_dump({**SWEEP, "model_name_or_path": str(micro_model_dir)}))
    argv = ["--config", str(config), "--output_dir", str(folder / "out")]
    return folder / "out", argv, load_recipe("loss_sweep").main(argv)


def test_sweep_trains_each_member_with_its_recipe_and_writes_a_ranked_table(sweep_run):
    out, _, payload = sweep_run
    ranking = payload["ranking"]
    assert {row["member"] for row in ranking} == {"sigmoid-b0.1", "kto-b0.1"}
    assert [row["rank"] for row in ranking] == [1, 2]
    assert ranking[0]["win_rate"] >= ranking[1]["win_rate"]
    for row in ranking:
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"] and row["n"] == SWEEP["n_prompts"]
        assert row["ci_low_vs_chosen"] <= row["win_rate_vs_chosen"] <= row["ci_high_vs_chosen"]
        assert 0.0 <= row["oracle"] <= 1.0 and 0.0 <= row["reward_accuracy"] <= 1.0
        assert row["kl"] == row["kl"] and row["train_s"] > 0 and row["wall_s"] >= row["eval_s"]
        assert (
            row["cpu_s"] == pytest.approx(row["train_cpu_s"] + row["eval_cpu_s"], abs=0.11)
            and row["cpu_s"] > 0
        )
        assert (out / row["member"] / "run_complete.json").exists()
    on_disk = json.loads((out / "loss_sweep.json").read_text())
    assert on_disk["ranking"] == ranking and 0.0 <= on_disk["base"]["oracle"] <= 1.0
    table = (out / "loss_sweep.md").read_text()
    assert "`sigmoid` (dpo)" in table and "`kto` (kto)" in table and "[95% CI]" in table
    assert (out / "loss_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_member_runs_its_recipe_on_its_own_yaml_with_the_shared_budget(sweep_run):
    out, _, _ = sweep_run
    dpo = yaml.safe_load((out / "sigmoid-b0.1" / "member.yaml").read_text())
    kto = yaml.safe_load((out / "kto-b0.1" / "member.yaml").read_text())
    assert dpo["loss_type"] == ["sigmoid"] and dpo["beta"] == 0.1 and kto["loss_type"] == "kto"
    assert dpo["max_steps"] == kto["max_steps"] == 2 and dpo["learning_rate"] == kto["learning_rate"]
    assert (
        kto["per_device_train_batch_size"] == 2 * dpo["per_device_train_batch_size"]
    )  # the same answers per step
    assert "losses" not in dpo and dpo["output_dir"] == str(out / "sigmoid-b0.1")
    for name in ("sigmoid-b0.1", "kto-b0.1"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert len([e for e in metrics["log_history"] if "loss" in e]) == 2


def test_a_rerun_reuses_finished_members_without_training_or_evaluating(sweep_run):
    out, argv, payload = sweep_run
    files = [
        out / name / f
        for name in ("sigmoid-b0.1", "kto-b0.1")
        for f in ("model.safetensors", "sweep_row.json")
    ]
    before = [f.stat().st_mtime_ns for f in files]
    again = load_recipe("loss_sweep").main(argv)
    assert [f.stat().st_mtime_ns for f in files] == before
    assert again["ranking"] == payload["ranking"]


def test_one_loss_given_as_source_code_is_trained_and_evaluated_with_the_sweeps_budget(sweep_run):
    out, argv, _ = sweep_run
    row = Sweep(argv).evaluate(DPO_SIGMOID)
    written = list((out / "losses").glob("loss_*.py"))
    assert len(written) == 1 and written[0].read_text() == DPO_SIGMOID
    assert row["loss"] == f"{written[0]}:dpo" and row["trainer"] == "dpo" and row["beta"] == 0.1
    assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
    member_yaml = yaml.safe_load((out / row["member"] / "member.yaml").read_text())
    assert member_yaml["loss_function"] == f"{written[0]}:dpo" and "loss_type" not in member_yaml


def test_per_member_settings_in_the_sweep_yaml_are_refused(tmp_path, micro_model_dir):
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump({**SWEEP, "model_name_or_path": str(micro_model_dir), "beta": 0.3, "output_dir": "x"})
    )
    with pytest.raises(ValueError, match=r"\['beta'\] are set per member"):
        Sweep(["--config", str(config)])
