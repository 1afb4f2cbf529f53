"""Configuration dataclasses of the recipes and of the evaluation.

A run is one flat YAML file (plus command-line overrides) parsed by TRL's ``TrlParser``
into these dataclasses and one of TRL's trainer configs. Unknown keys fail loudly.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align_kit import files


class ConfigError(ValueError):
    """A setting that cannot work: raised at parse time, naming the setting (and the file, from parse)."""


def check_choices(config: Any) -> None:
    """Every ``Literal`` field of a config dataclass holds one of its values, or ConfigError names the field
    and the valid values (argparse checks command-line values; this also covers YAML and code)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name}: {value!r} is not one of {list(choices)}")


def check_at_least(config: Any, minimum: float, *names: str) -> None:
    """Each named field is None or at least ``minimum``, or ConfigError names the field."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name}: {value} must be at least {minimum}")


def check_fraction(config: Any, name: str, low_open: bool = True, high_open: bool = False) -> None:
    """A field that is a fraction of something: in (0, 1] by default (``low_open``/``high_open`` say which
    ends are excluded)."""
    value = getattr(config, name)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{name}: {value} must be in {interval}")


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
    embedded_train_size: int = field(default=3000, metadata={"help": "Rows generated for the embedded task."})
    embedded_test_size: int = field(
        default=300, metadata={"help": "Held-out rows generated for the embedded task."}
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(f"test_size: {self.test_size} must be between 0 and 1 (a fraction held out)")
        for name in ("max_train_samples", "max_eval_samples", "max_pair_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be at least 1 (or None: no cap)")
        if self.chat_template not in ("auto", "hh", "tokenizer"):
            if not self.chat_template.endswith(".jinja"):
                raise ConfigError(
                    f"chat_template: {self.chat_template!r} is not auto, hh, tokenizer or a .jinja file"
                )
            if not os.path.isfile(self.chat_template):
                raise ConfigError(f"chat_template: {self.chat_template}: no such file")
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
            raise ConfigError(f"torch_dtype: {self.torch_dtype!r} is not one of {list(TORCH_DTYPES)}")
        if self.model_config and not self.weights_file:
            raise ConfigError("model_config: describes the architecture of weights_file, which is not set")


TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class AdapterArgs:
    """The hand-written MLP adapter (see align_kit/adapters.py). Flat keys so a run stays one flat YAML."""

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
            raise ConfigError(f"adapter_rank: {self.adapter_rank} must be at least 1")
        check_fraction(self, "adapter_dropout", low_open=False, high_open=True)
        if not re.fullmatch(r"all|\s*\d+\s*(,\s*\d+\s*)*", self.adapter_layers):
            raise ConfigError(
                f"adapter_layers: {self.adapter_layers!r} must be 'all' or block indices such as '0,1,5'"
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
            raise ConfigError(f"sampling_temperature: {self.sampling_temperature} must be above 0")
        if self.keep_top_k > self.samples_per_prompt:
            raise ConfigError(
                f"keep_top_k: {self.keep_top_k} is more than samples_per_prompt ({self.samples_per_prompt})"
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
            "with =<model> overriding its model (e.g. reward_model=runs/demo/reward). Each is checked before "
            "generation: one that cannot work stops the evaluation unless optional_judges names it."
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
    combine_orders: Literal["strict", "average"] = field(
        default="strict",
        metadata={
            "help": "How a pair's two presentation orders score: 'strict' (a win needs both orders, any "
            "disagreement is a tie) or 'average' (Arena-Hard: the mean of the two single-order scores, so a "
            "win and a tie score 0.75). Used by every win rate, interval, paired test and rating."
        },
    )
    optional_judges: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Judges (by their name in `judges`, before any '=') that may be missing: a problem found "
            "before generation (no model folder, no key, endpoint down) leaves such a judge out with a note; "
            "for any other judge it stops the evaluation before anything is generated."
        },
    )
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": "Model of the one judge that takes a model (hf_logits, reward_model, openai), e.g. "
            "--judge_model Qwen/Qwen2.5-1.5B-Instruct; with several such judges use judge_overrides."
        },
    )
    judge_dtype: str | None = field(
        default=None,
        metadata={
            "help": "torch_dtype of every local judge (hf_logits, reward_model): float32, bfloat16, float16 "
            "or auto (bfloat16 on a GPU that supports it, float32 otherwise)."
        },
    )
    judge_overrides: dict[str, dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Any judge.yaml key per judge name, e.g. {local_hf_pairwise: {torch_dtype: float32}} in "
            "the YAML, or a JSON string on the command line."
        },
    )
    group_column: str | None = field(
        default=None,
        metadata={
            "help": "A column of the data (e.g. hh-rlhf's subset, saved as a column) whose value groups the "
            "held-out prompts: every comparison is also reported per group. None: no groups."
        },
    )
    judge_retry_threshold: float = field(
        default=0.05,
        metadata={
            "help": "Flag a judge in its report when more than this fraction of its requests were retried."
        },
    )
    judge_connect_timeout: float = field(
        default=3.0,
        metadata={"help": "Seconds the check before generation waits for a judge's endpoint to accept."},
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if isinstance(self.judge_overrides, str):
            try:
                self.judge_overrides = json.loads(self.judge_overrides)
            except json.JSONDecodeError as error:
                raise ConfigError(f"judge_overrides: not JSON ({error}): {self.judge_overrides!r}") from None
        overrides = self.judge_overrides or {}
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise ConfigError(f"judge_overrides: expected {{judge name: {{key: value}}}}, got {overrides!r}")
        for name in ("systems", "judges", "honeypot_kinds", "optional_judges"):
            as_list(self, name)
        unknown = sorted(set(self.honeypot_kinds) - set(HONEYPOT_KINDS))
        if unknown:
            raise ConfigError(f"honeypot_kinds: {unknown} not among {list(HONEYPOT_KINDS)}")
        check_at_least(self, 1, "n_prompts", "max_new_tokens", "batch_size", "best_of_n_n", "n_boot")
        check_at_least(self, 0, "n_honeypots", "n_human", "n_examples", "seed")
        check_fraction(self, "top_p")
        check_fraction(self, "level", high_open=True)
        for name in ("temperature", "best_of_n_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be above 0")


@dataclass
class RunArgs:
    """How a run started again in the folder of an interrupted one treats changed settings."""

    allow_changed_settings: bool = field(
        default=False,
        metadata={
            "help": "Resume an interrupted run although settings differ from its run_config.json (otherwise "
            "refused, listing the differences); the old and new values go to settings_changes.json."
        },
    )


def parse(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``--config file.yaml`` plus command-line overrides into ``dataclass_types``.

    The config is a path, or a shipped config named by its repository path or its name (``dpo_tiny``).
    Every refusal is a ConfigError naming the setting and where it came from (``file.yaml:LINE``, the file,
    or the command line): a file that is no YAML mapping, a key given twice, an unknown key, a value of the
    wrong type (``max_steps: 2.5``), a value a dataclass refuses, and a trainer setting that cannot train
    (``check_trainer_args``).
    """
    import sys

    from align_kit.resources import find_config

    args = list(sys.argv[1:] if argv is None else argv)
    path, values, lines = None, {}, {}
    if "--config" in args:
        at = args.index("--config")
        if at + 1 == len(args):
            raise ConfigError("command line: --config needs a file or a shipped config name")
        try:
            path = str(find_config(args[at + 1]))
        except FileNotFoundError as error:
            raise ConfigError(f"--config: {error}") from None
        del args[at : at + 2]
        values, lines = load_yaml(path)
        set_environment(values.pop("env", {}), path)
    hints = field_types(dataclass_types)
    unknown = sorted(str(key) for key in values if key not in hints)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; see --help for the accepted fields")
    for name, value in values.items():
        try:
            values[name] = check_value(name, value, *hints[name])
        except ConfigError as error:
            raise ConfigError(f"{path}:{lines[name]}: {error}") from None

    def source(name: str) -> str:
        """Where a setting came from: the command line, the file and line, or the file's defaults."""
        if any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in args):
            return "command line"
        if name in lines:
            return f"{path}:{lines[name]}"
        return path or "command line"

    def where(error: Exception) -> str:
        """The error prefixed with the place its setting (the message's first word) came from."""
        return f"{source(str(error).split(':')[0].split(' ')[0])}: {error}"

    parser = _parser_class()(dataclass_types, allow_abbrev=False)  # --learning_rat is a typo, not a prefix
    parser.set_defaults_with_config(**values)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        if remaining:
            raise ConfigError(f"command line: unknown argument(s) {remaining}; see --help")
        for config in parsed:
            check_trainer_args(config)
            grpo = any(
                isinstance(c, GRPOArgs) for c in parsed
            )  # GRPO names its reward models in reward_funcs
            if isinstance(config, RewardModelArgs) and not config.reward_models and not grpo:
                raise ConfigError(
                    "reward_models: none given; name at least one reward-model folder (recipes/reward.py writes one)"
                )
    except ConfigError as error:
        raise ConfigError(str(error) if str(error).startswith("command line:") else where(error)) from None
    except ValueError as error:  # a trainer config's own check in __post_init__ (transformers, TRL)
        raise ConfigError(where(error)) from None
    for config in parsed:  # for checks made later, before the run starts (runs.start)
        setattr(config, SOURCES, {f.name: source(f.name) for f in dataclasses.fields(config)})
    return tuple(parsed)


