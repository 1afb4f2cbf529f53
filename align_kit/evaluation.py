"""Judged evaluation: answers from each system, win rates against the dataset's chosen answers and the
base system, and the judge audits that say whether to trust them.

    python eval/win_rate.py --config eval/configs/embedded.yaml
    accelerate launch eval/win_rate.py --config eval/configs/embedded.yaml   # generation split by rank

Steps, each reusing what an earlier run already finished:

1. held-out prompts: the first ``n_prompts`` distinct prompts of the test split, with their chosen answers
   (``answers.held_out``);
2. answers: every system answers them (``answers.system_answers``: ``generations/<system>.jsonl``, one
   row per prompt, extended and never redone while the model, its weights and the decoding settings are
   the same);
3. judging: every comparison in both presentation orders (``judges.judge_both_orders``), verdicts cached
   in ``judge_cache.jsonl``, so rerunning a finished evaluation makes zero judge calls;
4. audits, on pairs whose better answer is known (``audits``): honeypots (the chosen answer against a truncated,
   word-shuffled, empty or off-topic copy), the dataset's own chosen/rejected labels, position bias over
   every pair judged in both orders, parse failures, and transitivity of the pairwise table;
5. one report per judge in ``<output_dir>/<judge>/`` (``reports.write_report``) and ``evaluation.json``.

Comparisons: every system against ``chosen``; every system against the base; with ``all_pairs`` every
other pair too, so that Bradley-Terry ratings and transitivity rest on direct games.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align_kit import judges as judges_lib
from align_kit import stats
from align_kit.answers import (
    CHOSEN,
    HeldOut,
    fingerprint,
    generation_settings,
    held_out,
    missing_local,
    resolve_systems,
    split_spec,
    system_answers,
    unfinished_run,
)
from align_kit.audits import AuditPair, audit_judge, honeypots, label_pairs
from align_kit.configs import DataArgs, EvalArgs, parse, save_resolved
from align_kit.judge_backends import build_judge
from align_kit.judge_cache import JudgmentCache
from align_kit.judges import PairResult
from align_kit.models import load_tokenizer
from align_kit.reports import headline, to_jsonable, write_report
from align_kit.runs import log
from align_kit.stats import Judgment

CONFIG = (EvalArgs, DataArgs)


# ---------------------------------------------------------------------------------------------------------
# Judges from their specs


def resolve_judges(specs: Sequence[str | Any], notes: list[str]) -> list[Any]:
    """Judges from specs ('name', 'name=model', a path) or objects with the Judge protocol (used as is).
    A reward-model or local-LM judge whose model folder is missing is left out with a note. Backends load
    their models on first use, so a rerun answered from the cache loads none."""
    out = []
    for spec in specs:
        if not isinstance(spec, str):
            out.append(spec)
            continue
        name, model = split_spec(spec)
        config = judges_lib.read_judge_config(name, **({"model": model} if model else {}))
        local_model = config.backend in ("reward_model", "hf_logits") and config.model
        if local_model and (missing_local(config.model) or unfinished_run(config.model)):
            notes.append(
                f"judge {config.name} skipped: its model {config.model} does not exist or is unfinished"
            )
            continue
        if local_model and not fingerprint(config.model).startswith("hub:"):
            # verdicts are cached by the judge's settings: the weights' fingerprint retires them on retraining
            config = dataclasses.replace(config, cache_tag=f"{config.cache_tag}{fingerprint(config.model)}")
        out.append(build_judge(config))
    names = [j.name for j in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two judges share a name: {names}; set `name` in one judge.yaml")
    return out


# ---------------------------------------------------------------------------------------------------------
# Judging


def to_judgments(
    results: Sequence[PairResult],
    system: str,
    baseline: str,
    system_answers: Sequence[str],
    baseline_answers: Sequence[str],
) -> list[Judgment]:
    """Decided ``judge_both_orders`` results as Judgments (lengths in characters); a pair whose two orders
    both failed to parse has no outcome and no Judgment."""
    return [
        Judgment(
            prompt_id=str(result.prompt_id),
            system=system,
            baseline=baseline,
            verdict=result.outcome,
            first_order_verdict=result.first,  # the system shown first
            swapped_order_verdict=result.swapped,
            system_len=len(ours.strip()),
            baseline_len=len(theirs.strip()),
            judge=result.judge,
            parse_failures=result.parse_failures,
        )
        for result, ours, theirs in zip(results, system_answers, baseline_answers, strict=True)
        if result.outcome is not None
    ]


def comparison_plan(names: Sequence[str], base: str, all_pairs: bool) -> list[tuple[str, str]]:
    """(system, baseline) pairs: each system vs chosen, each other system vs base, then (with
    ``all_pairs``) each later system vs each earlier non-base one."""
    plan = [(name, CHOSEN) for name in names]
    plan += [(name, base) for name in names if name != base]
    if all_pairs:
        others = [n for n in names if n != base]
        plan += [(later, earlier) for earlier, later in itertools.combinations(others, 2)]
    return plan


def paired_plan(plan: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(system_a, system_b, baseline) for every two systems judged against the same baseline, the later
    system first, so the difference reads 'new minus older' (e.g. dpo - sft against chosen)."""
    by_baseline: dict[str, list[str]] = {}
    for system, baseline in plan:
        by_baseline.setdefault(baseline, []).append(system)
    return [
        (later, earlier, baseline)
        for baseline, systems in by_baseline.items()
        for earlier, later in itertools.combinations(systems, 2)
    ]


