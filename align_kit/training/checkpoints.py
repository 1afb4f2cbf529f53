"""Checkpoints a resume can trust, and rotation that deletes only what this run wrote.

- ``manifest.json``, written last into every checkpoint (after every rank has written its files), lists each
  file with its size and SHA-256 and names the run that wrote it. A checkpoint is *verified* when its manifest
  parses and every file it lists is there with that size and hash: a kill mid-save (no manifest), a truncated
  ``model.safetensors`` or ``optimizer.pt`` (size), a deleted ``scheduler.pt`` (missing) and flipped bytes
  (hash) are all caught. Resume takes the newest verified checkpoint and names, for each newer one it skips,
  the file that failed.
- Rotation (``save_total_limit``) happens here, not in Trainer, whose rotation deletes any folder named
  ``checkpoint-*``: only checkpoints whose manifest names this run are deleted, newest and best kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from align_kit import files

MANIFEST = "manifest.json"
RUN_ID = "run_id.json"  # written at a run folder's first start: the id its checkpoints' manifests carry


def run_id(output_dir: Path) -> str:
    """The id of the run in ``output_dir``, made at its first start (main process only writes it)."""
    path = output_dir / RUN_ID
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        made = uuid.uuid4().hex
        if PartialState().is_main_process:
            files.write_json(path, {"run_id": made})
        return made


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(folder: Path, run: str, step: int) -> None:
    """Every file under ``folder`` with its size and hash, then the manifest itself (whole or not at all)."""
    listed = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name
    }
    files.write_json(folder / MANIFEST, {"run": run, "step": step, "files": listed}, indent=1)


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def checkpoint_problem(folder: Path) -> str | None:
    """None for a verified checkpoint, else what is wrong with it, naming the file."""
    if not folder.is_dir():
        return f"{folder} is no folder"
    manifest = read_manifest(folder)
    if manifest is None:
        what = "is not whole" if (folder / MANIFEST).exists() else "is missing (its save did not finish)"
        return f"{folder / MANIFEST} {what}"
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{path} holds {size} bytes, {entry.get('size')} were written"
        if sha256(path) != entry.get("sha256"):
            return f"{path} does not match the hash recorded when it was written"
    return None


def numbered(output_dir: Path) -> dict[int, Path]:
    """Step -> checkpoint folder, for every ``checkpoint-N`` folder in ``output_dir``."""
    found = {}
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and folder.is_dir():
            found[int(step)] = folder
    return found


def newest_verified(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest verified checkpoint in ``output_dir`` (or None), and one line per newer one skipped."""
    skipped = []
    for _, folder in sorted(numbered(output_dir).items(), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"skipping {folder.name}: {problem}")
    return None, skipped


def rotate(output_dir: Path, run: str, keep: int, best: str | None) -> list[Path]:
    """Delete this run's checkpoints beyond the newest ``keep`` (never ``best``); returns what was deleted.
    A folder whose manifest names another run, or that has none, is never deleted."""
    ours = [f for _, f in sorted(numbered(output_dir).items()) if (read_manifest(f) or {}).get("run") == run]
    protected = {Path(best).resolve()} if best else set()
    deleted = []
    for folder in ours[: max(len(ours) - keep, 0)]:
        if folder.resolve() not in protected:
            shutil.rmtree(folder)
            deleted.append(folder)
    return deleted


class VerifiedCheckpoints(TrainerCallback):
    """After every checkpoint save: wait for every rank's files, write the manifest, rotate (see the module
    docstring). ``keep`` is the run's ``save_total_limit`` (Trainer's own rotation is turned off)."""

    def __init__(self, run: str, keep: int | None):
        self.run, self.keep = run, keep

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # every rank has written its RNG state
        if state.is_world_process_zero:
            output_dir = Path(args.output_dir)
            write_manifest(
                output_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", self.run, state.global_step
            )
            if self.keep:
                rotate(output_dir, self.run, self.keep, state.best_model_checkpoint)
        PartialState().wait_for_everyone()  # no rank reads a checkpoint before its manifest exists


class ResumedSchedule(TrainerCallback):
    """On resume, the learning rate of the first resumed step comes from this run's schedule.

    The checkpoint's optimizer state brings back the rate its own schedule had reached (0 at the end of a
    linear schedule), and Trainer applies the new schedule only from the second step, so a resume with a
    longer ``max_steps`` or another warmup would train one step at the old rate. Recomputed the way
    ``LambdaLR`` computes it, an unchanged schedule gives the same rate to the bit."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0 or not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [
            base * rule(lr_scheduler.last_epoch)
            for base, rule in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True)
        ]
        for group, rate in zip(lr_scheduler.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        lr_scheduler._last_lr = rates
