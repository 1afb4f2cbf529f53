"""Iterative DPO: rounds of sample -> label with a judge -> DPO (TRL's DPOTrainer), each round starting from,
and referenced to, the last round's policy.

    accelerate launch recipes/iterative_dpo.py --config recipes/configs/iterative_dpo_tiny.yaml
    python recipes/iterative_dpo.py --config recipes/configs/iterative_dpo_tiny.yaml --rounds 2

Each round samples ``samples_per_prompt`` answers to ``prompts_per_round`` training prompts, judges
``pairs_per_prompt`` pairs in both orders (``judge``: any judge the evaluation takes; cached in
``judge_cache.jsonl`` for all rounds), and trains DPO on the pairs won in both orders. Round ``r`` writes
``round_<r>/samples.jsonl``, ``pairs.jsonl``, ``model`` and, last, ``report.json`` (labels, the judge's
position bias, the greedy reward). A killed run started again resumes after its last finished round; a
killed round keeps its samples (and its trainer checkpoints, with ``save_strategy: steps``).
"""

from __future__ import annotations

import dataclasses
import random

from datasets import Dataset

from align_kit import console
from align_kit.configs import AdapterArgs, DataArgs, ModelArgs, RewardModelArgs, RunArgs
from align_kit.data.formats import DataError
from align_kit.data.loading import distinct_prompts, load_preferences
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.label_args import IterativeDPOArgs
from align_kit.judges.labelling import (
    candidate_pairs,
    judge_from_spec,
    judge_pairs,
    preference_rows,
    slot_figures,
)
from align_kit.models.generation import generate, greedy_reward, policy_report
from align_kit.models.loading import load_model, load_tokenizer, policy_and_reference, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import guards, runs, stops
from align_kit.training.losses import DPOConfig, DPOTrainer
from align_kit.training.reward_funcs import WeightedRewards, build_reward_funcs

CONFIG = (DataArgs, ModelArgs, AdapterArgs, IterativeDPOArgs, RunArgs, DPOConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, it_args, run_args, args = parse(CONFIG, argv)
    judge = judge_from_spec(it_args.judge)

    # 2. seed, logging, run directory; the rounds an interrupted run finished
    run = runs.start(args, data_args, model_args, adapter_args, it_args, run_args)
    reports = runs.finished_rounds(run)[: it_args.rounds]
    if reports:
        console.log(f"resuming after round {len(reports)}, from {runs.round_model(run, len(reports))}")

    # 3. data: prompts only; each round samples its own
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: distinct_prompts(rows) for split, rows in splits.items()}
    held_out = prompts["test"][: it_args.report_prompts]
    cache = JudgmentCache(run.path("judge_cache.jsonl"))
    funcs, _ = build_reward_funcs([it_args.report_reward], RewardModelArgs(), tokenizer)
    scorer = WeightedRewards(funcs, None, tokenizer)

    # 4-6. per round: policy and reference (the last round's), samples, labels, DPO
    for index in range(len(reports) + 1, it_args.rounds + 1):
        round_dir, seed = runs.round_dir(run, index), args.seed + index
        start = str(runs.round_model(run, index - 1)) if index > 1 else model_args.model_name_or_path
        model, ref_model = policy_and_reference(
            dataclasses.replace(model_args, model_name_or_path=start), adapter_args
        )
        sampled = runs.read_jsonl(round_dir / "samples.jsonl")  # a killed round's samples are kept
        if sampled is None:
            batch = random.Random(seed).sample(
                prompts["train"], min(it_args.prompts_per_round, len(prompts["train"]))
            )
            answers = generate(
                model, tokenizer, batch, it_args.max_new_tokens, it_args.generation_batch_size, do_sample=True,
                temperature=it_args.sampling_temperature, num_return_sequences=it_args.samples_per_prompt,
                seed=seed, progress=False,
            )  # fmt: skip
            sampled = [{"prompt": p, "answers": a} for p, a in zip(batch, answers, strict=True)]
            runs.write_jsonl(round_dir / "samples.jsonl", sampled)
        pairs, skipped = candidate_pairs(
            [s["prompt"] for s in sampled], [s["answers"] for s in sampled], it_args.pairs_per_prompt, seed
        )
        calls = judge.stats.calls
        results = judge_pairs(judge, pairs, cache)
        rows, outcomes = preference_rows(pairs, results)
        if not rows:
            raise DataError(f"round {index}: the judge decided none of {len(pairs)} pairs ({dict(outcomes)})")
        runs.write_jsonl(round_dir / "pairs.jsonl", rows)
        round_run = runs.Run(round_dir, runs.last_checkpoint(round_dir))
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=dataclasses.replace(args, output_dir=str(round_dir)),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=guards.watch(round_run),
        )
        result = stops.train(trainer, round_run)
        runs.save_model(
            runs.Run(runs.round_model(run, index), None), trainer, tokenizer, model_args.model_name_or_path,
            adapter_args,
        )  # fmt: skip
        report = {
            "round": index,
            "started_from": start,
            "labels": {"pairs": len(pairs), "rows": len(rows), "outcomes": dict(outcomes), **dict(skipped)},
            "judge": {**slot_figures(results), "calls": judge.stats.calls - calls},
            "reward_greedy_held_out": greedy_reward(
                model, tokenizer, scorer, held_out, it_args.max_new_tokens
            )[0],
            "train": runs.train_summary(round_run, trainer, result),
            "log_history": trainer.state.log_history,
        }
        round_run.write_json(runs.ROUND_REPORT, report)  # last: the round is finished
        console.log(
            f"round {index}: {len(rows)} of {len(pairs)} pairs labelled; reward {report['reward_greedy_held_out']:+.3f}"
        )
        reports.append(report)

    # 7. save: the last round's policy is the run's
    runs.copy_model(runs.round_model(run, len(reports)), run)

    # 8. report: greedy reward (final vs the starting model), KL to the start, sample completions
    final = load_model(dataclasses.replace(model_args, model_name_or_path=str(run.output_dir)))
    start_model = load_model(model_args).eval().requires_grad_(False)
    report, samples = policy_report(
        final, start_model, tokenizer, scorer, held_out, it_args.max_new_tokens, args.seed
    )
    runs.record_policy(run, report, samples)
    return runs.finish(run, None, {"rounds": reports, "report": report}, history=reports[-1]["log_history"])


if __name__ == "__main__":
    console.run_command(main)
