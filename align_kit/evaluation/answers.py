"""What the evaluation judges: the systems under test, the held-out prompts, and each system's answers.

A system is a model (an align-kit run folder, a local model, a Hub id), a ``.jsonl`` file of precomputed
answers, a model served by an OpenAI-compatible endpoint (``served``), or best-of-N sampling from a policy
with a reward model. Answers are kept in
``generations/<system>.jsonl`` and reused while the model, its weights, the decoding and the seed are the
same; only missing prompts are generated, each process answering its share, and the file grows one
generation batch at a time, so a crash loses at most the batch in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.configs import DataArgs, ModelArgs
from align_kit.data.formats import DataError, load_raw
from align_kit.data.loading import load_preferences, render_held_out, system_chat_format
from align_kit.data.prompt_sets import PromptSet, categories, describe, read_source
from align_kit.data.prompts import format_prompt
from align_kit.evaluation.served import served_answers, served_endpoint
from align_kit.evaluation.settings import EvalArgs
from align_kit.models import generation, rewards
from align_kit.models.generation import best_of_n
from align_kit.models.loading import load_model, load_reward_model, load_tokenizer, resolve, source_state

CHOSEN = "chosen"  # the dataset's chosen answer, a baseline every system meets
ANSWER_FILE_SUFFIX = ".jsonl"


# ---------------------------------------------------------------------------------------------------------
# Systems from their specs


@dataclass(frozen=True)
class System:
    """One system under evaluation: ``kind`` is 'model', 'answers' (a .jsonl file), 'served' or 'best_of_n'."""

    name: str
    path: str
    kind: str = "model"


def split_spec(spec: str) -> tuple[str, str | None]:
    """'name=value' -> (name, value); a spec without '=' -> (spec, None)."""
    name, sep, value = spec.partition("=")
    return name.strip(), (value.strip() if sep else None)


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
        kind = "served" if served_endpoint(path) else kind
        systems.append(System(name, path, kind))
    if args.best_of_n_policy is not None:
        systems.append(System("best_of_n", args.best_of_n_policy, "best_of_n"))
    if args.base not in {s.name for s in systems}:
        raise ValueError(f"base {args.base!r} is not one of the systems {[s.name for s in systems]}")
    kept = []
    for system in systems:
        reason = None
        state = source_state(system.path) if system.kind != "served" else None  # models.loading's one rule
        if state == "missing":
            reason = f"{system.path} does not exist"
        elif state == "unfinished":
            reason = f"{system.path} is an unfinished run (no run_complete.json)"
        elif state == "weights file":
            reason = f"{system.path} is a weights file, not a model folder"
        elif system.kind == "best_of_n":
            reason = best_of_n_unavailable(args)
        if reason is None:
            kept.append(system)
        elif system.name == args.base:
            raise FileNotFoundError(f"base system {system.name}: {reason}")
        else:
            notes.append(f"system {system.name} skipped: {reason}")
    return sorted(kept, key=lambda s: s.name != args.base)


# ---------------------------------------------------------------------------------------------------------
# Held-out data


@dataclass
class HeldOut:
    """Held-out prompts (distinct, in dataset order) with their chosen (or reference) answers, and the
    labelled rows. From a prompt set, ``chosen`` holds each prompt's reference answer or None, and ``rows``
    is empty (a prompt set has no human labels)."""

    prompt_ids: list[str]
    prompts: list[str]
    chosen: list[str | None]
    rows: list[dict[str, str]]  # every held-out (prompt, chosen, rejected) row, for label agreement
    groups: list[str] | None = None  # each prompt's value of EvalArgs.group_column, when one is set
    chat_template: str = "auto"  # how systems that are no align-kit run get their prompts rendered
    layout: str = "pairs"  # 'pairs' (preference data, test split) or a prompt_sets.PROMPT_SET_LAYOUTS name
    requested: int = 0  # prompts asked for (n_prompts, or the rows of a prompt set read)
    left_out: Counter = field(default_factory=Counter)  # reason -> prompts lost before any answer
    group_column: str | None = None  # what ``groups`` are (EvalArgs.group_column, or 'category')
    source_line: str = ""  # what was read, for the console and the report
    first_turns: list[str] | None = None  # a prompt set's questions as written (turn 1)
    second_turns: list[str | None] | None = None  # the second question of a two-turn conversation, or None
    second_references: list[str | None] | None = None

    @property
    def n_references(self) -> int:
        return sum(answer is not None for answer in self.chosen)


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt text (the same across runs, sizes and systems)."""
    return "p" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:10]


