"""Reference log-probabilities computed once per run and kept in the run folder.

DPO's reference is frozen, so log pi_ref(y|x) of every training pair is the same in every epoch and after a
resume. ``precomputed`` computes them once (with whatever reference the trainer holds: the adapter-off view of
the policy or a separate model, through the chunked path when it is on), saves them under
``<output_dir>/ref_logps/<split>-<key>.pt``, and reuses the file when the key matches: a hash of the tokenized
pairs, of the weights the reference computes with, and of every setting that changes the values. TRL's own
cache (datasets' cache folder) is keyed by the dataset and weights only, outside the run.
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

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
FOLDER = "ref_logps"


def data_hash(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for column in PAIR_COLUMNS:
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
    compute: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
    accelerator: Any,
    log: Callable[[str], None],
) -> Dataset:
    """``dataset`` with ``ref_chosen_logps`` and ``ref_rejected_logps`` columns, read from the run folder when
    a file with this key is there, else computed batch by batch with ``compute`` (on every rank, gathered)
    and saved by the main process."""
    path = Path(folder) / FOLDER / f"{name}-{key[:16]}.pt"
    if path.is_file():
        saved = torch.load(path)
        if saved["key"] == key and len(saved["chosen"]) == len(dataset):
            log(f"reference log-probabilities for {name}: reused from {path}")
            return _with_columns(dataset, saved["chosen"], saved["rejected"])
    chosen, rejected = [], []
    for batch in accelerator.prepare(loader):
        pair = accelerator.gather_for_metrics(compute(batch))
        chosen.append(pair[0].float().cpu())
        rejected.append(pair[1].float().cpu())
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "chosen": chosen, "rejected": rejected}, tmp)
        tmp.replace(path)  # whole or not at all
        log(f"reference log-probabilities for {name}: computed once for {len(chosen)} pairs, saved to {path}")
    accelerator.wait_for_everyone()
    return _with_columns(dataset, chosen, rejected)


def _with_columns(dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor) -> Dataset:
    dataset = dataset.remove_columns(
        [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in dataset.column_names]
    )
    return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column(
        "ref_rejected_logps", rejected.tolist()
    )