def judge_audit_pairs(
    judge: Any, cache: JudgmentCache, pairs: Sequence[AuditPair], progress: bool
) -> list[tuple[AuditPair, PairResult]]:
    """Judge audit pairs in both orders, the first answer in the system's seat."""
    results = judges_lib.judge_both_orders(
        judge,
        [p.prompt for p in pairs],
        [p.first for p in pairs],
        [p.second for p in pairs],
        cache,
        [p.prompt_id for p in pairs],
        progress,
    )
    return list(zip(pairs, results, strict=True))


def evaluate_judge(
    judge: Any,
    cache: JudgmentCache,
    held: HeldOut,
    answers: Mapping[str, Sequence[str]],
    plan: Sequence[tuple[str, str]],
    honeypot_pairs: Sequence[AuditPair],
    labelled: Sequence[AuditPair],
    args: EvalArgs,
) -> tuple[dict[str, Any], list[Judgment], list[Judgment], list[dict[str, Any]]]:
    """Everything one judge says: (results for write_report, comparison judgments, audit judgments, examples)."""
    skipped: Counter = Counter()
    judgments: list[Judgment] = []
    examples: list[dict[str, Any]] = []
    asked: list[PairResult] = []
    for system, baseline in plan:
        results = judges_lib.judge_both_orders(
            judge, held.prompts, answers[system], answers[baseline], cache, held.prompt_ids, args.progress
        )
        found = to_judgments(results, system, baseline, answers[system], answers[baseline])
        skipped[f"{system} vs {baseline}: both orders unparseable"] += len(results) - len(found)
        judgments += found
        asked += results
        examples += pick_examples(found, held, answers, args.n_examples)

    audited = judge_audit_pairs(judge, cache, honeypot_pairs, args.progress)
    audited += judge_audit_pairs(judge, cache, labelled, args.progress)
    audit_judgments = list(judgments)
    for pair, result in audited:
        asked.append(result)
        if result.outcome is None:
            skipped[f"{pair.label}: both orders unparseable"] += 1
        audit_judgments += to_judgments(
            [result], pair.label + ":first", pair.label + ":second", [pair.first], [pair.second]
        )

    rates = stats.win_rate_table(stats.win_table(judgments))
    audit = audit_judge(audit_judgments, asked, audited, rates if len(rates) >= 3 else None)
    comparisons = [
        stats.summarize(judgments, s, b, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for s, b in plan
    ]
    paired = [
        stats.paired_test(judgments, a, b, baseline, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for a, b, baseline in paired_plan(plan)
    ]
    results = {
        "skipped": {k: v for k, v in skipped.items() if v},
        "comparisons": comparisons,
        "paired": paired,
        "ranking": stats.rank_systems(judgments, anchor=args.base),
        **audit,
    }
    return results, judgments, audit_judgments, examples


def pick_examples(
    judgments: Sequence[Judgment], held: HeldOut, answers: Mapping[str, Sequence[str]], n: int
) -> list[dict[str, Any]]:
    """Up to ``n`` judged examples of one comparison, a win, a loss and a tie first when there are any."""
    index = {pid: i for i, pid in enumerate(held.prompt_ids)}
    ordered = []
    for verdict in ("win", "loss", "tie"):
        ordered += [j for j in judgments if j.verdict == verdict][:1]
    ordered += [j for j in judgments if j not in ordered]
    out = []
    for j in ordered[:n]:
        i = index[j.prompt_id]
        out.append(
            {
                "prompt_id": j.prompt_id,
                "prompt": held.prompts[i],
                "system": j.system,
                "baseline": j.baseline,
                "system_answer": answers[j.system][i],
                "baseline_answer": answers[j.baseline][i],
                "verdict": j.verdict,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(
    args: EvalArgs, data_args: DataArgs, judges: Sequence[str | Any] | None = None
) -> dict[str, Any]:
    """Run the evaluation described by ``args`` (``judges`` objects replace ``args.judges``).

    Every process generates its share of the answers; only the main process judges and writes reports
    (the others return an empty dict). Returns what ``evaluation.json`` holds.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU ranks run alone
    out_dir = Path(args.output_dir)
    notes: list[str] = []
    systems = resolve_systems(args, notes)
    tokenizer = None
    if data_args.max_pair_tokens is not None:  # lengths are counted with the base system's tokenizer
        tokenizer = load_tokenizer(next(s.path for s in systems if s.name == args.base))
    with state.main_process_first():  # the main process writes the embedded task once
        held = held_out(args, data_args, tokenizer)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(str(out_dir / "eval_config.json"), args, data_args)

    answers: dict[str, list[str]] = {CHOSEN: held.chosen}
    generated: dict[str, int] = {}
    for system in systems:
        answers[system.name], generated[system.name] = system_answers(system, held, args, out_dir, state)
        log(f"{system.name}: {generated[system.name]} answers generated, the others reused")
    if not state.is_main_process:
        return {}

    judge_list = resolve_judges(args.judges if judges is None else judges, notes)
    for judge in judge_list:
        model = getattr(getattr(judge, "config", None), "model", None)
        if "best_of_n" in answers and model and model == args.best_of_n_reward_model:
            notes.append(
                f"best_of_n picks its answers with {model}, the model behind judge {judge.name}: its win "
                f"rates under {judge.name} are optimistic (it optimises that judge)"
            )
    for note in notes:
        log(note)
    cache = JudgmentCache(out_dir / "judge_cache.jsonl")
    plan = comparison_plan([s.name for s in systems], args.base, args.all_pairs)
    honeypot_pairs, honeypot_skipped = honeypots(held, args.n_honeypots, args.honeypot_kinds, args.seed)
    labelled = label_pairs(held, args.n_human, args.seed)
    metadata = {
        "systems": {s.name: s.path for s in systems},
        "base": args.base,
        "dataset": data_args.dataset,
        "held-out prompts": len(held.prompts),
        "decoding": json.dumps(generation_settings(args)),
        "seed": args.seed,
        "honeypot pairs": len(honeypot_pairs),
        "labelled pairs": len(labelled),
        "answer length unit": "characters",
    }
    if "best_of_n" in answers:
        metadata["best_of_n"] = f"n={args.best_of_n_n}, temperature={args.best_of_n_temperature}, "
        metadata["best_of_n"] += f"reward model {args.best_of_n_reward_model}"
    summary: dict[str, Any] = {
        "output_dir": str(out_dir),
        "systems": metadata["systems"],
        "base": args.base,
        "n_prompts": len(held.prompts),
        "notes": notes,
        "generated": generated,
        "judge_calls": {},
        "judges": {},
        "reports": {},
    }
    for judge in judge_list:
        calls_before = judge.stats.calls
        results, judgments, audit_judgments, examples = evaluate_judge(
            judge, cache, held, answers, plan, honeypot_pairs, labelled, args
        )
        calls = judge.stats.calls - calls_before
        results["skipped"] = {**dict(honeypot_skipped), **results["skipped"]}
        results["notes"] = list(notes)
        results["metadata"] = {"judge": judge.name, "judge identity": judge.identity, **metadata}
        results["metadata"]["judge calls this run"] = calls
        judge_dir = out_dir / re.sub(r"[^\w.-]+", "_", judge.name)
        paths = write_report(judge_dir, results, judgments, examples)
        (judge_dir / "audit_judgments.jsonl").write_text(
            "".join(json.dumps(j.to_row()) + "\n" for j in audit_judgments), encoding="utf-8"
        )
        summary["judges"][judge.name] = to_jsonable(results)
        summary["judge_calls"][judge.name] = calls
        summary["reports"][judge.name] = {name: str(path) for name, path in paths.items()}
        log(f"judge {judge.name}: {calls} calls; report in {paths['report.md']}")
        for comparison in results["comparisons"]:
            log(f"  {judge.name}: {headline(comparison)}")
    (out_dir / "evaluation.json").write_text(json.dumps(to_jsonable(summary), indent=2), encoding="utf-8")
    return summary


def evaluate_systems(
    systems: Mapping[str, str],
    base: str,
    judges: Sequence[str | Any],
    out_dir: str | Path,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate ``systems`` ({name: model folder, Hub id or answers .jsonl}) against the dataset's chosen
    answers and ``base`` with ``judges`` (specs as in ``EvalArgs.judges``, or judge objects).

    ``overrides`` are any other EvalArgs or DataArgs fields (e.g. n_prompts=100, dataset='embedded').
    Systems whose local folder is missing or unfinished, and judges whose model is missing, are skipped
    with a note. Returns the contents of ``<out_dir>/evaluation.json``.
    """
    eval_fields = {f.name for f in dataclasses.fields(EvalArgs)}
    data_fields = {f.name for f in dataclasses.fields(DataArgs)}
    unknown = sorted(set(overrides) - eval_fields - data_fields)
    if unknown:
        raise TypeError(f"unknown evaluation setting(s) {unknown}")
    args = EvalArgs(
        systems=[f"{name}={path}" for name, path in systems.items()],
        base=base,
        judges=[j for j in judges if isinstance(j, str)],
        output_dir=str(out_dir),
        **{k: v for k, v in overrides.items() if k in eval_fields},
    )
    data_args = DataArgs(**{k: v for k, v in overrides.items() if k in data_fields})
    return evaluate(args, data_args, judges=list(judges))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (eval/win_rate.py): ``--config eval/configs/<name>.yaml`` plus overrides."""
    args, data_args = parse(CONFIG, argv)
    return evaluate(args, data_args)