SOURCES = "_setting_sources"  # attribute parse() gives each config: field -> where its value came from


def setting_source(config: Any, name: str) -> str:
    """Where ``parse`` found the value of ``config.name`` ('file.yaml:7', 'command line'), or 'default'."""
    return getattr(config, SOURCES, {}).get(name, "default")


@functools.cache
def _parser_class() -> type:
    """TRL's parser, with argparse's usage-and-exit replaced by a ConfigError (one line, not 300 options).
    Built on first use: importing TRL takes seconds and most modules import this one."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message: str) -> typing.NoReturn:
            match = re.match(r"argument --(\w+)[^:]*: invalid (\w+) value: (.*)", message)
            if match and match.group(2) in ARGPARSE_TYPES:
                name, kind, value = match.groups()
                message = f"--{name} must be {ARGPARSE_TYPES[kind]}, got {value}"
            raise ConfigError(f"command line: {message}")

    return Parser


ARGPARSE_TYPES = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (lines {first[key]} and {line})",
                    key_node.start_mark,
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """A config file's top-level mapping and the line of each key; ConfigError for text that is not UTF-8,
    not YAML, not a mapping, empty, or has a key twice."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        values = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{at}: not valid YAML: {problem}") from None
    if values is None:
        raise ConfigError(f"{path}: the file holds no settings")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a mapping of setting: value, got a {type(values).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    return values, lines


def set_environment(env: Any, path: str) -> None:
    """A config's ``env:`` mapping (TRL's convention) sets environment variables."""
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: env must be a mapping of VARIABLE: value, got {env!r}")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def field_types(dataclass_types: tuple[type, ...]) -> dict[str, tuple[Any, bool]]:
    """Field name -> (type hint, whether its default is None) over several config dataclasses."""
    out = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (hints[f.name], f.default is None)
    return out


SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}  # what argparse's bool type reads


