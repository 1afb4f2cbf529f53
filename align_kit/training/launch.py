"""How the run was launched, checked before anything loads: a launcher that asked for FSDP or DeepSpeed where
the run cannot shard is refused in one line instead of training unsharded without a word."""

from __future__ import annotations

import importlib.util
import os

import torch

from align_kit.configs import ConfigError


def refuse_unsharded_launch(use_cpu: bool) -> None:
    """One line, before anything loads, where the launcher asked for FSDP or DeepSpeed and the run cannot
    shard: accelerate would otherwise train as DDP (or fail deep inside the trainer) without saying so."""
    on_cpu = use_cpu or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and on_cpu:
        raise ConfigError(
            "FSDP was requested (ACCELERATE_USE_FSDP) on CPU: align-kit does not run FSDP on CPUs (accelerate "
            "launches it as unsharded DDP); use recipes/accelerate/cpu_2proc.yaml, or FSDP on GPUs"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "DeepSpeed ZeRO was requested (ACCELERATE_USE_DEEPSPEED) but deepspeed is not installed: "
                'pip install -e ".[deepspeed]" on a GPU host'
            )
        if on_cpu:
            raise ConfigError("DeepSpeed ZeRO was requested on CPU: align-kit runs ZeRO on GPUs only")
