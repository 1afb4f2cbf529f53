"""Best-of-N fine-tuning (the cross-entropy method): sample N answers per prompt, keep the k that the
reward model (or ensemble) scores highest, fine-tune on them with TRL's SFTTrainer (align_kit/training/sft.py),
and repeat.

    accelerate launch recipes/best_of_n.py --config recipes/configs/best_of_n_tiny.yaml
    python recipes/best_of_n.py --config recipes/configs/best_of_n_tiny.yaml --rounds 3

Each round writes ``round_<r>/samples.jsonl`` (every sampled answer, its reward, whether it was kept),
``round_<r>/model`` (the policy after the round) and, last, ``round_<r>/report.json``. An interrupted run
started again resumes after its last finished round, from that round's policy; an interrupted round keeps
its samples (and its trainer checkpoints, with ``save_strategy: steps``). Best-of-N sampling without
training, the inference-time baseline, is ``align_kit.models.generation.best_of_n``.
"""

from __future__ import annotations

import dataclasses
import random
from statistics import mean

from datasets import Dataset

from align_kit import console
from align_kit.configs import AdapterArgs, BestOfNArgs, DataArgs, ModelArgs, RewardModelArgs, RunArgs
from align_kit.data.loading import distinct_prompts, load_preferences
from align_kit.models import adapters, rewards
from align_kit.models.generation import greedy_reward, policy_report, sample_and_score, top_k
from align_kit.models.loading import load_model, load_policy, load_tokenizer, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import curves, guards, runs, stops
from align_kit.training.curves import CurveArgs
from align_kit.training.sft import SFTConfig, SFTTrainer

CONFIG = (DataArgs, ModelArgs, AdapterArgs, RewardModelArgs, BestOfNArgs, CurveArgs, RunArgs, SFTConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, reward_args, bon_args, curve_args, run_args, args = parse(
        CONFIG, argv
    )

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, reward_args, bon_args, curve_args, run_args)
    reports = runs.finished_rounds(run)[: bon_args.rounds]  # an interrupted run's: resume after the last
    if reports:
        console.log(f"resuming after round {len(reports)}, from {runs.round_model(run, len(reports))}")

    # 3. data: prompts only; each round samples its own training prompts
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: distinct_prompts(rows) for split, rows in splits.items()}
    held_out = prompts["test"][: bon_args.report_prompts]

    # 4. model and adapter (the last finished round's, on a resume); the starting model as reference (for
    # the KL); reward model(s)
    start_from = str(runs.round_model(run, len(reports))) if reports else model_args.model_name_or_path
    model, _ = load_policy(dataclasses.replace(model_args, model_name_or_path=start_from), adapter_args)
    console.log(adapters.describe_parameters(model))
    reference = load_model(model_args).eval().requires_grad_(False)
    reward_model = rewards.load_reward(reward_args, tokenizer.pad_token_id)
    scorer = rewards.reward_scorer(reward_model, tokenizer)
    recorder = curves.recorder_for(
        curve_args, run.output_dir, "best_of_n", model, reference, tokenizer, prompts["test"], reward_model,
        save=curves.adapter_saver(model, model_args.model_name_or_path, adapter_args), seed=args.seed,
    )  # fmt: skip  # a point per round (curve_steps: on or off), the first before any training
    if recorder is not None and not reports:
        recorder.record(0)

    # 5-6. trainer and training, one SFTTrainer per round on that round's best answers
    for round_index in range(len(reports) + 1, bon_args.rounds + 1):
        round_dir, seed = runs.round_dir(run, round_index), args.seed + round_index
        rows = runs.read_jsonl(round_dir / "samples.jsonl")  # an interrupted round's samples are kept
        if rows is None:
            batch = random.Random(seed).sample(
                prompts["train"], min(bon_args.prompts_per_round, len(prompts["train"]))
            )
            samples, scores = sample_and_score(
                model, tokenizer, scorer, batch, bon_args.samples_per_prompt, bon_args.max_new_tokens,
                bon_args.generation_batch_size, bon_args.sampling_temperature, seed=seed,
            )  # fmt: skip
            kept = [top_k(group, bon_args.keep_top_k) for group in scores]
            rows = [
                {"prompt": prompt, "answer": answer, "reward": reward, "kept": i in keep}
                for prompt, answers, rewards_, keep in zip(batch, samples, scores, kept, strict=True)
                for i, (answer, reward) in enumerate(zip(answers, rewards_, strict=True))
            ]
            runs.write_jsonl(round_dir / "samples.jsonl", rows)
        best = [{"prompt": row["prompt"], "completion": row["answer"]} for row in rows if row["kept"]]
        round_run = runs.Run(round_dir, runs.last_checkpoint(round_dir), run.run_id, run.keep)
        trainer = SFTTrainer(
            model=model,
            args=dataclasses.replace(args, output_dir=str(round_dir)),
            train_dataset=Dataset.from_list(best),
            processing_class=tokenizer,
            callbacks=guards.watch(round_run),
        )
        result = stops.train(trainer, round_run)
        runs.save_model(
            runs.Run(runs.round_model(run, round_index), None), trainer, tokenizer,
            model_args.model_name_or_path, adapter_args,
        )  # fmt: skip
        report = {
            "round": round_index,
            "reward_samples": mean(row["reward"] for row in rows),
            "reward_kept": mean(row["reward"] for row in rows if row["kept"]),
            "reward_greedy_held_out": greedy_reward(
                model, tokenizer, scorer, held_out, bon_args.max_new_tokens
            )[0],
            "train": runs.train_summary(round_run, trainer, result),
            "log_history": trainer.state.log_history,
        }
        round_run.write_json(runs.ROUND_REPORT, report)  # last: the round is finished
        console.log(
            f"round {round_index}: reward of samples {report['reward_samples']:+.3f}, kept "
            f"{report['reward_kept']:+.3f}; greedy held-out {report['reward_greedy_held_out']:+.3f}"
        )
        reports.append(report)
        if recorder is not None:
            recorder.record(round_index)
            if recorder.should_stop():
                console.log(f"stop_at_gold_peak: stopping after round {round_index}")
                break

    # 7. save: the last round's policy is the run's
    runs.copy_model(runs.round_model(run, len(reports)), run)
    marker = curves.adopt_peak(recorder, run.output_dir)  # stop_at_gold_peak: the peak's policy is the run's

    # 8. report: reward of greedy answers (final vs start), KL to the start, sample completions
    report, held_out_samples = policy_report(
        model, reference, tokenizer, scorer, held_out, bon_args.max_new_tokens, args.seed
    )
    runs.record_policy(run, report, held_out_samples)
    last_round = reports[-1]["log_history"]  # metrics.json's log history is the last round's SFT
    return runs.finish(
        run, None, {"rounds": reports, "report": report, **marker}, history=last_round, marker=marker
    )


if __name__ == "__main__":
    console.run_command(main)
