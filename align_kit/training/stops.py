"""A graceful stop on SIGTERM or SIGINT, and a finished run that is not trained again.

Schedulers and spot instances send SIGTERM some seconds before SIGKILL. While ``train(trainer, run)`` runs,
SIGTERM or SIGINT finishes the optimizer step in flight, saves a checkpoint (verified, ``checkpoints``),
appends why to ``stopped.json`` and raises ``Stopped``: one line saying how to resume, exit status
``EXIT_STOPPED``. With several processes the request is reduced over every rank at each step end, so all
ranks stop after the same step whichever of them got the signal. A second SIGINT stops at once.
transformers' own ``enable_jit_checkpoint`` is not used: it waits 3 s before it acts, handles SIGTERM only,
stops each rank on its own signal (a rank that got none waits forever in the next collective), and returns
from ``train()`` as if training had finished, so a recipe would save the model and mark the run complete.

A process started by a launcher (``accelerate launch``, ``torchrun``) asks the kernel for SIGTERM when its
launcher dies (``PR_SET_PDEATHSIG``): ``accelerate launch`` with one process dies on SIGTERM without passing
it on, and its child would otherwise train on, orphaned.

A resumed run whose checkpoint already holds all its steps (a kill after the final checkpoint) would take
one more step in Trainer, which checks the step limit only after a step: ``train`` stops it before that step
and the recipe saves and reports the checkpoint's weights.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from align_kit import files
from align_kit.console import EXIT_STOPPED, Stopped, is_main_process, log
from align_kit.training import launch

STOPPED_FILE = "stopped.json"  # one entry per graceful stop: signal, step, checkpoint, time
PR_SET_PDEATHSIG = 1


class AlreadyTrained(Exception):
    """Raised before a step when the resumed state already holds every step of the run."""


class StopOnSignal(TrainerCallback):
    """Asks the trainer to save and stop at the end of the step in flight once a signal arrived (see the
    module docstring); ``train`` installs and removes its signal handlers."""

    def __init__(self):
        self.received: str | None = None
        self.stopped_at: int | None = None
        self.previous: dict[int, Any] = {}
        self.resumable, self.trainer = True, None

    def install(self, trainer: Any, resumable: bool) -> None:
        self.trainer, self.resumable = trainer, resumable
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received:
            return
        self.received = name
        step = self.trainer.state.global_step if self.trainer is not None else 0
        if not self.resumable:
            raise Stopped(
                f"stopped by {name} at update {step}: this method cannot resume (TRL 1.12's PPOTrainer saves "
                f"no optimizer state), so the {step} updates done are lost; start it again with another "
                "output_dir"
            )
        log(f"{name}: finishing step {step + 1}, then saving a checkpoint and stopping")

    def requested(self, args: Any) -> bool:
        """Whether any rank got a signal (a collective with several processes: every rank calls it)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyTrained

    def on_step_end(self, args, state, control, **kwargs):
        if self.resumable and self.requested(args):
            self.received = self.received or "a signal to another rank"
            control.should_save, control.should_training_stop = True, True
            control.should_evaluate = False
            self.stopped_at = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the stop's checkpoint is saved; no second save or evaluation
            control.should_save, control.should_evaluate = False, False


def die_with_launcher() -> None:
    """Ask the kernel for SIGTERM when the launcher that started this process dies (Linux only)."""
    launched = "LOCAL_RANK" in os.environ or any(key.startswith("ACCELERATE_") for key in os.environ)
    if launched and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the launcher died before the request
            os.kill(os.getpid(), signal.SIGTERM)


def train(trainer: Any, run: Any, resumable: bool = True) -> TrainOutput:
    """``trainer.train`` from the run's checkpoint, stopping gracefully on a signal (``Stopped``) and taking
    no step when the checkpoint already holds them all (see the module docstring)."""
    stop = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal)), None)
    if stop is None:
        stop = StopOnSignal()
        trainer.add_callback(stop)
    stop.install(trainer, resumable)
    launch.shard_on_cpu(trainer)
    die_with_launcher()
    try:
        result = trainer.train(resume_from_checkpoint=run.resume_from) if resumable else trainer.train()
    except (
        OSError,
        RuntimeError,
    ) as error:  # torch reports a full disk as "unexpected pos" or a write failure
        full = disk_full(Path(run.output_dir))
        if full:
            raise OSError(errno.ENOSPC, full) from error
        raise
    except AlreadyTrained:
        state = trainer.state
        log(
            f"{Path(run.resume_from).name} already holds all {state.max_steps} steps: saved and reported without another step"
        )
        if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
            trainer._load_best_model()  # what Trainer does at the end of training
        result = TrainOutput(state.global_step, math.nan, {})
    finally:
        stop.restore()
    if stop.stopped_at is not None:
        raise stopped(run, stop.received, stop.stopped_at, trainer.state.max_steps)
    return result


FULL_BELOW = 64 * 2**20  # bytes free on the run folder's device under which a failed save is a full disk


def disk_full(output_dir: Path) -> str | None:
    """The line for a full disk under ``output_dir`` (None when space is left)."""
    free = shutil.disk_usage(output_dir if output_dir.exists() else output_dir.parent).free
    if free >= FULL_BELOW:
        return None
    return (
        f"no space left for {output_dir} ({free:,} bytes free): the checkpoint being saved is incomplete and "
        "will be skipped; free space, then run the same command to resume from the last verified checkpoint"
    )


def stopped(run: Any, name: str | None, step: int, max_steps: int) -> Stopped:
    """Record a graceful stop in the run folder, end the process group, and say how to resume."""
    checkpoint = Path(run.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if is_main_process():
        path = Path(run.output_dir) / STOPPED_FILE
        try:
            history = json.loads(path.read_text()) if path.exists() else []
        except ValueError:
            history = []
        history.append({"signal": name, "step": step, "checkpoint": str(checkpoint), "at": time.time()})
        files.write_json(path, history, indent=2)
    state = PartialState()
    if state.use_distributed:
        state.wait_for_everyone()
        state.destroy_process_group()
    return Stopped(
        f"stopped by {name} after step {step} of {max_steps}: {checkpoint} is saved and verified; run the "
        f"same command to resume from it (exit status {EXIT_STOPPED})"
    )
