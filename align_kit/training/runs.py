"""The run directory: resolved config, data counts, metrics, completion marker; rank-aware logging.

A finished run is never overwritten, a folder align-kit did not make is never written into, one process at a
time holds a run folder (``run_folder``), and an interrupted run resumes from its newest verified checkpoint
(``checkpoints``; best-of-N: from its last finished round) only with the settings it was started with, so no run loses finished work
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

from align_kit import files
from align_kit.configs import ConfigError, DataArgs, ModelArgs, RunArgs
from align_kit.console import OneLineError, is_main_process, log
from align_kit.data.loading import count_cut
from align_kit.data.prompts import TOKENIZER, chat_format
from align_kit.models import adapters, shapes
from align_kit.models.loading import load_tokenizer, source_problem, tokenizer_source
from align_kit.parsing import setting_source, to_dict
from align_kit.training import checkpoints, launch, run_folder

COMPLETE = "run_complete.json"
RUN_CONFIG = "run_config.json"
SETTINGS_CHANGES = "settings_changes.json"  # old and new values of every resume with changed settings
TRAINER_STATE_NAME = "trainer_state.json"  # the last file Trainer writes into a checkpoint
ROUND_REPORT = "report.json"  # the last file a best-of-N round writes: the round is finished
# Settings that may differ between the first start and a resume: the same folder spelled another way, the
# resume switches themselves, and secrets (never saved).
NOT_COMPARED = {
    "output_dir",
    "run_id",
    "resume_from_checkpoint",
    "allow_changed_settings",
    "hub_token",
    "chat_template_used",
}  # chat_template_used: derived from chat_template and the tokenizer (runs of older versions lack it)
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
# Settings a resume cannot apply: the checkpoint's optimizer and scheduler states bring back the values they
# were made with, so a change would be recorded but never run. Refused even with --allow_changed_settings.
NOT_APPLIED_ON_RESUME = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim")
logger = logging.getLogger("align_kit")


class RunRefused(OneLineError, FileExistsError):
    """The run folder cannot take this run: a finished run, a file, settings that differ from the interrupted
    run's, or a method that cannot resume. Nothing is written."""


@dataclass
class Run:
    """A run's output folder and whether it resumes an interrupted run."""

    output_dir: Path
    resume_from: str | None
    run_id: str = ""  # named in every checkpoint manifest of the run (``checkpoints``)
    keep: int | None = None  # the run's save_total_limit, applied by ``checkpoints.rotate``
    long_rows: tuple[int, str] | None = None  # (the trainer's max_length, what TRL does to longer rows)

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
    launch.refuse_unsharded_launch(bool(getattr(args, "use_cpu", False)))
    output_dir = Path(args.output_dir)
    refuse_output_dir(output_dir, args)
    shapes.resolve_random_model(configs)  # random:<shape> -> its folder, built on this run's data
    check_model_sources(configs)
    run_args = next((c for c in configs if isinstance(c, RunArgs)), RunArgs())
    launch.keep_freed_memory(run_args.keep_freed_memory, launch.cpu_autocast(args))
    resume_from = args.resume_from_checkpoint
    if resume_from is not None:
        problem = checkpoints.checkpoint_problem(Path(resume_from))
        if problem:
            where = setting_source(args, "resume_from_checkpoint")
            raise ConfigError(
                f"{where}: resume_from_checkpoint: {resume_from} is no verified checkpoint: {problem}"
            )
    if resume_from is None and output_dir.is_dir():
        resume_from = last_checkpoint(output_dir)
    if resume_from and cannot_resume:
        raise RunRefused(
            f"{output_dir} holds {Path(resume_from).name} of an interrupted run, and {cannot_resume}: start "
            "again with another output_dir (align-kit deletes nothing)"
        )
    hide_secrets(args)
    settings = to_dict(*configs, args)
    used = chat_template_used(configs)
    if used is not None:  # the evaluation renders the run's answers the same way (data.loading)
        settings["chat_template_used"] = used
    changes = {}
    if resume_from or started_rounds(output_dir):
        changes = changed_settings(output_dir, settings)
        fixed = [k for k in NOT_APPLIED_ON_RESUME if k in changes]
        if fixed and resume_from:
            listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed)
            raise RunRefused(
                f"{output_dir}: {listed} cannot change on resume: {Path(resume_from).name}'s optimizer and "
                "scheduler states would bring back the old value; resume with it, or start a new run"
            )
        if changes and not run_args.allow_changed_settings:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise RunRefused(
                f"{output_dir} holds an interrupted run started with other settings ({listed}); start it "
                f"with its own settings, or add --allow_changed_settings true to resume with these (both are "
                "recorded), or choose another output_dir"
            )
    # Every check above only reads; the lock is the first thing written into the folder.
    refusal, note = run_folder.take_lock(output_dir)
    if refusal:
        raise RunRefused(refusal)
    if note:
        log(note)
    refuse_output_dir(output_dir, args)  # a run that finished while this one was checking
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        if changes:
            record_changes(output_dir, changes, resume_from)
        files.write_json(output_dir / RUN_CONFIG, settings, indent=2, sort_keys=True)  # written once
    run_folder.record_labelling_mark(output_dir, configs)
    if resume_from:
        log(f"resuming from {resume_from}")
    keep, args.save_total_limit = args.save_total_limit, None  # rotation is ours: checkpoints.rotate
    limit = getattr(args, "max_length", None)  # longer rows: TRL's RewardTrainer drops them, the others cut
    long_rows = (limit, "dropped" if type(args).__name__ == "RewardConfig" else "cut") if limit else None
    return Run(output_dir, resume_from, checkpoints.run_id(output_dir), keep, long_rows)