def check_value(name: str, value: Any, hint: Any, none_default: bool = False) -> Any:
    """A YAML value checked against its field's type: ConfigError("max_steps must be an integer, got 2.5"),
    or the value (one item for a list field is made a list). Strings are what argparse converts later, so
    a string must read as the type (``learning_rate: 1e-3`` is a string to YAML and a number to argparse)."""
    if value is None and none_default:
        return value
    wanted = _wanted(value, hint)
    if wanted is not None:
        shown = "null (an empty value)" if value is None else repr(value)
        note = ""
        if isinstance(value, bool):
            note = " (YAML reads unquoted yes/no/on/off as true/false: quote it)"
        raise ConfigError(f"{name} must be {wanted}, got {shown}{note}")
    arms = [arm for arm in typing.get_args(hint) if arm is not type(None)] or [hint]
    if (
        len(arms) == 1
        and typing.get_origin(arms[0]) is list
        and not isinstance(value, list)
        and value is not None
    ):
        return [value]
    return value


def _wanted(value: Any, hint: Any) -> str | None:
    """None when ``value`` fits ``hint``, else what the field takes ('an integer')."""
    origin, arms = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arms:
            return None
        if any(isinstance(arm, type) and issubclass(arm, enum.Enum) for arm in arms):
            arms = tuple(arm for arm in arms if arm is not str)  # transformers reads the string as the enum
        wanted = [_wanted(value, arm) for arm in arms if arm is not type(None)]
        return None if None in wanted else " or ".join(dict.fromkeys(wanted))
    if origin is Literal:
        return None if value in arms else f"one of {list(arms)}"
    if origin is list or hint is list:
        item = arms[0] if arms else Any
        items = value if isinstance(value, list) else [value]
        problems = [_wanted(v, item) for v in items]
        return None if all(p is None for p in problems) else f"a list of {getattr(item, '__name__', item)}"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [member.value for member in hint]
        return None if value in choices or isinstance(value, hint) else f"one of {choices}"
    if hint not in SCALARS:
        return None  # a type argparse and the dataclass check themselves
    if value is None:
        return SCALARS[hint]
    if hint is bool:
        fits = isinstance(value, bool) or (isinstance(value, str) and value.lower() in BOOL_WORDS)
    elif isinstance(value, bool):
        fits = False
    elif hint is str:
        fits = isinstance(value, str)
    else:
        fits = isinstance(value, int) or (hint is float and isinstance(value, float))
        fits = fits or (isinstance(value, str) and _reads_as(hint, value))
    return None if fits else SCALARS[hint]


