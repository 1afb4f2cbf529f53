"""The run directory: resolved config, data counts, metrics, completion marker; rank-aware logging.

A finished run is never overwritten, and an interrupted one resumes from its last checkpoint (best-of-N:
from its last finished round) only with the settings it was started with, so no run loses finished work
and no resumed run mixes two configurations unawares. No secret reaches a file of the run folder, and
every JSON file is written whole and strict (``align_kit.files``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from align_kit import files
from align_kit.configs import ConfigError, RunArgs
from align_kit.models import adapters
from align_kit.models.loading import source_problem
from align_kit.parsing import save_resolved, setting_source, to_dict

COMPLETE = "run_complete.json"
RUN_CONFIG = "run_config.json"
SETTINGS_CHANGES = "settings_changes.json"  # old and new values of every resume with changed settings
TRAINER_STATE_NAME = "trainer_state.json"  # the last file Trainer writes into a checkpoint
ROUND_REPORT = "report.json"  # the last file a best-of-N round writes: the round is finished
# Settings that may differ between the first start and a resume: the same folder spelled another way, the
# resume switches themselves, and secrets (never saved).
NOT_COMPARED = {
    "output_dir",
    "resume_from_checkpoint",
    "allow_changed_settings",
    "hub_token",
    "chat_template_used",
}  # chat_template_used: recorded once the data is read
# Fields whose value is a secret: written to no file of the run folder (hub_token goes to $HF_TOKEN).
SECRET_FIELD = re.compile(r"(^|_)(hub_token|secret|password|api_key|access_token|auth_token)$")
# Our config fields that name a model, adapter or reward-model folder (or a Hub id).
MODEL_SOURCES = (
    "model_name_or_path",
    "ref_model_name_or_path",
    "tokenizer_name_or_path",
    "adapter_path",
    "reward_stopping_model",
    "reward_models",
    "value_model_path",
)
logger = logging.getLogger("align_kit")


class RunRefused(FileExistsError):
    """The run folder cannot take this run: a finished run, a file, settings that differ from the interrupted
    run's, or a method that cannot resume. Nothing is written."""


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
        """Strict JSON (non-finite numbers as null, flagged), on the main process, whole or not at all."""
        if is_main_process():
            files.write_json(self.path(name), payload, indent=2)


def start(args: Any, *configs: Any, cannot_resume: str | None = None) -> Run:
    """Seed everything and check the run can start before anything is written: the output folder is a folder
    and holds no finished run, every local model folder named exists, and an interrupted run found there is
    resumed only with its own settings (or with ``--allow_changed_settings true``, recording both); a method
    that ``cannot_resume`` (a reason) refuses an interrupted run's checkpoint. Secrets are taken out of
    ``args`` before anything pickles it. Saves the resolved config."""
    set_seed(args.seed)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)
    refuse_unsharded_launch(bool(getattr(args, "use_cpu", False)))
    output_dir = Path(args.output_dir)
    refuse_output_dir(output_dir)
    check_model_sources(configs)
    run_args = next((c for c in configs if isinstance(c, RunArgs)), RunArgs())
    resume_from = args.resume_from_checkpoint
    if resume_from is not None and not _whole_json(Path(resume_from) / TRAINER_STATE_NAME):
        where = setting_source(args, "resume_from_checkpoint")
        raise ConfigError(f"{where}: resume_from_checkpoint: {resume_from} is no complete checkpoint")
    if resume_from is None and output_dir.is_dir():
        resume_from = last_checkpoint(output_dir)
    if resume_from and cannot_resume:
        raise RunRefused(
            f"{output_dir} holds {Path(resume_from).name} of an interrupted run, and {cannot_resume}: start "
            "again with another output_dir (align-kit deletes nothing)"
        )
    hide_secrets(args)
    settings = to_dict(*configs, args)
    changes = {}
    if resume_from or started_rounds(output_dir):
        changes = changed_settings(output_dir, settings)
        if changes and not run_args.allow_changed_settings:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise RunRefused(
                f"{output_dir} holds an interrupted run started with other settings ({listed}); start it "
                f"with its own settings, or add --allow_changed_settings true to resume with these (both are "
                "recorded), or choose another output_dir"
            )
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        if changes:
            record_changes(output_dir, changes, resume_from)
        save_resolved(str(output_dir / RUN_CONFIG), *configs, args)
    if resume_from:
        log(f"resuming from {resume_from}")
    return Run(output_dir, resume_from)


