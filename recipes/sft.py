"""Supervised fine-tuning (SFT) on instruction rows, conversations or the answers of a preference set,
with TRL's SFTTrainer (align_kit/training/sft.py: its chunked loss without the head's recompute).

accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml
python recipes/sft.py --config recipes/configs/sft_tiny.yaml --num_train_epochs 1
"""

from __future__ import annotations

from datasets import Dataset

from align_kit import console
from align_kit.configs import AdapterArgs, ConfigError, DataArgs, EarlyStoppingArgs, ModelArgs, RunArgs
from align_kit.data.loading import load_sft
from align_kit.models import adapters
from align_kit.models.loading import (
    load_model,
    load_policy,
    load_reward_model,
    load_tokenizer,
    tokenizer_source,
)
from align_kit.parsing import parse
from align_kit.training import curves, guards, runs, stops
from align_kit.training.callbacks import trainer_callbacks
from align_kit.training.curves import CurveArgs
from align_kit.training.sft import SFTConfig, SFTTrainer

CONFIG = (DataArgs, ModelArgs, AdapterArgs, EarlyStoppingArgs, CurveArgs, RunArgs, SFTConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, stopping, curve_args, run_args, args = parse(CONFIG, argv)
    if curve_args.curve_steps and not stopping.reward_stopping_model:
        raise ConfigError("curve_steps: SFT's curve needs a proxy: set reward_stopping_model")

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, stopping, curve_args, run_args)

    # 3. data
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_sft(data_args, tokenizer, args.seed)  # instruction rows, or one answer per pair
    runs.record_data(run, counts)
    train = Dataset.from_list(splits["train"]).select_columns(["prompt", "completion"])
    test = Dataset.from_list(splits["test"]).select_columns(["prompt", "completion"])

    # 4. model and adapter
    model, _ = load_policy(model_args, adapter_args)
    console.log(adapters.describe_parameters(model))

    # 5. trainer
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=[
            *trainer_callbacks(stopping, tokenizer, [row["prompt"] for row in splits["test"]]),
            *guards.watch(run),
        ],
    )

    proxy = None
    if curve_args.curve_steps:  # proxy: the reward model of reward early stopping; reference: the start
        proxy = load_reward_model(stopping.reward_stopping_model, pad_token_id=tokenizer.pad_token_id).eval()
    recorder = curves.attach(
        curve_args, trainer, run.output_dir, "sft", model,
        load_model(model_args).eval().requires_grad_(False) if proxy is not None else None, tokenizer,
        list(dict.fromkeys(row["prompt"] for row in splits["test"])), proxy,
        base_model=model_args.model_name_or_path, adapter_args=adapter_args, seed=args.seed,
    )  # fmt: skip

    # 6. train
    result = stops.train(trainer, run)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)
    marker = curves.adopt_peak(recorder, run.output_dir)  # stop_at_gold_peak: the peak's policy is the run's

    # 8. report
    return runs.finish(
        run, trainer, {"train": runs.train_summary(run, trainer, result), **marker}, marker=marker
    )


if __name__ == "__main__":
    console.run_command(main)
