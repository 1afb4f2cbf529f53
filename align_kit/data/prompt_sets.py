"""Benchmark prompt sets as an evaluation input: prompts with optional reference answers, categories and ids,
in four layouts told apart by their columns.

- ``prompts``: ``prompt`` (a text, or a list of turns) or ``turns``; optional ``reference`` / ``references``
  / ``completion`` (a text, or one per turn), ``category``, ``id``;
- ``mt-bench``: ``question_id``, ``category``, ``turns`` (a list of texts), optional ``reference`` (a list);
- ``arena-hard``: ``question_id`` (or ``uid``), ``category``, ``turns`` as ``[{"content": ...}]``;
- ``alpacaeval``: ``instruction``, optional ``output`` (the reference answer) and ``dataset`` (its category).

A prompt set is used whole (no train/test split); a row that cannot be used (no text, a duplicate prompt) is
counted under its reason, never dropped silently. Rows holding ``chosen`` and ``rejected`` are preference
pairs and are read by ``align_kit.data.loading`` instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_kit.configs import DataArgs
from align_kit.data.formats import DATA_SUFFIXES, DataError, RawSplit, read_file

PROMPT_SET_LAYOUTS = ("prompts", "mt-bench", "arena-hard", "alpacaeval")
PAIR_COLUMNS = ("chosen", "rejected")
REFERENCE_KEYS = ("reference", "references", "completion")  # prompts layout, first one present wins


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a set: its turns (user messages, in order), a reference answer per turn where the set has
    one (None elsewhere), its category and a stable id."""

    id: str
    turns: tuple[str, ...]
    references: tuple[str | None, ...]
    category: str | None = None

    @property
    def reference(self) -> str | None:
        """The reference answer to the first turn, or None."""
        return self.references[0] if self.references else None


@dataclass
class PromptSet:
    """The usable prompts of a set, in file order, and what was left out of the first ``n_prompts`` rows."""

    source: str
    layout: str
    items: list[PromptItem]
    rows_read: int  # rows considered (the first n_prompts of the file)
    left_out: Counter = field(default_factory=Counter)  # reason -> rows


def layout_of_columns(raw: RawSplit) -> str | None:
    """The prompt-set layout of a split by its columns (and the shape of its first ``turns``), or None for
    preference pairs and anything else."""
    columns = set(raw.columns)
    if set(PAIR_COLUMNS) <= columns:
        return None
    if "turns" in columns and ("question_id" in columns or "uid" in columns):
        first = next((row.get("turns") for row in _rows(raw, 20) if row.get("turns")), None)
        if isinstance(first, list) and first and isinstance(first[0], dict):
            return "arena-hard"
        return "mt-bench"
    if "instruction" in columns:
        return "alpacaeval"
    if "prompt" in columns or "turns" in columns:
        return "prompts"
    return None


def _rows(raw: RawSplit, n: int | None = None) -> list[dict[str, Any]]:
    rows = raw.rows if isinstance(raw.rows, list) else [dict(r) for r in raw.rows]
    return list(rows[:n] if n is not None else rows)


def prompt_set_file(args: DataArgs) -> Path | None:
    """The file of a local dataset that may be a prompt set: the file itself, or a folder's test split (its
    train split when the folder has no test file); None for the embedded task and Hub datasets."""
    if args.dataset == "embedded":
        return None
    path = Path(args.dataset)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for split in (args.test_split, args.train_split):
        found = sorted(p for p in path.iterdir() if p.stem == split and p.suffix in DATA_SUFFIXES)
        if found:
            return found[0]
    return None


def read_source(args: DataArgs, n_prompts: int) -> tuple[PromptSet | None, dict[str, RawSplit] | None]:
    """The prompt set behind ``args.dataset`` (its first ``n_prompts`` rows), or, for data that is no prompt
    set, the raw splits already read (as ``formats.load_raw`` gives them, so nothing is read twice; None when
    nothing was read: the embedded task, a Hub dataset, a folder without a train split)."""
    path = prompt_set_file(args)
    if path is None:
        return None, None
    raw = read_file(path)
    layout = layout_of_columns(raw)
    if layout is None:
        if Path(args.dataset).is_file():
            return None, {args.train_split: raw}
        other = args.train_split if path.stem == args.test_split else None
        found = sorted(p for p in path.parent.iterdir() if p.stem == other and p.suffix in DATA_SUFFIXES)
        if not found:
            return None, None
        return None, {args.train_split: read_file(found[0]), args.test_split: raw}
    return parse_prompt_set(raw, layout, path, n_prompts), None


