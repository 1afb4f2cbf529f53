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
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.configs import DataArgs
from align_kit.console import log
from align_kit.evaluation import reports, tax
from align_kit.evaluation.answers import (
    CHOSEN,
    Answered,
    HeldOut,
    generation_settings,
    held_out,
    resolve_systems,
    system_answers,
)
from align_kit.evaluation.audits import degenerate_answers, judge_traffic
from align_kit.evaluation.judge_setup import prepare_judges
from align_kit.evaluation.judging import (
    JudgeRun,
    Plan,
    comparison_plan,
    evaluate_judge,
    evaluate_single,
    make_plan,
    paired_plan,
)
from align_kit.evaluation.reports import headline, opening, write_report
from align_kit.evaluation.settings import EvalArgs
from align_kit.evaluation.turns import answer_second_turn, has_second_turn, turn_plan, turn_table
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.openai_client import EndpointRefused
from align_kit.judges.protocol import log_traffic
from align_kit.models.loading import load_tokenizer
from align_kit.parsing import parse, save_resolved

__all__ = ["comparison_plan", "paired_plan"]  # the plan's pieces, read by tests through this module

CONFIG = (EvalArgs, DataArgs)


class JudgeFailed(RuntimeError):
    """Judges that failed while judging; their reports and evaluation.json say why."""


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
# The whole evaluation, as named steps whose results flow down


def log_plan(plan: Plan, held: HeldOut, systems: Sequence[Any], judges: Sequence[Any]) -> dict[str, Any]:
    """The plan block printed before anything is generated; returned for evaluation.json."""
    block = {
        "prompts": len(held.prompts),
        "systems answering": [s.name for s in systems if s.kind != "answers"],
        "comparisons": [f"{s} vs {b}" for s, b in plan.comparisons],
        "comparison pairs": len(plan.comparisons) * len(held.prompts),
        "audit pairs": {"honeypots": len(plan.honeypots), "labels": len(plan.labelled)},
        "judge calls per judge (at most, before the cache)": plan.judge_calls,
        "judges": [j.name for j in judges],
    }
    log(f"plan: {held.source_line}")
    for key, value in block.items():
        log(f"plan: {key}: {value}")
    return block