def refuse_output_dir(output_dir: Path) -> None:
    """RunRefused when ``output_dir`` (or a folder above it) is a file, or holds a finished run."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RunRefused(f"output_dir: {folder} is a file, not a folder")
            break
    if (output_dir / COMPLETE).exists():
        raise RunRefused(
            f"{output_dir} already holds a finished run ({COMPLETE}); choose another output_dir "
            "(align-kit never deletes finished work)."
        )


def check_model_sources(configs: tuple[Any, ...]) -> None:
    """ConfigError naming the setting for a model folder that does not exist or is an unfinished run
    (``models.source_problem``), before the run folder is touched or any model loads."""
    for config in configs:
        for name in MODEL_SOURCES:
            value = getattr(config, name, None)
            for source in value if isinstance(value, list) else [value]:
                problem = source_problem(str(source)) if source else None
                if problem:
                    raise ConfigError(f"{setting_source(config, name)}: {name}: {problem}")
        weights = getattr(config, "weights_file", None)
        if weights and not Path(weights).is_file():
            raise ConfigError(
                f"{setting_source(config, 'weights_file')}: weights_file: no such file {weights}"
            )


def hide_secrets(args: Any) -> None:
    """Take secret-looking fields out of the trainer config, which Trainer pickles into training_args.bin of
    every checkpoint: ``hub_token`` moves to ``$HF_TOKEN`` (where huggingface_hub finds it for pushing)."""
    for name in vars(args):
        value = getattr(args, name)
        if SECRET_FIELD.search(name) and isinstance(value, str) and value:
            if name == "hub_token":
                os.environ["HF_TOKEN"] = value
                log("hub_token moved to $HF_TOKEN for this process: no file of the run folder holds it")
            setattr(args, name, None)


def changed_settings(output_dir: Path, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Setting -> (value in the interrupted run's run_config.json, value now), for every one that differs."""
    saved_path = output_dir / RUN_CONFIG
    if not saved_path.exists():
        return {}
    saved = json.loads(saved_path.read_text())
    now = json.loads(files.dumps(settings))  # compared as they are saved
    keys = sorted((set(saved) | set(now)) - NOT_COMPARED - {files.NON_FINITE})
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def record_changes(output_dir: Path, changes: dict[str, tuple[Any, Any]], resume_from: str | None) -> None:
    """Append one resume's changed settings (old and new values) to settings_changes.json."""
    path = output_dir / SETTINGS_CHANGES
    history = json.loads(path.read_text()) if path.exists() else []
    history.append(
        {
            "resumed_from": resume_from,
            "finished_rounds": len(finished_rounds(Run(output_dir, None))),
            "changed": {k: {"before": old, "after": new} for k, (old, new) in changes.items()},
        }
    )
    files.write_json(path, history, indent=2)
    log(f"resuming with changed settings {sorted(changes)}: old and new values in {path}")


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


def finish(
    run: Run, trainer: Any | None, extra: dict[str, Any] | None = None, history: list | None = None
) -> dict[str, Any]:
    """Write metrics (final and per-step log history) and the completion marker; end the process group.

    The log history is the trainer's (restored from the checkpoint on a resume, so it covers the whole run),
    or ``history`` when no trainer ran in this process (a best-of-N run whose rounds were all finished).
    This is the last call of a run: with several processes it waits for all of them, then destroys
    the process group, without which some two-process runs aborted at exit.
    """
    history = trainer.state.log_history if trainer is not None else list(history or [])
    metrics = {"log_history": history, **(extra or {})}
    losses = [entry["loss"] for entry in history if "loss" in entry]
    metrics["first_loss"], metrics["last_loss"] = (losses[0], losses[-1]) if losses else (None, None)
    run.write_json("metrics.json", metrics)
    step = (
        trainer.state.global_step
        if trainer is not None
        else max((e.get("step", 0) for e in history), default=0)
    )
    run.write_json(COMPLETE, {"output_dir": str(run.output_dir), "global_step": step})
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
    """Save the trained model where every later stage can load it with ``align_kit.models.loading.load_model``.

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
    """Print and keep the data counts (layout, rows kept, dropped by reason, located examples); the chat
    template the rows were rendered with goes into run_config.json too (the evaluation reads it there)."""
    log("data:\n" + counts.summary())
    run.write_json("data_counts.json", counts.to_dict())
    if is_main_process() and counts.chat_template is not None:
        config = json.loads(run.path("run_config.json").read_text())
        run.write_json(
            "run_config.json", dict(sorted({**config, "chat_template_used": counts.chat_template}.items()))
        )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One strict JSON object per line, on the main process, written whole or not at all."""
    if is_main_process():
        files.write_text(path, "".join(files.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    """The rows ``write_jsonl`` wrote, or None when the file is absent."""
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def train_summary(run: Run, trainer: Any, result: Any) -> dict[str, Any]:
    """The ``train`` summary of the whole run, across a kill and resume: steps, epochs and FLOPs from the
    trainer state (restored from the checkpoint), the loss as the step-weighted mean of every logged training
    loss, the training seconds and processes behind the final weights (``RunClock``), and this process's own
    figures as transformers reports them (``this_process``)."""
    state = trainer.state
    logged = [(e["step"], e["loss"]) for e in state.log_history if "loss" in e and "step" in e]
    before = ([0] + [step for step, _ in logged])[:-1]  # the step of the previous logged loss
    steps = [step - previous for (step, _), previous in zip(logged, before, strict=True)]
    total = sum(steps)
    clock = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunClock)), None)
    return {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "total_flos": state.total_flos,
        "train_loss": sum(n * loss for n, (_, loss) in zip(steps, logged, strict=True)) / total
        if total
        else None,
        "train_runtime": clock.seconds() if clock else None,
        "processes": clock.processes() if clock else None,
        "resumed_from": run.resume_from,
        "this_process": result.metrics,
    }


