"""Reference log-probabilities computed once per run and kept in the run folder.

DPO's reference is frozen, so log pi_ref(y|x) of every training pair is the same in every epoch and after a
resume. ``precomputed`` computes them once (with whatever reference the trainer holds: the adapter-off view of
the policy or a separate model, through the chunked path when it is on), saves them under
``<output_dir>/ref_logps/<split>-<key>.pt``, and reuses the file when the key matches: a hash of the tokenized
pairs, of the weights the reference computes with, and of every setting that changes the values. TRL's own
cache (datasets' cache folder) is keyed by the dataset and weights only, outside the run. DPO keeps two columns
(``ref_chosen_logps``, ``ref_rejected_logps``), KTO one or two (``ref_logps`` and, with its KL estimate,
``ref_KL_logps``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "KL_completion_ids", "label")
FOLDER = "ref_logps"


def data_hash(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for column in TOKEN_COLUMNS:
        if column in dataset.column_names:
            digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(dataset: Dataset, reference: torch.nn.Module, settings: dict[str, Any]) -> str:
    parts = {"data": data_hash(dataset), "weights": weights_hash(reference), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def precomputed(
    dataset: Dataset,
    name: str,
    folder: str | Path,
    key: str,
    loader: DataLoader,
    compute: Callable[[dict], tuple[torch.Tensor, ...]],
    accelerator: Any,
    log: Callable[[str], None],
    columns: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps"),
) -> Dataset:
    """``dataset`` with one column per name in ``columns`` (``compute(batch)`` returns a tensor for each, in that
    order), read from the run folder when a file with this key is there, else computed batch by batch (on every
    rank, gathered) and saved by the main process."""
    path = Path(folder) / FOLDER / f"{name}-{key[:16]}.pt"
    if path.is_file():
        saved = torch.load(path)
        if saved["key"] == key and all(len(saved["columns"].get(c, ())) == len(dataset) for c in columns):
            log(f"reference log-probabilities for {name}: reused from {path}")
            return _with_columns(dataset, saved["columns"])
    parts: dict[str, list[torch.Tensor]] = {column: [] for column in columns}
    for batch in accelerator.prepare(loader):
        values = accelerator.gather_for_metrics(tuple(compute(batch)))
        for column, value in zip(columns, values, strict=True):
            parts[column].append(value.float().cpu())
    values = {column: torch.cat(chunks) for column, chunks in parts.items()}
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "columns": values}, tmp)
        tmp.replace(path)  # whole or not at all
        log(f"reference log-probabilities for {name}: computed once for {len(dataset)} rows, saved to {path}")
    accelerator.wait_for_everyone()
    return _with_columns(dataset, values)


def _with_columns(dataset: Dataset, values: dict[str, torch.Tensor]) -> Dataset:
    dataset = dataset.remove_columns([c for c in values if c in dataset.column_names])
    for column, value in values.items():
        dataset = dataset.add_column(column, value.tolist())
    return dataset
