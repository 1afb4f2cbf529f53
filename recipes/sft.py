"""Supervised fine-tuning (SFT) on instruction rows, conversations or the answers of a preference set,
with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml
python recipes/sft.py --config recipes/configs/sft_tiny.yaml --num_train_epochs 1
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from align_kit import console
from align_kit.configs import AdapterArgs, DataArgs, EarlyStoppingArgs, ModelArgs, RunArgs
from align_kit.data.loading import load_sft
from align_kit.models import adapters
from align_kit.models.loading import load_policy, load_tokenizer, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import guards, runs
from align_kit.training.callbacks import trainer_callbacks

CONFIG = (DataArgs, ModelArgs, AdapterArgs, EarlyStoppingArgs, RunArgs, SFTConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, stopping, run_args, args = parse(CONFIG, argv)

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, stopping, run_args)

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

    # 6. train
    result = trainer.train(resume_from_checkpoint=run.resume_from)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report
    return runs.finish(run, trainer, {"train": runs.train_summary(run, trainer, result)})


if __name__ == "__main__":
    console.run_command(main)
