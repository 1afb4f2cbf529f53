"""Protects `make demo`'s runner: each stage is its script's main() called with its YAML, every config
the demo names exists, every curve run's YAML sets curve_steps, a stage whose run folder is complete is skipped
rather than overwritten, and the summary prints oracle scores, win rates, the alignment tax and the reward
model's accuracy by kind of rejected answer."""

from __future__ import annotations

import json

import yaml
from conftest import ROOT

from align_kit import demo


def test_a_stage_calls_its_scripts_main_with_its_config_and_a_finished_one_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "stage.py").write_text(
        "from pathlib import Path\ndef main(argv):\n    Path('called.txt').write_text(' '.join(argv))\n"
    )
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "out" / "run_complete.json"
    seconds = demo.run("stage", "stage.py", "configs/stage.yaml", done)
    assert (tmp_path / "called.txt").read_text() == "--config configs/stage.yaml" and seconds >= 0
    (tmp_path / "called.txt").unlink()
    done.parent.mkdir()
    done.write_text("{}")
    assert demo.run("stage", "stage.py", "configs/stage.yaml", done) == 0.0
    assert not (tmp_path / "called.txt").exists()


def test_every_stage_the_demo_runs_has_its_script_and_tiny_config():
    for stage in demo.STAGES:
        assert (ROOT / "recipes" / f"{stage}.py").exists(), stage
        assert (ROOT / "recipes" / "configs" / f"{stage}_tiny.yaml").exists(), stage
    assert (ROOT / "eval" / "win_rate.py").exists() and (ROOT / "eval" / "configs" / "embedded.yaml").exists()
    for stage in demo.CURVE_RUNS:  # the demo draws their curves: each records them
        config = yaml.safe_load((ROOT / "recipes" / "configs" / f"{stage}_tiny.yaml").read_text())
        assert stage in demo.STAGES and config["curve_steps"] >= 1, stage
    assert yaml.safe_load((ROOT / "eval" / "configs" / "embedded.yaml").read_text())["tax_text"] == "embedded"


def test_summary_prints_oracle_scores_win_rates_and_the_reward_models_accuracy_by_kind(
    tmp_path, monkeypatch, capsys
):
    from align_kit.data import task

    monkeypatch.setattr(demo, "OUT", tmp_path)
    example = task.generate(3, "test")[0]  # an add question
    rows = [{"prompt": example.prompt, "answer": " " + example.chosen}]
    (tmp_path / "eval" / "generations").mkdir(parents=True)
    (tmp_path / "eval" / "generations" / "sft.jsonl").write_text(json.dumps(rows[0]) + "\n")
    comparison = {
        "system": "sft",
        "baseline": "chosen",
        "win_rate": 0.25,
        "ci_low": 0.1,
        "ci_high": 0.4,
        "n": 1,
    }
    tax = {"sft": {"perplexity": 2.0, "perplexity_change_pct": 0.0}}
    tax["dpo"] = {"perplexity": 2.5, "perplexity_change_pct": 25.0, "oracle_change": {"harm": 0.5}}
    (tmp_path / "eval" / "evaluation.json").write_text(
        json.dumps(
            {"judges": {"oracle": {"comparisons": [comparison]}}, "tax": {"base": "sft", "systems": tax}}
        )
    )
    held = {"accuracy": 0.85, "by_kind": {"add: wrong sum": {"accuracy": 0.47, "n_pairs": 57}}}
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "metrics.json").write_text(json.dumps({"held_out": held}))
    out = demo.summary(tmp_path / "eval", {"sft": 1.5})
    printed = capsys.readouterr().out
    assert out["oracle"]["sft"]["oracle"] == 1.0 and out["reward_held_out"] == held
    assert "25.0% (10.0-40.0), n=1" in printed and "held-out preference accuracy 0.850" in printed
    assert "add: wrong sum" in printed and "0.470 (n=57)" in printed
    assert "dpo                2.500   +25.0%  +0.000  +0.000  +0.500" in printed and out["tax"] == tax
    assert json.loads((tmp_path / "summary.json").read_text())["timings_s"] == {"sft": 1.5}
