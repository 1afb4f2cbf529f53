"""Configuration dataclasses of the recipes and of the evaluation.

A run is one flat YAML file (plus command-line overrides) parsed by TRL's ``TrlParser``
into these dataclasses and one of TRL's trainer configs. Unknown keys fail loudly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from align_kit.console import OneLineError


class ConfigError(OneLineError, ValueError):
    """A setting that cannot work: raised at parse time, naming the setting (and the file, from parse).

    ``field`` is the setting the error is about (None when it is about no one setting): ``parsing.parse``
    reads it to prefix the message with where that setting came from (``file.yaml:LINE``).
    """

    def __init__(self, message: str = "", field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def check_choices(config: Any) -> None:
    """Every ``Literal`` field of a config dataclass holds one of its values, or ConfigError names the field
    and the valid values (argparse checks command-line values; this also covers YAML and code)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: {value!r} is not one of {list(choices)}", field=f.name)


def check_at_least(config: Any, minimum: float, *names: str) -> None:
    """Each named field is None or at least ``minimum``, or ConfigError names the field."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name}: {value} must be at least {minimum}", field=name)


def check_fraction(config: Any, name: str, low_open: bool = True, high_open: bool = False) -> None:
    """A field that is a fraction of something: in (0, 1] by default (``low_open``/``high_open`` say which
    ends are excluded)."""
    value = getattr(config, name)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{name}: {value} must be in {interval}", field=name)


def as_list(config: Any, name: str) -> None:
    """A list field given one string (``reward_models: runs/demo/reward``) holds that one string."""
    if isinstance(getattr(config, name), str):
        setattr(config, name, [getattr(config, name)])


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
    dataset_format: Literal[
        "auto",
        "hh-rlhf",
        "preference",
        "chat-preference",
        "chat-transcripts",
        "tldr-comparisons",
        "instruction",
        "unpaired",
    ] = field(
        default="auto",
        metadata={
            "help": "Row layout. 'auto' (default) detects it from the columns and stops on a mixed or unknown "
            "layout; 'hh-rlhf': `chosen`/`rejected` transcripts split at the last Assistant turn; "
            "'preference': prompt/chosen/rejected strings (see *_column); 'chat-preference': `prompt` "
            "messages and `chosen`/`rejected` assistant messages (TRL's conversational layout); "
            "'chat-transcripts': `chosen`/`rejected` conversations sharing their history; "
            "'tldr-comparisons': summarize-from-feedback comparisons (`info`, `summaries`, `choice`); "
            "'instruction' (SFT): prompt/`completion` or a `messages` conversation; 'unpaired' (KTO): "
            "prompt, `completion` and a boolean or 0/1 `label` (True: a desirable answer)."
        },
    )
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "How conversations become model text: 'auto' (the tokenizer's chat template when it has "
            "one, else the hh format), 'hh' (\\n\\nHuman: ... \\n\\nAssistant:), 'tokenizer', or the path of "
            "a .jinja file. The choice is recorded in run_config.json (chat_template_used); the evaluation "
            "renders a run's prompts the same way and uses this setting for other systems."
        },
    )
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Prompt column (preference, chat-preference, instruction and unpaired rows)."},
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
    sft_target: Literal["chosen", "rejected", "mix"] = field(
        default="chosen",
        metadata={
            "help": "SFT only: train on the 'chosen' answers, the 'rejected' ones, or a seeded 50/50 'mix' "
            "(the embedded demo's SFT base is a mix so that preference tuning has room to improve it)."
        },
    )
    write_dropped: str | None = field(
        default=None,
        metadata={
            "help": "Write every dropped row (file, row, line, every reason, the row) to this JSONL file."
        },
    )
    embedded_train_size: int = field(default=3000, metadata={"help": "Rows generated for the embedded task."})
    embedded_test_size: int = field(
        default=300, metadata={"help": "Held-out rows generated for the embedded task."}
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(
                f"test_size: {self.test_size} must be between 0 and 1 (a fraction held out)",
                field="test_size",
            )
        for name in ("max_train_samples", "max_eval_samples", "max_pair_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(
                    f"{name}: {getattr(self, name)} must be at least 1 (or None: no cap)", field=name
                )
        if self.chat_template not in ("auto", "hh", "tokenizer"):
            if not self.chat_template.endswith(".jinja"):
                raise ConfigError(
                    f"chat_template: {self.chat_template!r} is not auto, hh, tokenizer or a .jinja file",
                    field="chat_template",
                )
            if not os.path.isfile(self.chat_template):
                raise ConfigError(f"chat_template: {self.chat_template}: no such file", field="chat_template")
        check_at_least(self, 1, "embedded_train_size")
        check_at_least(self, 0, "embedded_test_size", "split_seed")


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

    def __post_init__(self) -> None:
        if self.torch_dtype not in TORCH_DTYPES:
            raise ConfigError(
                f"torch_dtype: {self.torch_dtype!r} is not one of {list(TORCH_DTYPES)}", field="torch_dtype"
            )
        if self.model_config and not self.weights_file:
            raise ConfigError(
                "model_config: describes the architecture of weights_file, which is not set",
                field="model_config",
            )


TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class AdapterArgs:
    """The hand-written MLP adapter (see align_kit/models/adapters.py). Flat keys so a run stays one flat YAML."""

    adapter: Literal["none", "residual", "replace"] = field(
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
    adapter_init: Literal["pretrained", "random"] = field(
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

    def __post_init__(self) -> None:
        check_choices(self)
        if self.adapter_rank < 1:
            raise ConfigError(f"adapter_rank: {self.adapter_rank} must be at least 1", field="adapter_rank")
        check_fraction(self, "adapter_dropout", low_open=False, high_open=True)
        if not re.fullmatch(r"all|\s*\d+\s*(,\s*\d+\s*)*", self.adapter_layers):
            raise ConfigError(
                f"adapter_layers: {self.adapter_layers!r} must be 'all' or block indices such as '0,1,5'",
                field="adapter_layers",
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

    def __post_init__(self) -> None:
        check_at_least(self, 1, "early_stopping_patience", "reward_stopping_prompts")
        check_at_least(self, 1, "reward_stopping_max_new_tokens")
        check_at_least(self, 0, "early_stopping_threshold")


Aggregation = Literal["mean", "min", "mean_minus_std"]  # how a reward-model ensemble combines its members
AGGREGATIONS = typing.get_args(Aggregation)


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

    def __post_init__(self) -> None:
        check_fraction(self, "train_fraction")
        check_at_least(self, 1, "score_batch_size")


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
    ensemble_aggregation: Aggregation = field(
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

    def __post_init__(self) -> None:
        check_choices(self)
        as_list(self, "reward_models")
        check_at_least(self, 0, "ensemble_std_weight", "disagreement_threshold")


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

    def __post_init__(self) -> None:
        check_at_least(self, 0, "entropy_coef")
        check_at_least(self, 1, "report_prompts", "report_max_new_tokens")


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

    def __post_init__(self) -> None:
        check_at_least(self, 1, "rounds", "samples_per_prompt", "keep_top_k", "prompts_per_round")
        check_at_least(self, 1, "max_new_tokens", "generation_batch_size", "report_prompts")
        if self.sampling_temperature <= 0:
            raise ConfigError(
                f"sampling_temperature: {self.sampling_temperature} must be above 0",
                field="sampling_temperature",
            )
        if self.keep_top_k > self.samples_per_prompt:
            raise ConfigError(
                f"keep_top_k: {self.keep_top_k} is more than samples_per_prompt ({self.samples_per_prompt})",
                field="keep_top_k",
            )


@dataclass
class RunArgs:
    """How a run treats its process's memory, and how a run started again in the folder of an interrupted one
    treats changed settings."""

    keep_freed_memory: Literal["auto", "small", "all", "none"] = field(
        default="auto",
        metadata={
            "help": "What glibc's malloc does with the memory a training process frees (training/launch.py; no "
            "effect without glibc). 'small': blocks up to 32 MB come from its heap, which is never trimmed "
            "(M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD -1), so activations and per-layer casts are reused "
            "instead of page-faulted in afresh, at no measured cost in peak memory. 'all': every block, the "
            "(chunk x vocabulary) logits and weight-sized gradients too (M_MMAP_MAX 0); bf16 autocast on CPU, "
            "which casts each of those once more, gains most, at a cost in peak memory on long float32 "
            "sequences (about 1.5 GB more for a DPO step of 4 pairs x 1,024 tokens; README, 'Lean "
            "training'). 'none': glibc's defaults. 'auto': 'all' for a CPU run under bf16 autocast, "
            "'small' otherwise."
        },
    )
    allow_changed_settings: bool = field(
        default=False,
        metadata={
            "help": "Resume an interrupted run although settings differ from its run_config.json (otherwise "
            "refused, listing the differences); the old and new values go to settings_changes.json."
        },
    )

    def __post_init__(self) -> None:
        check_choices(self)


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
