"""Configuration dataclasses of the recipes and of the evaluation.

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
    """Early stopping on the Trainer's evaluation metric (``metric_for_best_model``) or, in SFT, on a reward
    model's score of greedy answers to held-out prompts."""

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


AGGREGATIONS = ("mean", "min", "mean_minus_std")  # how a reward-model ensemble combines its members
HONEYPOT_KINDS = ("truncated", "shuffled", "empty", "off_topic")  # corruptions an evaluation plants


@dataclass
class RewardArgs:
    """Reward-model training options beyond TRL's RewardConfig."""

    margin_column: str | None = field(
        default=None,
        metadata={
            "help": "Raw dataset column holding a per-pair margin m in -log sigmoid(r_w - r_l - m) (e.g. a "
            "preference strength). None: no margin."
        },
    )
    train_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Train on a random fraction of the training pairs drawn with the run's seed (below 1, "
            "ensemble members with different seeds see different data subsets)."
        },
    )
    score_batch_size: int = field(
        default=64, metadata={"help": "Pairs per batch when scoring the held-out set."}
    )


@dataclass
class RewardModelArgs:
    """Which reward model(s) score answers in PPO and best-of-N."""

    reward_models: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward-model folder(s) written by recipes/reward.py. Several make an ensemble whose "
            "members are standardised with their own held-out reward mean and std (reward_scale.json)."
        },
    )
    ensemble_aggregation: str = field(
        default="mean",
        metadata={"help": f"How an ensemble combines its members: one of {AGGREGATIONS}."},
    )
    ensemble_std_weight: float = field(
        default=1.0, metadata={"help": "k in mean - k * std (ensemble_aggregation=mean_minus_std)."}
    )
    disagreement_threshold: float = field(
        default=1.0,
        metadata={
            "help": "An answer whose members' standardised rewards have a std above this raises the "
            "disagreement alarm (a warning and a counter)."
        },
    )


@dataclass
class PPOArgs:
    """PPO options beyond TRL's PPOConfig."""

    value_model_path: str | None = field(
        default=None,
        metadata={"help": "Initial value model (a reward-model folder). None: the first of reward_models."},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "c in loss = L_clip + vf_coef * L_value - c * H(pi) (Schulman et al. 2017, Eq. 9), H the "
            "mean token entropy of the answers. TRL's PPO has none; 0 keeps TRL's loss unchanged."
        },
    )
    report_prompts: int = field(
        default=64,
        metadata={"help": "Held-out prompts for the final report (reward, KL, sample completions)."},
    )
    report_max_new_tokens: int = field(default=48, metadata={"help": "Answer length in the final report."})


@dataclass
class BestOfNArgs:
    """Best-of-N fine-tuning (the cross-entropy method): sample, score, keep the best, fine-tune, repeat."""

    rounds: int = field(default=2, metadata={"help": "Sample-select-fine-tune rounds."})
    samples_per_prompt: int = field(default=8, metadata={"help": "N: completions sampled per prompt."})
    keep_top_k: int = field(default=1, metadata={"help": "Best completions per prompt kept for fine-tuning."})
    prompts_per_round: int = field(
        default=512, metadata={"help": "Training prompts sampled (seeded, without replacement) each round."}
    )
    sampling_temperature: float = field(default=1.0, metadata={"help": "Temperature of the N samples."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest sampled completion."})
    generation_batch_size: int = field(
        default=64, metadata={"help": "Prompts per generation batch (each gives N rows)."}
    )
    report_prompts: int = field(
        default=64, metadata={"help": "Held-out prompts for the per-round report (greedy reward, KL)."}
    )


@dataclass
class EvalArgs:
    """One evaluation: which systems, which judges, how answers are generated, where results go."""

    systems: list[str] = field(
        default_factory=lambda: ["sft=runs/demo/sft", "dpo=runs/demo/dpo"],
        metadata={
            "help": "Systems as name=path: a model folder (an align-kit run or any causal LM), a Hub id, "
            "'tiny-gpt2', or a .jsonl file of precomputed answers with 'prompt' and 'answer' keys. A local "
            "path that does not exist, or an align-kit run without run_complete.json, is skipped with a note."
        },
    )
    base: str = field(
        default="sft", metadata={"help": "The system every other one is compared with; it must exist."}
    )
    all_pairs: bool = field(
        default=True,
        metadata={
            "help": "Also judge every pair of non-base systems (round robin), so ratings and transitivity "
            "rest on direct games; the number of comparisons grows as k(k-1)/2."
        },
    )
    judges: list[str] = field(
        default_factory=lambda: ["oracle"],
        metadata={
            "help": "Judges: a folder name under eval/judges, a judge folder or a judge.yaml, optionally "
            "with =<model> overriding its model (e.g. reward_model=runs/demo/reward). A judge whose local "
            "model folder does not exist is skipped with a note."
        },
    )
    output_dir: str = field(
        default="runs/eval", metadata={"help": "Folder for generations, the judge cache and the reports."}
    )
    n_prompts: int = field(default=200, metadata={"help": "Distinct held-out prompts every system answers."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest answer in tokens."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch (left padded)."})
    do_sample: bool = field(
        default=False, metadata={"help": "Sample (temperature, top_p) instead of greedy decoding."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (do_sample only)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (do_sample only)."})
    best_of_n_policy: str | None = field(
        default=None,
        metadata={
            "help": "Adds a system 'best_of_n': this policy samples best_of_n_n answers per prompt and "
            "best_of_n_reward_model keeps the highest scored. None: no best-of-N system."
        },
    )
    best_of_n_reward_model: str = field(
        default="runs/demo/reward", metadata={"help": "Reward model folder that ranks the best-of-N samples."}
    )
    best_of_n_n: int = field(default=8, metadata={"help": "Samples per prompt for best-of-N."})
    best_of_n_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the best-of-N samples."}
    )
    n_honeypots: int = field(
        default=50,
        metadata={"help": "Held-out prompts turned into honeypots; each gives one pair per honeypot kind."},
    )
    honeypot_kinds: list[str] = field(
        default_factory=lambda: list(HONEYPOT_KINDS),
        metadata={
            "help": f"Corruptions of the chosen answer that the real answer must beat: {HONEYPOT_KINDS}."
        },
    )
    n_human: int = field(
        default=200,
        metadata={"help": "Held-out chosen/rejected rows judged for agreement with the dataset's labels."},
    )
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples for every interval."})
    level: float = field(default=0.95, metadata={"help": "Confidence level of every interval."})
    n_examples: int = field(
        default=3, metadata={"help": "Judged examples per comparison shown in report.html."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of sampling, honeypots, label coins and bootstraps."}
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})


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


@dataclass
class GRPOArgs:
    """GRPO options beyond TRL's GRPOConfig: where the rewards come from, and the final report."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions, summed with GRPOConfig's reward_weights (one weight each): 'oracle' "
            "(the embedded task's exact checker, 1 or 0), a reward-model folder (recipes/reward.py), "
            "'ensemble:<folder>,<folder>[,...]' (one RewardEnsemble combined by ensemble_aggregation, its "
            "disagreement logged and alarms counted; one per run), or 'module:function' (an importable "
            "function f(prompts, completions, **kwargs) -> list[float], GRPO's reward-function signature)."
        },
    )
    report_prompts: int = field(
        default=64,
        metadata={"help": "Held-out prompts for the final report (reward, KL to the reference, samples)."},
    )
    report_max_new_tokens: int = field(default=48, metadata={"help": "Answer length in the final report."})
