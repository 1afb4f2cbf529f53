"""Protects a run against what a GPU host does to it: SIGTERM mid-run finishes the step, saves a verified
checkpoint and exits 75 with one line, and the same command resumes to exactly the weights of an uninterrupted
run, with no step redone and no process left (plain python here; ``accelerate launch`` with 1 and 2 processes
and DPO under the quality mark); a second launch into a held folder is refused naming the holder, and a lock
left by a killed process is taken over; a user's folder is refused with its files untouched; a run killed
after its final checkpoint is saved and reported without another step; each damaged checkpoint (truncated
weights or optimizer, missing scheduler, flipped bytes) is skipped with a line naming the file, and the run
resumes from the previous verified one to the uninterrupted run's weights; rotation deletes only this run's
checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, load_recipe, tiny_run_args
from safetensors.torch import load_file

from align_kit import console
from align_kit.training import checkpoints, run_folder, runs, stops

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 8, 2
TWO_PROCESSES = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"


def command(recipe: str, output_dir: Path, launcher: list[str] | None = None, **overrides) -> list[str]:
    settings = dict(max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, learning_rate=1e-3)
    args = tiny_run_args(output_dir, **{**settings, **overrides})
    return [*(launcher or [sys.executable]), str(ROOT / "recipes" / f"{recipe}.py"), *args]


def alive(marker: str) -> list[int]:
    """Pids of live processes whose command line holds ``marker`` (a run folder's path)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                state = (proc / "stat").read_text().split(") ")[-1][:1]
                if state != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def logged_steps(output_dir: Path) -> list[int]:
    history = json.loads((output_dir / "metrics.json").read_text())["log_history"]
    return [e["step"] for e in history if "loss" in e]


def sigterm_after_first_checkpoint(
    cmd: list[str], output_dir: Path, env: dict, log: Path
) -> tuple[int, float]:
    """Start ``cmd``, SIGTERM it once checkpoint-2 is verified (the next step is in flight); returns its exit
    status and the seconds from the signal to its exit."""
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 240
        first = output_dir / f"checkpoint-{SAVE_STEPS}" / checkpoints.MANIFEST
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        status = process.wait(timeout=120)
    return status, time.monotonic() - sent


def stop_and_resume(tmp: Path, recipe: str, launcher: list[str] | None = None, **overrides) -> dict:
    """An uninterrupted run beside the same run SIGTERMed after its first checkpoint, then started again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, stopped = tmp / "whole", tmp / "stopped"
    with open(tmp / "whole.log", "w") as whole_log:
        reference = subprocess.Popen(
            command(recipe, whole, launcher, **overrides), env=env, stdout=whole_log, stderr=subprocess.STDOUT,
            cwd=ROOT,
        )  # fmt: skip
        try:
            cmd = command(recipe, stopped, launcher, **overrides)
            status, seconds = sigterm_after_first_checkpoint(cmd, stopped, env, tmp / "stopped.log")
            deadline = time.monotonic() + 60  # a one-process launcher exits before its child has stopped
            while alive(str(stopped)) and time.monotonic() < deadline:
                time.sleep(0.1)
            seconds_all = time.monotonic() - deadline + 60 + seconds
            left = alive(str(stopped))
            record = json.loads((stopped / stops.STOPPED_FILE).read_text())
            checkpoint_state = json.loads((Path(record[-1]["checkpoint"]) / "trainer_state.json").read_text())
            again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
            assert reference.wait(timeout=300) == 0, (tmp / "whole.log").read_text()[-4000:]
        finally:
            if reference.poll() is None:
                reference.kill()
    return {
        "whole": whole, "stopped": stopped, "status": status, "seconds": seconds_all, "left": left,
        "record": record, "state": checkpoint_state, "log": (tmp / "stopped.log").read_text(),
        "again": again.stdout,
    }  # fmt: skip


def check_graceful_stop(result: dict, one_line_per_rank: int = 1) -> None:
    stopped, record = result["stopped"], result["record"]
    [entry] = record
    step = entry["step"]
    assert entry["signal"] == "SIGTERM" and SAVE_STEPS < step < MAX_STEPS
    assert checkpoints.checkpoint_problem(Path(entry["checkpoint"])) is None  # saved whole, verified
    line = (
        f"stopped by SIGTERM after step {step} of {MAX_STEPS}: {stopped / f'checkpoint-{step}'} is saved and "
        f"verified; run the same command to resume from it (exit status {stops.EXIT_STOPPED})"
    )
    assert result["log"].count(line) == one_line_per_rank, result["log"][-3000:]
    assert result["left"] == []  # no process outlives the stop
    # the step in flight was finished and saved: the resumed process logs only the steps after it
    assert [e["step"] for e in result["state"]["log_history"] if "loss" in e] == list(range(1, step + 1))
    assert f"resuming from {stopped / f'checkpoint-{step}'}" in result["again"]
    assert logged_steps(stopped) == list(range(1, MAX_STEPS + 1))


@pytest.fixture(scope="module")
def sft_stopped(tmp_path_factory):
    return stop_and_resume(tmp_path_factory.mktemp("sigterm_sft"), "sft")


def test_sigterm_saves_a_verified_checkpoint_and_exits_with_one_line(sft_stopped):
    assert sft_stopped["status"] == stops.EXIT_STOPPED
    check_graceful_stop(sft_stopped)


def test_the_same_command_resumes_to_the_weights_of_an_uninterrupted_run(sft_stopped):
    assert same_weights(sft_stopped["whole"], sft_stopped["stopped"])
    whole = json.loads((sft_stopped["whole"] / "metrics.json").read_text())["log_history"]
    resumed = json.loads((sft_stopped["stopped"] / "metrics.json").read_text())["log_history"]
    assert [e["loss"] for e in whole if "loss" in e] == [e["loss"] for e in resumed if "loss" in e]


@pytest.mark.quality
def test_dpo_stops_on_sigterm_and_resumes_bit_identical(tmp_path):
    result = stop_and_resume(tmp_path, "dpo", beta=0.1, loss_type="sigmoid")
    assert result["status"] == stops.EXIT_STOPPED
    check_graceful_stop(result)
    assert same_weights(result["whole"], result["stopped"])


@pytest.mark.quality
@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_two_processes_under_accelerate_launch_stop_together_and_resume(tmp_path, recipe):
    """torchrun's agent passes SIGTERM to both ranks; they stop after the same step (the request is reduced
    over ranks), one checkpoint is saved, no process is left, and the same launch resumes to the end."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCESSES)]
    extra = {"beta": 0.1, "loss_type": "sigmoid"} if recipe == "dpo" else {}
    result = stop_and_resume(
        tmp_path, recipe, launcher, per_device_train_batch_size=4, ddp_find_unused_parameters="false", **extra
    )
    check_graceful_stop(result, one_line_per_rank=2)
    assert same_weights(result["whole"], result["stopped"])


