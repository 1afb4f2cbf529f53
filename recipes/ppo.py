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

import torch
from datasets import Dataset
from torch.utils.hooks import RemovableHandle

from align_kit import adapters, rewards, runs
from align_kit.configs import AdapterArgs, DataArgs, ModelArgs, PPOArgs, RewardModelArgs, parse
from align_kit.data import load_preferences
from align_kit.models import load_tokenizer, policy_and_reference, tokenizer_source


def ppo_classes() -> tuple[type, type]:
    """(PPOConfig, PPOTrainer) from trl 1.12's experimental namespace, or an error that says what to do."""
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as error:
        import trl

        raise ImportError(
            f"PPO needs trl 1.12.x: PPOTrainer was removed in trl 1.13 (installed: trl {trl.__version__}). "
            "Install trl==1.12.* for this recipe, or use recipes/dpo.py or recipes/best_of_n.py."
        ) from error
    return PPOConfig, PPOTrainer


def answer_token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_token_id: int | None
) -> torch.Tensor:
    """(B, R) answer tokens PPO trains on: real tokens up to and including the first stop token, before
    the first padding. Inputs (B, R) are the answer part of TRL's forward (padding masked out)."""
    real = attention_mask.bool()
    ended = ~real if stop_token_id is None else ~real | (input_ids == stop_token_id)
    before_end = (ended.long().cumsum(-1) - ended.long()) == 0  # nothing ended strictly earlier
    return before_end & real


def add_entropy_bonus(
    policy: torch.nn.Module,
    coef: float,
    context_length: int,
    temperature: float,
    stop_token_id: int | None,
    gradient_accumulation_steps: int,
) -> RemovableHandle:
    """Make TRL's PPO minimise L_clip + vf_coef * L_value - coef * H without changing its code.

    TRL computes its loss inside ``train()`` from the policy's logits x. A forward hook on the policy
    registers, on every forward that builds a graph (the PPO updates; rollouts, the reference and
    generation run without one), a gradient hook on x that adds d(-coef * H)/dx, where H is the mean
    entropy of pi(. | x / T) over the micro-batch's answer tokens (the mask TRL's policy loss averages
    over). With z = x / T, dH/dz = -p (log p + H_t). Forward values are untouched, so log-probabilities,
    ratios and TRL's logged statistics are unchanged; the gradient is divided by the accumulation steps
    as accelerate divides the loss. Answers start at ``context_length``: prompts must be left padded to
    exactly that width. Returns the handle; ``.remove()`` restores the plain policy.
    """
    scale = temperature + 1e-7  # TRL divides the training logits by this

    def on_forward(module, args, kwargs, output):
        logits = output.logits  # (B, T, V)
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return None
        input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
        if logits.shape[1] <= context_length or not attention_mask[:, context_length - 1].all():
            raise ValueError(f"entropy bonus: prompts must be left padded to exactly {context_length} tokens")
        with torch.no_grad():
            log_p = torch.log_softmax(logits[:, context_length - 1 : -1].float() / scale, dim=-1)  # (B, R, V)
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1, keepdim=True)  # (B, R, 1)
            mask = answer_token_mask(
                input_ids[:, context_length:], attention_mask[:, context_length:], stop_token_id
            ).float()  # (B, R)
            weight = mask * coef / (mask.sum().clamp(min=1) * gradient_accumulation_steps)
            extra = (weight[..., None] * p * (log_p + entropy) / scale).to(logits.dtype)  # d(-coef H)/dx

        def add_bonus(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:, context_length - 1 : -1] += extra
            return grad

        logits.register_hook(add_bonus)
        return None

    return policy.register_forward_hook(on_forward, with_kwargs=True)


def left_padded(tokenizer, prompts: list[str], width: int) -> Dataset:
    """PPO's data: prompt token ids only, left padded to ``width``."""
    ids = tokenizer(prompts)["input_ids"]
    return Dataset.from_dict({"input_ids": [[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids]})


PPOConfig, PPOTrainer = ppo_classes()
CONFIG = (DataArgs, ModelArgs, AdapterArgs, RewardModelArgs, PPOArgs, PPOConfig)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, adapter_args, reward_args, ppo_args, args = parse(CONFIG, argv)
    unused = [
        name
        for name in ("sft_model_path", "reward_model_path")
        if getattr(args, name) != getattr(PPOConfig, name)
    ]
    if unused:
        raise ValueError(
            f"{unused}: not read by this recipe; set model_name_or_path and reward_models instead"
        )

    # 2. seed, logging, run directory
    run = runs.start(args, data_args, model_args, adapter_args, reward_args, ppo_args)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # PPO gathers every metric with an INFO line
    if run.resume_from:
        raise FileExistsError(
            f"{run.output_dir} holds {run.resume_from} from an interrupted run and trl's PPOTrainer cannot "
            "resume; choose another output_dir (align-kit never deletes work)."
        )

    # 3. data: prompts only, left padded to one width
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = {split: list(dict.fromkeys(row["prompt"] for row in rows)) for split, rows in splits.items()}
    width = max(len(ids) for split in prompts.values() for ids in tokenizer(split)["input_ids"])
    train = left_padded(tokenizer, prompts["train"], width)
    test = left_padded(tokenizer, prompts["test"], width)

    # 4. policy, adapter and reference; reward and value models
    policy, ref_model = policy_and_reference(model_args, adapter_args)
    runs.log(adapters.describe_parameters(policy))
    reward_model = rewards.load_reward(reward_args, tokenizer.pad_token_id).eval().requires_grad_(False)
    value_path = ppo_args.value_model_path or reward_args.reward_models[0]
    value_model = rewards.load_reward_model(value_path, model_args.torch_dtype, tokenizer.pad_token_id)

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
        callbacks=[rewards.DisagreementCallback(ensemble)] if ensemble else None,
    )
    bonus = None
    if ppo_args.entropy_coef:
        bonus = add_entropy_bonus(
            policy, ppo_args.entropy_coef, width, args.temperature, trainer.stop_token_id,
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
    report, samples = rewards.policy_report(
        policy, ref_model, tokenizer, scorer, prompts["test"][: ppo_args.report_prompts],
        ppo_args.report_max_new_tokens, args.seed,
    )  # fmt: skip
    run.write_json("samples.json", samples)
    for sample in samples[:3]:
        runs.log(
            f"sample: {sample['prompt'][-60:]!r} -> {sample['answer']!r} (reward {sample['reward']:+.2f})"
        )
    runs.log(
        f"greedy reward {report['reward_reference']:+.3f} -> {report['reward_policy']:+.3f}; "
        f"KL to reference {report['kl_to_reference']:.3f} nats per answer"
    )
    return runs.finish(run, trainer, {"report": report, **extra})


if __name__ == "__main__":
    main()
