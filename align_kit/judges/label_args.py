"""Settings of the recipes that learn from a judge's labels: labelling (recipes/label.py), online DPO's
judge labeller (recipes/online_dpo.py) and iterative DPO (recipes/iterative_dpo.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from align_kit.configs import ConfigError, check_at_least, check_fraction


@dataclass
class LabelArgs:
    """Labelling: sample answers from a policy, judge pairs of them, write a preference dataset and its audit."""

    output_dir: str = field(
        metadata={"help": "Folder of the labelled dataset (train.jsonl, test.jsonl), its audit and cache."}
    )
    judge: str = field(
        default="oracle",
        metadata={
            "help": "Any judge the evaluation takes: a name under eval/judges ('oracle', 'reward_model', "
            "'local_hf_pairwise', 'openai_pairwise'), 'name=model' (e.g. reward_model=runs/demo/reward), or "
            "a folder or judge.yaml path."
        },
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "k: answers sampled per prompt."})
    pairs_per_prompt: int = field(
        default=2, metadata={"help": "Pairs of distinct sampled answers judged per prompt (seeded draw)."}
    )
    max_prompts: int = field(default=512, metadata={"help": "Training prompts labelled (seeded draw)."})
    test_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of labelled prompts written to test.jsonl (held out)."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Longest sampled answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    n_honeypots: int = field(
        default=64,
        metadata={"help": "Held-out chosen answers planted against truncated, shuffled and empty copies."},
    )
    n_human: int = field(
        default=128, metadata={"help": "Held-out human-labelled pairs the judge's agreement is measured on."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of prompts, sampling, pairing and audits."})

    def __post_init__(self) -> None:
        check_at_least(self, 2, "samples_per_prompt")
        check_at_least(self, 1, "pairs_per_prompt", "max_prompts", "max_new_tokens", "generation_batch_size")
        check_at_least(self, 0, "n_honeypots", "n_human")
        check_fraction(self, "test_fraction", low_open=False, high_open=True)
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be above 0")


@dataclass
class JudgeLabellerArgs:
    """Online DPO's labeller when it is a pairwise judge rather than reward functions."""

    judge: str | None = field(
        default=None,
        metadata={
            "help": "A pairwise judge as the labeller, as the evaluation names it ('oracle', "
            "'reward_model=<folder>', 'local_hf_pairwise', 'openai_pairwise', a judge.yaml path): each pair of "
            "sampled answers is judged in both orders (cached). reward_funcs then only score the final report "
            "(default: the oracle on the embedded task)."
        },
    )


@dataclass
class IterativeDPOArgs:
    """Iterative DPO: rounds of sample -> label with a judge -> DPO from the last round's policy."""

    rounds: int = field(default=3, metadata={"help": "Sample-label-DPO rounds; each is a folder round_<r>."})
    judge: str = field(
        default="oracle",
        metadata={
            "help": "The labeller, any judge the evaluation takes ('oracle', 'reward_model=<folder>', ...)."
        },
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "Answers sampled per prompt each round."})
    pairs_per_prompt: int = field(
        default=2, metadata={"help": "Pairs of distinct answers judged per prompt."}
    )
    prompts_per_round: int = field(
        default=512, metadata={"help": "Training prompts sampled (seeded, per round) without replacement."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Longest sampled answer."})
    sampling_temperature: float = field(default=1.0, metadata={"help": "Temperature of the samples."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    report_reward: str = field(
        default="oracle",
        metadata={"help": "Reward spec (as in reward_funcs) scoring each round's greedy answers."},
    )
    report_prompts: int = field(default=64, metadata={"help": "Held-out prompts for the reports."})

    def __post_init__(self) -> None:
        check_at_least(self, 1, "rounds", "pairs_per_prompt", "prompts_per_round", "max_new_tokens")
        check_at_least(self, 1, "generation_batch_size", "report_prompts")
        check_at_least(self, 2, "samples_per_prompt")
        if self.sampling_temperature <= 0:
            raise ConfigError(f"sampling_temperature: {self.sampling_temperature} must be above 0")