def held_out(args: EvalArgs, data_args: DataArgs, tokenizer: Any = None) -> HeldOut:
    """The prompts every system answers, in the hh format (the plain conversation judges read; each system
    gets them rendered as it was trained): a prompt set's first ``args.n_prompts`` rows used whole
    (``prompt_sets``), else the first ``args.n_prompts`` distinct prompts of the preference data's test split
    with their first chosen answer. Prompts asked for and not there are counted in ``left_out``."""
    prompt_set, raws = read_source(data_args, args.n_prompts)  # the raw data is read once
    if prompt_set is not None:
        return held_out_of_set(prompt_set, args, data_args)
    if raws is None and args.group_column:
        raws = load_raw(data_args)
    splits, counts = load_preferences(dataclasses.replace(data_args, chat_template="hh"), tokenizer, raws)
    first_chosen: dict[str, str] = {}
    for row in splits["test"]:
        first_chosen.setdefault(row["prompt"], row["chosen"])
    prompts = list(first_chosen)[: args.n_prompts]
    if not prompts:
        raise ValueError(f"{data_args.dataset}: the test split has no usable rows")
    groups = None
    if args.group_column:
        group_of = prompt_groups(splits["test"], data_args, args.group_column, raws)
        groups = [group_of[p] for p in prompts]
    left_out: Counter = Counter()
    if len(prompts) < args.n_prompts:
        dropped = ", ".join(f"{r}={n}" for r, n in sorted(counts.dropped.get("test", {}).items())) or "none"
        reason = (
            f"not in the test split ({len(first_chosen)} distinct prompts; loader drops there: {dropped})"
        )
        left_out[reason] = args.n_prompts - len(prompts)
    return HeldOut(
        [prompt_id(p) for p in prompts],
        prompts,
        [first_chosen[p] for p in prompts],
        splits["test"],
        groups,
        data_args.chat_template,
        requested=args.n_prompts,
        left_out=left_out,
        group_column=args.group_column,
        source_line=f"{data_args.dataset}: preference pairs, test split; {counts.summary()}".replace(
            "\n", "; "
        ),
    )


def held_out_of_set(prompt_set: PromptSet, args: EvalArgs, data_args: DataArgs) -> HeldOut:
    """A prompt set as held-out prompts: the first turn of every usable row, its reference answer (or
    None), its category as the group unless ``group_column`` names another column."""
    items = prompt_set.items
    prompts = [format_prompt(item.turns[0]) for item in items]
    groups, column = categories(items), "category"
    if args.group_column and args.group_column != "category":
        raise DataError(
            f"{prompt_set.source}: group_column {args.group_column!r}: a prompt set is grouped by its "
            "category only"
        )
    return HeldOut(
        [prompt_id(p) for p in prompts],
        prompts,
        [item.reference for item in items],
        [],
        groups,
        data_args.chat_template,
        layout=prompt_set.layout,
        requested=prompt_set.rows_read,
        left_out=Counter(prompt_set.left_out),
        group_column=column if groups is not None else None,
        source_line=describe(prompt_set),
        first_turns=[item.turns[0] for item in items],
        second_turns=[item.turns[1] if len(item.turns) > 1 else None for item in items],
        second_references=[item.references[1] if len(item.references) > 1 else None for item in items],
    )


def prompt_groups(
    rows: Sequence[dict[str, Any]], data_args: DataArgs, column: str, raws: dict[str, Any] | None = None
) -> dict[str, str]:
    """prompt -> its value of ``column`` in the raw source row it came from (``source_row``; the first row
    of a prompt decides), for reporting every comparison per group (``raws``: the splits already read)."""
    raw = raws if raws is not None else load_raw(data_args)
    split = raw[
        data_args.test_split if data_args.test_split in raw else data_args.train_split
    ]  # test from train
    if column not in split.columns:
        raise DataError(f"{split.source}: no group column {column!r}; the file has {split.columns}")
    values = split.column(column)
    out: dict[str, str] = {}
    for row in rows:
        out.setdefault(row["prompt"], str(values[row["source_row"]]))
    return out


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
    return files.read_jsonl(path, skip_bad=True)


