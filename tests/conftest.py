"""Shared test setup: offline, CPU only, generated assets in a per-session folder, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from align_kit.demo import load_script

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
    values.update({k: str(v) for k, v in overrides.items()})
    args = [item for key, value in values.items() for item in (f"--{key}", value)]
    return args + CPU_ARGS


@pytest.fixture(scope="module")
def reward_folders(tmp_path_factory) -> list[str]:
    """Two untrained reward models (tiny-gpt2 backbone, seeded new heads) with their reward scales."""
    import json

    import torch

    from align_kit import rewards
    from align_kit.models import EMBEDDED_NAME

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"rm{seed}")
        rewards.load_reward_model(EMBEDDED_NAME, pad_token_id=257).save_pretrained(folder)
        (folder / rewards.SCALE_FILE).write_text(json.dumps({"mean": 0.0, "std": 0.1}))
        folders.append(str(folder))
    return folders


def max_change(a, b) -> float:
    """Largest absolute difference between two models' weights."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