def _reads_as(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


# Trainer configs whose beta may be 0 (no KL term); in DPO, KTO and the rest, beta divides or scales the
# implicit reward, and 0 or less cannot train.
BETA_MAY_BE_ZERO = ("GRPOConfig", "RLOOConfig")


def check_trainer_args(args: Any) -> None:
    """Settings of a transformers/TRL trainer config that transformers accepts but that cannot train as meant:
    no training step, negative sizes and rates, beta <= 0 (ConfigError naming the field)."""
    from transformers import TrainingArguments

    if not isinstance(args, TrainingArguments):
        return
    if hasattr(args, "total_episodes"):  # TRL's online trainers count episodes, not steps
        if args.total_episodes is not None and args.total_episodes < 1:
            raise ConfigError(f"total_episodes: {args.total_episodes} gives no training step")
        if args.total_episodes is None and args.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs: {args.num_train_epochs} gives no training step")
    else:
        if args.max_steps == 0 or args.max_steps < -1:
            raise ConfigError(
                f"max_steps: {args.max_steps} must be a positive number of steps, or -1 to train num_train_epochs"
            )
        if args.max_steps == -1 and args.num_train_epochs <= 0:
            raise ConfigError(
                f"num_train_epochs: {args.num_train_epochs} gives no training step (max_steps is -1)"
            )
    check_at_least(args, 1, "per_device_train_batch_size", "per_device_eval_batch_size")
    check_at_least(args, 1, "gradient_accumulation_steps", "save_total_limit")
    check_at_least(args, 0, "learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "seed")
    for name in ("max_length", "max_prompt_length", "num_ppo_epochs", "num_mini_batches", "response_length"):
        if hasattr(args, name):  # TRL fields of some trainers only
            check_at_least(args, 1, name)
    for strategy, steps in (("logging", "logging_steps"), ("save", "save_steps"), ("eval", "eval_steps")):
        chosen, value = getattr(args, f"{strategy}_strategy"), getattr(args, steps)
        if getattr(chosen, "value", chosen) == "steps" and value is not None and value <= 0:
            raise ConfigError(f"{steps}: {value} must be above 0 with {strategy}_strategy steps")
    if hasattr(args, "beta"):
        zero_ok = any(cls.__name__ in BETA_MAY_BE_ZERO for cls in type(args).__mro__)
        if args.beta < 0 or (args.beta == 0 and not zero_ok):
            raise ConfigError(f"beta: {args.beta} must be above 0{' (or 0: no KL term)' if zero_ok else ''}")
    if hasattr(args, "kl_coef") and args.kl_coef < 0:
        raise ConfigError(f"kl_coef: {args.kl_coef} must not be negative")
    if hasattr(args, "temperature") and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"temperature: {args.temperature} must be above 0")


def to_dict(*configs: Any) -> dict[str, Any]:
    """Flat, JSON-safe dict of several config dataclasses (for the run directory)."""
    out: dict[str, Any] = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        out.update(values)
    return json.loads(json.dumps(out, default=str))


def save_resolved(path: str, *configs: Any) -> None:
    """Write the resolved configuration of a run as JSON, whole or not at all."""
    files.write_json(path, to_dict(*configs), indent=2, sort_keys=True)


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