@pytest.mark.quality
def test_one_process_accelerate_launch_leaves_no_orphan(tmp_path):
    """``accelerate launch`` with one process dies on SIGTERM without passing it on; its child asked the
    kernel for SIGTERM on its launcher's death, so it stops gracefully instead of training on, orphaned."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    result = stop_and_resume(tmp_path, "sft", launcher)
    check_graceful_stop(result)
    assert same_weights(result["whole"], result["stopped"])


def hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_users_folder_is_refused_with_its_files_untouched(tmp_path):
    folder = tmp_path / "somefolder"
    (folder / "checkpoint-3").mkdir(parents=True)
    for name, text in (("README.md", "mine"), ("config.json", "{}"), ("model.safetensors", "weights")):
        (folder / name).write_text(text)
    (folder / "checkpoint-3" / "important.txt").write_text("keep me")
    before = hashes(folder)
    with pytest.raises(
        runs.RunRefused, match=r"is not empty and is no align-kit run folder \(it holds README.md"
    ):
        load_recipe("sft").main(tiny_run_args(folder))
    assert hashes(folder) == before


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    for step, run in ((1, None), (2, "other"), (3, "ours"), (4, "ours"), (5, "ours"), (6, "ours")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "x.bin").write_text(str(step))
        if run:
            checkpoints.write_manifest(tmp_path / f"checkpoint-{step}", run, step)
    deleted = checkpoints.rotate(tmp_path, "ours", keep=2, best=str(tmp_path / "checkpoint-3"))
    assert deleted == [tmp_path / "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{s}" for s in (1, 2, 3, 5, 6)]


HOLD = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from align_kit.training import run_folder
refusal, _ = run_folder.take_lock(Path(sys.argv[1]))
print("held" if refusal is None else refusal, flush=True)
time.sleep(120)
"""


