"""The evaluation's settings: which systems, which judges, how answers are generated, where results go."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from align_kit.configs import ConfigError, as_list, check_at_least, check_choices, check_fraction

HONEYPOT_KINDS = ("truncated", "shuffled", "empty", "off_topic")  # corruptions an evaluation plants


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
