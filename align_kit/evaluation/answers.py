"""What the evaluation judges: the systems under test, the held-out prompts, and each system's answers.

A system is a model (an align-kit run folder, a local model, a Hub id), a ``.jsonl`` file of precomputed
answers, or best-of-N sampling from a policy with a reward model. Answers are kept in
``generations/<system>.jsonl`` and reused while the model, its weights, the decoding and the seed are the
same; only missing prompts are generated, each process answering its share, and the file grows one
generation batch at a time, so a crash loses at most the batch in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align_kit.configs import DataArgs, ModelArgs
from align_kit.data.loading import DataError, load_preferences, load_raw, render_held_out, system_chat_format
from align_kit.evaluation.settings import EvalArgs
from align_kit.models import generation, rewards
from align_kit.models.generation import best_of_n
from align_kit.models.loading import load_model, load_reward_model, load_tokenizer, resolve

CHOSEN = "chosen"  # the dataset's chosen answer, a baseline every system meets
ANSWER_FILE_SUFFIX = ".jsonl"


# ---------------------------------------------------------------------------------------------------------
# Systems from their specs


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
    """Held-out prompts (distinct, in dataset order) with their chosen answers, and the labelled rows."""

    prompt_ids: list[str]
    prompts: list[str]
    chosen: list[str]
    rows: list[dict[str, str]]  # every held-out (prompt, chosen, rejected) row, for label agreement
    groups: list[str] | None = None  # each prompt's value of EvalArgs.group_column, when one is set
    chat_template: str = "auto"  # how systems that are no align-kit run get their prompts rendered


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt text (the same across runs, sizes and systems)."""
    return "p" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:10]


def held_out(args: EvalArgs, data_args: DataArgs, tokenizer: Any = None) -> HeldOut:
    """The first ``args.n_prompts`` distinct prompts of the test split and their first chosen answer, in the
    hh format (the plain conversation judges read; each system gets them rendered as it was trained)."""
    splits, _ = load_preferences(dataclasses.replace(data_args, chat_template="hh"), tokenizer)
    first_chosen: dict[str, str] = {}
    for row in splits["test"]:
        first_chosen.setdefault(row["prompt"], row["chosen"])
    prompts = list(first_chosen)[: args.n_prompts]
    if not prompts:
        raise ValueError(f"{data_args.dataset}: the test split has no usable rows")
    groups = None
    if args.group_column:
        group_of = prompt_groups(splits["test"], data_args, args.group_column)
        groups = [group_of[p] for p in prompts]
    return HeldOut(
        [prompt_id(p) for p in prompts],
        prompts,
        [first_chosen[p] for p in prompts],
        splits["test"],
        groups,
        data_args.chat_template,
    )


def prompt_groups(rows: Sequence[dict[str, Any]], data_args: DataArgs, column: str) -> dict[str, str]:
    """prompt -> its value of ``column`` in the raw source row it came from (``source_row``; the first row
    of a prompt decides), for reporting every comparison per group."""
    raw = load_raw(data_args)
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
    reused; only the missing prompts are generated (split across processes) and appended after every
    generation batch.
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
    # prompts rendered as the system's training rendered them (its run_config.json), else by chat_template
    chat = system_chat_format(system.path, held.chat_template, load_tokenizer)
    if chat.name != "hh":  # earlier answers were all generated from hh prompts: they stay valid
        identity["chat_template"] = chat.identity()
    path = out_dir / "generations" / f"{system.name}.jsonl"
    done = {
        row["prompt"]: row["answer"]
        for row in read_generations(path)
        if all(row.get(k) == v for k, v in identity.items())
    }
    todo = [p for p in held.prompts if p not in done]
    if todo:
        done_now = 0  # the batches come back rendered for the system: the file keeps the hh prompts
        for batch, new in generate_answers(system, render_held_out(todo, held.rows, chat), args, state):
            prompts, done_now = todo[done_now : done_now + len(batch)], done_now + len(batch)
            if state.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:  # one batch, then flushed by close
                    for prompt, answer in zip(prompts, new, strict=True):
                        row = {"prompt_id": prompt_id(prompt), "prompt": prompt, "answer": answer}
                        row |= {"system": system.name, **identity, "num_processes": state.num_processes}
                        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            done |= dict(zip(prompts, new, strict=True))
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


def generate_answers(
    system: System, prompts: list[str], args: EvalArgs, state: Any
) -> Iterator[tuple[list[str], list[str]]]:
    """(prompts, answers) one generation batch at a time, in order: each batch holds ``batch_size``
    prompts per process, each process answers a contiguous share of it, and all shares are gathered."""
    from accelerate.utils import gather_object

    model = load_model(ModelArgs(model_name_or_path=system.path)).to(state.device)
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
    if missing_local(args.best_of_n_reward_model) or unfinished_run(args.best_of_n_reward_model):
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
