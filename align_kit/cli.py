"""The ``align-kit`` command: one subcommand per recipe, each a thin door to the recipe's own ``main``.

    align-kit dpo --config recipes/configs/dpo_tiny.yaml --beta 0.2
    align-kit dpo --config dpo_tiny                     # a shipped config by name, from any folder
    align-kit eval --config embedded
    accelerate launch -m align_kit.cli dpo --config dpo_tiny   # several processes

A subcommand takes exactly what ``python recipes/<stage>.py`` takes (``align-kit dpo --help`` lists it).
Exit status: 0 done, 2 a user's mistake (one line naming the file, row, field or setting), 3 training
diverged, 1 with a traceback for a bug; ``ALIGN_KIT_DEBUG=1`` shows the traceback of every failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# subcommand -> (module with main(argv), one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("align_kit.recipes.sft", "supervised fine-tuning on a dataset's answers (TRL SFTTrainer)"),
    "reward": (
        "align_kit.recipes.reward",
        "a Bradley-Terry reward model from preference pairs (TRL RewardTrainer)",
    ),
    "dpo": ("align_kit.recipes.dpo", "direct preference optimisation and its loss family (TRL DPOTrainer)"),
    "kto": ("align_kit.recipes.kto", "KTO from answers labelled desirable or undesirable (TRL KTOTrainer)"),
    "loss-sweep": (
        "align_kit.recipes.loss_sweep",
        "one model trained with each listed loss and beta on one budget, ranked by judged win rate",
    ),
    "discover-loss": (
        "align_kit.recipes.discover_loss",
        "an LLM proposes new losses; each is checked, trained and scored on the sweep's budget",
    ),
    "ppo": ("align_kit.recipes.ppo", "PPO against a reward model with a KL penalty (TRL 1.12 PPOTrainer)"),
    "grpo": (
        "align_kit.recipes.grpo",
        "GRPO: groups of sampled answers scored by reward functions, with a KL penalty (TRL GRPOTrainer)",
    ),
    "best-of-n": (
        "align_kit.recipes.best_of_n",
        "best-of-N fine-tuning: sample, keep the best by reward, fine-tune",
    ),
    "eval": (
        "align_kit.eval.win_rate",
        "judged win rates against chosen answers and the base, with judge audits",
    ),
    "leaderboard": (
        "align_kit.eval.leaderboard",
        "one table of ratings across evaluation runs that share a judge",
    ),
    "demo": ("align_kit.demo", "every stage on the embedded default, then the judged report"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="align-kit",
        description="Preference alignment over TRL, with judged win rates a reviewer can trust.",
        epilog="Each subcommand passes its arguments to that recipe: align-kit <command> --help.",
    )
    commands = top.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, (_, line) in COMMANDS.items():
        commands.add_parser(name, help=line, add_help=False)  # --help belongs to the recipe
    return top


def main(argv: list[str] | None = None) -> Any:
    top = parser()
    known, rest = top.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.command is None:
        top.print_help()
        return 2
    module = importlib.import_module(COMMANDS[known.command][0])
    return module.main(rest)


def console() -> int:
    """The installed ``align-kit`` script: the exit status, not the recipe's returned metrics. A user's mistake
    or a diverged run is one line on stderr and a non-zero status (``console.exit_status``)."""
    from align_kit.console import exit_status

    return exit_status(main)


if __name__ == "__main__":
    sys.exit(console())
