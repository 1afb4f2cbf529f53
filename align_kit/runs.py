"""The run directory: resolved config, data counts, metrics, completion marker; rank-aware logging.

A finished run is never overwritten, and an interrupted one resumes from its last checkpoint, so
no run loses finished work.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from align_kit import adapters
from align_kit.configs import save_resolved

COMPLETE = "run_complete.json"
TRAINER_STATE_NAME = "trainer_state.json"  # the last file Trainer writes into a checkpoint
logger = logging.getLogger("align_kit")


def is_main_process() -> bool:
    return PartialState().is_main_process


def log(message: str) -> None:
    """Print on the main process only (one line per event, whatever the process count)."""
    if is_main_process():
        print(f"[align-kit] {message}", flush=True)


@dataclass
class Run:
    """A run's output folder and whether it resumes an interrupted run."""

    output_dir: Path
    resume_from: str | None

    def path(self, name: str) -> Path:
        return self.output_dir / name

    def write_json(self, name: str, payload: Any) -> None:
        if is_main_process():
            tmp = self.path(name + ".tmp")
            tmp.write_text(json.dumps(payload, indent=2, default=str))
            tmp.replace(self.path(name))


def start(args: Any, *configs: Any) -> Run:
    """Seed everything, refuse to clobber a finished run, find a checkpoint to resume, save the config."""
    set_seed(args.seed)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)
    output_dir = Path(args.output_dir)
    if (output_dir / COMPLETE).exists():
        raise FileExistsError(
            f"{output_dir} already holds a finished run ({COMPLETE}); choose another output_dir "
            "(align-kit never deletes finished work)."
        )
    resume_from = args.resume_from_checkpoint
    if resume_from is None and output_dir.is_dir():
        resume_from = last_checkpoint(output_dir)
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(str(output_dir / "run_config.json"), *configs, args)
    if resume_from:
        log(f"resuming from {resume_from}")
    return Run(output_dir, resume_from)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint that was written to the end (``trainer_state.json`` is its last file).

    A run killed while saving leaves a partial folder; resuming from it would load half a state or
    restart at step 0 with its weights, so it is skipped (and later overwritten by the trainer).
    """
    steps = {}
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if step.isdigit() and _whole_json(folder / TRAINER_STATE_NAME):
            steps[int(step)] = folder
    return str(steps[max(steps)]) if steps else None


def _whole_json(path: Path) -> bool:
    """True when ``path`` exists and parses: a kill during its write leaves it cut short."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def finish(run: Run, trainer: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write metrics (final and per-step log history) and the completion marker; end the process group.

    This is the last call of a run: with several processes it waits for all of them, then destroys
    the process group, without which some two-process runs aborted at exit.
    """
    history = trainer.state.log_history
    metrics = {"log_history": history, **(extra or {})}
    losses = [entry["loss"] for entry in history if "loss" in entry]
    metrics["first_loss"], metrics["last_loss"] = (losses[0], losses[-1]) if losses else (None, None)
    run.write_json("metrics.json", metrics)
    run.write_json(COMPLETE, {"output_dir": str(run.output_dir), "global_step": trainer.state.global_step})
    log(f"done: outputs in {run.output_dir}")
    state = PartialState()
    if state.use_distributed:
        state.wait_for_everyone()
        state.destroy_process_group()
    return metrics


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def save_model(
    run: Run, trainer: Any, tokenizer: Any, base_model: str, adapter_args: Any
) -> dict[str, Any] | None:
    """Save the trained model where every later stage can load it with ``align_kit.models.load_model``.

    With an adapter only the adapter weights and their config are written (``Trainer.save_model``
    would write renamed keys that ``from_pretrained`` silently ignores), from the full state dict that
    every rank gathers (under FSDP and ZeRO-3 a rank holds only a shard); that state dict is returned
    on the main process, for other trained parts such as a reward head. Otherwise the full model is
    saved and None returned.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = None
    if adapters.has_adapters(model):
        state = trainer.accelerator.get_state_dict(trainer.model)  # collective: every rank calls it
        if is_main_process():
            adapters.save_adapter(
                model, run.output_dir, base_model=base_model, args=adapter_args, state=state
            )
    else:
        trainer.save_model(str(run.output_dir))  # collective under FSDP/DeepSpeed: every rank calls it
    if is_main_process():
        tokenizer.save_pretrained(str(run.output_dir))
    return state if is_main_process() else None


def record_data(run: Run, counts: Any) -> None:
    """Print and keep the data counts (rows kept, dropped by reason, located examples)."""
    log("data:\n" + counts.summary())
    run.write_json("data_counts.json", counts.to_dict())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, on the main process, written whole or not at all (temporary file, rename)."""
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(path)


def record_policy(run: Run, report: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Keep and print an online method's final report: sample answers, reward of greedy answers (the
    policy's against the reference's), and the sampled KL to the reference."""
    run.write_json("samples.json", samples)
    for sample in samples[:3]:
        log(f"sample: {sample['prompt'][-60:]!r} -> {sample['answer']!r} (reward {sample['reward']:+.2f})")
    log(
        f"greedy reward {report['reward_reference']:+.3f} -> {report['reward_policy']:+.3f}; "
        f"KL to reference {report['kl_to_reference']:.3f} nats per answer"
    )
