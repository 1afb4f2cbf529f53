"""Proximal policy optimisation (PPO) against a reward model or an ensemble, with TRL 1.12's PPOTrainer.

    accelerate launch recipes/ppo.py --config recipes/configs/ppo_tiny.yaml
    python recipes/ppo.py --config recipes/configs/ppo_tiny.yaml --kl_coef 0.1

The policy starts from the SFT model; the reference is passed explicitly (loaded again from disk, or
the policy with its adapter off); the value model starts from the (first) reward model. PPOTrainer was
removed in trl 1.13, so this recipe needs trl 1.12.x. Prompts are left padded to one width, which is
what lets the optional entropy bonus find the answer tokens (see ``add_entropy_bonus``).
"""

from __future__ import annotations

import logging

from align_kit import console
from align_kit.configs import AdapterArgs, DataArgs, ModelArgs, PPOArgs, RewardModelArgs, RunArgs
from align_kit.data.loading import distinct_prompts, load_preferences
from align_kit.models import adapters, rewards
from align_kit.models.generation import policy_report
from align_kit.models.loading import load_reward_model, load_tokenizer, policy_and_reference, tokenizer_source
from align_kit.parsing import parse
from align_kit.training import guards, runs
from align_kit.training.ppo import (
    CANNOT_RESUME,
    BatchWidth,
    add_entropy_bonus,
    left_pad,
    ppo_classes,
    prompt_dataset,
    refuse_trl_model_paths,
)

PPOConfig, PPOTrainer = ppo_classes()
CONFIG = (DataArgs, ModelArgs, AdapterArgs, RewardModelArgs, PPOArgs, RunArgs, PPOConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, reward_args, ppo_args, run_args, args = parse(CONFIG, argv)
    refuse_trl_model_paths(args)

    # 2. seed, logging, run directory
    configs = (data_args, model_args, adapter_args, reward_args, ppo_args, run_args)
    run = runs.start(args, *configs, cannot_resume=CANNOT_RESUME)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # PPO gathers every metric with an INFO line

    # 3. data: prompts only, each batch left padded to its longest prompt
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: distinct_prompts(rows) for split, rows in splits.items()}
    train, test = (prompt_dataset(tokenizer, prompts[split]) for split in ("train", "test"))

    # 4. policy, adapter and reference; reward and value models
    policy, ref_model = policy_and_reference(model_args, adapter_args)
    console.log(adapters.describe_parameters(policy))
    reward_model = rewards.load_reward(reward_args, tokenizer.pad_token_id).eval().requires_grad_(False)
    value_path = ppo_args.value_model_path or reward_args.reward_models[0]
    value_model = load_reward_model(value_path, model_args.torch_dtype, tokenizer.pad_token_id)

    # 5. trainer
    ensemble = reward_model if isinstance(reward_model, rewards.RewardEnsemble) else None
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_model,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train,
        eval_dataset=test,
        data_collator=left_pad(tokenizer.pad_token_id),
        callbacks=[*([rewards.DisagreementCallback(ensemble)] if ensemble else []), *guards.watch(run)],
    )
    bonus = None
    if ppo_args.entropy_coef:
        trainer.dataloader = width = BatchWidth(trainer.dataloader)
        bonus = add_entropy_bonus(
            policy, ppo_args.entropy_coef, width.get, args.temperature, trainer.stop_token_id,
            args.gradient_accumulation_steps,
        )  # fmt: skip

    # 6. train
    trainer.train()
    if bonus is not None:
        bonus.remove()

    # 7. save: the policy only (PPOTrainer's model is a policy-and-value wrapper)
    trainer.model = trainer.accelerator.unwrap_model(trainer.model).policy
    runs.save_model(run, trainer, tokenizer, model_args.model_name_or_path, adapter_args)

    # 8. report: reward of greedy answers (policy vs reference), KL to the reference, sample completions
    extra = {"ensemble": ensemble.stats()} if ensemble else {}
    scorer = rewards.reward_scorer(reward_model, tokenizer)
    report, samples = policy_report(
        policy, ref_model, tokenizer, scorer, prompts["test"][: ppo_args.report_prompts],
        ppo_args.report_max_new_tokens, args.seed,
    )  # fmt: skip
    runs.record_policy(run, report, samples)
    return runs.finish(run, trainer, {"report": report, **extra})


if __name__ == "__main__":
    console.run_command(main)
