"""Whose folder a run writes into, and one process per run folder.

- ``refuse_foreign``: an existing ``output_dir`` that holds anything is used only when align-kit made it
  (``run_config.json``, or only the lock files a start leaves); a user's folder is refused before a byte is
  written, so no file of it is overwritten and no ``checkpoint-*`` of it is rotated away.
- ``take_lock``: an advisory lock (``run.lock``, ``filelock``) taken by the main process before anything else
  is written and held to the end of the run. The kernel releases it when its process dies, however it dies,
  so a lock left by a killed run is simply taken over (and the previous holder named). A second launch into
  a held folder is refused on every rank with one line naming the holder: pid, host, start time.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from align_kit import files
from align_kit.configs import DataArgs
from align_kit.console import is_main_process, log
from align_kit.data.loading import LABELLING_MARK, labelling_mark

LOCK = "run.lock"
HOLDER = "run.lock.json"  # who holds (or last held) the lock
# What a start writes before run_config.json: a folder holding only these is a run folder too.
OWN_FIRST_FILES = {LOCK, HOLDER, "run_id.json"}
RUN_CONFIG = "run_config.json"
_held: dict[
    str, FileLock
] = {}  # lock path -> the lock this process holds (a second start in-process reuses it)


def foreign_files(output_dir: Path, config_file: str | None = None) -> list[str]:
    """The names in an existing ``output_dir`` that show it is not an align-kit run folder (empty if it is).
    ``config_file``, the YAML file that set this ``output_dir``, may sit inside it (a loss sweep's members)."""
    if not output_dir.is_dir():
        return []
    names = sorted(p.name for p in output_dir.iterdir())
    if RUN_CONFIG in names or not names:
        return []
    own = set(OWN_FIRST_FILES)
    if config_file and Path(config_file).parent.resolve() == output_dir.resolve():
        own.add(Path(config_file).name)
    return [n for n in names if n not in own]


def holder_text(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def read_holder(output_dir: Path) -> dict:
    try:
        holder = json.loads((output_dir / HOLDER).read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_on_main(output_dir: Path) -> tuple[str | None, str | None]:
    """(refusal, note): take the lock on this process; a refusal names the holder, a note a stale holder."""
    key = str(output_dir.resolve() / LOCK)
    if key in _held:
        return None, None
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(key, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(output_dir)
        who = holder_text(holder) if holder else "a process that has not yet said who it is"
        return (
            f"{output_dir} is in use by another run ({who}): one process per run folder; wait for it to "
            "end, stop it, or choose another output_dir"
        ), None
    _held[key] = lock
    previous = read_holder(output_dir)
    note = None
    if previous and previous.get("pid") != os.getpid():
        note = f"took over the lock of {output_dir} from {holder_text(previous)}, which no longer runs"
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    files.write_json(
        output_dir / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    )
    return None, note


def take_lock(output_dir: Path) -> tuple[str | None, str | None]:
    """Lock ``output_dir`` for this launch (see the module docstring). Returns (refusal, note), the same on
    every rank: a refusal is the line to stop with, a note a line to print."""
    state = PartialState()
    outcome = list(_lock_on_main(output_dir)) if state.is_main_process else [None, None]
    if state.use_distributed:
        broadcast_object_list(outcome)
    return outcome[0], outcome[1]


def release_lock(output_dir: Path) -> None:
    """Release this process's lock on ``output_dir`` (the end of a run; process exit releases it too)."""
    lock = _held.pop(str(output_dir.resolve() / LOCK), None)
    if lock is not None:
        lock.release()


def write_model_card(output_dir: Path, method: str, origin: dict) -> None:
    """The run folder's README.md: the real base model, the method, the data, and which weights became the
    model (TRL's card names the base as "[None]" for any local model folder)."""
    config = json.loads((output_dir / RUN_CONFIG).read_text())
    base = str(config.get("model_name_or_path"))
    if Path(base).is_dir():
        base = str(Path(base).resolve())
    data = str(config.get("dataset"))
    if Path(data).exists():
        data = str(Path(data).resolve())
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [align-kit, {method}]",
        "---",
        "",
        f"# {output_dir.name}",
        "",
        f"Trained by align-kit with {method} from the base model `{base}` on the data `{data}`.",
        "",
        f"- Weights: {origin.get('model_from')} ({origin.get('why')})",
        f"- Steps: {config.get('max_steps')} (max_steps), epochs: {config.get('num_train_epochs')}",
        f"- Learning rate: {config.get('learning_rate')}; seed: {config.get('seed')}",
        f"- Every setting: `{RUN_CONFIG}`; data counts: `data_counts.json`; metrics: `metrics.json`",
        "",
    ]
    files.write_text(output_dir / "README.md", "\n".join(lines))


def record_labelling_mark(output_dir: Path, configs: tuple[Any, ...]) -> None:
    """A dataset labelled by a judge that failed its audits (``data.labelling_mark``): its mark is copied
    into the run folder under the same name and the run says so; nothing for any other dataset."""
    data_args = next((c for c in configs if isinstance(c, DataArgs)), None)
    mark = labelling_mark(data_args) if data_args is not None else None
    if mark is None:
        return
    if is_main_process():
        files.write_json(output_dir / LABELLING_MARK, mark, indent=2)
    log(
        f"WARNING: {data_args.dataset} was labelled by a judge that failed its audits "
        f"({', '.join(mark.get('failed', [])) or 'see the mark'}); recorded in {output_dir / LABELLING_MARK}"
    )
