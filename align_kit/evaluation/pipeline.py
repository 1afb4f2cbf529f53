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
5. one report per judge in ``<output_dir>/<judge>/`` (``reports.write_report``) and ``evaluation.json``,
   each opening with the verdict on its judge (``audits.trust_verdict``), each written whole or not at all.

Before anything is generated every judge is checked (its config, its model folder, its API key, its
endpoint accepting a connection): a problem stops the evaluation with one line per judge, unless the judge
is listed in ``optional_judges``, which leaves it out with a note. A judge that fails while judging gets a
report that says so, the others finish, and the evaluation then raises ``JudgeFailed``.

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

from align_kit import files
from align_kit.configs import DataArgs
from align_kit.console import log
from align_kit.evaluation import ratings, reports, stats
from align_kit.evaluation.answers import (
    CHOSEN,
    HeldOut,
    generation_settings,
    held_out,
    resolve_systems,
    system_answers,
)
from align_kit.evaluation.audits import (
    AuditPair,
    audit_judge,
    honeypots,
    judge_traffic,
    label_pairs,
    trust_verdict,
)
from align_kit.evaluation.judge_setup import prepare_judges
from align_kit.evaluation.reports import headline, opening, to_jsonable, write_report
from align_kit.evaluation.settings import EvalArgs
from align_kit.evaluation.stats import Judgment
from align_kit.judges import protocol as judges_lib
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.protocol import PairResult
from align_kit.judges.verdicts import pair_score
from align_kit.models.loading import load_tokenizer
from align_kit.parsing import parse, save_resolved

CONFIG = (EvalArgs, DataArgs)
MAX_UNPARSEABLE_SHOWN = 20


class JudgeFailed(RuntimeError):
    """Judges that failed while judging; their reports and evaluation.json say why."""


# ---------------------------------------------------------------------------------------------------------
# Judging


def to_judgments(
    results: Sequence[PairResult],
    system: str,
    baseline: str,
    system_answers: Sequence[str],
    baseline_answers: Sequence[str],
    rule: str = "strict",
) -> list[Judgment]:
    """Decided ``judge_both_orders`` results as Judgments (lengths in characters, scores by ``rule``); a
    pair whose two orders both failed to parse has no outcome and no Judgment (see ``undecided_rows``)."""
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
            score=pair_score(result.first, result.swapped, rule),
            **_texts(result),
        )
        for result, ours, theirs in zip(results, system_answers, baseline_answers, strict=True)
        if result.outcome is not None
    ]


def _texts(result: PairResult) -> dict[str, str | None]:
    """The judge's raw answer and rationale in each order, as Judgment fields."""
    first, swapped = result.first_reply, result.swapped_reply
    return {
        "first_order_text": first.text if first else None,
        "swapped_order_text": swapped.text if swapped else None,
        "first_order_rationale": first.rationale if first else None,
        "swapped_order_rationale": swapped.rationale if swapped else None,
    }


