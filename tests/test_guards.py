"""Protects what a run leaves behind when it goes wrong or holds a secret.

- A diverging run (SFT at learning rate 1000) stops at its first non-finite gradient norm, says so in one
  line naming the step and the last good checkpoint (whose weights are finite), exits with status 3, and
  is neither marked complete nor given a final model; what it wrote is strict JSON.
- The guard itself: a NaN or infinite gradient stops before the optimizer step; a non-finite loss in the
  logs (including PPO's loss/policy_avg) stops; a legitimately NaN statistic does not.
- Every JSON file of a run is strict (NaN written as null and flagged) and written whole or not at all.
- A ``--hub_token`` given on the command line reaches no byte of any file of the run folder, checkpoints
  included, and stays usable for pushing ($HF_TOKEN).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_run_args
from safetensors.torch import load_file
from transformers import TrainerState

from align_kit import cli, console, files
from align_kit.models.loading import build_tiny_gpt2
from align_kit.training import guards, runs


def strict_json(path: Path):
    """Parse as most JSON readers do: NaN and Infinity literals are errors."""

    def refuse(literal):
        raise ValueError(f"{path}: non-standard JSON literal {literal}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverging_run_stops_at_the_first_nan_and_is_not_marked_complete(tmp_path, capsys):
    out = tmp_path / "sft"
    argv = tiny_run_args(out, learning_rate=1000, max_steps=8, save_strategy="steps", save_steps=1)
    status = console.exit_status(lambda: cli.main(["sft", *argv]))
    assert status == console.EXIT_DIVERGED == 3
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("align-kit:")]
    # Step 1 at learning rate 1000 leaves huge but finite weights; the gradient of step 2 is NaN.
    assert line.startswith(
        f"align-kit: training diverged: gradient norm is nan at step 2 (last good checkpoint {out / 'checkpoint-1'})"
    )
    assert not (out / runs.COMPLETE).exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # nothing saved after the NaN
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    diverged = strict_json(out / guards.DIVERGED_FILE)
    assert diverged["step"] == 2 and diverged["last_good_checkpoint"] == str(out / "checkpoint-1")
    assert [e["step"] for e in diverged["log_history"]] == [1]
    for path in out.rglob("*.json"):
        strict_json(path)


def guard_args(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(tmp_path))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_the_guard_stops_before_the_optimizer_step_on_a_non_finite_gradient(tmp_path, bad):
    model = build_tiny_gpt2()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    guard = guards.NonFiniteGuard()
    guard.on_pre_optimizer_step(
        guard_args(tmp_path), TrainerState(global_step=4), None, model=model
    )  # finite
    next(model.parameters()).grad[0, 0] = bad
    with pytest.raises(
        guards.TrainingDiverged, match=f"gradient norm is {bad} at step 5 .no checkpoint was saved"
    ):
        guard.on_pre_optimizer_step(guard_args(tmp_path), TrainerState(global_step=4), None, model=model)


def test_the_guard_reads_losses_in_the_logs_and_ignores_other_statistics(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / runs.TRAINER_STATE_NAME).write_text("{}")
    guard, args, state = guards.NonFiniteGuard(), guard_args(tmp_path), TrainerState(global_step=4)
    logs = {"loss": 0.5, "grad_norm": 1.0, "val/ratio_var": math.nan}
    state.log_history.append({**logs, "step": 4})  # what Trainer.log does before calling the callbacks
    guard.on_log(args, state, None, logs=logs)
    assert state.log_history == [
        {"loss": 0.5, "grad_norm": 1.0, "val/ratio_var": None, "step": 4, "non_finite": ["val/ratio_var"]}
    ]  # kept, and strict JSON in trainer_state.json
    for key in ("loss", "eval_loss", "loss/policy_avg", "objective/kl", "grad_norm"):
        with pytest.raises(guards.TrainingDiverged, match=f"{key} is nan at step 4 .last good checkpoint"):
            guard.on_log(args, state, None, logs={key: math.nan})


def test_json_is_strict_non_finite_numbers_are_null_and_flagged(tmp_path):
    payload = {
        "last_loss": math.nan,
        "scores": [1.0, math.inf],
        "log_history": [{"loss": -math.inf, "step": 2}],
    }
    files.write_json(tmp_path / "m.json", payload)
    assert strict_json(tmp_path / "m.json") == {
        "last_loss": None,
        "scores": [1.0, None],
        "log_history": [{"loss": None, "step": 2, "non_finite": ["loss"]}],
        "non_finite": ["last_loss", "scores"],
    }
    runs.write_jsonl(tmp_path / "rows.jsonl", [{"reward": math.nan}])
    assert json.loads((tmp_path / "rows.jsonl").read_text()) == {"reward": None, "non_finite": ["reward"]}


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "run_config.json"
    files.write_json(path, {"seed": 0})
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        files.write_json(path, {"seed": 1})
    assert strict_json(path) == {"seed": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.json"]  # no temporary file left behind


def test_a_hub_token_reaches_no_file_of_the_run_folder(tmp_path, monkeypatch):
    token = "hf_FAKEreliabilityTOKEN0123456789"
    monkeypatch.setenv("HF_TOKEN", "placeholder")  # restored after the test
    out = tmp_path / "sft"
    argv = tiny_run_args(out, max_steps=2, save_strategy="steps", save_steps=1, hub_token=token)
    cli.main(["sft", *argv])
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"training_args.bin", "trainer_state.json", "optimizer.pt"} <= {p.name for p in written}
    assert (out / "checkpoint-2" / "training_args.bin").exists() and (out / runs.COMPLETE).exists()
    assert [p for p in written if token.encode() in p.read_bytes()] == []
    assert torch.load(out / "checkpoint-1" / "training_args.bin", weights_only=False).hub_token is None
    assert json.loads((out / runs.RUN_CONFIG).read_text())["hub_token"] == "<HUB_TOKEN>"
    assert os.environ["HF_TOKEN"] == token  # where huggingface_hub finds it to push
