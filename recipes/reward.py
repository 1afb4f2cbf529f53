"""Reward model r(x, y) from pairwise preferences with TRL's RewardTrainer (Bradley-Terry loss).

    accelerate launch recipes/reward.py --config recipes/configs/reward_tiny.yaml
    python recipes/reward.py --config recipes/configs/reward_tiny.yaml --num_train_epochs 1

The model is a sequence classifier with one output built on the SFT model (or any causal LM): the
backbone is loaded from the folder and the ``score`` head is new. The report holds the held-out
preference accuracy and reward statistics; ``reward_scale.json`` (mean and std of held-out rewards)
lets ensembles standardise their members.
"""

from __future__ import annotations

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from align_kit import console
from align_kit.configs import AdapterArgs, DataArgs, EarlyStoppingArgs, ModelArgs, RewardArgs, RunArgs
from align_kit.data import task
from align_kit.data.loading import attach_margins, load_preferences, subsample
from align_kit.models import adapters, rewards
from align_kit.models.loading import (
    load_tokenizer,
    load_trainable_reward_model,
    save_score_head,
    tokenizer_source,
)
from align_kit.parsing import parse
from align_kit.training import guards, runs
from align_kit.training.callbacks import trainer_callbacks

CONFIG = (DataArgs, ModelArgs, AdapterArgs, EarlyStoppingArgs, RewardArgs, RunArgs, RewardConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, stopping, reward_args, run_args, args = parse(CONFIG, argv)

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, stopping, reward_args, run_args)

    # 3. data
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    splits["train"] = subsample(splits["train"], reward_args.train_fraction, args.seed)
    columns = ["prompt", "chosen", "rejected"]
    if reward_args.margin_column:
        splits = attach_margins(splits, data_args, reward_args.margin_column)
        columns.append("margin")
    train = Dataset.from_list(splits["train"]).select_columns(columns)
    test = Dataset.from_list(splits["test"]).select_columns(columns)

    # 4. model and adapter (the score head is new and always trains)
    model = load_trainable_reward_model(model_args, adapter_args, tokenizer.pad_token_id)
    console.log(adapters.describe_parameters(model))

    # 5. trainer
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=[*trainer_callbacks(stopping), *guards.watch(run)],
    )

    # 6. train
    result = trainer.train(resume_from_checkpoint=run.resume_from)

    # 7. save
    adapted_state = runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)
    if adapted_state is not None:
        save_score_head(adapted_state, run.output_dir)

    # 8. report
    scorer = rewards.reward_scorer(
        trainer.accelerator.unwrap_model(trainer.model), tokenizer, reward_args.score_batch_size
    )
    # the embedded task's oracle names what is wrong with each rejected answer: accuracy per kind
    kind = task.rejected_kind if data_args.dataset == "embedded" else None
    held_out = rewards.preference_stats(scorer, splits["test"], kind)
    run.write_json(rewards.SCALE_FILE, {"mean": held_out["mean"], "std": held_out["std"]})
    console.log(
        f"held-out preference accuracy {held_out['accuracy']:.3f} on {held_out['n_pairs']} pairs; "
        f"reward chosen {held_out['chosen_mean']:+.2f} +- {held_out['chosen_std']:.2f}, "
        f"rejected {held_out['rejected_mean']:+.2f} +- {held_out['rejected_std']:.2f}"
    )
    for name, group in held_out.get("by_kind", {}).items():
        console.log(f"  rejected answer {name}: accuracy {group['accuracy']:.3f} on {group['n_pairs']} pairs")
    return runs.finish(
        run, trainer, {"train": runs.train_summary(run, trainer, result), "held_out": held_out}
    )


if __name__ == "__main__":
    console.run_command(main)
