"""Judged evaluation: answers from each system, win rates against the dataset's chosen answers and the
base system, and the judge audits that say whether to trust them.

    python eval/win_rate.py --config eval/configs/embedded.yaml
    accelerate launch eval/win_rate.py --config eval/configs/embedded.yaml   # generation split by rank

Steps, each reusing what an earlier run already finished:

1. held-out prompts: the first ``n_prompts`` distinct prompts of the test split, with their chosen answers;
2. answers: every system answers them (``generations/<system>.jsonl``, one row per prompt, extended
   and never redone while the model, its weights and the decoding settings are the same);
3. judging: every comparison in both presentation orders (``judges.judge_both_orders``), verdicts cached
   in ``judge_cache.jsonl``, so rerunning a finished evaluation makes zero judge calls;
4. audits, on pairs whose better answer is known: honeypots (the chosen answer against a truncated,
   word-shuffled, empty or off-topic copy), the dataset's own chosen/rejected labels, position bias over
   every pair judged in both orders, parse failures, and transitivity of the pairwise table;
5. one report per judge in ``<output_dir>/<judge>/`` (``reports.write_report``) and ``evaluation.json``.

Comparisons: every system against ``chosen``; every system against the base; with ``all_pairs`` every
other pair too, so that Bradley-Terry ratings and transitivity rest on direct games.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align_kit import judges as judges_lib
from align_kit import stats
from align_kit.configs import HONEYPOT_KINDS, DataArgs, EvalArgs, parse, save_resolved
from align_kit.judge_cache import JudgmentCache
from align_kit.reports import headline, to_jsonable, write_report
from align_kit.runs import log
from align_kit.stats import Judgment

CHOSEN = "chosen"  # the dataset's chosen answer, a baseline every system meets
ANSWER_FILE_SUFFIX = ".jsonl"


CONFIG = (EvalArgs, DataArgs)


# ---------------------------------------------------------------------------------------------------------
# Systems and judges from their specs


@dataclass(frozen=True)
class System:
    """One system under evaluation: ``kind`` is 'model', 'answers' (a .jsonl file) or 'best_of_n'."""

    name: str
    path: str
    kind: str = "model"


def split_spec(spec: str) -> tuple[str, str | None]:
    """'name=value' -> (name, value); a spec without '=' -> (spec, None)."""
    name, sep, value = spec.partition("=")
    return name.strip(), (value.strip() if sep else None)


def missing_local(path: str) -> bool:
    """True for a path meant to be local that is not there (absolute, ./-relative, or its parent exists);
    a name that could be a Hub id is left to the loader."""
    if path == "tiny-gpt2" or Path(path).exists():
        return False
    p = Path(path)
    return p.is_absolute() or path.startswith(".") or (len(p.parts) > 1 and p.parent.exists())


def unfinished_run(path: str) -> bool:
    """An align-kit run folder (it holds run_config.json) whose training has not finished."""
    folder = Path(path)
    return (folder / "run_config.json").exists() and not (folder / "run_complete.json").exists()


def resolve_systems(args: EvalArgs, notes: list[str]) -> list[System]:
    """The systems to evaluate, base first; missing or unfinished ones are left out with a note."""
    systems: list[System] = []
    for spec in args.systems:
        name, path = split_spec(spec)
        if not name or not path:
            raise ValueError(f"systems entry {spec!r}: expected name=path")
        if name == CHOSEN or name in {s.name for s in systems}:
            raise ValueError(f"systems entry {spec!r}: the name is taken ('{CHOSEN}' is reserved)")
        kind = "answers" if path.endswith(ANSWER_FILE_SUFFIX) else "model"
        systems.append(System(name, path, kind))
    if args.best_of_n_policy is not None:
        systems.append(System("best_of_n", args.best_of_n_policy, "best_of_n"))
    if args.base not in {s.name for s in systems}:
        raise ValueError(f"base {args.base!r} is not one of the systems {[s.name for s in systems]}")
    kept = []
    for system in systems:
        reason = None
        if missing_local(system.path):
            reason = f"{system.path} does not exist"
        elif unfinished_run(system.path):
            reason = f"{system.path} is an unfinished run (no run_complete.json)"
        elif system.kind == "best_of_n":
            reason = _best_of_n_unavailable(args)
        if reason is None:
            kept.append(system)
        elif system.name == args.base:
            raise FileNotFoundError(f"base system {system.name}: {reason}")
        else:
            notes.append(f"system {system.name} skipped: {reason}")
    return sorted(kept, key=lambda s: s.name != args.base)


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
# Held-out data


@dataclass
class HeldOut:
    """Held-out prompts (distinct, in dataset order) with their chosen answers, and the labelled rows."""

    prompt_ids: list[str]
    prompts: list[str]
    chosen: list[str]
    rows: list[dict[str, str]]  # every held-out (prompt, chosen, rejected) row, for label agreement


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt text (the same across runs, sizes and systems)."""
    return "p" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:10]


