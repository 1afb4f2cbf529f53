"""Supervised fine-tuning (SFT) on the answers of a preference set, with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml
python recipes/sft.py --config recipes/configs/sft_tiny.yaml --num_train_epochs 1
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from align_kit import adapters, runs
from align_kit.callbacks import trainer_callbacks
from align_kit.configs import AdapterArgs, DataArgs, EarlyStoppingArgs, ModelArgs, parse
from align_kit.data import load_preferences, to_sft
from align_kit.models import load_policy, load_tokenizer, tokenizer_source

CONFIG = (DataArgs, ModelArgs, AdapterArgs, EarlyStoppingArgs, SFTConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, stopping, args = parse(CONFIG, argv)

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, stopping)

    # 3. data
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    train = Dataset.from_list(to_sft(splits["train"], data_args.sft_target, args.seed))
    test = Dataset.from_list(to_sft(splits["test"], data_args.sft_target, args.seed + 1))

    # 4. model and adapter
    model, _ = load_policy(model_args, adapter_args)
    runs.log(adapters.describe_parameters(model))

    # 5. trainer
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=trainer_callbacks(stopping, tokenizer, [row["prompt"] for row in splits["test"]]),
    )

    # 6. train
    result = trainer.train(resume_from_checkpoint=run.resume_from)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report
    return runs.finish(run, trainer, {"train": result.metrics})


if __name__ == "__main__":
    main()
