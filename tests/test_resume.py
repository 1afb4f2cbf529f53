"""Protects kill-and-resume: a run killed with SIGKILL after a checkpoint, started again with the same command,
resumes from its last complete checkpoint (a half-written one is skipped) and ends with exactly the weights
of an uninterrupted run; a finished run refuses to start again and deletes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, load_recipe, tiny_run_args
from safetensors.torch import load_file

from align_kit import runs

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
