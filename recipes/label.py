"""Label a policy's own answers with a judge (AI feedback): a preference dataset and the labelling's audit.

    python recipes/label.py --config recipes/configs/label_tiny.yaml
    align-kit label --config label_tiny --judge reward_model=runs/demo/reward

For each of ``max_prompts`` training prompts the policy (a run folder or any model) samples
``samples_per_prompt`` answers; ``pairs_per_prompt`` pairs of distinct answers are judged in both orders by
any judge the evaluation takes (cached in ``judge_cache.jsonl``, traffic and cost counted). Pairs won in
both orders become rows of ``train.jsonl``/``test.jsonl`` (prompt, chosen, rejected: the layout
recipes/dpo.py and recipes/reward.py read with ``--dataset <output_dir>``); ties and unparseable pairs are
counted. ``labelling_audit.json`` holds position bias, flip rate, honeypot pass rate, agreement with the
dataset's human labels and the counts; a judge that fails a check also leaves ``judge_failed_audits.json``,
which every training run on the dataset copies into its own folder. A rerun reuses the samples and cache.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from transformers import set_seed

from align_kit import console
from align_kit.configs import DataArgs, ModelArgs
from align_kit.data.loading import LABELLING_MARK, distinct_prompts, load_preferences
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.label_args import LabelArgs
from align_kit.judges.labelling import (
    HONEYPOT_KINDS,
    candidate_pairs,
    honeypot_pairs,
    human_pairs,
    judge_from_spec,
    judge_pairs,
    labelling_audit,
    preference_rows,
)
from align_kit.models.generation import generate
from align_kit.models.loading import load_model, load_tokenizer, tokenizer_source
from align_kit.parsing import parse, save_resolved, to_dict
from align_kit.training import runs

CONFIG = (DataArgs, ModelArgs, LabelArgs)


def main(argv: list[str] | None = None) -> dict:
    # 1. config
    data_args, model_args, label_args = parse(CONFIG, argv)

    # 2. seed, logging, run directory (no trainer: the folder is the dataset)
    set_seed(label_args.seed)
    out = Path(label_args.output_dir)
    runs.refuse_output_dir(out, label_args)
    judge = judge_from_spec(label_args.judge)
    changes = runs.changed_settings(out, to_dict(data_args, model_args, label_args))
    if changes:  # a rerun reuses the samples: only with the settings they were drawn with
        raise runs.RunRefused(f"{out} holds an unfinished labelling with other settings {sorted(changes)}")
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(str(out / runs.RUN_CONFIG), data_args, model_args, label_args)
    run = runs.Run(out, None)

    # 3. data: training prompts to label; held-out rows for honeypots and human labels
    tokenizer = load_tokenizer(tokenizer_source(model_args), model_args.model_revision)
    splits, counts = load_preferences(data_args, tokenizer)
    runs.record_data(run, counts)
    prompts = distinct_prompts(splits["train"])
    prompts = random.Random(label_args.seed).sample(prompts, min(label_args.max_prompts, len(prompts)))
    held = splits["test"]

    # 4. policy
    policy = load_model(model_args).eval()

    # 5. sampling (kept: a rerun judges the same answers)
    sampled = runs.read_jsonl(out / "samples.jsonl")
    if sampled is None:
        answers = generate(
            policy, tokenizer, prompts, label_args.max_new_tokens, label_args.generation_batch_size,
            do_sample=True, temperature=label_args.temperature,
            num_return_sequences=label_args.samples_per_prompt, seed=label_args.seed, progress=False,
        )  # fmt: skip
        sampled = [{"prompt": p, "answers": a} for p, a in zip(prompts, answers, strict=True)]
        runs.write_jsonl(out / "samples.jsonl", sampled)
    pairs, skipped = candidate_pairs(
        [s["prompt"] for s in sampled], [s["answers"] for s in sampled], label_args.pairs_per_prompt,
        label_args.seed,
    )  # fmt: skip

    # 6. judging: the sampled pairs, honeypots and human-labelled pairs, each in both orders
    cache = JudgmentCache(out / "judge_cache.jsonl")
    results = judge_pairs(judge, pairs, cache)
    honey, honey_skipped = honeypot_pairs(
        [r["prompt"] for r in held[: label_args.n_honeypots]],
        [r["chosen"] for r in held[: label_args.n_honeypots]], HONEYPOT_KINDS, label_args.seed,
    )  # fmt: skip
    honey_results = judge_pairs(judge, honey, cache)
    human = human_pairs(held, label_args.n_human, label_args.seed)
    human_results = judge_pairs(judge, human, cache)

    # 7. save: the preference dataset, split by prompt, and every judged pair
    rows, outcomes = preference_rows(pairs, results)
    test_prompts = set(prompts[: round(label_args.test_fraction * len(prompts))])
    runs.write_jsonl(out / "train.jsonl", [r for r in rows if r["prompt"] not in test_prompts])
    runs.write_jsonl(out / "test.jsonl", [r for r in rows if r["prompt"] in test_prompts])
    runs.write_jsonl(
        out / "labels.jsonl",
        [{"prompt": p, "answer_a": a, "answer_b": b, "outcome": r.outcome, "first": r.first,
          "swapped": r.swapped} for (p, a, b), r in zip(pairs, results, strict=True)],
    )  # fmt: skip

    # 8. report: the labelling's audit, and the mark when the judge failed it
    audit = labelling_audit(
        results,
        [(h[3], r) for h, r in zip(honey, honey_results, strict=True)],
        [(h[3], r) for h, r in zip(human, human_results, strict=True)],
    )
    audit |= {
        "judge": judge.name,
        "judge_identity": judge.identity,
        "judge_traffic": dataclasses.asdict(judge.stats),
        "n_prompts": len(prompts),
        "n_pairs": len(pairs),
        "n_rows": {
            "train": len(rows) - sum(r["prompt"] in test_prompts for r in rows),
            "test": sum(r["prompt"] in test_prompts for r in rows),
        },  # fmt: skip
        "outcomes": dict(outcomes),
        "skipped": dict(skipped + honey_skipped),
    }
    run.write_json("labelling_audit.json", audit)
    if not audit["passed"]:
        run.write_json(
            LABELLING_MARK, {"judge": judge.name, "failed": audit["failed"], "checks": audit["checks"]}
        )
        console.log(
            f"WARNING: judge {judge.name} failed its audits ({', '.join(audit['failed'])}): dataset marked"
        )
    figures = audit["figures"]
    console.log(
        f"labelled {len(rows)} of {len(pairs)} pairs ({dict(outcomes)}); flip rate {figures['flip_rate']:.3f}, "
        f"first slot {figures['first_slot_rate']:.3f}, honeypots {figures['honeypot_pass_rate']}, "
        f"human kappa {figures['human_kappa']}"
    )
    return runs.finish(run, None, audit)


if __name__ == "__main__":
    console.run_command(main)