def undecided_rows(
    results: Sequence[PairResult],
    system: str,
    baseline: str,
    system_answers: Sequence[str],
    baseline_answers: Sequence[str],
) -> list[dict[str, Any]]:
    """judgments.csv rows (no verdict, no score) for the pairs unparseable in both orders, so their raw
    judge answers are in the file too."""
    return [
        {
            "prompt_id": str(result.prompt_id),
            "system": system,
            "baseline": baseline,
            "system_len": len(ours.strip()),
            "baseline_len": len(theirs.strip()),
            "judge": result.judge,
            "parse_failures": result.parse_failures,
            **_texts(result),
        }
        for result, ours, theirs in zip(results, system_answers, baseline_answers, strict=True)
        if result.outcome is None
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
) -> tuple[dict[str, Any], list[Judgment], list[Judgment], list[dict[str, Any]], list[dict[str, Any]]]:
    """Everything one judge says: (results for write_report, comparison judgments, audit judgments,
    examples, undecided comparison pairs)."""
    skipped: Counter = Counter()
    judgments: list[Judgment] = []
    examples: list[dict[str, Any]] = []
    undecided: list[dict[str, Any]] = []
    asked: list[tuple[str, PairResult]] = []  # (comparison or audit pair, result) for every pair asked
    for system, baseline in plan:
        results = judges_lib.judge_both_orders(
            judge, held.prompts, answers[system], answers[baseline], cache, held.prompt_ids, args.progress
        )
        found = to_judgments(
            results, system, baseline, answers[system], answers[baseline], args.combine_orders
        )
        skipped[f"{system} vs {baseline}: both orders unparseable"] += len(results) - len(found)
        judgments += found
        undecided += undecided_rows(results, system, baseline, answers[system], answers[baseline])
        asked += [(f"{system} vs {baseline}", result) for result in results]
        examples += reports.pick_examples(found, held, answers, args.n_examples)

    audited = judge_audit_pairs(judge, cache, honeypot_pairs, args.progress)
    audited += judge_audit_pairs(judge, cache, labelled, args.progress)
    audit_judgments = list(judgments)
    for pair, result in audited:
        asked.append((pair.label, result))
        if result.outcome is None:
            skipped[f"{pair.label}: both orders unparseable"] += 1
        audit_judgments += to_judgments(
            [result],
            pair.label + ":first",
            pair.label + ":second",
            [pair.first],
            [pair.second],
            args.combine_orders,
        )

    rates = ratings.win_rate_table(ratings.win_table(judgments))
    audit = audit_judge(
        audit_judgments, [result for _, result in asked], audited, rates if len(rates) >= 3 else None
    )
    comparisons = [
        stats.summarize(judgments, s, b, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for s, b in plan
    ]
    for comparison in comparisons:
        if not comparison["n"]:
            lost = skipped[f"{comparison['system']} vs {comparison['baseline']}: both orders unparseable"]
            comparison["note"] = f"no decided pairs: {lost} of {len(held.prompts)} unparseable in both orders"
    paired = [
        stats.paired_test(judgments, a, b, baseline, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for a, b, baseline in paired_plan(plan)
    ]
    unparseable = reports.unparseable_answers(asked)
    results = {
        "combine_orders": args.combine_orders,
        "skipped": {k: v for k, v in skipped.items() if v},
        "comparisons": comparisons,
        "paired": paired,
        "ranking": ratings.rank_systems(judgments, anchor=args.base),
        **audit,
        "trust": trust_verdict(audit["audit_checks"]),
        "unparseable": {"total": len(unparseable), "shown": unparseable[:MAX_UNPARSEABLE_SHOWN]},
    }
    if held.groups is not None:
        results["by_group"] = group_comparisons(judgments, held, plan, args)
    return results, judgments, audit_judgments, examples, undecided


def group_comparisons(
    judgments: Sequence[Judgment], held: HeldOut, plan: Sequence[tuple[str, str]], args: EvalArgs
) -> dict[str, Any]:
    """Every comparison of ``plan`` summarised on each group's prompts (``held.groups``) separately."""
    group_of = dict(zip(held.prompt_ids, held.groups, strict=True))
    comparisons = []
    for system, baseline in plan:
        for group in sorted(set(held.groups)):
            rows = [j for j in judgments if group_of[j.prompt_id] == group]
            summary = stats.summarize(
                rows, system, baseline, seed=args.seed, n_boot=args.n_boot, level=args.level
            )
            comparisons.append({"group": group, **summary})
    return {"column": args.group_column, "comparisons": comparisons}


def _counters(judge_stats: Any) -> dict[str, Any]:
    """Every counter a judge keeps (``JudgeStats``, whatever fields it has)."""
    if dataclasses.is_dataclass(judge_stats):
        return dataclasses.asdict(judge_stats)
    return dict(vars(judge_stats))


def _since(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Counters of this run: numbers as differences, anything else as it is now."""

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    return {k: v - before[k] if number(v) and number(before.get(k)) else v for k, v in after.items()}


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(
    args: EvalArgs, data_args: DataArgs, judges: Sequence[str | Any] | None = None
) -> dict[str, Any]:
    """Run the evaluation described by ``args`` (``judges`` objects replace ``args.judges``).

    Every judge is checked before anything is generated (``prepare_judges``). Every process generates
    its share of the answers; only the main process judges and writes reports (the others return an
    empty dict). Returns what ``evaluation.json`` holds; raises JudgeFailed, after writing every report
    and evaluation.json, when a judge that is not optional failed while judging.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # without cpu=True, CPU ranks run alone
    out_dir = Path(args.output_dir)
    notes: list[str] = []
    systems = resolve_systems(args, notes)
    judge_list = prepare_judges(args.judges if judges is None else judges, args, notes)  # on every rank
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
        "combine orders": args.combine_orders,
    }
    if args.group_column:
        metadata["group column"] = args.group_column
    if "best_of_n" in answers:
        metadata["best_of_n"] = f"n={args.best_of_n_n}, temperature={args.best_of_n_temperature}, "
        metadata["best_of_n"] += f"reward model {args.best_of_n_reward_model}"
    summary: dict[str, Any] = {
        "output_dir": str(out_dir),
        "systems": metadata["systems"],
        "base": args.base,
        "n_prompts": len(held.prompts),
        "prompt_ids": held.prompt_ids,
        "combine_orders": args.combine_orders,
        "notes": notes,
        "generated": generated,
        "judge_calls": {},
        "evidence": {},
        "judges": {},
        "reports": {},
    }
    failed = []
    for judge in judge_list:
        before = _counters(judge.stats)
        try:
            results, judgments, audit_judgments, examples, undecided = evaluate_judge(
                judge, cache, held, answers, plan, honeypot_pairs, labelled, args
            )
        except Exception as error:  # the judge gets a report saying why; the other judges still run
            results, judgments, audit_judgments, examples, undecided = (
                {"error": f"{type(error).__name__}: {error}"},
                [],
                [],
                [],
                [],
            )
            if judge.name not in args.optional_judges:
                failed.append(f"judge {judge.name}: {results['error']}")
        counts = _since(before, _counters(judge.stats))
        results["traffic"] = judge_traffic(counts, args.judge_retry_threshold)
        results["skipped"] = {**dict(honeypot_skipped), **results.get("skipped", {})}
        results["notes"] = list(notes)
        results["metadata"] = {"judge": judge.name, "judge identity": judge.identity, **metadata}
        results["metadata"]["judge calls this run"] = counts.get("calls")
        judge_dir = judge_folder(out_dir, judge.name)
        paths = write_report(judge_dir, results, judgments, examples, undecided)
        files.write_text(
            judge_dir / "audit_judgments.jsonl",
            "".join(json.dumps(j.to_row()) + "\n" for j in audit_judgments),
        )
        summary["judges"][judge.name] = to_jsonable(results)
        summary["judge_calls"][judge.name] = counts.get("calls")
        summary["evidence"][judge.name] = bool(results.get("trust", {}).get("evidence"))
        summary["reports"][judge.name] = {name: str(path) for name, path in paths.items()}
        title, reasons = opening(results)
        log(title)
        for reason in reasons:
            log(f"  {reason}")
        for comparison in results.get("comparisons", []):
            log(f"  {judge.name}: {headline(comparison)}")
        log(f"judge {judge.name}: {counts.get('calls')} calls; report in {paths['report.md']}")
    files.write_text(out_dir / "evaluation.json", json.dumps(to_jsonable(summary), indent=2))
    if failed:
        raise JudgeFailed("\n".join(failed) + f"\n(reports and {out_dir / 'evaluation.json'} were written)")
    return summary


def judge_folder(out_dir: str | Path, judge: str) -> Path:
    """Where a judge's report files are written in an evaluation folder."""
    return Path(out_dir) / re.sub(r"[^\w.-]+", "_", judge)


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
    Systems whose local folder is missing or unfinished are skipped with a note, and so are judges named
    in ``optional_judges`` that cannot work; any other judge that cannot work stops the evaluation before
    generation. Returns the contents of ``<out_dir>/evaluation.json``.
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
