"""REINFORCE leave-one-out (RLOO) with TRL's RLOOTrainer, against reward models, an ensemble, the embedded
task's oracle, or your own reward functions: the same reward specs as recipes/grpo.py.

    accelerate launch recipes/rloo.py --config recipes/configs/rloo_tiny.yaml
    python recipes/rloo.py --config recipes/configs/rloo_tiny.yaml --reward_funcs oracle --max_steps 2

For each prompt RLOO samples ``num_generations`` answers, scores them with ``reward_funcs`` (summed with
``reward_weights``) minus ``beta`` times each answer's log-ratio to the reference, and pushes up each
answer by how much it beats the mean of the OTHER answers to its prompt (the leave-one-out baseline);
no value model. The policy starts from SFT; the reference is passed explicitly (loaded again
from disk, or the policy with its adapter off), never TRL's reload from ``_name_or_path``. Rewards are
specs (see ``align_kit.training.reward_funcs``): ``oracle``, a reward-model folder, ``ensemble:a,b``, ``module:function``.
"""

from __future__ import annotations

from datasets import Dataset
from trl import RLOOConfig

from align_kit import console
from align_kit.configs import (
    AdapterArgs,
    ConfigError,
    DataArgs,
    GRPOArgs,
    ModelArgs,
    RewardModelArgs,
    RunArgs,
)
from align_kit.data.loading import distinct_prompts, load_preferences
from align_kit.models import adapters, rewards
from align_kit.models.generation import policy_report
from align_kit.models.loading import load_tokenizer, policy_and_reference, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import guards, runs, stops
from align_kit.training.grpo import RLOOTrainerWithReference
from align_kit.training.reward_funcs import WeightedRewards, build_reward_funcs

CONFIG = (DataArgs, ModelArgs, AdapterArgs, RewardModelArgs, GRPOArgs, RunArgs, RLOOConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    # GRPOArgs: the reward specs and report settings, shared with recipes/grpo.py
    data_args, model_args, adapter_args, reward_args, grpo_args, run_args, args = parse(CONFIG, argv)
    if reward_args.reward_models:
        raise ConfigError(
            "reward_models: not read by this recipe; list reward models in reward_funcs "
            "(a folder, or 'ensemble:<folder>,<folder>' with ensemble_aggregation)"
        )

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, reward_args, grpo_args, run_args)

    # 3. data: prompts only, one row per distinct prompt
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: distinct_prompts(rows) for split, rows in splits.items()}
    train = Dataset.from_dict({"prompt": prompts["train"]})

    # 4. policy, adapter and reference; reward functions
    policy, ref_model = policy_and_reference(model_args, adapter_args)
    console.log(adapters.describe_parameters(policy))
    reward_funcs, ensemble = build_reward_funcs(
        grpo_args.reward_funcs, reward_args, tokenizer, args.reward_weights
    )
    console.log(f"rewards: {grpo_args.reward_funcs}, weights {args.reward_weights or 'all 1'}")

    # 5. trainer
    trainer = RLOOTrainerWithReference(
        model=policy,
        ref_model=ref_model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[*([rewards.DisagreementCallback(ensemble)] if ensemble else []), *guards.watch(run)],
    )

    # 6. train
    result = stops.train(trainer, run)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report: weighted reward of greedy answers (policy vs reference), KL to the reference, samples
    extra = {"ensemble": ensemble.stats()} if ensemble else {}
    scorer = WeightedRewards(reward_funcs, args.reward_weights, tokenizer)
    report, samples = policy_report(
        policy, ref_model, tokenizer, scorer, prompts["test"][: grpo_args.report_prompts],
        grpo_args.report_max_new_tokens, args.seed,
    )  # fmt: skip
    runs.record_policy(run, report, samples)
    return runs.finish(
        run, trainer, {"train": runs.train_summary(run, trainer, result), "report": report, **extra}
    )


if __name__ == "__main__":
    console.run_command(main)
