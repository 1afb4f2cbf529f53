"""Best-of-N fine-tuning (the cross-entropy method): sample N answers per prompt, keep the k that the
reward model (or ensemble) scores highest, fine-tune on them with TRL's SFTTrainer, and repeat.

    accelerate launch recipes/best_of_n.py --config recipes/configs/best_of_n_tiny.yaml
    python recipes/best_of_n.py --config recipes/configs/best_of_n_tiny.yaml --rounds 3

Each round writes ``round_<r>/samples.jsonl`` (every sampled answer, its reward, whether it was kept)
and ``round_<r>/report.json``. Best-of-N sampling without training, the inference-time baseline, is
``align_kit.rewards.best_of_n``.
"""

from __future__ import annotations

import dataclasses
import json
import random

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from align_kit import adapters, rewards, runs
from align_kit.configs import AdapterArgs, BestOfNArgs, DataArgs, ModelArgs, RewardModelArgs, parse
from align_kit.data import load_preferences
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
    prompts = {split: list(dict.fromkeys(row["prompt"] for row in rows)) for split, rows in splits.items()}
    held_out = prompts["test"][: bon_args.report_prompts]

    # 4. model and adapter; the starting model as reference (for the KL); reward model(s)
    model, _ = load_policy(model_args, adapter_args)
    runs.log(adapters.describe_parameters(model))
    reference = load_model(model_args).eval().requires_grad_(False)
    reward_model = rewards.load_reward(reward_args, tokenizer.pad_token_id)
    scorer = rewards.reward_scorer(reward_model, tokenizer)

    # 5-6. trainer and training, one SFTTrainer per round on that round's best answers
    reports = []
    for round_index in range(1, bon_args.rounds + 1):
        round_dir = run.path(f"round_{round_index}")
        seed = args.seed + round_index
        batch = random.Random(seed).sample(
            prompts["train"], min(bon_args.prompts_per_round, len(prompts["train"]))
        )
        samples, scores = rewards.sample_and_score(
            model, tokenizer, scorer, batch, bon_args.samples_per_prompt, bon_args.max_new_tokens,
            bon_args.generation_batch_size, bon_args.sampling_temperature, seed=seed,
        )  # fmt: skip
        kept = [sorted(range(len(s)), key=s.__getitem__, reverse=True)[: bon_args.keep_top_k] for s in scores]
        round_dir.mkdir(parents=True, exist_ok=True)
        if runs.is_main_process():
            with open(round_dir / "samples.jsonl", "w") as handle:
                for prompt, answers, answer_rewards, keep in zip(batch, samples, scores, kept, strict=True):
                    for i, (answer, reward) in enumerate(zip(answers, answer_rewards, strict=True)):
                        row = {"prompt": prompt, "answer": answer, "reward": reward, "kept": i in keep}
                        handle.write(json.dumps(row) + "\n")
        best = [
            {"prompt": p, "completion": a[i]}
            for p, a, keep in zip(batch, samples, kept, strict=True)
            for i in keep
        ]
        trainer = SFTTrainer(
            model=model,
            args=dataclasses.replace(args, output_dir=str(round_dir)),
            train_dataset=Dataset.from_list(best),
            processing_class=tokenizer,
        )
        result = trainer.train()
        all_scores = [s for group in scores for s in group]
        report = {
            "round": round_index,
            "reward_samples": sum(all_scores) / len(all_scores),
            "reward_kept": sum(scores[j][i] for j, keep in enumerate(kept) for i in keep) / len(best),
            "reward_greedy_held_out": rewards.greedy_reward(
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
    report, held_out_samples = rewards.policy_report(
        model, reference, tokenizer, scorer, held_out, bon_args.max_new_tokens, args.seed
    )
    run.write_json("samples.json", held_out_samples)
    runs.log(
        f"greedy reward {report['reward_reference']:+.3f} -> {report['reward_policy']:+.3f}; "
        f"KL to the start {report['kl_to_reference']:.3f} nats per answer"
    )
    return runs.finish(run, trainer, {"rounds": reports, "report": report})


if __name__ == "__main__":
    main()
