"""Protects kill-and-resume: a run killed with SIGKILL after a checkpoint, started again with the same command,
resumes from its last complete checkpoint (a half-written one is skipped) and ends with exactly the weights
of an uninterrupted run, its train summary covering the whole run; a finished run refuses to start again
and deletes nothing; changed settings are refused, or allowed with a flag and recorded. Best-of-N killed
mid-run resumes after its last finished round (keeping an interrupted round's samples) and ends with the
weights, samples and reports of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, load_recipe, tiny_run_args
from safetensors.torch import load_file

from align_kit.training import runs

pytestmark = pytest.mark.slow

MAX_STEPS = 16
SAVE_STEPS = 2


def sft_command(output_dir: Path) -> list[str]:
    args = tiny_run_args(
        output_dir,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_total_limit=2,
        learning_rate=1e-3,
        sft_target="mix",
    )
    return [sys.executable, str(ROOT / "recipes" / "sft.py"), *args]


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose trainer state was written to the end (a kill can land mid-write)."""
    return [c for c in output_dir.glob("checkpoint-*") if runs._whole_json(c / "trainer_state.json")]


def logged_losses(output_dir: Path) -> list[float]:
    return [
        e["loss"] for e in json.loads((output_dir / "metrics.json").read_text())["log_history"] if "loss" in e
    ]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def kill_after_first_checkpoint(command: list[str], output_dir: Path, env: dict[str, str]) -> int:
    """Start ``command``, SIGKILL it as soon as a checkpoint is complete; returns that checkpoint's step."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not complete_checkpoints(output_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / runs.COMPLETE).exists(), "the run finished before it could be killed"
    return max(int(c.name.split("-")[1]) for c in complete_checkpoints(output_dir))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An uninterrupted run, and the same run killed after its first checkpoint then started again.

    The uninterrupted run goes alongside the first attempt, so the two share the machine's cores.
    """
    tmp = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, interrupted = tmp / "whole", tmp / "interrupted"
    with open(tmp / "whole.log", "w") as whole_log:
        reference = subprocess.Popen(sft_command(whole), env=env, stdout=whole_log, stderr=subprocess.STDOUT)
        try:
            killed_at = kill_after_first_checkpoint(sft_command(interrupted), interrupted, env)
            # What a kill during the next save leaves: a checkpoint folder without trainer_state.json.
            partial = interrupted / f"checkpoint-{killed_at + SAVE_STEPS}"
            partial.mkdir(exist_ok=True)
            (partial / "model.safetensors").write_bytes(b"half a file")
            again = subprocess.run(
                sft_command(interrupted), env=env, capture_output=True, text=True, timeout=240
            )
            assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
            assert reference.wait(timeout=240) == 0, (tmp / "whole.log").read_text()[-4000:]
        finally:
            if reference.poll() is None:
                reference.kill()
    return {"whole": whole, "interrupted": interrupted, "killed_at": killed_at, "log": again.stdout}


def test_resumes_from_the_last_complete_checkpoint(killed_and_resumed):
    out, killed_at = killed_and_resumed["interrupted"], killed_and_resumed["killed_at"]
    assert f"[align-kit] resuming from {out / f'checkpoint-{killed_at}'}\n" in killed_and_resumed["log"]
    complete = json.loads((out / runs.COMPLETE).read_text())
    assert complete["global_step"] == MAX_STEPS
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, MAX_STEPS + 1))


