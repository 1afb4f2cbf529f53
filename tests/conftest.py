"""Shared test setup: offline, CPU only, generated assets in a per-session folder, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from align_kit.judges.protocol import JudgeStats
from align_kit.models.loading import (
    EMBEDDED_NAME,
    TinyGPT2Shape,
    build_byte_tokenizer,
    build_tiny_gpt2,
    load_reward_model,
)
from align_kit.resources import load_script

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"

# Tests never download: any Hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session", autouse=True)
def align_kit_home(tmp_path_factory) -> Path:
    """Embedded model and task are generated into a fresh folder, never the user's cache."""
    home = tmp_path_factory.mktemp("align_kit_home")
    os.environ["ALIGN_KIT_HOME"] = str(home)
    return home


def load_recipe(name: str):
    """Import recipes/<name>.py as a module."""
    return load_script(ROOT / "recipes" / f"{name}.py", f"recipe_{name}")


CPU_ARGS = [
    "--use_cpu",
    "true",
    "--bf16",
    "false",
    "--gradient_checkpointing",
    "false",
    "--report_to",
    "none",
]


def tiny_run_args(output_dir: Path, **overrides) -> list[str]:
    """Command-line arguments for a few-step recipe run on a small embedded task."""
    values = {
        "dataset": "embedded",
        "embedded_train_size": "48",
        "embedded_test_size": "24",
        "output_dir": str(output_dir),
        "max_steps": "3",
        "per_device_train_batch_size": "8",
        "per_device_eval_batch_size": "8",
        "logging_steps": "1",
        "save_strategy": "no",
        "eval_strategy": "no",
        "max_length": "128",
        "dataloader_num_workers": "0",
        "seed": "0",
    }
    return recipe_argv({**values, **overrides})


def recipe_argv(values: dict, *extra: str) -> list[str]:
    """``--key value`` for every setting (values as strings), then ``extra``, then the CPU settings."""
    return [item for key, value in values.items() for item in (f"--{key}", str(value))] + [*extra, *CPU_ARGS]


def group_sampling_args(out, specs, **overrides) -> list[str]:
    """Two steps of a group-sampling recipe (GRPO, RLOO) on the embedded task with reward specs ``specs``."""
    values = {
        "model_name_or_path": EMBEDDED_NAME,
        "dataset": "embedded",
        "embedded_train_size": "48",
        "embedded_test_size": "24",
        "output_dir": str(out),
        "max_steps": "2",
        "per_device_train_batch_size": "8",
        "num_generations": "4",
        "max_completion_length": "8",
        "learning_rate": "1e-3",
        "beta": "0.1",
        "report_prompts": "4",
        "report_max_new_tokens": "8",
        "logging_steps": "1",
        "save_strategy": "no",
        "seed": "0",
        **overrides,
    }
    return recipe_argv(values, "--reward_funcs", *specs)


class ScriptedJudge:
    """The one judge double of the suite: ``verdict(item)`` gives each single-order answer ('A', 'B',
    'tie', or None for a parse failure); every pair asked and every parse failure is counted."""

    def __init__(self, verdict, name: str = "scripted", batch_size: int = 4, identity: str | None = None):
        self.verdict, self.name, self.batch_size = verdict, name, batch_size
        self.identity = identity or f"{name}:v1"
        self.stats = JudgeStats()

    def judge_batch(self, items):
        self.stats.calls += len(items)
        verdicts = [self.verdict(item) for item in items]
        self.stats.parse_failures += sum(v is None for v in verdicts)
        return verdicts


def keyword_judge(
    keyword: str = "good", always=None, fail_marker: str = "[unparseable]", name: str = "fake", batch_size=4
) -> ScriptedJudge:
    """Prefers the answer containing ``keyword`` (tie when both or neither do); ``always`` answers that
    for every pair (a fully position-biased judge); a prompt containing ``fail_marker`` does not parse."""

    def verdict(item):
        if fail_marker in item.prompt:
            return None
        if always is not None:
            return always
        in_a, in_b = keyword in item.answer_a, keyword in item.answer_b
        return "A" if in_a and not in_b else "B" if in_b and not in_a else "tie"

    return ScriptedJudge(verdict, name, batch_size, identity=f"fake:{keyword}:{always}:{fail_marker}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny GPT-2 and its byte tokenizer saved as a model folder, once per session."""
    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny_gpt2().save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    """A reward model (random score head) on the embedded tiny GPT-2, saved once per session."""
    import torch

    folder = tmp_path_factory.mktemp("tiny_reward")
    torch.manual_seed(0)
    load_reward_model(EMBEDDED_NAME, pad_token_id=257).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide GPT-2 (25k parameters) with the byte tokenizer, for tests that run a recipe many
    times: a step takes milliseconds, so a run costs little more than the trainer's own overhead."""
    folder = tmp_path_factory.mktemp("micro_model")
    build_tiny_gpt2(TinyGPT2Shape(n_layer=1, n_embd=32, n_head=2, n_positions=256)).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread_and_a_frozen_heap():
    """For modules of many short recipe runs: one intra-op thread (faster on tensors this small, and far
    faster on shared cores), and the objects alive now frozen out of the cyclic garbage collector that
    accelerate runs at every train(). Both are undone at the end of the module."""
    import gc

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reward_folders(tmp_path_factory) -> list[str]:
    """Two untrained reward models (tiny-gpt2 backbone, seeded new heads) with their reward scales."""
    import json

    import torch

    from align_kit.models import rewards

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"rm{seed}")
        load_reward_model(EMBEDDED_NAME, pad_token_id=257).save_pretrained(folder)
        (folder / rewards.SCALE_FILE).write_text(json.dumps({"mean": 0.0, "std": 0.1}))
        folders.append(str(folder))
    return folders


def max_change(a, b) -> float:
    """Largest absolute difference between two models' weights."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
