"""Protects two-process runs (DDP on gloo, two CPU processes): both ranks end with the same weights, the
losses equal a one-process run at the same global batch, the embedded model and task are generated safely
by two processes at once, and the run folder and log are written once, by rank 0."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_recipe, tiny_run_args

from align_kit.configs import ModelArgs
from align_kit.models.loading import embedded_dir, load_model

pytestmark = pytest.mark.slow

ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
STEPS = 3
RUN_FILES = {
    "run_config.json", "data_counts.json", "metrics.json", "run_complete.json", "config.json",
    "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_args.bin",
    "README.md", "run.lock", "run.lock.json", "run_id.json",  # model card; the run folder's lock and run id
}  # fmt: skip

# Runs a recipe's main(), writes a checksum of this rank's weights (its own shards under FSDP) and how many
# parameter elements it holds just before the model is saved, and notes whether the process group was ended.
# It lives here, not in align_kit: production code carries no test hooks.
WRAPPER = """
import importlib.util, json, os, sys
from pathlib import Path
from align_kit.training import runs
sys.path.insert(0, {tests!r})
from test_multiprocess import held_elements, weights_checksum

spec = importlib.util.spec_from_file_location("recipe", sys.argv[1])
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
save_model = runs.save_model

def save_model_with_checksum(run, trainer, *args):
    model = trainer.accelerator.unwrap_model(trainer.model)
    Path(os.environ["CHECKSUM_DIR"], "rank" + os.environ["RANK"]).write_text(weights_checksum(model))
    Path(os.environ["CHECKSUM_DIR"], "held" + os.environ["RANK"]).write_text(json.dumps(held_elements(model, trainer.optimizer)))
    return save_model(run, trainer, *args)

runs.save_model = save_model_with_checksum
recipe.main(sys.argv[2:])
import torch.distributed
if not torch.distributed.is_initialized():  # runs.finish ended the process group
    Path(os.environ["CHECKSUM_DIR"], "closed" + os.environ["RANK"]).write_text("")
