"""Kahneman-Tversky optimisation (KTO) with TRL's KTOTrainer: answers labelled desirable or undesirable
one at a time, so no pairs are needed.

    accelerate launch recipes/kto.py --config recipes/configs/kto_tiny.yaml
    python recipes/kto.py --config recipes/configs/kto_tiny.yaml --beta 0.2

Rows are unpaired (``dataset_format: unpaired``: prompt, completion, label) or preference pairs, each split
into its desirable and its undesirable answer. As in DPO the reference model is always passed explicitly.
"""

from __future__ import annotations

from datasets import Dataset

from align_kit import console
from align_kit.configs import AdapterArgs, DataArgs, EarlyStoppingArgs, ModelArgs, RunArgs
from align_kit.data.loading import distinct_prompts, load_unpaired
from align_kit.models import adapters
from align_kit.models.loading import load_tokenizer, policy_and_reference, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import curves, guards, runs, stops
from align_kit.training.callbacks import trainer_callbacks
from align_kit.training.curves import CurveArgs
from align_kit.training.losses import KTOConfig, KTOTrainer  # TRL's, on chunked log-probabilities

CONFIG = (DataArgs, ModelArgs, AdapterArgs, EarlyStoppingArgs, CurveArgs, RunArgs, KTOConfig)


def main(argv: list[str] | None = None, configs: tuple | None = None) -> dict:
    # 1. config (the loss sweep passes the configs it parsed when it checked its members)
    data_args, model_args, adapter_args, stopping, curve_args, run_args, args = configs or parse(CONFIG, argv)

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, stopping, curve_args, run_args)

    # 3. data
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_unpaired(data_args, tokenizer)  # a pair gives a desirable and an undesirable row
    runs.record_data(run, counts)
    columns = ["prompt", "completion", "label"]
    train = Dataset.from_list(splits["train"]).select_columns(columns)
    test = Dataset.from_list(splits["test"]).select_columns(columns)

    # 4. model, adapter and reference
    model, ref_model = policy_and_reference(model_args, adapter_args)
    console.log(adapters.describe_parameters(model))

    # 5. trainer
    trainer = KTOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=test if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=[*trainer_callbacks(stopping), *guards.watch(run)],
    )

    recorder = curves.attach(
        curve_args, trainer, run.output_dir, "kto", model, ref_model, tokenizer, distinct_prompts(splits["test"]),
        implicit_beta=args.beta, base_model=model_args.model_name_or_path, adapter_args=adapter_args, seed=args.seed,
    )  # fmt: skip

    # 6. train
    result = stops.train(trainer, run)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)
    marker = curves.adopt_peak(recorder, run.output_dir)  # stop_at_gold_peak: the peak's policy is the run's

    # 8. report
    return runs.finish(run, trainer, {"train": result.metrics, **marker}, marker=marker)


if __name__ == "__main__":
    console.run_command(main)
