"""Direct preference optimisation (DPO and its loss family) with TRL's DPOTrainer.

    accelerate launch recipes/dpo.py --config recipes/configs/dpo_tiny.yaml
    python recipes/dpo.py --config recipes/configs/dpo_tiny.yaml --beta 0.2

The reference model is always passed explicitly: TRL would otherwise reload one from
``config._name_or_path``, which can silently be the wrong model.
"""

from __future__ import annotations

from datasets import Dataset

from align_kit import console
from align_kit.configs import AdapterArgs, DataArgs, EarlyStoppingArgs, ModelArgs, RunArgs
from align_kit.data.loading import load_preferences
from align_kit.models import adapters
from align_kit.models.loading import load_tokenizer, policy_and_reference, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import guards, runs
from align_kit.training.callbacks import trainer_callbacks
from align_kit.training.losses import DPOConfig, DPOTrainer  # TRL's, plus checked settings and loss_function

CONFIG = (DataArgs, ModelArgs, AdapterArgs, EarlyStoppingArgs, RunArgs, DPOConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, stopping, run_args, args = parse(CONFIG, argv)

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, stopping, run_args)

    # 3. data
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    columns = ["prompt", "chosen", "rejected"]
    train = Dataset.from_list(splits["train"]).select_columns(columns)
    test = Dataset.from_list(splits["test"]).select_columns(columns)

    # 4. model, adapter and reference
    model, ref_model = policy_and_reference(model_args, adapter_args)
    console.log(adapters.describe_parameters(model))

    # 5. trainer
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=test if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=[*trainer_callbacks(stopping), *guards.watch(run)],
    )

    # 6. train
    result = trainer.train(resume_from_checkpoint=run.resume_from)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report
    return runs.finish(run, trainer, {"train": runs.train_summary(run, trainer, result)})


if __name__ == "__main__":
    console.run_command(main)