def answer_all(
    systems: Sequence[Any], held: HeldOut, args: EvalArgs, out_dir: Path, state: Any, plan_block: dict[str, Any]
) -> dict[str, Answered]:  # fmt: skip
    """Step 3: every system's answers; the first system's first two batches (the first with the model's
    loading) give the time estimate of the rest."""
    answered: dict[str, Answered] = {}
    for system in systems:
        answered[system.name] = done = system_answers(system, held, args, out_dir, state)
        if done.batch_s and "estimated generation s" not in plan_block:
            first, rest = done.batch_s[0], done.batch_s[1] if len(done.batch_s) > 1 else done.batch_s[0]
            batches = -(-len(held.prompts) // args.batch_size)
            generating = sum(s.kind != "answers" for s in systems)
            plan_block["estimated generation s"] = round(generating * (first + rest * (batches - 1)), 1)
            log(f"plan: the first batches took {first:.1f}s (with loading) and {rest:.1f}s: generation about "
                f"{plan_block['estimated generation s']:.0f}s in all")  # fmt: skip
        for reason, n in done.left_out.items():
            log(f"{system.name}: {n} prompt(s) left out: {reason}")
        if done.truncated:
            log(f"{system.name}: {done.truncated} prompt(s) left-truncated to fit its context")
        log(f"{system.name}: {done.generated} answers generated, the others reused")
    plan_block["actual generation s"] = round(sum(a.seconds for a in answered.values()), 1)
    return answered


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
        held = held_out(args, data_args, tokenizer)  # step 1
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(str(out_dir / "eval_config.json"), args, data_args)
    plan = make_plan(held, systems, args)  # step 2
    plan_block = log_plan(plan, held, systems, judge_list) if state.is_main_process else {}
    answered = answer_all(systems, held, args, out_dir, state, plan_block)  # step 3
    if not state.is_main_process:
        return {}
    answers: dict[str, list[str | None]] = {
        CHOSEN: held.chosen,
        **{k: a.answers for k, a in answered.items()},
    }
    tax_result = tax.evaluation_tax(args, systems, held, answers) if args.tax_text else None
    notes += tax.tax_lines(tax_result) if tax_result and "systems" in tax_result else []
    answer_audit = degenerate_answers(answered, args.max_degenerate)  # step 4
    notes += [note for note in (held.source_line,) if note] + answer_audit["lines"]
    turn_2 = None
    if has_second_turn(held) and args.second_turn:  # step 3b: turn 2, given each system's own turn 1
        turn_2, answers_2, left_2 = answer_second_turn(systems, held, answered, args, out_dir, state)
        notes += [f"turn 2: {n} prompt(s) left out: {reason}" for reason, n in left_2.items()]
    elif has_second_turn(held):
        notes.append("only the first turn of each conversation is answered and judged (second_turn: false)")
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
    metadata = run_metadata(args, data_args, held, systems, plan, answers)
    summary: dict[str, Any] = {
        "output_dir": str(out_dir),
        "systems": metadata["systems"],
        "base": args.base,
        "n_prompts": len(held.prompts),
        "prompt_ids": held.prompt_ids,
        "layout": held.layout,
        "combine_orders": args.combine_orders,
        "notes": notes,
        "plan": plan_block,
        "generated": {k: a.generated for k, a in answered.items()},
        "answers_audit": answer_audit,
        "prompts": {},
        **({"tax": tax_result} if tax_result else {}),
        "judge_calls": {},
        "evidence": {},
        "judges": {},
        "reports": {},
    }
    failed = []
    for judge in judge_list:  # step 5: each judge, then its report
        before, started = _counters(judge.stats), time.perf_counter()
        try:
            run = judge_turn(judge, cache, out_dir, held, answers, plan, args)
            if turn_2 is not None:
                second = judge_turn(judge, cache, out_dir, turn_2, answers_2, turn_plan(plan, turn_2), args)
                keep = ("comparisons", "prompts", "by_group", "scores", "scores_by_group")
                run.results["turn_2"] = {k: v for k, v in second.results.items() if k in keep}
                run.results.setdefault("tables", []).append(turn_table(second.results))
        except EndpointRefused:
            raise  # a refused key is the user's to fix: one line, exit 2
        except Exception as error:  # the judge gets a report saying why; the other judges still run
            run = JudgeRun({"error": f"{type(error).__name__}: {error}"})
            if judge.name not in args.optional_judges:
                failed.append(f"judge {judge.name}: {run.results['error']}")
        counts = _since(before, _counters(judge.stats))
        plan_block.setdefault("judge s", {})[judge.name] = round(time.perf_counter() - started, 1)
        plan_block.setdefault("judge calls made", {})[judge.name] = counts.get("calls")
        earlier = log_traffic(judge_folder(out_dir, judge.name), counts)  # a rerun adds to earlier runs'
        results = run.results | {
            "traffic": judge_traffic(counts, args.judge_retry_threshold, earlier),
            "skipped": {**dict(plan.honeypot_skipped), **run.results.get("skipped", {})},
            "notes": list(notes),
            "answers_audit": answer_audit,
            "metadata": {"judge": judge.name, "judge identity": judge.identity, **metadata,
                         "judge calls this run": counts.get("calls")},
        }  # fmt: skip
        judge_dir = judge_folder(out_dir, judge.name)
        paths = write_report(judge_dir, results, run.judgments, run.examples, run.undecided)
        files.write_text(
            judge_dir / "audit_judgments.jsonl",
            "".join(json.dumps(j.to_row()) + "\n" for j in run.audit_judgments),
        )
        summary["judges"][judge.name] = files.to_jsonable(results)
        summary["prompts"][judge.name] = results.get("prompts")
        summary["judge_calls"][judge.name] = counts.get("calls")
        evidence = bool(results.get("trust", {}).get("evidence")) and not answer_audit["flagged"]
        summary["evidence"][judge.name] = evidence
        summary["reports"][judge.name] = {name: str(path) for name, path in paths.items()}
        log_judge(judge.name, results, counts, paths)
    files.write_text(out_dir / "evaluation.json", json.dumps(files.to_jsonable(summary), indent=2))
    if failed:
        raise JudgeFailed("\n".join(failed) + f"\n(reports and {out_dir / 'evaluation.json'} were written)")
    return summary


def log_judge(
    name: str, results: Mapping[str, Any], counts: Mapping[str, Any], paths: Mapping[str, Path]
) -> None:
    """The console's lines for one judge: the verdict first, then the prompt counts and the headlines."""
    title, reasons = opening(results)
    log(title)
    for reason in reasons:
        log(f"  {reason}")
    if results.get("prompts"):
        log(f"  {name}: prompts {reports.prompt_line(results['prompts'])}")
    for comparison in results.get("comparisons", []):
        log(f"  {name}: {headline(comparison)}")
    second = results.get("turn_2") or {}
    if second.get("prompts"):
        log(f"  {name}: turn 2: prompts {reports.prompt_line(second['prompts'])}")
    for comparison in second.get("comparisons", []):
        log(f"  {name}: turn 2: {headline(comparison)}")
    log(f"judge {name}: {counts.get('calls')} calls; report in {paths['report.md']}")


def run_metadata(
    args: EvalArgs, data_args: DataArgs, held: HeldOut, systems: Sequence[Any], plan: Plan, answers: Mapping[str, Any]
) -> dict[str, Any]:  # fmt: skip
    """The report's settings table."""
    metadata = {
        "systems": {s.name: s.path for s in systems},
        "base": args.base,
        "dataset": data_args.dataset,
        "layout": held.layout,
        "held-out prompts": len(held.prompts),
        "decoding": json.dumps(generation_settings(args)),
        "seed": args.seed,
        "honeypot pairs": len(plan.honeypots),
        "labelled pairs": len(plan.labelled),
        "answer length unit": "characters",
        "combine orders": args.combine_orders,
    }
    if held.group_column:
        metadata["group column"] = held.group_column
    if "best_of_n" in answers:
        metadata["best_of_n"] = f"n={args.best_of_n_n}, temperature={args.best_of_n_temperature}, "
        metadata["best_of_n"] += f"reward model {args.best_of_n_reward_model}"
    return metadata


def judge_turn(
    judge: Any, cache: JudgmentCache, out_dir: Path, held: HeldOut, answers: Mapping[str, Any], plan: Plan,
    args: EvalArgs,
) -> JudgeRun:  # fmt: skip
    """One judge on one turn, in the evaluation's grading mode."""
    if args.grading == "single":
        return evaluate_single(judge, out_dir, held, answers, plan, args)
    return evaluate_judge(judge, cache, held, answers, plan, args)


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