def held_out(args: EvalArgs, data_args: DataArgs, tokenizer: Any = None) -> HeldOut:
    """The first ``args.n_prompts`` distinct prompts of the test split and their first chosen answer."""
    from align_kit.data import load_preferences

    splits, _ = load_preferences(data_args, tokenizer)
    first_chosen: dict[str, str] = {}
    for row in splits["test"]:
        first_chosen.setdefault(row["prompt"], row["chosen"])
    prompts = list(first_chosen)[: args.n_prompts]
    if not prompts:
        raise ValueError(f"{data_args.dataset}: the test split has no usable rows")
    return HeldOut(
        [prompt_id(p) for p in prompts], prompts, [first_chosen[p] for p in prompts], splits["test"]
    )


# ---------------------------------------------------------------------------------------------------------
# Answers


def generation_settings(args: EvalArgs) -> dict[str, Any]:
    """Decoding settings that change an answer; sampling knobs are dropped for greedy decoding."""
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        settings |= {"temperature": args.temperature, "top_p": args.top_p}
    return settings


def fingerprint(path: str) -> str:
    """Names, sizes and modification times of a local model's weight files (or a file's content hash),
    so answers are regenerated when the weights behind a path change; a Hub id stands for itself."""
    from align_kit.models import resolve

    target = Path(resolve(path))
    if target.is_file():
        return "sha256:" + hashlib.sha256(target.read_bytes()).hexdigest()[:16]
    if not target.is_dir():
        return f"hub:{path}"
    weights = sorted(
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in target.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    return "files:" + hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16]


