"""LLM-driven discovery of preference losses (DiscoPOP; Lu et al. 2024, "Discovering Preference Optimization
Algorithms with and for Large Language Models") on the loss sweep's budget.

    OPENAI_API_KEY=... accelerate launch recipes/discover_loss.py --config recipes/configs/discover_loss_tiny.yaml
    python recipes/discover_loss.py --config recipes/configs/discover_loss_tiny.yaml \\
        --proposer_base_url http://127.0.0.1:8000/v1 --proposer_model my-served-model

An LLM behind any OpenAI-compatible endpoint proposes one loss function per generation, given the table so far;
each proposal is checked statically and unit-checked in a killable worker (align_kit.loss_lab.checks,
align_kit.loss_lab.sandbox), then trained and scored exactly as a member of the sweep (align_kit.loss_lab.sweep).
Every proposal goes to <output_dir>/discovery/discovery.jsonl; a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import sys

from align_kit.console import log
from align_kit.loss_lab import search as loss_search
from align_kit.loss_lab import sweep as loss_sweep
from align_kit.loss_lab.discovery import OpenAIProposer, discover
from align_kit.loss_lab.sandbox import LossSandbox

CONFIG = (loss_search.DiscoveryArgs, *loss_sweep.CONFIG)


def main(argv: list[str] | None = None) -> dict:
    # 1. config: the search's settings, then the sweep's (budget, data, model, evaluation)
    sweep = loss_sweep.Sweep(sys.argv[1:] if argv is None else argv, extra=(loss_search.DiscoveryArgs,))
    (args,) = sweep.extra
    beta = sweep.sweep_args.betas[0]
    folder = sweep.root / "discovery"

    # 2. the known losses the proposer is shown: the sweep's members, trained or reused
    known = loss_search.seed_table(sweep.run()["ranking"]) if args.seed_with_sweep else []

    # 3. the proposer, and the evaluation every checked proposal gets
    propose = OpenAIProposer(loss_search.proposer_config(args))
    evaluate = loss_search.discovery_evaluator(sweep, beta)

    # 4. the search: propose, check, train and score, append to discovery.jsonl; resumes
    with LossSandbox(timeout=args.check_timeout, seed=sweep.args.seed) as sandbox:
        result = discover(
            args.generations,
            propose,
            evaluate,
            folder / "discovery.jsonl",
            seed_table=known,
            score_key=args.score_key,
            sandbox=sandbox,
            beta_hint=f"{beta:g} in this search",
            log=log,
        )

    # 5. report: discovery_summary.json next to the log
    log(f"best: {result.table[0].get('name') if result.table else None}; summary in {result.summary_path}")
    return {"table": result.table, "refusals": result.refusals, "log": str(result.log_path)}


if __name__ == "__main__":
    main()