class RunClock(TrainerCallback, ExportableState):
    """The training seconds and the number of processes behind the weights, kept in every checkpoint's
    trainer_state.json (as a stateful callback, written with it), so that a resumed run's summary covers the
    whole run. Work a killed process did after its last checkpoint is redone, and counted once."""

    def __init__(self, run: Run | None = None):
        self.train_seconds_before, self.processes_before, self.begin = 0.0, 0, None
        state_file = Path(run.resume_from) / TRAINER_STATE_NAME if run and run.resume_from else None
        if state_file is not None:
            saved = (
                json.loads(state_file.read_text()).get("stateful_callbacks", {}).get(type(self).__name__, {})
            )
            attributes = saved.get("attributes", {})
            self.train_seconds_before = attributes.get("train_seconds_before", math.nan)  # nan: not recorded
            self.processes_before = attributes.get("processes_before", 1)

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.monotonic()

    def seconds(self) -> float:
        return self.train_seconds_before + (time.monotonic() - self.begin if self.begin is not None else 0.0)

    def processes(self) -> int:
        return self.processes_before + 1

    def state(self) -> dict[str, Any]:
        """What a process resuming from this checkpoint starts from (transformers saves it with the state)."""
        return {
            "args": {},
            "attributes": {"train_seconds_before": self.seconds(), "processes_before": self.processes()},
        }


def round_dir(run: Run, index: int) -> Path:
    return run.path(f"round_{index}")


def round_model(run: Run, index: int) -> Path:
    """Where best-of-N round ``index`` keeps its policy: the next round (or a resume) starts from it."""
    return round_dir(run, index) / "model"


def refuse_unsharded_launch(use_cpu: bool) -> None:
    """One line, before anything loads, where the launcher asked for FSDP or DeepSpeed and the run cannot
    shard: accelerate would otherwise train as DDP (or fail deep inside the trainer) without saying so."""
    import torch

    on_cpu = use_cpu or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and on_cpu:
        raise ConfigError(
            "FSDP was requested (ACCELERATE_USE_FSDP) on CPU: align-kit does not run FSDP on CPUs (accelerate "
            "launches it as unsharded DDP); use recipes/accelerate/cpu_2proc.yaml, or FSDP on GPUs"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "DeepSpeed ZeRO was requested (ACCELERATE_USE_DEEPSPEED) but deepspeed is not installed: "
                'pip install -e ".[deepspeed]" on a GPU host'
            )
        if on_cpu:
            raise ConfigError("DeepSpeed ZeRO was requested on CPU: align-kit runs ZeRO on GPUs only")


def started_rounds(output_dir: Path) -> bool:
    """True when a best-of-N run in ``output_dir`` got as far as sampling a round."""
    return any(output_dir.glob("round_*/samples.jsonl"))


def finished_rounds(run: Run) -> list[dict[str, Any]]:
    """The reports of the best-of-N rounds finished in order from round 1 (report and model both written)."""
    reports = []
    while _whole_json(round_dir(run, len(reports) + 1) / ROUND_REPORT):
        index = len(reports) + 1
        if not any(round_model(run, index).glob("*.json")):
            break
        reports.append(json.loads((round_dir(run, index) / ROUND_REPORT).read_text()))
    return reports


def copy_model(source: Path, run: Run) -> None:
    """Copy a saved model's files (weights, config, tokenizer) into the run folder, each whole or not at all."""
    if is_main_process():
        for item in sorted(source.iterdir()):
            if item.is_file():
                tmp = run.path(f"{item.name}.tmp{os.getpid()}")
                shutil.copyfile(item, tmp)
                os.replace(tmp, run.path(item.name))
