"""One judge over an evaluation's comparisons and audit pairs, and the plan that says what will be asked.

``make_plan`` decides the comparisons (against the reference only where the data has reference or chosen
answers), the audit pairs (honeypots on reference answers, the label audit only on rows with human labels)
and says which audits run and why not. ``evaluate_judge`` asks one judge every comparison on the prompts it
can judge: a prompt without a reference, one too long for a system (no answer) or a pair too long for the
judge (its ``fits``) is counted under its reason, never asked; every prompt requested is either judged or
counted (``prompt_counts``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from align_kit.evaluation import grading, ratings, reports, stats
from align_kit.evaluation.answers import CHOSEN, HeldOut
from align_kit.evaluation.audits import AuditPair, audit_judge, honeypots, label_pairs, trust_verdict
from align_kit.evaluation.settings import EvalArgs, audit_sizes
from align_kit.evaluation.stats import Judgment
from align_kit.judges import protocol as judges_lib
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.config import uses_reference
from align_kit.judges.protocol import PairItem, PairResult
from align_kit.judges.verdicts import pair_score

MAX_UNPARSEABLE_SHOWN = 20


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


def comparison_plan(
    names: Sequence[str], base: str, all_pairs: bool, with_reference: bool = True
) -> list[tuple[str, str]]:
    """(system, baseline) pairs: each system vs chosen (when the data has chosen or reference answers), each
    other system vs base, then (with ``all_pairs``) each later system vs each earlier non-base one."""
    plan = [(name, CHOSEN) for name in names] if with_reference else []
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
    judge: Any,
    cache: JudgmentCache,
    pairs: Sequence[AuditPair],
    progress: bool,
    references: Sequence[str | None] | None = None,
) -> list[tuple[AuditPair, PairResult]]:
    """Judge audit pairs in both orders, the first answer in the system's seat (shown ``references`` when
    the judge is reference-guided)."""
    results = judges_lib.judge_both_orders(
        judge,
        [p.prompt for p in pairs],
        [p.first for p in pairs],
        [p.second for p in pairs],
        cache,
        [p.prompt_id for p in pairs],
        progress,
        references,
    )
    return list(zip(pairs, results, strict=True))


@dataclass
class JudgeRun:
    """Everything one judge says: the results write_report renders, the comparison judgments, the audit
    judgments (comparisons included, for position bias), judged examples and undecided comparison pairs."""

    results: dict[str, Any]
    judgments: list[Judgment] = field(default_factory=list)
    audit_judgments: list[Judgment] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    undecided: list[dict[str, Any]] = field(default_factory=list)


def fitting(judge: Any, items: Sequence[PairItem]) -> list[bool]:
    """Which items fit the judge's context (a judge without ``fits`` takes anything)."""
    fits = getattr(judge, "fits", None)
    return list(fits(list(items))) if fits is not None and items else [True] * len(items)


def comparison_rows(
    judge: Any, held: HeldOut, answers: Mapping[str, Sequence[str | None]], system: str, baseline: str
) -> tuple[list[int], dict[int, str]]:
    """Prompt indices one comparison judges, and why each other prompt is left out of it (a reference-guided
    judge needs the prompt's reference answer)."""
    why: dict[int, str] = {}
    guided = uses_reference(getattr(judge, "template", None))
    for i in range(len(held.prompts)):
        if guided and held.chosen[i] is None:
            why[i] = f"no reference answer for judge {judge.name}"
            continue
        for name in (system, baseline):
            if answers[name][i] is None:
                why[i] = "no reference answer" if name == CHOSEN else f"too long for system {name}"
                break
    keep = [i for i in range(len(held.prompts)) if i not in why]
    refs = [held.chosen[i] if guided else None for i in keep]
    items = [
        PairItem(held.prompts[i], answers[system][i], answers[baseline][i], r)
        for i, r in zip(keep, refs, strict=True)
    ]
    for i, fits in zip(keep, fitting(judge, items), strict=True):
        if not fits:
            why[i] = f"too long for judge {judge.name}"
    return [i for i in keep if i not in why], why


