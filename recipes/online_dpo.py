"""Online DPO (Guo et al. 2024) with TRL 1.12's experimental OnlineDPOTrainer: at every step the policy
samples two answers per prompt, a labeller picks the better one, and DPO trains on that fresh pair.

    accelerate launch recipes/online_dpo.py --config recipes/configs/online_dpo_tiny.yaml
    python recipes/online_dpo.py --config recipes/configs/online_dpo_tiny.yaml --reward_funcs oracle

The labeller is either reward specs, as GRPO takes them (``oracle``, a reward-model folder,
``ensemble:a,b``, ``module:function``; the higher summed reward is chosen), or a pairwise ``judge`` as the
evaluation names it (both orders, cached in ``judge_cache.jsonl``; ties and parse failures counted in the
report). The reference is passed explicitly (loaded again from disk, or the policy with its adapter off).
"""

from __future__ import annotations

from datasets import Dataset

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
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.label_args import JudgeLabellerArgs
from align_kit.judges.labelling import PairwiseLabeller, judge_from_spec
from align_kit.models import adapters, rewards
from align_kit.models.generation import policy_report
from align_kit.models.loading import load_tokenizer, policy_and_reference, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import guards, runs, stops
from align_kit.training.online_dpo import OnlineDPOConfig, OnlineDPOTrainerWithReference
from align_kit.training.reward_funcs import WeightedRewards, build_reward_funcs

CONFIG = (
    DataArgs,
    ModelArgs,
    AdapterArgs,
    RewardModelArgs,
    GRPOArgs,
    JudgeLabellerArgs,
    RunArgs,
    OnlineDPOConfig,
)


def main(argv: list[str] | None = None) -> dict:
    # 1. config (GRPOArgs: the reward specs and report settings, shared with recipes/grpo.py)
    data_args, model_args, adapter_args, reward_args, grpo_args, labeller_args, run_args, args = parse(
        CONFIG, argv
    )
    if reward_args.reward_models:
        raise ConfigError("reward_models: not read by this recipe; list reward models in reward_funcs")
    report_specs = grpo_args.reward_funcs
    if labeller_args.judge and not report_specs:
        if data_args.dataset != "embedded":
            raise ConfigError("reward_funcs: name one to score the final report (a judge gives no scores)")
        report_specs = ["oracle"]

    # 2. seed, logging, run directory
    run = runs.start(
        args, data_args, model_args, adapter_args, reward_args, grpo_args, labeller_args, run_args
    )

    # 3. data: prompts only, one row per distinct prompt
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: distinct_prompts(rows) for split, rows in splits.items()}
    train = Dataset.from_dict({"prompt": prompts["train"]})

    # 4. policy, adapter and reference; the labeller
    policy, ref_model = policy_and_reference(model_args, adapter_args)
    console.log(adapters.describe_parameters(policy))
    report_funcs, ensemble = build_reward_funcs(report_specs, reward_args, tokenizer, args.reward_weights)
    labeller = None
    if labeller_args.judge:
        labeller = PairwiseLabeller(
            judge_from_spec(labeller_args.judge), JudgmentCache(run.path("judge_cache.jsonl"))
        )
        console.log(f"labeller: judge {labeller.judge.name} (both orders); report scored by {report_specs}")
    else:
        console.log(f"labeller: {report_specs}, weights {args.reward_weights or 'all 1'}")

    # 5. trainer
    trainer = OnlineDPOTrainerWithReference(
        model=policy,
        ref_model=ref_model,
        reward_funcs=[labeller] if labeller else report_funcs,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[
            *([rewards.DisagreementCallback(ensemble)] if ensemble and not labeller else []),
            *guards.watch(run),
        ],
    )

    # 6. train
    result = stops.train(trainer, run)

    # 7. save
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report: reward of greedy answers (policy vs reference), KL to the reference, samples; the labeller
    extra = {"ensemble": ensemble.stats()} if ensemble else {}
    if labeller:
        extra["labeller"] = labeller.stats()
        console.log(
            f"labeller: {extra['labeller']['outcomes']}, flip rate {extra['labeller']['flip_rate']:.3f}"
        )
    scorer = WeightedRewards(report_funcs, args.reward_weights, tokenizer)
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