def test_resumed_weights_equal_an_uninterrupted_run(killed_and_resumed):
    whole = load_file(str(killed_and_resumed["whole"] / "model.safetensors"))
    resumed = load_file(str(killed_and_resumed["interrupted"] / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    # Trainer restores weights, optimizer, scheduler, RNG states and the data order: on CPU it is bit-exact.
    assert all((whole[k] == resumed[k]).all() for k in whole)
    assert logged_losses(killed_and_resumed["interrupted"]) == logged_losses(killed_and_resumed["whole"])


def test_a_finished_run_refuses_to_start_and_deletes_nothing(killed_and_resumed):
    out = killed_and_resumed["interrupted"]
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        load_recipe("sft").main(sft_command(out)[2:])
    assert snapshot(out) == before


def test_last_checkpoint_skips_partial_and_foreign_folders(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-best").mkdir()
    assert runs.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # numeric, not lexical, order
    assert runs.last_checkpoint(tmp_path / "checkpoint-12") is None


def test_the_train_summary_of_a_resumed_run_covers_the_whole_run(killed_and_resumed):
    whole = json.loads((killed_and_resumed["whole"] / "metrics.json").read_text())["train"]
    resumed = json.loads((killed_and_resumed["interrupted"] / "metrics.json").read_text())["train"]
    losses, killed_at = logged_losses(killed_and_resumed["interrupted"]), killed_and_resumed["killed_at"]
    assert resumed["global_step"] == whole["global_step"] == MAX_STEPS
    assert (resumed["processes"], whole["processes"]) == (2, 1)
    # transformers' own figure after a resume is the mean over the last process's steps only
    assert resumed["this_process"]["train_loss"] == pytest.approx(
        sum(losses[killed_at:]) / (MAX_STEPS - killed_at)
    )
    assert resumed["train_loss"] == pytest.approx(whole["this_process"]["train_loss"], rel=1e-6)
    assert resumed["train_loss"] == pytest.approx(sum(losses) / MAX_STEPS, rel=1e-6)
    assert resumed["train_runtime"] > resumed["this_process"]["train_runtime"] > 0
    assert resumed["resumed_from"] == str(killed_and_resumed["interrupted"] / f"checkpoint-{killed_at}")


def test_changed_settings_are_refused_then_allowed_and_recorded(tmp_path):
    """An interrupted run (checkpoint-2 of 2 steps, killed before its final save) started again for 4 steps at
    another learning rate: refused and listed, then resumed with --allow_changed_settings true, both recorded."""
    sft, out = load_recipe("sft"), tmp_path / "sft"
    first = dict(max_steps=2, save_strategy="steps", save_steps=2, learning_rate=1e-3)
    sft.main(tiny_run_args(out, **first))
    for name in (runs.COMPLETE, "model.safetensors", "metrics.json"):
        (out / name).unlink()  # what a kill after the checkpoint leaves
    again = tiny_run_args(out, **{**first, "max_steps": 4, "learning_rate": 2e-3})
    with pytest.raises(
        runs.RunRefused, match=r"other settings \(learning_rate: 0.001 -> 0.002; max_steps: 2 -> 4\)"
    ):
        sft.main(again)
    assert not (out / runs.SETTINGS_CHANGES).exists()
    metrics = sft.main([*again, "--allow_changed_settings", "true"])
    assert metrics["train"]["global_step"] == 4 and metrics["train"]["processes"] == 2
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 2, 3, 4]
    [change] = json.loads((out / runs.SETTINGS_CHANGES).read_text())
    assert change["resumed_from"] == str(out / "checkpoint-2")
    assert change["changed"] == {
        "learning_rate": {"before": 0.001, "after": 0.002},
        "max_steps": {"before": 2, "after": 4},
    }
    config = json.loads((out / runs.RUN_CONFIG).read_text())
    assert (config["learning_rate"], config["max_steps"], config["allow_changed_settings"]) == (
        0.002,
        4,
        True,
    )


ROUNDS = 3


def best_of_n_command(output_dir: Path, reward_dir: Path) -> list[str]:
    args = tiny_run_args(
        output_dir, model_name_or_path="tiny-gpt2", rounds=ROUNDS, samples_per_prompt=3, keep_top_k=1,
        prompts_per_round=6, max_new_tokens=10, report_prompts=4, learning_rate=1e-3, max_steps=2,
        per_device_train_batch_size=3, reward_models=reward_dir,
    )  # fmt: skip
    return [sys.executable, str(ROOT / "recipes" / "best_of_n.py"), *args]


@pytest.fixture(scope="module")
def best_of_n_killed_and_resumed(tmp_path_factory, tiny_reward_dir):
    """An uninterrupted best-of-N run, and the same run SIGKILLed once round 2 has written its samples (or
    later, if the machine was quick), then started again; both share the machine's cores."""
    tmp = tmp_path_factory.mktemp("bon_resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, interrupted = tmp / "whole", tmp / "interrupted"
    with open(tmp / "whole.log", "w") as whole_log:
        reference = subprocess.Popen(
            best_of_n_command(whole, tiny_reward_dir), env=env, stdout=whole_log, stderr=subprocess.STDOUT
        )
        try:
            process = subprocess.Popen(
                best_of_n_command(interrupted, tiny_reward_dir), env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 240
            marker = interrupted / "round_2" / "samples.jsonl"
            while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert not (interrupted / runs.COMPLETE).exists(), "the run finished before it could be killed"
            left = {
                p.relative_to(interrupted).as_posix(): p.stat().st_mtime_ns for p in interrupted.rglob("*")
            }
            again = subprocess.run(
                best_of_n_command(interrupted, tiny_reward_dir), env=env, capture_output=True, text=True,
                timeout=300,
            )  # fmt: skip
            assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
            assert reference.wait(timeout=300) == 0, (tmp / "whole.log").read_text()[-4000:]
        finally:
            if reference.poll() is None:
                reference.kill()
    return {"whole": whole, "interrupted": interrupted, "left": left, "log": again.stdout}


def test_best_of_n_resumes_after_its_last_finished_round(best_of_n_killed_and_resumed):
    out, left = best_of_n_killed_and_resumed["interrupted"], best_of_n_killed_and_resumed["left"]
    finished = max(r for r in range(1, ROUNDS + 1) if f"round_{r}/report.json" in left)
    assert finished >= 1
    log = best_of_n_killed_and_resumed["log"]
    assert f"[align-kit] resuming after round {finished}, from {out / f'round_{finished}' / 'model'}\n" in log
    for r in range(1, finished + 1):  # finished rounds are not redone
        assert (out / f"round_{r}" / "report.json").stat().st_mtime_ns == left[f"round_{r}/report.json"]
    sampled = f"round_{finished + 1}/samples.jsonl"
    if sampled in left:  # an interrupted round keeps its samples
        assert (out / sampled).stat().st_mtime_ns == left[sampled]


def test_resumed_best_of_n_equals_an_uninterrupted_run(best_of_n_killed_and_resumed):
    whole, resumed = best_of_n_killed_and_resumed["whole"], best_of_n_killed_and_resumed["interrupted"]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for r in range(1, ROUNDS + 1):
        assert (whole / f"round_{r}" / "samples.jsonl").read_text() == (
            resumed / f"round_{r}" / "samples.jsonl"
        ).read_text()
        reports = [json.loads((run / f"round_{r}" / "report.json").read_text()) for run in (whole, resumed)]
        keys = ("round", "reward_samples", "reward_kept", "reward_greedy_held_out")
        assert {k: reports[0][k] for k in keys} == {k: reports[1][k] for k in keys}
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (whole, resumed)]
    assert metrics[0]["report"] == metrics[1]["report"]  # greedy reward and KL of the final policy


def test_best_of_n_killed_after_its_last_round_only_saves_and_reports(best_of_n_killed_and_resumed, tmp_path):
    """What a kill between the last round's report and run_complete.json leaves: no round is trained again,
    the last round's policy becomes the run's, and the final report equals the uninterrupted run's."""
    whole, out = best_of_n_killed_and_resumed["whole"], tmp_path / "bon"
    shutil.copytree(whole, out)
    for name in (runs.COMPLETE, "metrics.json", "samples.json", "model.safetensors", "config.json"):
        (out / name).unlink()
    rounds_before = {p: p.stat().st_mtime_ns for p in out.glob("round_*/**/*")}
    reward_dir = Path(json.loads((out / runs.RUN_CONFIG).read_text())["reward_models"][0])
    metrics = load_recipe("best_of_n").main(best_of_n_command(out, reward_dir)[2:])
    assert {p: p.stat().st_mtime_ns for p in out.glob("round_*/**/*")} == rounds_before  # no round redone
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    assert metrics["report"] == json.loads((whole / "metrics.json").read_text())["report"]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert [e["loss"] for e in metrics["log_history"] if "loss" in e]  # the last round's SFT history
