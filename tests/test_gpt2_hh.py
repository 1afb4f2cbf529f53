"""The GPT-2 / hh-rlhf path as the README gives it: every ``*_gpt2_hh.yaml`` run in order, each reading the
folders the one before it wrote (runs/gpt2-hh/...), then ``eval/configs/gpt2_hh.yaml`` over all of them.

Offline stand-ins for the two downloads: a GPT-2-shaped folder without a pad token (GPT-2's tokenizer has
none) for ``openai-community/gpt2``, and hh-rlhf-format files for ``Anthropic/hh-rlhf``. Each stage runs one
or two steps; the settings that size a GPU run (steps, batch, lengths) are cut on the command line, nothing
else, so the configs' own wiring (early stopping, best checkpoint, reward folders, output folders) runs."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from align_kit.eval import win_rate
from conftest import ROOT, load_recipe

from align_kit.data import task
from align_kit.models.loading import build_byte_tokenizer, build_tiny_gpt2

CONFIGS = ROOT / "recipes" / "configs"
ORDER = ["sft", "reward", "dpo", "kto", "ppo", "best_of_n", "grpo"]  # the README's order
SMALL = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_length", "128"]
EVALUATED = ["--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--max_eval_samples", "8", *SMALL]
CUTS = {
    "sft": EVALUATED,
    "reward": EVALUATED,
    "dpo": EVALUATED,
    "kto": EVALUATED,
    "ppo": ["--total_episodes", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--response_length", "8", "--local_rollout_forward_batch_size", "4", "--num_sample_generations", "0",
            "--report_prompts", "4", "--report_max_new_tokens", "8"],
    "best_of_n": ["--rounds", "1", "--samples_per_prompt", "2", "--prompts_per_round", "4", "--max_new_tokens",
                  "8", "--generation_batch_size", "4", "--report_prompts", "4", *SMALL],
    "grpo": ["--max_steps", "1", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
             "--num_generations", "2", "--max_completion_length", "8", "--report_prompts", "4",
             "--report_max_new_tokens", "8"],
}  # fmt: skip
CPU = ["--use_cpu", "true", "--bf16", "auto", "--logging_steps", "1"]  # auto: float32 here, bf16 on an A100


def recipe_config(stage: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{stage}_gpt2_hh.yaml").read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Every stage run in order from one working folder; returns (folder, {stage: metrics})."""
    root = tmp_path_factory.mktemp("gpt2_hh")
    model_dir, data_dir = root / "gpt2", root / "hh"
    build_tiny_gpt2().save_pretrained(model_dir)
    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = None  # like GPT-2's
    tokenizer.save_pretrained(model_dir)
    task.write(data_dir, 40, 16)
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the configs' relative runs/gpt2-hh/... folders land here
        for stage in ORDER:
            argv = ["--config", str(CONFIGS / f"{stage}_gpt2_hh.yaml"), "--dataset", str(data_dir)]
            if stage == "sft":
                argv += ["--model_name_or_path", str(model_dir)]
            results[stage] = load_recipe(stage).main([*argv, *CUTS[stage], *CPU])
    return root, results


def test_every_gpt2_hh_config_is_in_the_chain():
    assert {p.name.removesuffix("_gpt2_hh.yaml") for p in CONFIGS.glob("*_gpt2_hh.yaml")} == set(ORDER)


def test_each_stage_reads_what_the_one_before_wrote(chain):
    root, _ = chain
    for stage in ORDER:
        config = recipe_config(stage)
        assert (root / config["output_dir"] / "run_complete.json").exists(), stage
        if stage != "sft":
            assert config["model_name_or_path"] == recipe_config("sft")["output_dir"], stage
    for stage in ("ppo", "best_of_n"):
        assert recipe_config(stage)["reward_models"] == [recipe_config("reward")["output_dir"]]
    assert recipe_config("grpo")["reward_funcs"] == [recipe_config("reward")["output_dir"]]


def test_the_stages_start_where_the_math_says(chain):
    root, results = chain
    assert results["dpo"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert results["kto"]["first_loss"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0) with weights 1
    assert math.isfinite(results["sft"]["first_loss"]) and results["sft"]["first_loss"] > 1.0
    assert 0.0 <= results["reward"]["held_out"]["accuracy"] <= 1.0
    for stage in ("sft", "reward", "dpo", "kto"):  # evaluations ran, so early stopping had something to read
        history = results[stage]["log_history"]
        assert any(key.startswith("eval_") for entry in history for key in entry), stage
    counts = json.loads((root / "runs/gpt2-hh/dpo/data_counts.json").read_text())
    assert counts["kept"]["train"] == 40 and counts["kept"]["test"] == 8  # max_eval_samples cut, counted
    for stage in ("ppo", "grpo", "best_of_n"):
        report = results[stage]["report"]
        assert report["n_prompts"] == 4 and math.isfinite(report["kl_to_reference"]), stage


def test_the_eval_config_compares_every_tuned_stage_with_sft_and_chosen(chain):
    root, _ = chain
    eval_config = yaml.safe_load((ROOT / "eval" / "configs" / "gpt2_hh.yaml").read_text())
    systems = dict(item.split("=", 1) for item in eval_config["systems"])
    tuned = {stage: recipe_config(stage)["output_dir"] for stage in ORDER if stage != "reward"}
    assert systems == tuned and eval_config["base"] == "sft"
    # The config itself on the chain's folders; the oracle stands in for the API and local LLM judges.
    cuts = ["--judges", "oracle", "--n_prompts", "6", "--max_new_tokens", "8", "--n_honeypots", "4",
            "--n_human", "0", "--n_boot", "50", "--progress", "false", "--dataset", str(root / "hh")]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = win_rate.main(["--config", str(ROOT / "eval" / "configs" / "gpt2_hh.yaml"), *cuts])
    pairs = {(c["system"], c["baseline"]) for c in result["judges"]["oracle"]["comparisons"]}
    assert pairs >= {(s, "chosen") for s in systems} | {(s, "sft") for s in systems if s != "sft"}
    assert (root / eval_config["output_dir"] / "oracle" / "report.md").exists()