"""


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and exact bytes (bit-identical weights <=> equal checksums); under
    FSDP, over this rank's shards."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(local(param).detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank stores of ``tensor``: its shard of an FSDP2 DTensor or a ZeRO-3 parameter, else all."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)


def held_elements(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter elements this rank stores ("held"), the model has ("total"), and optimizer-state elements
    this rank stores ("optimizer"; AdamW keeps two per parameter element)."""
    params = list(model.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper; DeepSpeed's ZeRO optimizer
    moments = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    return {
        "held": sum(local(p).numel() for p in params),
        "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "optimizer": sum(local(v).numel() for v in moments),
    }


def launch_two_processes(
    recipe: str, args: list[str], tmp_path: Path, home: Path, config: Path = ACCELERATE_CONFIG, *flags: str
) -> tuple[str, Path]:
    """``accelerate launch --config_file config *flags`` (default: DDP) a recipe on two CPU processes;
    returns (captured stdout+stderr, checksum folder)."""
    wrapper = tmp_path / "run_with_checksum.py"
    wrapper.write_text(WRAPPER.format(tests=str(ROOT / "tests")))
    checksums = tmp_path / "checksums"
    checksums.mkdir()
    env = {**os.environ, "ALIGN_KIT_HOME": str(home), "CHECKSUM_DIR": str(checksums), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags]
    command += [str(wrapper), str(ROOT / "recipes" / f"{recipe}.py"), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log, checksums


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(history: list[dict]) -> list[dict]:
    keys = ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected")
    return [{k: entry[k] for k in keys} for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def dpo_two_and_one(tmp_path_factory):
    """The same DPO run twice: 2 processes x 4 rows per device, then 1 process x 8 rows (in-process).

    The two-process run starts from an empty ALIGN_KIT_HOME, so both ranks build the embedded model
    and task at the same moment; the one-process run then reuses exactly those files.
    """
    tmp = tmp_path_factory.mktemp("mp")
    home = tmp / "home"
    common = {"learning_rate": 1e-3, "beta": 0.1, "loss_type": "sigmoid", "max_steps": STEPS}
    two_args = tiny_run_args(
        tmp / "two", per_device_train_batch_size=4, ddp_find_unused_parameters="false", **common
    )
    log, checksums = launch_two_processes("dpo", two_args, tmp, home)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALIGN_KIT_HOME", str(home))
        one = load_recipe("dpo").main(tiny_run_args(tmp / "one", per_device_train_batch_size=8, **common))
    return {
        "dir": tmp / "two",
        "log": log,
        "checksums": checksums,
        "home": home,
        "one": one,
        "one_dir": tmp / "one",
    }


def test_both_ranks_end_with_identical_weights_save_them_and_close(dpo_two_and_one):
    checksums = dpo_two_and_one["checksums"]
    assert sorted(p.name for p in checksums.iterdir()) == [
        "closed0",
        "closed1",
        "held0",
        "held1",
        "rank0",
        "rank1",
    ]
    rank0, rank1 = (checksums / "rank0").read_text(), (checksums / "rank1").read_text()
    assert rank0 == rank1
    for rank in (0, 1):  # DDP: every rank holds the whole model and both AdamW moments of it
        held = json.loads((checksums / f"held{rank}").read_text())
        assert held["held"] == held["total"] > 0
        assert held["optimizer"] == 2 * held["total"]
    saved = load_model(ModelArgs(model_name_or_path=str(dpo_two_and_one["dir"])))
    assert weights_checksum(saved) == rank0


def test_losses_equal_one_process_at_the_same_global_batch(dpo_two_and_one):
    two = json.loads((dpo_two_and_one["dir"] / "metrics.json").read_text())
    one = dpo_two_and_one["one"]
    two_losses, one_losses = losses(two["log_history"]), losses(one["log_history"])
    assert len(two_losses) == len(one_losses) == STEPS
    for step_two, step_one in zip(two_losses, one_losses, strict=True):
        for key, value in step_one.items():
            # Only the order of float sums differs (gradients all-reduced, batch split in two).
            assert step_two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert one_losses[-1]["loss"] < one_losses[0]["loss"]  # it trained, so later steps test the sync
    two_model = load_model(ModelArgs(model_name_or_path=str(dpo_two_and_one["dir"])))
    one_model = load_model(ModelArgs(model_name_or_path=str(dpo_two_and_one["one_dir"])))
    one_state = one_model.state_dict()
    worst = max(
        (value - one_state[name]).abs().max().item() for name, value in two_model.state_dict().items()
    )
    assert worst < 1e-4


def test_run_folder_and_log_are_written_once(dpo_two_and_one):
    out, log = dpo_two_and_one["dir"], dpo_two_and_one["log"]
    assert {p.name for p in out.iterdir()} == RUN_FILES  # nothing half-written, no per-rank copies
    complete = json.loads((out / "run_complete.json").read_text())
    assert complete["global_step"] == STEPS
    assert len(losses(json.loads((out / "metrics.json").read_text())["log_history"])) == STEPS
    assert log.count("[align-kit] data:") == 1
    assert log.count("[align-kit] trainable") == 1
    assert log.count("[align-kit] done:") == 1
    assert log.count("{'loss':") == STEPS  # the trainer's per-step line, printed by rank 0 only


def test_embedded_model_and_task_built_whole_by_two_ranks_at_once(dpo_two_and_one):
    home = dpo_two_and_one["home"]
    names = sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.name.endswith(".lock"))
    assert not [n for n in names if "tmp" in n], names
    task = next(p for p in (home / "embedded").iterdir() if p.is_dir())
    rows = read_jsonl(task / "train.jsonl")
    assert len(rows) == 48 and all(set(r) == {"chosen", "rejected"} for r in rows)
    assert (home / embedded_dir().name / "model.safetensors").exists()


def test_two_process_evaluation_gives_the_same_numbers_as_one_process(dpo_two_and_one, tmp_path):
    """eval/win_rate.py under the same launcher: ranks split the greedy generation, rank 0 judges; every
    number in each judge's results.json equals the one-process evaluation's."""
    from transformers import GPT2ForSequenceClassification

    from align_kit.evaluation import pipeline as evaluation
    from align_kit.models.loading import build_byte_tokenizer, build_tiny_gpt2

    home = dpo_two_and_one["home"]
    reward_model = tmp_path / "reward"  # a random scorer, saved: its verdicts vary, unlike the oracle's here
    scorer_config = build_tiny_gpt2().config
    scorer_config.num_labels = 1
    GPT2ForSequenceClassification(scorer_config).save_pretrained(reward_model)
    build_byte_tokenizer().save_pretrained(reward_model)
    config = tmp_path / "eval.yaml"
    settings = {
        "systems": f"[base={home / embedded_dir().name}, dpo={dpo_two_and_one['dir']}]",
        "base": "base",
        "judges": f"[oracle, reward_model={reward_model}]",
        "dataset": "embedded", "embedded_train_size": 48, "embedded_test_size": 24,
        "n_prompts": 12, "max_new_tokens": 8, "batch_size": 4, "n_honeypots": 4, "n_human": 8, "n_boot": 200,
        "progress": "false", "seed": 0,
    }  # fmt: skip
    config.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    env = {**os.environ, "ALIGN_KIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG)]
    command += ["eval/win_rate.py", "--config", str(config), "--output_dir", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALIGN_KIT_HOME", str(home))
        evaluation.main(["--config", str(config), "--output_dir", str(tmp_path / "one")])

    for system in ("base", "dpo"):
        two, one = (read_jsonl(tmp_path / run / "generations" / f"{system}.jsonl") for run in ("two", "one"))
        assert [r["num_processes"] for r in two] == [2] * 12 and [r["num_processes"] for r in one] == [1] * 12
        assert [(r["prompt"], r["answer"]) for r in two] == [(r["prompt"], r["answer"]) for r in one]
    for judge in ("oracle", "reward_model"):
        two, one = (
            json.loads((tmp_path / run / judge / "results.json").read_text()) for run in ("two", "one")
        )
        assert two == one, judge
    scored = json.loads((tmp_path / "two" / "reward_model" / "results.json").read_text())
    assert sum(c["counts"]["win"] + c["counts"]["loss"] for c in scored["comparisons"]) > 0  # not all ties


def _first_use_of_embedded_task(home: str, barrier) -> None:
    from align_kit.configs import DataArgs
    from align_kit.data.formats import embedded_folder

    os.environ["ALIGN_KIT_HOME"] = home
    barrier.wait()  # all processes ask for the missing task at the same moment
    embedded_folder(DataArgs(embedded_train_size=3000, embedded_test_size=300))


def test_concurrent_first_use_of_the_embedded_task_leaves_it_whole(tmp_path):
    """Four processes at once (the old shared tmp name failed 15 of 20 such processes)."""
    from align_kit.data import task

    context = multiprocessing.get_context("fork")  # the children run plain Python only, so fork is safe
    barrier = context.Barrier(4)
    processes = [
        context.Process(target=_first_use_of_embedded_task, args=(str(tmp_path), barrier)) for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    folder = next(p for p in (tmp_path / "embedded").iterdir() if p.is_dir())
    assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl"]  # no tmp files left
    expected = task.write(tmp_path / "single", 3000, 300, seed=0)
    for split, path in expected.items():
        assert (folder / f"{split}.jsonl").read_bytes() == path.read_bytes()


def test_two_process_adapter_run_saves_the_adapter_both_ranks_trained(dpo_two_and_one, tmp_path):
    """DPO with a residual adapter on two ranks: the adapter is saved from the state dict every rank
    gathers, and reloading it onto the base gives the weights both ranks ended with."""
    from align_kit.models.adapters import CONFIG_NAME, WEIGHTS_NAME, has_adapters

    home = dpo_two_and_one["home"]
    args = tiny_run_args(
        tmp_path / "adapter", model_name_or_path=dpo_two_and_one["dir"], per_device_train_batch_size=4,
        learning_rate=1e-2, loss_type="sigmoid", max_steps=STEPS, adapter="residual", adapter_rank=8,
        ddp_find_unused_parameters="false",
    )  # fmt: skip
    _, checksums = launch_two_processes("dpo", args, tmp_path, home)
    rank0, rank1 = (checksums / "rank0").read_text(), (checksums / "rank1").read_text()
    assert rank0 == rank1
    out = tmp_path / "adapter"
    assert (out / WEIGHTS_NAME).exists() and (out / CONFIG_NAME).exists()
    assert not (out / "model.safetensors").exists()
    reloaded = load_model(ModelArgs(model_name_or_path=str(out)))
    assert has_adapters(reloaded) and weights_checksum(reloaded) == rank0
