"""Loss discovery on the loss sweep's budget (recipes/discover_loss.py): the search's settings, the proposer's
endpoint taken from an OpenAI judge, the sweep's ranking as the table of known losses, and the evaluator that
trains and scores each checked proposal as a sweep member (``loss_discovery.discover`` calls it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align_kit.configs import ConfigError
from align_kit.judges.config import read_judge_config
from align_kit.loss_lab.discovery import LossFailed, ProposerConfig
from align_kit.loss_lab.sweep import Sweep
from align_kit.training.losses import LossFunctionError

ROW_SCORES = (
    "win_rate",
    "ci_low",
    "ci_high",
    "win_rate_vs_chosen",
    "oracle",
    "reward_accuracy",
    "kl",
    "wall_s",
)


@dataclass
class DiscoveryArgs:
    """An LLM-driven search for new losses, each trained and scored like a sweep member."""

    generations: int = field(
        default=10, metadata={"help": "Proposals to record (a rerun resumes up to this)."}
    )
    proposer_judge: str = field(
        default="openai_pairwise",
        metadata={
            "help": "An OpenAI-backend judge (eval/judges name, folder or judge.yaml) whose endpoint the proposer "
            "uses: model, base_url, api_key_env, timeout, max_retries."
        },
    )
    proposer_model: str | None = field(
        default=None, metadata={"help": "Served model name (None: the judge's)."}
    )
    proposer_base_url: str | None = field(
        default=None, metadata={"help": "Endpoint root such as http://host:8000/v1 (None: the judge's)."}
    )
    proposer_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (a search wants a new proposal every time)."}
    )
    proposer_max_new_tokens: int = field(default=2048, metadata={"help": "Longest reply, in tokens."})
    check_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds a proposal's unit checks may run before its worker is killed."},
    )
    seed_with_sweep: bool = field(
        default=True,
        metadata={
            "help": "Train (or reuse) the sweep's `losses` first and show their scores to the proposer."
        },
    )
    score_key: str = field(
        default="win_rate", metadata={"help": "The row field that ranks losses (higher wins)."}
    )


def proposer_config(args: DiscoveryArgs):
    """The proposer's ProposerConfig: the judge's endpoint, this search's decoding."""
    judge = read_judge_config(args.proposer_judge)
    if judge.backend != "openai":
        raise ConfigError(
            f"proposer_judge={args.proposer_judge!r}: backend {judge.backend!r}, not an OpenAI one"
        )
    endpoint = {"model": args.proposer_model, "base_url": args.proposer_base_url}
    return ProposerConfig.from_judge(
        judge,
        **{k: v for k, v in endpoint.items() if v is not None},
        temperature=args.proposer_temperature,
        max_new_tokens=args.proposer_max_new_tokens,
        system_prompt=None,  # the judge's system prompt asks for one character
    )


def seed_table(ranking: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sweep rows as the proposer's table of known losses."""
    return [
        {"name": f"{row['loss']} at beta {row['beta']:g}", **{k: row[k] for k in ROW_SCORES if k in row}}
        for row in ranking
    ]


def discovery_evaluator(sweep: Sweep, beta: float):
    """``evaluate("file.py:function") -> row`` for ``loss_discovery.discover``: the loss trained and scored as a
    sweep member at ``beta``; a loss that breaks training (non-finite, wrong shape) raises LossFailed."""

    def evaluate(loss_function: str) -> dict[str, Any]:
        try:
            row = sweep.evaluate(loss_function, beta)
        except LossFunctionError as error:
            raise LossFailed(str(error)) from error
        return {k: row[k] for k in ("member", *ROW_SCORES) if k in row}

    return evaluate