def read_generations(path: Path) -> list[dict[str, Any]]:
    """Rows of a generations file; a line cut short by a crash is ignored."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def system_answers(
    system: System, held: HeldOut, args: EvalArgs, out_dir: Path, state: Any
) -> tuple[list[str], int]:
    """Answers of one system to every held-out prompt and how many were generated now.

    Rows already in ``generations/<system>.jsonl`` with the same model, weights, decoding and seed are
    reused; only the missing prompts are generated (split across processes) and appended.
    """
    if system.kind == "answers":
        return answers_from_file(system.path, held.prompts), 0
    settings = generation_settings(args)
    if system.kind == "best_of_n":
        settings = {
            "max_new_tokens": args.max_new_tokens,
            "best_of_n": args.best_of_n_n,
            "temperature": args.best_of_n_temperature,
            "top_p": args.top_p,
            "reward_model": args.best_of_n_reward_model,
            "reward_model_fingerprint": fingerprint(args.best_of_n_reward_model),
        }
    identity = {"model": system.path, "model_fingerprint": fingerprint(system.path)}
    identity |= {"generation": settings, "seed": args.seed}
    path = out_dir / "generations" / f"{system.name}.jsonl"
    done = {
        row["prompt"]: row["answer"]
        for row in read_generations(path)
        if all(row.get(k) == v for k, v in identity.items())
    }
    todo = [p for p in held.prompts if p not in done]
    if todo:
        new = generate_answers(system, todo, args, state)
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                for prompt, answer in zip(todo, new, strict=True):
                    row = {"prompt_id": prompt_id(prompt), "prompt": prompt, "answer": answer}
                    row |= {"system": system.name, **identity, "num_processes": state.num_processes}
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        done |= dict(zip(todo, new, strict=True))
    return [done[p] for p in held.prompts], len(todo)


def answers_from_file(path: str, prompts: Sequence[str]) -> list[str]:
    """Precomputed answers from a .jsonl file with 'prompt' and 'answer' keys, matched by prompt text."""
    by_prompt = {row["prompt"]: row["answer"] for row in read_generations(Path(path))}
    missing = [p for p in prompts if p not in by_prompt]
    if missing:
        raise ValueError(
            f"{path}: no answer for {len(missing)} of {len(prompts)} prompts, e.g. {missing[0]!r}"
        )
    return [by_prompt[p] for p in prompts]


def generate_answers(system: System, prompts: list[str], args: EvalArgs, state: Any) -> list[str]:
    """Answers to ``prompts`` in order; each process answers a contiguous share, then all are gathered."""
    from accelerate.utils import gather_object

    from align_kit import generation
    from align_kit.configs import ModelArgs
    from align_kit.models import load_model, load_tokenizer

    model = load_model(ModelArgs(model_name_or_path=system.path)).to(state.device)
    tokenizer = load_tokenizer(system.path)
    with state.split_between_processes(prompts) as mine:
        mine = list(mine)
        if system.kind == "best_of_n":
            answers = best_of_n_answers(model, tokenizer, mine, args, args.seed + state.process_index)
        else:
            completions = generation.generate(
                model,
                tokenizer,
                mine,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                do_sample=args.do_sample,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed + state.process_index,
                progress=args.progress and state.is_main_process,
            )
            answers = [c[0] for c in completions]
    return list(gather_object(answers)) if state.num_processes > 1 else answers


def _best_of_n_unavailable(args: EvalArgs) -> str | None:
    """Why the best-of-N system cannot run (its reward model is missing), or None."""
    if missing_local(args.best_of_n_reward_model) or unfinished_run(args.best_of_n_reward_model):
        return f"its reward model {args.best_of_n_reward_model} does not exist or is unfinished"
    return None


def best_of_n_answers(
    policy: Any, tokenizer: Any, prompts: list[str], args: EvalArgs, seed: int
) -> list[str]:
    """``align_kit.rewards.best_of_n``: ``best_of_n_n`` samples per prompt from ``policy``, the one the
    reward model scores highest kept."""
    from align_kit import rewards
    from align_kit.models import load_tokenizer

    reward_tokenizer = load_tokenizer(args.best_of_n_reward_model)
    reward_model = rewards.load_reward_model(
        args.best_of_n_reward_model, pad_token_id=reward_tokenizer.pad_token_id
    ).to(policy.device)
    scorer = rewards.reward_scorer(reward_model, reward_tokenizer, batch_size=args.batch_size)
    return rewards.best_of_n(
        policy,
        tokenizer,
        scorer,
        prompts,
        args.best_of_n_n,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.best_of_n_temperature,
        top_p=args.top_p,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------
# Pairs with a known better answer


@dataclass(frozen=True)
class AuditPair:
    """One audit pair: ``first`` against ``second``; ``expected`` is the verdict for ``first``."""

    group: str  # e.g. 'honeypot:shuffled' or 'labels'
    prompt_id: str
    prompt: str
    first: str
    second: str
    expected: str


def _words(text: str) -> list[str]:
    return text.split()


def honeypots(held: HeldOut, n: int, kinds: Sequence[str], seed: int) -> tuple[list[AuditPair], Counter]:
    """The chosen answer of the first ``n`` held-out prompts against corrupted copies of itself:
    truncated to its first quarter of words, its words shuffled, empty, or the answer to another prompt
    sharing the fewest words with it. Answers too short to corrupt are counted, not used."""
    unknown = sorted(set(kinds) - set(HONEYPOT_KINDS))
    if unknown:
        raise ValueError(f"unknown honeypot kind(s) {unknown}; choose from {HONEYPOT_KINDS}")
    rng = random.Random(seed)
    pairs, skipped = [], Counter()
    for i, (pid, prompt, real) in enumerate(
        zip(held.prompt_ids[:n], held.prompts[:n], held.chosen[:n], strict=True)
    ):
        words = _words(real)
        for kind in kinds:
            fake = None
            if kind == "truncated" and len(words) >= 2:
                fake = " " + " ".join(words[: max(1, len(words) // 4)])
            elif kind == "shuffled" and len(set(words)) >= 2:
                shuffled = list(words)
                while shuffled == words:
                    rng.shuffle(shuffled)
                fake = " " + " ".join(shuffled)
            elif kind == "empty":
                fake = ""
            elif kind == "off_topic":
                fake = _off_topic(i, held, rng)
            if fake is None or fake.strip() == real.strip():
                skipped[f"honeypot {kind}: answer too short to corrupt"] += 1
            else:
                pairs.append(AuditPair(f"honeypot:{kind}", pid, prompt, real, fake, "win"))
    return pairs, skipped


def _off_topic(index: int, held: HeldOut, rng: random.Random, candidates: int = 16) -> str | None:
    """The chosen answer of another prompt with the least word overlap (Jaccard) with this one's."""
    others = [k for k in range(len(held.prompts)) if k != index and held.chosen[k] != held.chosen[index]]
    if not others:
        return None
    own = set(w.lower() for w in _words(held.chosen[index]))

    def overlap(k: int) -> float:
        theirs = set(w.lower() for w in _words(held.chosen[k]))
        return len(own & theirs) / max(1, len(own | theirs))

    return held.chosen[min(rng.sample(others, min(candidates, len(others))), key=overlap)]


def label_pairs(held: HeldOut, n: int, seed: int) -> list[AuditPair]:
    """Held-out chosen/rejected rows as pairs, the chosen answer first or second by a seeded coin, so the
    dataset's labels hold both 'win' and 'loss' and Cohen's kappa is defined."""
    rng = random.Random(seed + 1)
    pairs = []
    for row in held.rows[:n]:
        pid = prompt_id(row["prompt"])
        if rng.random() < 0.5:
            pairs.append(AuditPair("labels", pid, row["prompt"], row["chosen"], row["rejected"], "win"))
        else:
            pairs.append(AuditPair("labels", pid, row["prompt"], row["rejected"], row["chosen"], "loss"))
    return pairs


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
