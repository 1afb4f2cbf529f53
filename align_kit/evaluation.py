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
import math
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
from align_kit.audits import AuditPair, honeypots, label_pairs
from align_kit.configs import DataArgs, EvalArgs, parse, save_resolved
from align_kit.judge_cache import JudgmentCache
from align_kit.reports import headline, to_jsonable, write_report
from align_kit.runs import log
from align_kit.stats import Judgment

CONFIG = (EvalArgs, DataArgs)


# ---------------------------------------------------------------------------------------------------------
# Judges from their specs


class LazyJudge:
    """A judge built from its config on its first cache miss, so a rerun answered entirely from the cache
    loads no model and opens no client. Its identity (the cache key) needs only the config and template."""

    def __init__(self, config: judges_lib.JudgeConfig):
        self.config = config
        self.name, self.batch_size = config.name, config.batch_size
        template = judges_lib.read_template(config.template) if config.template else None
        self.identity = judges_lib.judge_identity(config, template)
        self.stats = judges_lib.JudgeStats()
        self._judge: Any = None

    def judge_batch(self, items: list[judges_lib.PairItem]) -> list[judges_lib.Verdict]:
        if self._judge is None:
            self._judge = judges_lib.build_judge(self.config)
            if self._judge.identity != self.identity:
                raise RuntimeError(
                    f"judge {self.name}: identity changed when built; the cache would be wrong"
                )
            self._judge.stats = self.stats  # one set of counters, whichever object counts
        return self._judge.judge_batch(items)


def resolve_judges(specs: Sequence[str | Any], notes: list[str]) -> list[Any]:
    """Judges from specs ('name', 'name=model', a path) or objects with the Judge protocol (used as is).
    A reward-model or local-LM judge whose model folder is missing is left out with a note."""
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
        out.append(LazyJudge(config))
    names = [j.name for j in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two judges share a name: {names}; set `name` in one judge.yaml")
    return out


# ---------------------------------------------------------------------------------------------------------
# Judging


def slot_verdict(verdict: str | None, system_slot: str) -> str | None:
    """The judge's single-order answer ('A', 'B', 'tie') behind a system-view verdict ('win', 'tie',
    'loss') given the slot the system sat in: the inverse of ``judges.to_system_view``."""
    if verdict is None or verdict == "tie":
        return verdict
    other = "B" if system_slot == "A" else "A"
    return system_slot if verdict == "win" else other


def to_judgments(
    rows: Sequence[Mapping[str, Any]],
    system: str,
    baseline: str,
    system_answers: Sequence[str],
    baseline_answers: Sequence[str],
) -> tuple[list[Judgment], int]:
    """``judge_both_orders`` rows as Judgments (lengths in characters); rows whose two orders both failed
    to parse have no verdict and are counted instead."""
    out, unparsed = [], 0
    for row, ours, theirs in zip(rows, system_answers, baseline_answers, strict=True):
        if row["verdict"] is None:
            unparsed += 1
            continue
        out.append(
            Judgment(
                prompt_id=str(row["prompt_id"]),
                system=system,
                baseline=baseline,
                verdict=row["verdict"],
                first_order_verdict=slot_verdict(row["first_order_verdict"], "A"),  # system shown first
                swapped_order_verdict=slot_verdict(row["swapped_order_verdict"], "B"),
                system_len=len(ours.strip()),
                baseline_len=len(theirs.strip()),
                judge=str(row["judge"]),
                parse_failures=int(row["parse_failures"]),
            )
        )
    return out, unparsed


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


def judge_pairs(
    judge: Any, cache: JudgmentCache, pairs: Sequence[AuditPair], progress: bool
) -> tuple[list[Judgment], list[dict[str, Any]]]:
    """Judge audit pairs in both orders: Judgments (first answer as the system) and the raw rows."""
    rows = judges_lib.judge_both_orders(
        judge,
        [p.prompt for p in pairs],
        [p.first for p in pairs],
        [p.second for p in pairs],
        cache,
        [p.prompt_id for p in pairs],
        progress,
    )
    judgments = []
    for pair, row in zip(pairs, rows, strict=True):
        found, _ = to_judgments(
            [row], pair.group + ":first", pair.group + ":second", [pair.first], [pair.second]
        )
        judgments += found
    return judgments, rows


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
    all_rows: list[dict[str, Any]] = []
    for system, baseline in plan:
        rows = judges_lib.judge_both_orders(
            judge, held.prompts, answers[system], answers[baseline], cache, held.prompt_ids, args.progress
        )
        found, unparsed = to_judgments(rows, system, baseline, answers[system], answers[baseline])
        skipped[f"{system} vs {baseline}: both orders unparseable"] += unparsed
        judgments += found
        all_rows += rows
        examples += pick_examples(found, held, answers, args.n_examples)

    honey_judgments, honey_rows = judge_pairs(judge, cache, honeypot_pairs, args.progress)
    label_judgments, label_rows = judge_pairs(judge, cache, labelled, args.progress)
    all_rows += honey_rows + label_rows
    by_kind: dict[str, list[bool]] = {}
    honey, labels = ([], []), ([], [])  # (judge verdicts, expected verdicts) of the decided pairs
    for pairs, rows, decided in ((honeypot_pairs, honey_rows, honey), (labelled, label_rows, labels)):
        for pair, row in zip(pairs, rows, strict=True):
            if row["verdict"] is None:
                skipped[f"{pair.group}: both orders unparseable"] += 1
                continue
            decided[0].append(row["verdict"])
            decided[1].append(pair.expected)
            if pair.group.startswith("honeypot:"):
                by_kind.setdefault(pair.group.split(":", 1)[1], []).append(row["verdict"] == pair.expected)

    rates = stats.win_rate_table(stats.win_table(judgments))
    audit_judgments = judgments + honey_judgments + label_judgments
    figures = stats.audit(
        audit_judgments,
        honeypots=honey if honey[0] else None,
        human=labels if labels[0] else None,
        rates=rates if len(rates) >= 3 else None,
    )
    # a pair with both orders unparseable has no Judgment, but it is the worst parse failure of all
    figures["n_pairs_judged"] = len(all_rows)
    figures["n_pairs_unparseable"] = sum(row["verdict"] is None for row in all_rows)
    failed = sum(row["parse_failures"] > 0 for row in all_rows)
    figures["parse_failure_rate"] = failed / len(all_rows) if all_rows else math.nan
    figures["honeypot_pass_rate_by_kind"] = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
    notes = [
        f"Position bias covers all {len(audit_judgments)} pairs with a verdict (comparisons, honeypots and "
        f"labelled pairs), first-slot binomial p = {_fmt(figures['first_slot_p'])}; the parse-failure rate "
        f"covers all {len(all_rows)} pairs asked, {figures['n_pairs_unparseable']} of them unparseable in "
        "both orders.",
        "Honeypots: the chosen answer must win against a corrupted copy; passed by kind: "
        + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by_kind.items())
        + ".",
        f"Labels: {len(labels[0])} held-out chosen/rejected pairs, the chosen one shown first or second by a "
        "seeded coin; a tie counts as disagreement.",
    ]
    if figures["n_intransitive"] is None:
        notes.append("Transitivity needs at least 3 systems (counting chosen).")

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
        "audit": figures,
        "audit_notes": notes,
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


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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
        from align_kit.models import load_tokenizer

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
