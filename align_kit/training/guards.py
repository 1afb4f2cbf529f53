"""What stands between a user's mistake, or a diverging run, and a wasted night on a rented GPU.

- ``NonFiniteGuard``: the first NaN or infinite gradient norm (checked before the optimizer step, so the
  weights are still good) or logged loss stops training with ``TrainingDiverged``, naming the step and the
  last good checkpoint. The exception leaves the recipe before it saves a model or marks the run complete.
  Other logged statistics that are NaN (a variance of one value) are kept in the log history as null with
  a ``non_finite`` flag, so checkpoints' trainer_state.json stays strict JSON.
- ``watch(run)``: the callbacks every recipe's trainer gets (the guard, the run clock, verified checkpoints
  and the graceful stop), in one line; ``stops.train(trainer, run)`` runs the trainer under them.
- ``TrainingDiverged`` is a ``console.OneLineError``: ``console.run_command`` prints it as one line and exits
  with ``EXIT_DIVERGED``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from align_kit import files
from align_kit.console import EXIT_DIVERGED, OneLineError
from align_kit.training.checkpoints import ResumedSchedule, VerifiedCheckpoints
from align_kit.training.runs import RunClock, last_checkpoint
from align_kit.training.stops import StopOnSignal

DIVERGED_FILE = "diverged.json"


class TrainingDiverged(OneLineError, RuntimeError):
    """A loss or gradient norm became NaN or infinite; nothing after it was saved."""

    exit_code = EXIT_DIVERGED


def watched(key: str) -> bool:
    """Logged values the guard checks: losses (``loss``, ``eval_loss``, PPO's ``loss/policy_avg``), the gradient
    norm and PPO's objective terms. Other statistics may be NaN legitimately (a variance of one value)."""
    return "loss" in key or key == "grad_norm" or key.startswith("objective/")


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first non-finite gradient norm or logged loss (see the module docstring).

    The gradient norm is computed from the gradients before each optimizer step (transformers' own clipping
    norm is not passed to callbacks); with several processes the verdict is reduced over all of them, so
    every rank stops together. Trainers that run their own loop (TRL's PPO) call no optimizer hook: there
    the guard reads each update's logged statistics, before any checkpoint of that update is written.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return  # DeepSpeed keeps gradients in its own partitions: the logged grad_norm is checked instead
        norm = torch.nn.utils.get_total_norm(grads).detach()
        if isinstance(norm, DTensor):  # FSDP2: the norm of every rank's gradient shards, reduced
            norm = norm.full_tensor()
        norm = norm.float()
        bad = (~torch.isfinite(norm)).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            self.stop(args, state, "gradient norm", norm.item(), state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if watched(key) and isinstance(value, (int, float)) and not math.isfinite(value):
                self.stop(args, state, key, value, state.global_step)
        if (
            state.log_history
        ):  # a statistic that may be NaN is kept as null and flagged: strict trainer_state.json
            state.log_history[-1] = files.json_safe(state.log_history[-1])

    def stop(self, args, state, what: str, value: float, step: int) -> NoReturn:
        output_dir = Path(args.output_dir)
        good = last_checkpoint(output_dir) if output_dir.is_dir() else None
        if state.is_world_process_zero:
            report = {"step": step, "what": what, "value": str(value), "last_good_checkpoint": good}
            files.write_json(
                output_dir / DIVERGED_FILE, {**report, "log_history": state.log_history}, indent=2
            )
        kept = f"last good checkpoint {good}" if good else "no checkpoint was saved before it"
        raise TrainingDiverged(
            f"training diverged: {what} is {value} at step {step} ({kept}); the run is not marked complete "
            f"and no final model was written (details in {output_dir / DIVERGED_FILE})"
        )


def watch(run: Any) -> list[TrainerCallback]:
    """The callbacks every recipe adds to its trainer: the non-finite guard, the run clock, the checkpoint
    manifests and rotation (``checkpoints``) and the graceful stop on SIGTERM/SIGINT (``stops``)."""
    return [
        NonFiniteGuard(),
        RunClock(run),
        VerifiedCheckpoints(run.run_id, run.keep),
        ResumedSchedule(),
        StopOnSignal(),
    ]
