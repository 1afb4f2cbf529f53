"""Configuration dataclasses shared by the recipes.

A run is one flat YAML file (plus command-line overrides) parsed by TRL's ``TrlParser``
into these dataclasses and one of TRL's trainer configs. Unknown keys fail loudly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataArgs:
    """Where the preference data comes from and how it is cleaned."""

    dataset: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (the generated toy task), a Hub id such as Anthropic/hh-rlhf, or a local "
            ".json/.jsonl/.parquet file or a folder of them."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_format: str = field(
        default="hh-rlhf",
        metadata={
            "help": "'hh-rlhf': full transcripts in `chosen`/`rejected`, split at the last Assistant turn; "
            "'preference': separate prompt/chosen/rejected columns (see *_column)."
        },
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "Prompt column for dataset_format=preference."}
    )
    chosen_column: str = field(default="chosen", metadata={"help": "Preferred answer column."})
    rejected_column: str = field(default="rejected", metadata={"help": "Dispreferred answer column."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    test_split: str = field(
        default="test", metadata={"help": "Held-out split (made from train when absent)."}
    )
    test_size: float = field(
        default=0.05, metadata={"help": "Fraction held out when the source has no test split."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the train/test split and of the embedded task."}
    )
    single_turn: bool = field(
        default=True,
        metadata={"help": "Keep only conversations with exactly one Human and one Assistant turn."},
    )
    max_pair_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Drop rows whose prompt plus longer answer exceeds this many tokens (None: keep all)."
        },
    )
    deduplicate: bool = field(
        default=True, metadata={"help": "Drop exact duplicate (prompt, chosen, rejected) rows."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap on training rows after cleaning."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cap on held-out rows after cleaning."}
    )
    sft_target: str = field(
        default="chosen",
        metadata={
            "help": "SFT only: train on the 'chosen' answers, the 'rejected' ones, or a seeded 50/50 'mix' "
            "(the embedded demo's SFT base is a mix so that preference tuning has room to improve it)."
        },
    )
    embedded_train_size: int = field(default=3000, metadata={"help": "Rows generated for the embedded task."})
    embedded_test_size: int = field(
        default=300, metadata={"help": "Held-out rows generated for the embedded task."}
    )


@dataclass
class ModelArgs:
    """Which causal LM to start from and how to load it."""

    model_name_or_path: str = field(
        default="tiny-gpt2",
        metadata={
            "help": "'tiny-gpt2' (embedded default built from code), a Hub id, a local model folder, or an "
            "earlier run's output folder."
        },
    )
    weights_file: str | None = field(
        default=None,
        metadata={"help": "A GPT-2 weights file (.safetensors, or .bin/.pt read with weights_only=True)."},
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "config.json path or Hub id describing the architecture of weights_file."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer location when it differs from the model's."}
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16 (GPU only)."}
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model for DPO/PPO. None: the starting model itself, loaded again from disk "
            "(or the adapter-off view of the policy when an adapter is used)."
        },
    )


@dataclass
class AdapterArgs:
    """The hand-written MLP adapter (see align_kit/adapters.py). Flat keys so a run stays one flat YAML."""

    adapter: str = field(
        default="none",
        metadata={
            "help": "'none' (full fine-tuning), 'residual' (frozen MLP plus a zero-initialised bottleneck) "
            "or 'replace' (a new MLP of width adapter_rank instead of the original)."
        },
    )
    adapter_rank: int = field(
        default=16,
        metadata={"help": "Bottleneck width for 'residual'; inner width of the new MLP for 'replace'."},
    )
    adapter_init: str = field(
        default="pretrained",
        metadata={
            "help": "'replace' only: 'pretrained' keeps the most important hidden units of the original MLP; "
            "'random' trains the new MLP from scratch."
        },
    )
    adapter_layers: str = field(
        default="all", metadata={"help": "Blocks to adapt: 'all' or comma-separated indices such as '0,1,5'."}
    )
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the adapter bottleneck."})
    adapter_path: str | None = field(
        default=None,
        metadata={"help": "Continue from saved adapter weights (a folder written by save_adapter)."},
    )


@dataclass
class EarlyStoppingArgs:
    """Early stopping on the Trainer's evaluation metric (``metric_for_best_model``)."""

    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement (None: never). Needs "
            "load_best_model_at_end, metric_for_best_model, and matching eval/save strategies."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of the metric that counts as an improvement."}
    )
    reward_stopping_model: str | None = field(
        default=None,
        metadata={
            "help": "SFT only: a reward-model folder (recipes/reward.py). At every evaluation the mean reward "
            "of greedy answers to held-out prompts is logged as eval_reward_mean, and training stops after "
            "early_stopping_patience evaluations without a gain above early_stopping_threshold. Replaces "
            "the loss-based stopping; set metric_for_best_model: reward_mean to keep the best checkpoint."
        },
    )
    reward_stopping_prompts: int = field(
        default=64, metadata={"help": "Held-out prompts answered at each evaluation (reward stopping)."}
    )
    reward_stopping_max_new_tokens: int = field(
        default=48, metadata={"help": "Longest greedy answer at each evaluation (reward stopping)."}
    )


def parse(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``--config file.yaml`` plus command-line overrides into ``dataclass_types``.

    Unknown keys in the YAML or on the command line raise an error.
    """
    import sys

    import yaml
    from trl import TrlParser

    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" in args:
        path = args[args.index("--config") + 1]
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        known = {f.name for t in dataclass_types for f in dataclasses.fields(t)} | {"env"}
        unknown = sorted(set(values) - known) if isinstance(values, dict) else []
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; see --help for the accepted fields")
    parser = TrlParser(dataclass_types)
    return parser.parse_args_and_config(args, fail_with_unknown_args=True)


def to_dict(*configs: Any) -> dict[str, Any]:
    """Flat, JSON-safe dict of several config dataclasses (for the run directory)."""
    out: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        out.update(values)
    return json.loads(json.dumps(out, default=str))


def save_resolved(path: str, *configs: Any) -> None:
    """Write the resolved configuration of a run as JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(to_dict(*configs), handle, indent=2, sort_keys=True)
