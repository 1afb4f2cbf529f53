"""Two-turn conversations (MT-Bench style): each system answers the second question of a conversation given its
own answer to the first, and the judge reads the whole conversation.

Turn 2 of a prompt is asked of a system only where it answered turn 1 (a prompt left out of turn 1 is left out
of turn 2 under the same reason). The judge is shown both questions as the request and each system's two
answers, marked by turn, as its answer; the reference, where the set has one for both turns, is written the
same way. Turn 2 is judged with the same comparisons as turn 1 and reported beside it (comparisons, prompt
counts, per category); the judge audits run on turn 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from align_kit.data.prompts import ASSISTANT, HUMAN
from align_kit.evaluation.answers import CHOSEN, Answered, HeldOut, prompt_id, system_answers
from align_kit.evaluation.judging import Plan
from align_kit.evaluation.reports import percent
from align_kit.evaluation.settings import EvalArgs


def conversation(first: str, second: str) -> str:
    """Two answers of one conversation as one text the judge reads."""
    return f"[turn 1] {first.strip()}\n[turn 2] {second.strip()}"


def judge_request(question_1: str, question_2: str) -> str:
    """Both user questions as the request the judge is shown."""
    return f"{HUMAN} {question_1.strip()}{HUMAN} {question_2.strip()}{ASSISTANT}"


def has_second_turn(held: HeldOut) -> bool:
    return bool(held.second_turns) and any(q is not None for q in held.second_turns)


def answer_second_turn(
    systems: Sequence[Any], held: HeldOut, answered: Mapping[str, Answered], args: EvalArgs, out_dir: Path, state: Any
) -> tuple[HeldOut, dict[str, list[str | None]], Counter]:  # fmt: skip
    """Every system's turn-2 answer given its own turn-1 answer. Returns the turn-2 held-out set (the judge's
    view: both questions as the request), the conversations as answers (the reference one as ``chosen``),
    and the prompts left out of turn 2 before judging, by reason."""
    rows = [i for i, q in enumerate(held.second_turns or []) if q is not None]
    questions_1 = [held.first_turns[i] for i in rows]
    questions_2 = [held.second_turns[i] for i in rows]
    requests = [judge_request(a, b) for a, b in zip(questions_1, questions_2, strict=True)]
    refs_2 = [held.second_references[i] for i in rows]
    out: dict[str, list[str | None]] = {
        CHOSEN: [
            conversation(held.chosen[i], ref) if held.chosen[i] is not None and ref is not None else None
            for i, ref in zip(rows, refs_2, strict=True)
        ]
    }
    left_out: Counter = Counter()
    for system in systems:
        first = [answered[system.name].answers[i] for i in rows]
        if system.kind == "answers":  # a file of answers has no turn 2 of its own
            out[system.name] = [None] * len(rows)
            left_out[f"system {system.name} is an answers file (no turn 2)"] += len(rows)
            continue
        prompts = [
            f"{HUMAN} {q1.strip()}{ASSISTANT} {a.strip()}{HUMAN} {q2.strip()}{ASSISTANT}"
            if a is not None
            else None
            for q1, q2, a in zip(questions_1, questions_2, first, strict=True)
        ]
        asked = [p for p in prompts if p is not None]
        turn = HeldOut(
            [prompt_id(p) for p in asked], asked, [None] * len(asked), [], chat_template=held.chat_template
        )
        done = system_answers(system, turn, args, out_dir, state) if asked else Answered([])
        by_prompt = dict(zip(asked, done.answers, strict=True))
        second = [by_prompt.get(p) if p is not None else None for p in prompts]
        out[system.name] = [
            conversation(a, b) if a is not None and b is not None else None
            for a, b in zip(first, second, strict=True)
        ]
    groups = [held.groups[i] for i in rows] if held.groups is not None else None
    turn_2 = replace(
        held, prompt_ids=[prompt_id(r) for r in requests], prompts=requests, chosen=out[CHOSEN], rows=[],
        groups=groups, requested=len(rows), left_out=Counter(), source_line="turn 2",
    )  # fmt: skip
    return turn_2, out, left_out


def turn_plan(plan: Plan, turn_2: HeldOut) -> Plan:
    """Turn 2's plan: turn 1's comparisons (against the reference only where turn 2 has one), no audit pairs."""
    comparisons = [(s, b) for s, b in plan.comparisons if b != CHOSEN or turn_2.n_references]
    return replace(
        plan, comparisons=comparisons, honeypots=[], labelled=[], audits_run={"turn 2": "no audits"}
    )


def turn_table(results: Mapping[str, Any]) -> dict[str, Any]:
    """A report table of turn 2's comparisons."""
    rows = [
        [f"{c['system']} vs {c['baseline']}", str(c["n"]), percent(c.get("win_rate")),
         f"{percent(c.get('ci_low'))}-{percent(c.get('ci_high'))}"]
        for c in results.get("comparisons", [])
    ]  # fmt: skip
    return {
        "title": "Turn 2 (the whole conversation)",
        "headers": ["Comparison", "n", "Win rate", "CI"],
        "rows": rows,
    }
