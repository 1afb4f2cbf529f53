"""How the run was launched, checked before anything loads, FSDP2 on CPU processes, and how the process keeps
its freed memory.

A launcher that asked for FSDP or DeepSpeed where the run cannot shard is refused in one line instead of
training unsharded without a word. FSDP2 (``fully_shard``) does run on CPU processes over gloo, but
accelerate 1.15 never selects it there: ``AcceleratorState`` turns ``ACCELERATE_USE_FSDP`` into FSDP only for
GPU-like distributed types and keeps ``MULTI_CPU`` (DDP) otherwise. ``shard_on_cpu`` makes that choice for
the trainer, before ``train()`` prepares the model (recipes/accelerate/fsdp_cpu.yaml). DeepSpeed ZeRO needs
no such switch: with the run config's use_cpu the trainer's accelerator is DeepSpeed's over the same gloo
group (deepspeed's CPU accelerator); without it, on a GPU-less machine, every rank would see world size 1.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from align_kit.configs import ConfigError
from align_kit.console import log

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h


def keep_freed_memory(mode: str, cpu_autocast: bool) -> str:
    """Tell glibc's malloc to keep freed memory for reuse (RunArgs.keep_freed_memory); returns the mode applied,
    "none" where libc is not glibc. By default a large block (above a threshold that grows to at most 32 MB)
    is its own mmap, unmapped when freed, so each step's activations, autocast copies, (chunk x vocabulary)
    logits and weight-sized gradients are page-faulted in and zeroed by the kernel again; reused heap memory
    is not. "small" keeps the heap (never trimmed) for blocks up to 32 MB; "all" serves every block from it,
    whose fragmentation costs peak memory; "auto" is "all" under CPU autocast, which casts the big blocks
    once more, else "small"."""
    if mode == "auto":
        mode = "all" if cpu_autocast else "small"
    if mode == "none":
        return mode
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "none"
    if mode == "all":
        applied = mallopt(M_MMAP_MAX, 0)
    else:
        applied = mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    return mode if applied and mallopt(M_TRIM_THRESHOLD, -1) else "none"


def cpu_autocast(args: Any) -> bool:
    """Whether a trainer with these arguments trains under CPU bf16/fp16 autocast."""
    mixed = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    return mixed and (bool(getattr(args, "use_cpu", False)) or not torch.cuda.is_available())


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def refuse_unsharded_launch(use_cpu: bool) -> None:
    """One line, before anything loads, where the launcher asked for FSDP or DeepSpeed and the run cannot
    shard: accelerate would otherwise train as DDP, or each process alone, without saying so."""
    zero = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not (fsdp_requested() or zero):
        return
    no_gpu = not torch.cuda.is_available()
    if fsdp_requested() and (use_cpu or no_gpu) and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            "FSDP1 (fsdp_version: 1) was requested on CPU: torch's FullyShardedDataParallel needs a non-CPU "
            "accelerator device; use fsdp_version: 2 (recipes/accelerate/fsdp_cpu.yaml)"
        )
    if no_gpu and not use_cpu:
        raise ConfigError(
            f"{'FSDP' if fsdp_requested() else 'DeepSpeed ZeRO'} was requested on a machine without a GPU but "
            "the run config says use_cpu: false (accelerate would record world size 1 on every rank); set "
            "use_cpu: true"
        )
    if zero and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "DeepSpeed ZeRO was requested (ACCELERATE_USE_DEEPSPEED) but deepspeed is not installed: "
            'pip install -e ".[deepspeed]"'
        )


def shard_on_cpu(trainer: Any) -> None:
    """Switch ``trainer``'s accelerator from DDP to FSDP2 where the launcher asked for FSDP on CPU processes,
    before ``train()`` prepares the model. Models the trainer prepared in its constructor (a separate
    reference or reward model, evaluation only) stay whole on every rank; a trainer that already wrapped its
    policy for DDP is refused."""
    if not fsdp_requested():
        return
    accelerator = trainer.accelerator
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
        raise ConfigError(
            f"FSDP on CPU: {type(trainer).__name__} wrapped its model for DDP when it was built, before "
            "align-kit can switch it to FSDP2; launch it with recipes/accelerate/cpu_2proc.yaml"
        )
    plugin = FullyShardedDataParallelPlugin()  # fsdp_* settings of the launcher's config (FSDP_* variables)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # What AcceleratorState does on GPUs: a later AcceleratorState() copies PartialState's type over its own.
    PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    log(
        f"FSDP{plugin.fsdp_version} on {accelerator.num_processes} CPU processes (gloo): accelerate keeps DDP here"
    )
