"""Best-of-N fine-tuning (the cross-entropy method): sample N answers per prompt, keep the k that the
reward model (or ensemble) scores highest, fine-tune on them with TRL's SFTTrainer, and repeat.

    accelerate launch recipes/best_of_n.py --config recipes/configs/best_of_n_tiny.yaml
    python recipes/best_of_n.py --config recipes/configs/best_of_n_tiny.yaml --rounds 3

Each round writes ``round_<r>/samples.jsonl`` (every sampled answer, its reward, whether it was kept)
and ``round_<r>/report.json``. Best-of-N sampling without training, the inference-time baseline, is
``align_kit.generation.best_of_n``.
"""

from __future__ import annotations

import dataclasses
import random
from statistics import mean

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from align_kit import adapters, rewards, runs
from align_kit.configs import AdapterArgs, BestOfNArgs, DataArgs, ModelArgs, RewardModelArgs, parse
from align_kit.data import distinct_prompts, load_preferences
from align_kit.generation import greedy_reward, policy_report, sample_and_score, top_k
from align_kit.models import load_model, load_policy, load_tokenizer, tokenizer_source

CONFIG = (DataArgs, ModelArgs, AdapterArgs, RewardModelArgs, BestOfNArgs, SFTConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, reward_args, bon_args, args = parse(CONFIG, argv)

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, reward_args, bon_args)
    if run.resume_from:
        raise FileExistsError(f"{run.output_dir}: best-of-N rounds do not resume; choose another output_dir")

    # 3. data: prompts only; each round samples its own training prompts
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: distinct_prompts(rows) for split, rows in splits.items()}
    held_out = prompts["test"][: bon_args.report_prompts]

    # 4. model and adapter; the starting model as reference (for the KL); reward model(s)
    model, _ = load_policy(model_args, adapter_args)
    runs.log(adapters.describe_parameters(model))
    reference = load_model(model_args).eval().requires_grad_(False)
    scorer = rewards.reward_scorer(rewards.load_reward(reward_args, tokenizer.pad_token_id), tokenizer)

    # 5-6. trainer and training, one SFTTrainer per round on that round's best answers
    reports = []
    for round_index in range(1, bon_args.rounds + 1):
        round_dir, seed = run.path(f"round_{round_index}"), args.seed + round_index
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
        trainer = SFTTrainer(
            model=model,
            args=dataclasses.replace(args, output_dir=str(round_dir)),
            train_dataset=Dataset.from_list(best),
            processing_class=tokenizer,
        )
        result = trainer.train()
        report = {
            "round": round_index,
            "reward_samples": mean(row["reward"] for row in rows),
            "reward_kept": mean(row["reward"] for row in rows if row["kept"]),
            "reward_greedy_held_out": greedy_reward(
                model, tokenizer, scorer, held_out, bon_args.max_new_tokens
            )[0],
            "train": result.metrics,
        }
        runs.Run(round_dir, None).write_json("report.json", report)
        runs.log(
            f"round {round_index}: reward of samples {report['reward_samples']:+.3f}, kept "
            f"{report['reward_kept']:+.3f}; greedy held-out {report['reward_greedy_held_out']:+.3f}"
        )
        reports.append(report)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report: reward of greedy answers (final vs start), KL to the start, sample completions
    report, held_out_samples = policy_report(
        model, reference, tokenizer, scorer, held_out, bon_args.max_new_tokens, args.seed
    )
    runs.record_policy(run, report, held_out_samples)
    return runs.finish(run, trainer, {"rounds": reports, "report": report})


if __name__ == "__main__":
    main()