def refuse_output_dir(output_dir: Path, args: Any = None) -> None:
    """RunRefused when ``output_dir`` (or a folder above it) is a file, holds a finished run, or holds files
    align-kit did not write (``run_folder.foreign_files``)."""
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
    source = setting_source(args, "output_dir") if args is not None else "default"
    config_file = source.rsplit(":", 1)[0] if source.endswith(tuple("0123456789")) else None
    foreign = run_folder.foreign_files(output_dir, config_file)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunRefused(
            f"output_dir: {output_dir} is not empty and is no align-kit run folder (it holds {shown}); "
            "align-kit writes only into a new or empty folder or its own run folder: choose another output_dir"
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
                    raise ConfigError(f"{setting_source(config, name)}: {name}: {problem}", field=name)
        weights = getattr(config, "weights_file", None)
        if weights and not Path(weights).is_file():
            raise ConfigError(
                f"{setting_source(config, 'weights_file')}: weights_file: no such file {weights}",
                field="weights_file",
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
    """The newest verified checkpoint (``checkpoints.checkpoint_problem``); each newer one skipped is named
    with the file that failed. A run killed while saving leaves a checkpoint without its manifest."""
    folder, skipped = checkpoints.newest_verified(output_dir)
    for line in skipped:
        log(line)
    return str(folder) if folder else None


def _whole_json(path: Path) -> bool:
    """True when ``path`` exists and parses: a kill during its write leaves it cut short."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def finish(
    run: Run,
    trainer: Any | None,
    extra: dict[str, Any] | None = None,
    history: list | None = None,
    marker: dict[str, Any] | None = None,
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
    origin = model_origin(trainer)
    if is_main_process() and run.path(RUN_CONFIG).exists():
        run_folder.write_model_card(run.output_dir, method_name(trainer), origin)
    run.write_json(
        COMPLETE, {"output_dir": str(run.output_dir), "global_step": step, **origin, **(marker or {})}
    )
    log(f"done: outputs in {run.output_dir}")
    state = PartialState()
    if state.use_distributed:
        state.wait_for_everyone()
        state.destroy_process_group()
    run_folder.release_lock(run.output_dir)
    return metrics


def method_name(trainer: Any | None) -> str:
    """The training method as TRL tags it (sft, dpo, kto, reward-trainer, grpo, ppo), or best-of-N."""
    if trainer is None:
        return "best-of-N"
    tags = [t for t in getattr(trainer, "_tag_names", []) if t != "trl"]
    return tags[0] if tags else type(trainer).__name__


def model_origin(trainer: Any | None) -> dict[str, Any]:
    """Which weights became the run's model, and why: the best checkpoint (its metric and value) when
    ``load_best_model_at_end`` loaded one, else the last step."""
    if trainer is None:
        return {"model_from": "last round", "why": "best-of-N keeps the policy of its last round"}
    state, args = trainer.state, trainer.args
    if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint:
        metric = args.metric_for_best_model or "loss"
        return {
            "model_from": Path(state.best_model_checkpoint).name,
            "why": f"best {metric} ({'greater' if args.greater_is_better else 'lower'} is better)",
            "best_metric": {metric: state.best_metric},
        }
    return {"model_from": f"step {state.global_step}", "why": "the last step (load_best_model_at_end is off)"}


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


def chat_template_used(configs: tuple[Any, ...]) -> str | None:
    """The chat format a run's data will be rendered with (``data.prompts.chat_format``'s name), known
    before any data loads, so run_config.json is written once: the tokenizer is read only when the setting
    depends on it (auto, tokenizer). None for a run without data and model settings."""
    data = next((c for c in configs if isinstance(c, DataArgs)), None)
    model = next((c for c in configs if isinstance(c, ModelArgs)), None)
    if data is None or model is None:
        return None
    tokenizer = None
    if data.chat_template in ("auto", TOKENIZER):
        tokenizer = load_tokenizer(tokenizer_source(model), model.model_revision)
    try:
        return chat_format(data.chat_template, tokenizer).name
    except ValueError as error:  # chat_template: tokenizer, and the tokenizer has none
        raise ConfigError(
            f"{setting_source(data, 'chat_template')}: {error}", field="chat_template"
        ) from None


def record_data(run: Run, counts: Any) -> None:
    """Print and keep the data counts (layout, rows kept, dropped by reason, located examples); the chat
    template is in run_config.json already (``chat_template_used``); rows over max_length are counted."""
    count_cut(counts, *(run.long_rows or (None,)))
    log("data:\n" + counts.summary())
    run.write_json("data_counts.json", counts.to_dict())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One strict JSON object per line, on the main process, written whole or not at all."""
    if is_main_process():
        files.write_text(path, "".join(files.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]] | None:
    """The rows ``write_jsonl`` wrote, or None when the file is absent."""
    return files.read_jsonl(path) if path.exists() else None


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
    """Where round ``index`` (best-of-N, iterative DPO) keeps its policy: the next round (or a resume) starts
    from it."""
    return round_dir(run, index) / "model"


def started_rounds(output_dir: Path) -> bool:
    """True when a run of rounds (best-of-N, iterative DPO) in ``output_dir`` got as far as sampling one."""
    return any(output_dir.glob("round_*/samples.jsonl"))


def finished_rounds(run: Run) -> list[dict[str, Any]]:
    """The reports of the rounds (best-of-N, iterative DPO) finished in order from round 1 (report and model
    both written)."""
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