def test_a_second_launch_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        info = json.loads((out / run_folder.HOLDER).read_text())
        assert info["pid"] == holder.pid
        with pytest.raises(
            runs.RunRefused, match=rf"in use by another run \(pid {holder.pid} on .+, started "
        ):
            load_recipe("sft").main(tiny_run_args(out, max_steps=1))
        assert sorted(p.name for p in out.iterdir()) == [run_folder.LOCK, run_folder.HOLDER]
    finally:
        holder.kill()
        holder.wait()
    load_recipe("sft").main(tiny_run_args(out, max_steps=1))  # the kernel released the killed holder's lock
    assert f"took over the lock of {out} from pid {holder.pid} on " in capsys.readouterr().out
    assert (out / runs.COMPLETE).exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 4-step run keeping both its checkpoints (2 and 4)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    load_recipe("sft").main(tiny_run_args(out, max_steps=4, save_strategy="steps", save_steps=2))
    return out


def killed_after_final_checkpoint(finished: Path, copy: Path) -> Path:
    """What a kill after the last checkpoint (or a full disk at the final save) leaves."""
    shutil.copytree(finished, copy)
    for name in (runs.COMPLETE, "model.safetensors", "metrics.json"):
        (copy / name).unlink()
    return copy


def test_killed_after_its_final_checkpoint_a_run_is_saved_without_another_step(
    finished_run, tmp_path, capsys
):
    out = killed_after_final_checkpoint(finished_run, tmp_path / "run")
    metrics = load_recipe("sft").main(tiny_run_args(out, max_steps=4, save_strategy="steps", save_steps=2))
    assert (
        "checkpoint-4 already holds all 4 steps: saved and reported without another step"
        in capsys.readouterr().out
    )
    assert metrics["train"]["global_step"] == 4 and logged_steps(out) == [1, 2, 3, 4]
    assert not (out / "checkpoint-5").exists()
    assert same_weights(finished_run, out)
    complete = json.loads((out / runs.COMPLETE).read_text())
    assert complete["model_from"] == "step 4" and "last step" in complete["why"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = [
    ("truncated weights", "model.safetensors", truncate, "holds {size} bytes, {written} were written"),
    ("truncated optimizer", "optimizer.pt", truncate, "holds {size} bytes, {written} were written"),
    ("missing scheduler", "scheduler.pt", Path.unlink, "is missing"),
    ("flipped bytes", "model.safetensors", flip, "does not match the hash recorded when it was written"),
]


@pytest.mark.parametrize(("case", "name", "damage", "says"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_checkpoint_is_skipped_naming_the_file(
    finished_run, tmp_path, capsys, case, name, damage, says
):
    out = killed_after_final_checkpoint(finished_run, tmp_path / "run")
    damaged = out / "checkpoint-4" / name
    written = damaged.stat().st_size
    damage(damaged)
    size = damaged.stat().st_size if damaged.exists() else None
    assert runs.last_checkpoint(out) == str(out / "checkpoint-2")
    line = f"skipping checkpoint-4: {damaged} " + says.format(size=size, written=written)
    assert line in capsys.readouterr().out


def test_a_run_resumes_from_the_checkpoint_before_a_damaged_one_to_the_same_weights(
    finished_run, tmp_path, capsys
):
    out = killed_after_final_checkpoint(finished_run, tmp_path / "run")
    truncate(out / "checkpoint-4" / "optimizer.pt")
    load_recipe("sft").main(tiny_run_args(out, max_steps=4, save_strategy="steps", save_steps=2))
    log = capsys.readouterr().out
    assert f"skipping checkpoint-4: {out / 'checkpoint-4' / 'optimizer.pt'} holds" in log
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert checkpoints.checkpoint_problem(out / "checkpoint-4") is None  # saved again, whole
    assert same_weights(finished_run, out) and logged_steps(out) == [1, 2, 3, 4]


def test_the_run_folder_says_which_weights_became_the_model_and_from_what(finished_run):
    complete = json.loads((finished_run / runs.COMPLETE).read_text())
    assert (complete["model_from"], complete["why"]) == (
        "step 4",
        "the last step (load_best_model_at_end is off)",
    )
    card = (finished_run / "README.md").read_text()
    assert "with sft from the base model `tiny-gpt2` on the data `embedded`" in card and "[None]" not in card
    best = SimpleNamespace(
        state=SimpleNamespace(best_model_checkpoint="/r/checkpoint-3", best_metric=0.25, global_step=6),
        args=SimpleNamespace(
            load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False
        ),
    )
    assert runs.model_origin(best) == {
        "model_from": "checkpoint-3",
        "why": "best eval_loss (lower is better)",
        "best_metric": {"eval_loss": 0.25},
    }


def test_an_adapter_records_its_local_base_model_as_an_absolute_path(tmp_path, monkeypatch):
    from align_kit.configs import AdapterArgs
    from align_kit.models import adapters
    from align_kit.models.loading import build_tiny_gpt2

    model = build_tiny_gpt2()
    adapters.inject_adapters(model, AdapterArgs(adapter="residual"))
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    adapters.save_adapter(
        model, tmp_path / "adapter", base_model="base", args=AdapterArgs(adapter="residual")
    )
    assert adapters.read_adapter_config(tmp_path / "adapter")[1] == str(tmp_path / "base")


def test_sigterm_outside_training_stops_at_once_keeping_what_was_written(tmp_path, capsys):
    """An evaluation (or a recipe before its first step) stops on SIGTERM at once, exit 75, one line
    (``console.run_command`` installs the handler; here it is installed the same way, in-process)."""
    kept = tmp_path / "kept.jsonl"

    def main():
        with open(kept, "a") as handle:  # what an evaluation writes as each verdict arrives
            handle.write("verdict 1\n")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    previous = signal.signal(signal.SIGTERM, console.stop_now)
    try:
        assert console.exit_status(main) == stops.EXIT_STOPPED
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == (
        "align-kit: stopped by SIGTERM: what was finished is kept (an evaluation's answers and verdicts, a run's "
        "checkpoints); run the same command to continue (exit status 75)\n"
    )
    assert kept.read_text() == "verdict 1\n"


def test_a_full_disk_during_training_is_one_line_naming_the_folder(tmp_path, monkeypatch, capsys):
    """torch reports a full disk mid-save as ``RuntimeError: unexpected pos``: it becomes one line, exit 2."""

    def save_fails(resume_from_checkpoint=None):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024")

    trainer = SimpleNamespace(train=save_fails, callback_handler=SimpleNamespace(callbacks=[]))
    trainer.add_callback = trainer.callback_handler.callbacks.append
    monkeypatch.setattr(stops.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    run = runs.Run(tmp_path / "run", None)
    assert console.exit_status(lambda: stops.train(trainer, run)) == console.EXIT_MISTAKE
    assert capsys.readouterr().err == (
        f"align-kit: no space left for {tmp_path / 'run'} (4,096 bytes free): the checkpoint being saved is "
        "incomplete and will be skipped; free space, then run the same command to resume from the last verified "
        "checkpoint\n"
    )


def test_the_config_file_that_names_the_folder_may_sit_in_it(tmp_path):
    """A loss sweep writes each member's YAML into the member's folder before training it."""
    (tmp_path / "member.yaml").write_text("output_dir: .\n")
    assert run_folder.foreign_files(tmp_path, str(tmp_path / "member.yaml")) == []
    assert run_folder.foreign_files(tmp_path) == ["member.yaml"]