def read_prompt_set(args: DataArgs, n_prompts: int) -> PromptSet | None:
    """The prompt set behind ``args.dataset``, or None when the data is no prompt set."""
    return read_source(args, n_prompts)[0]


def parse_prompt_set(raw: RawSplit, layout: str, path: Path, n_prompts: int) -> PromptSet:
    """The usable rows of a prompt set's first ``n_prompts``, the others counted by reason."""
    rows = _rows(raw)
    considered = rows[:n_prompts]
    out = PromptSet(str(path), layout, [], len(considered))
    seen: set[str] = set()  # first turns: the turn every system answers and the prompt id is made from
    for index, row in enumerate(considered):
        try:
            item = parse_row(row, layout, index)
        except ValueError as error:
            out.left_out[f"unusable row: {error}"] += 1
            continue
        if item.turns[0] in seen:
            out.left_out["duplicate prompt"] += 1
            continue
        seen.add(item.turns[0])
        out.items.append(item)
    if not out.items:
        reasons = ", ".join(f"{r}={n}" for r, n in out.left_out.items())
        raise DataError(f"{path}: {layout} prompt set with no usable row ({reasons})")
    return out


def _texts(value: Any, name: str) -> tuple[str, ...]:
    """A text or a list of texts (or of {"content": text}) as a tuple of non-empty texts."""
    values = value if isinstance(value, list) else [value]
    texts = []
    for part in values:
        text = part.get("content") if isinstance(part, dict) else part
        if not isinstance(text, str):
            raise ValueError(f"{name} is not text")
        texts.append(text)
    if not texts or not texts[0].strip():
        raise ValueError(f"{name} is empty")
    return tuple(texts)


def _references(value: Any, n_turns: int) -> tuple[str | None, ...]:
    """One reference per turn (None where there is none or it is blank)."""
    if value is None:
        return (None,) * n_turns
    values = value if isinstance(value, list) else [value]
    refs = [v if isinstance(v, str) and v.strip() else None for v in values]
    return tuple((refs + [None] * n_turns)[:n_turns])


def parse_row(row: dict[str, Any], layout: str, index: int) -> PromptItem:
    """One row as a PromptItem; ValueError names the field that makes it unusable."""
    if layout in ("mt-bench", "arena-hard"):
        turns = _texts(row.get("turns"), "turns")
        refs = _references(row.get("reference"), len(turns))
        pid = row.get("question_id", row.get("uid"))
    elif layout == "alpacaeval":
        turns = _texts(row.get("instruction"), "instruction")
        refs = _references(row.get("output"), 1)
        pid = row.get("id")
    else:
        key = "prompt" if row.get("prompt") is not None else "turns"
        turns = _texts(row.get(key), key)
        ref_key = next((k for k in REFERENCE_KEYS if row.get(k) is not None), None)
        refs = _references(row.get(ref_key) if ref_key else None, len(turns))
        pid = row.get("id")
    category = row.get("category", row.get("dataset"))
    return PromptItem(
        str(pid) if pid is not None else f"row{index}",
        turns,
        refs,
        str(category) if category is not None else None,
    )


def describe(prompt_set: PromptSet) -> str:
    """One line for the console and the report: what was read and what was left out."""
    refs = sum(item.reference is not None for item in prompt_set.items)
    two = sum(len(item.turns) > 1 for item in prompt_set.items)
    line = (
        f"{prompt_set.source}: {prompt_set.layout} prompt set, {prompt_set.rows_read} row(s) read, "
        f"{len(prompt_set.items)} prompt(s) used whole (no train/test split), {refs} with a reference answer"
    )
    if two:
        line += f", {two} with more than one turn"
    if prompt_set.left_out:
        line += "; left out: " + ", ".join(f"{r}={n}" for r, n in sorted(prompt_set.left_out.items()))
    return line


def categories(items: Sequence[PromptItem]) -> list[str] | None:
    """Each item's category, or None when the set has none."""
    if all(item.category is None for item in items):
        return None
    return [item.category or "(none)" for item in items]