def evaluate_judge(
    judge: Any, cache: JudgmentCache, held: HeldOut, answers: Mapping[str, Sequence[str | None]], plan: Plan,
    args: EvalArgs,
) -> JudgeRun:  # fmt: skip
    """One judge over every comparison of ``plan`` and its audit pairs; prompts a comparison cannot judge
    (no reference, too long for a system or for the judge) and audit pairs that overflow the judge are
    counted, never asked."""
    run = JudgeRun({})
    guided = uses_reference(getattr(judge, "template", None))
    skipped: Counter = Counter()
    asked: list[tuple[str, PairResult]] = []  # (comparison or audit pair, result) for every pair asked
    decided = [False] * len(held.prompts)
    reasons: dict[int, str] = {}  # a prompt's first reason for being left out of a comparison
    for system, baseline in plan.comparisons:
        rows, why = comparison_rows(judge, held, answers, system, baseline)
        refs = [held.chosen[i] for i in rows] if guided else None
        for i, reason in why.items():
            reasons.setdefault(i, reason)
            skipped[f"{system} vs {baseline}: {reason}"] += 1
        prompts, ids = [held.prompts[i] for i in rows], [held.prompt_ids[i] for i in rows]
        ours, theirs = [answers[system][i] for i in rows], [answers[baseline][i] for i in rows]
        results = judges_lib.judge_both_orders(judge, prompts, ours, theirs, cache, ids, args.progress, refs)
        found = to_judgments(results, system, baseline, ours, theirs, args.combine_orders)
        skipped[f"{system} vs {baseline}: both orders unparseable"] += len(results) - len(found)
        for i, result in zip(rows, results, strict=True):
            decided[i] = decided[i] or result.outcome is not None
            if result.outcome is None:
                reasons.setdefault(i, "unparseable in both orders")
        run.judgments += found
        run.undecided += undecided_rows(results, system, baseline, ours, theirs)
        asked += [(f"{system} vs {baseline}", result) for result in results]
        run.examples += reports.pick_examples(found, held, answers, args.n_examples)

    reference_of = dict(zip(held.prompt_ids, held.chosen, strict=True)) if guided else {}
    pairs = [*plan.honeypots, *plan.labelled]
    if guided:  # a reference-guided judge is asked only audit pairs whose prompt has a reference
        for pair in pairs:
            if reference_of.get(pair.prompt_id) is None:
                skipped[f"{pair.label}: no reference answer for judge {judge.name}"] += 1
        pairs = [p for p in pairs if reference_of.get(p.prompt_id) is not None]
    fits = fitting(
        judge, [PairItem(p.prompt, p.first, p.second, reference_of.get(p.prompt_id)) for p in pairs]
    )
    for pair, ok in zip(pairs, fits, strict=True):
        if not ok:
            skipped[f"{pair.label}: too long for judge {judge.name}"] += 1
    pairs = [p for p, ok in zip(pairs, fits, strict=True) if ok]
    refs = [reference_of[p.prompt_id] for p in pairs] if guided else None
    audited = judge_audit_pairs(judge, cache, pairs, args.progress, refs)
    run.audit_judgments = list(run.judgments)
    for pair, result in audited:
        asked.append((pair.label, result))
        if result.outcome is None:
            skipped[f"{pair.label}: both orders unparseable"] += 1
        run.audit_judgments += to_judgments(
            [result],
            pair.label + ":first",
            pair.label + ":second",
            [pair.first],
            [pair.second],
            args.combine_orders,
        )
    run.results = judge_results(run, asked, audited, skipped, held, plan, args)
    run.results["prompts"] = prompt_counts(held, decided, reasons)
    return run


