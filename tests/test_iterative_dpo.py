"""Protects recipes/iterative_dpo.py: a run killed as its second round starts training, started again, keeps
round 1 untouched (its report and model; no sampling, judging or training again) and the killed round's
samples (their verdicts from the judge cache), and finishes round 2 from round 1's policy; each round
writes its labelled pairs, model and report."""

from __future__ import annotations

import json

import pytest
from conftest import load_recipe, recipe_argv

from align_kit.training import runs


@pytest.fixture(scope="module")
def iterative_dpo():
    return load_recipe("iterative_dpo")


@pytest.mark.slow
def test_a_run_killed_in_round_two_resumes_there(
    iterative_dpo, reward_folders, micro_model_dir, tmp_path, monkeypatch
):
    out = tmp_path / "iterative"
    judge = tmp_path / "judge" / "judge.yaml"  # a judge is data: the untrained reward model, no tie margin
    judge.parent.mkdir()
    judge.write_text(
        f"backend: reward_model\nmodel: {reward_folders[0]}\ntie_margin: 0.0\nappend_eos: true\n"
    )
    values = {
        "model_name_or_path": str(micro_model_dir),
        "judge": str(judge),
        "dataset": "embedded",
        "embedded_train_size": "48",
        "embedded_test_size": "24",
        "output_dir": str(out),
        "rounds": "2",
        "samples_per_prompt": "3",
        "pairs_per_prompt": "2",
        "prompts_per_round": "6",
        "max_new_tokens": "6",
        "report_prompts": "4",
        "max_steps": "1",
        "per_device_train_batch_size": "4",
        "learning_rate": "1e-3",
        "beta": "0.1",
        "logging_steps": "1",
        "save_strategy": "no",
        "seed": "0",
    }

    class KilledInRound2(iterative_dpo.DPOTrainer):  # the process dies as round 2 starts training
        def train(self, *args, **kwargs):
            if self.args.output_dir.endswith("round_2"):
                raise KeyboardInterrupt
            return super().train(*args, **kwargs)

    monkeypatch.setattr(iterative_dpo, "DPOTrainer", KilledInRound2)
    with pytest.raises(KeyboardInterrupt):
        iterative_dpo.main(recipe_argv(values))
    round_1 = json.loads((out / "round_1" / "report.json").read_text())
    first_model = (out / "round_1" / "model" / "model.safetensors").read_bytes()
    samples_2 = (out / "round_2" / "samples.jsonl").read_text()
    assert not (out / "round_2" / "report.json").exists() and not (out / "run_complete.json").exists()

    monkeypatch.undo()
    metrics = iterative_dpo.main(recipe_argv(values))
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["rounds"][0] == round_1  # round 1 kept as it was, not run again
    assert (out / "round_1" / "model" / "model.safetensors").read_bytes() == first_model
    assert metrics["rounds"][1]["started_from"] == str(runs.round_model(runs.Run(out, None), 1))
    assert (out / "round_2" / "samples.jsonl").read_text() == samples_2  # the killed round's samples reused
    assert metrics["rounds"][1]["judge"]["calls"] == 0  # and its pairs' verdicts come from the judge cache
    for index in (1, 2):
        rows = [json.loads(x) for x in (out / f"round_{index}" / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == metrics["rounds"][index - 1]["labels"]["rows"] > 0
        assert metrics["rounds"][index - 1]["train"]["global_step"] == 1
    assert (out / "run_complete.json").exists() and (out / "round_2" / "report.json").exists()