@dataclass
class Answered:
    """One system's answers to the held-out prompts (None where the prompt did not fit its context), how many
    were generated now, the prompts left out or left-truncated by reason, and timings for the plan."""

    answers: list[str | None]
    generated: int = 0
    left_out: Counter = field(default_factory=Counter)
    truncated: int = 0
    context: int | None = None  # the system's context length in tokens, when known
    cut: int | None = None  # answers that reached max_new_tokens (None: not measurable, e.g. an answer file)
    batch_s: list[float] = field(default_factory=list)  # wall time of each generation batch (the first loads)
    seconds: float = 0.0  # wall time of all generation


def context_limit(path: str, tokenizer: Any) -> int | None:
    """A model's context length in tokens, read from its config (no weights loaded), else from its tokenizer's
    ``model_max_length`` when that is a real bound; None when neither says."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve(path))
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    except (OSError, ValueError):
        limit = None
    if limit is None and getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 10**7:
        limit = tokenizer.model_max_length
    return int(limit) if limit else None


def fit_prompts(
    name: str, rendered: Sequence[str], tokenizer: Any, limit: int | None, args: EvalArgs
) -> tuple[list[str | None], Counter, int]:
    """Each rendered prompt as the system reads it when ``prompt + max_new_tokens`` fits ``limit``; with
    ``truncate_prompts`` one that does not fit keeps its last tokens (counted), else it is None (counted)."""
    if limit is None:
        return list(rendered), Counter(), 0
    room = limit - args.max_new_tokens
    left_out, truncated, out = Counter(), 0, []
    reason = f"too long for system {name} (prompt + max_new_tokens {args.max_new_tokens} > {limit} tokens)"
    for text in rendered:
        ids = tokenizer(text, verbose=False)["input_ids"]  # too long is what we measure, not a warning
        if len(ids) <= room:
            out.append(text)
            continue
        if args.truncate_prompts and room > 0:
            cut = tokenizer.decode(ids[-room:])
            if len(tokenizer(cut)["input_ids"]) <= room:
                out.append(cut)
                truncated += 1
                continue
        out.append(None)
        left_out[reason] += 1
    return out, left_out, truncated


def count_cut(answers: Sequence[str | None], tokenizer: Any, max_new_tokens: int) -> int:
    """Answers whose tokens reach ``max_new_tokens``: generation stopped them, not the model."""
    return sum(
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= max_new_tokens
        for a in answers
        if a is not None
    )


def system_answers(system: System, held: HeldOut, args: EvalArgs, out_dir: Path, state: Any) -> Answered:
    """Answers of one system to every held-out prompt that fits its context (None for the others, counted).

    Rows already in ``generations/<system>.jsonl`` with the same model, weights, decoding and seed are
    reused; only the missing prompts are generated (split across processes) and appended after every
    generation batch.
    """
    if system.kind == "answers":
        return Answered(list(answers_from_file(system.path, held.prompts)))
    if system.kind == "served":  # asked by the main process, the one that judges
        if not state.is_main_process:
            return Answered([])
        answers, made = served_answers(system.name, system.path, held.prompts, args, out_dir)
        return Answered(list(answers), generated=made)
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
    # prompts rendered as the system's training rendered them (its run_config.json), else by chat_template
    chat = system_chat_format(system.path, held.chat_template, load_tokenizer)
    if chat.name != "hh":  # earlier answers were all generated from hh prompts: they stay valid
        identity["chat_template"] = chat.identity()
    tokenizer = load_tokenizer(system.path)
    limit = context_limit(system.path, tokenizer)
    rendered = render_held_out(held.prompts, held.rows, chat)
    fitted, left_out, truncated = fit_prompts(system.name, rendered, tokenizer, limit, args)
    reader = dict(zip(held.prompts, fitted, strict=True))  # hh prompt -> what the system reads, or None
    path = out_dir / "generations" / f"{system.name}.jsonl"
    done = {
        row["prompt"]: row["answer"]
        for row in read_generations(path)
        if all(row.get(k) == v for k, v in identity.items())
    }
    todo = [p for p in held.prompts if p not in done and reader[p] is not None]
    result = Answered([], len(todo), left_out, truncated, limit)
    start = time.perf_counter()
    if todo:
        done_now = 0  # the batches come back rendered for the system: the file keeps the hh prompts
        for batch, new in generate_answers(system, [reader[p] for p in todo], args, state):
            result.batch_s.append(time.perf_counter() - start - sum(result.batch_s))
            prompts, done_now = todo[done_now : done_now + len(batch)], done_now + len(batch)
            if state.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:  # one batch, then flushed by close
                    for prompt, answer in zip(prompts, new, strict=True):
                        row = {"prompt_id": prompt_id(prompt), "prompt": prompt, "answer": answer}
                        row |= {"system": system.name, **identity, "num_processes": state.num_processes}
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            done |= dict(zip(prompts, new, strict=True))
    result.seconds = time.perf_counter() - start
    result.answers = [done[p] if reader[p] is not None else None for p in held.prompts]
    result.cut = count_cut(result.answers, tokenizer, args.max_new_tokens)
    return result


def answers_from_file(path: str, prompts: Sequence[str]) -> list[str]:
    """Precomputed answers from a .jsonl file with 'prompt' and 'answer' keys, matched by prompt text."""
    by_prompt = {row["prompt"]: row["answer"] for row in read_generations(Path(path))}
    missing = [p for p in prompts if p not in by_prompt]
    if missing:
        raise ValueError(
            f"{path}: no answer for {len(missing)} of {len(prompts)} prompts, e.g. {missing[0]!r}"
        )
    return [by_prompt[p] for p in prompts]


def generate_answers(
    system: System, prompts: list[str], args: EvalArgs, state: Any
) -> Iterator[tuple[list[str], list[str]]]:
    """(prompts, answers) one generation batch at a time, in order: each batch holds ``batch_size``
    prompts per process, each process answers a contiguous share of it, and all shares are gathered."""
    from accelerate.utils import gather_object

    model = load_model(ModelArgs(model_name_or_path=system.path)).to(state.device)  # prompts come rendered
    tokenizer = load_tokenizer(system.path)
    scorer = best_of_n_scorer(args, model.device) if system.kind == "best_of_n" else None
    step = args.batch_size * state.num_processes
    for number, start in enumerate(range(0, len(prompts), step)):
        batch = prompts[start : start + step]
        seed = args.seed + number * state.num_processes + state.process_index  # fresh noise every batch
        with state.split_between_processes(batch) as mine:
            mine = list(mine)
            if not mine:
                answers: list[str] = []
            elif scorer is not None:
                answers = best_of_n_answers(model, tokenizer, scorer, mine, args, seed)
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
                    seed=seed,
                    progress=False,
                )
                answers = [c[0] for c in completions]
        yield batch, (list(gather_object(answers)) if state.num_processes > 1 else answers)


def best_of_n_unavailable(args: EvalArgs) -> str | None:
    """Why the best-of-N system cannot run (its reward model is missing), or None."""
    if source_state(args.best_of_n_reward_model):
        return f"its reward model {args.best_of_n_reward_model} does not exist or is unfinished"
    return None


def best_of_n_scorer(args: EvalArgs, device: Any) -> Any:
    """The reward model that ranks the best-of-N samples, as a scorer on ``device``."""
    reward_tokenizer = load_tokenizer(args.best_of_n_reward_model)
    reward_model = load_reward_model(
        args.best_of_n_reward_model, pad_token_id=reward_tokenizer.pad_token_id
    ).to(device)
    return rewards.reward_scorer(reward_model, reward_tokenizer, batch_size=args.batch_size)


def best_of_n_answers(
    policy: Any, tokenizer: Any, scorer: Any, prompts: list[str], args: EvalArgs, seed: int
) -> list[str]:
    """``align_kit.models.generation.best_of_n``: ``best_of_n_n`` samples per prompt from ``policy``, the one the
    reward model scores highest kept."""
    return best_of_n(
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