def evaluate_single(
    judge: Any,
    out_dir: Any,
    held: HeldOut,
    answers: Mapping[str, Sequence[str | None]],
    plan: Plan,
    args: EvalArgs,
) -> JudgeRun:
    """One judge grading single answers (``grading.grade_single``); a prompt no system has a score for is
    counted under its first reason (too long for a system, no reference for a reference-guided judge, no
    parseable score)."""
    with_reference = uses_reference(getattr(judge, "template", None))
    graded = grading.grade_single(judge, out_dir, held, answers, plan, args, with_reference)
    reasons: dict[int, str] = {}
    for i in range(len(held.prompts)):
        missing = [n for n in answers if n != CHOSEN and answers[n][i] is None]
        if with_reference and held.chosen[i] is None:
            reasons[i] = f"no reference answer for judge {judge.name}"
        elif missing:
            reasons[i] = f"too long for system {missing[0]}"
        elif i in graded["overflow"]:
            reasons[i] = f"too long for judge {judge.name}"
        else:
            reasons[i] = "no parseable score"
    judgments = graded.pop("judgments")
    graded.pop("overflow")
    comparisons = [
        stats.summarize(judgments, s, b, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for s, b in plan.comparisons
    ]
    tables = [grading.score_table(graded["scores"], args.level)]
    if graded["scores_by_group"]:
        tables.append(grading.score_table(graded["scores_by_group"], args.level))
    results = graded | {
        "combine_orders": "scores",
        "comparisons": comparisons,
        "ranking": ratings.rank_systems(judgments, anchor=args.base),
        "audits_run": plan.audits_run
        | {"labels": "not run: single grading", "position bias": "does not apply"},
        "prompts": prompt_counts(held, graded.pop("decided"), reasons),
        "tables": tables,
    }
    return JudgeRun(results, judgments, list(judgments))


def judge_results(
    run: JudgeRun, asked: Sequence[tuple[str, PairResult]], audited: Sequence[tuple[AuditPair, PairResult]],
    skipped: Counter, held: HeldOut, plan: Plan, args: EvalArgs,
) -> dict[str, Any]:  # fmt: skip
    """The report's results from one judge's judgments: comparisons, paired tests, ranking, audit and trust."""
    rates = ratings.win_rate_table(ratings.win_table(run.judgments))
    audit = audit_judge(
        run.audit_judgments, [result for _, result in asked], audited, rates if len(rates) >= 3 else None
    )
    comparisons = [
        stats.summarize(run.judgments, s, b, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for s, b in plan.comparisons
    ]
    for comparison in comparisons:
        if not comparison["n"]:
            prefix = f"{comparison['system']} vs {comparison['baseline']}: "
            lost = skipped[prefix + "both orders unparseable"]
            other = [
                f"{k.removeprefix(prefix)} {v}" for k, v in skipped.items() if k.startswith(prefix) and v
            ]
            other = [o for o in other if not o.startswith("both orders unparseable")]
            comparison["note"] = f"no decided pairs: {lost} of {len(held.prompts)} unparseable in both orders"
            comparison["note"] += f"; left out: {', '.join(other)}" if other else ""
    paired = [
        stats.paired_test(run.judgments, a, b, baseline, seed=args.seed, n_boot=args.n_boot, level=args.level)
        for a, b, baseline in paired_plan(plan.comparisons)
    ]
    unparseable = reports.unparseable_answers(asked)
    results = {
        "combine_orders": args.combine_orders,
        "skipped": {k: v for k, v in skipped.items() if v},
        "comparisons": comparisons,
        "paired": paired,
        "ranking": ratings.rank_systems(run.judgments, anchor=args.base),
        **audit,
        "trust": trust_verdict(audit["audit_checks"]),
        "unparseable": {"total": len(unparseable), "shown": unparseable[:MAX_UNPARSEABLE_SHOWN]},
        "audits_run": plan.audits_run,
    }
    if held.groups is not None:
        results["by_group"] = group_comparisons(run.judgments, held, plan.comparisons, args)
    return results


def prompt_counts(held: HeldOut, decided: Sequence[bool], reasons: Mapping[int, str]) -> dict[str, Any]:
    """requested = judged + left out: a prompt is judged when at least one comparison decided it; one left out
    before any answer, or judged by no comparison, is counted under its first reason."""
    left_out = Counter(held.left_out)
    for i, done in enumerate(decided):
        if not done:
            left_out[reasons.get(i, "no comparison")] += 1
    judged = sum(decided)
    return {"requested": held.requested, "judged": judged, "left_out": dict(sorted(left_out.items()))}


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


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation, as named steps whose results flow down


@dataclass
class Plan:
    """What will be asked: the comparisons, the audit pairs, which audits run (and why not), and the judge
    calls (single-order pairs) per judge at most, before the cache answers any."""

    comparisons: list[tuple[str, str]]
    honeypots: list[AuditPair]
    honeypot_skipped: Counter
    labelled: list[AuditPair]
    audits_run: dict[str, str]
    judge_calls: int


def make_plan(held: HeldOut, systems: Sequence[Any], args: EvalArgs) -> Plan:
    """Step 2: comparisons (against the reference only where the data has one), audit pairs (honeypots on
    reference answers, labels only on rows with human labels), and what each audit runs on or why not."""
    names = [s.name for s in systems]
    comparisons = comparison_plan(names, args.base, args.all_pairs, with_reference=held.n_references > 0)
    n_honey, n_human = audit_sizes(args, len(held.prompts))
    pairs, skipped = honeypots(held, n_honey, args.honeypot_kinds, args.seed)
    labelled = label_pairs(held, n_human, args.seed)
    audits_run = {
        "honeypots": f"ran on {len(pairs)} pairs" if pairs else (
            "not run: no reference answers to corrupt" if not held.n_references else f"not run: n_honeypots={n_honey}"
        ),
        "labels": f"ran on {len(labelled)} labelled pairs" if labelled else (
            "not run: a prompt set has no human labels" if held.layout != "pairs" else f"not run: n_human={n_human}"
        ),
        "position bias": "ran on every pair judged in both orders",
    }  # fmt: skip
    if held.n_references and held.layout != "pairs":
        audits_run["reference"] = f"comparisons against the reference on {held.n_references} prompts"
    calls = 2 * (len(comparisons) * len(held.prompts) + len(pairs) + len(labelled))
    return Plan(comparisons, pairs, skipped, labelled, audits_run, calls)
