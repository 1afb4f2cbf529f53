"""Preference data: Anthropic/hh-rlhf and other pairwise sets into ``prompt`` / ``chosen`` / ``rejected``.

Every row that is not used is counted under a reason (and its first occurrences are kept with file,
row and field), so a run can show exactly what it dropped. A source with no usable rows is an error
that names the file and the reasons.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_kit import task
from align_kit.configs import DataArgs
from align_kit.prompts import ASSISTANT, HUMAN, count_turns, format_prompt, split_last_turn
from align_kit.resources import home

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MAX_EXAMPLES_PER_REASON = 5


class DataError(ValueError):
    """A data source that cannot be used at all (missing file or column, no usable rows)."""


class RowError(ValueError):
    """One unusable row: ``reason`` is the counter key, ``field`` the offending column."""

    def __init__(self, reason: str, field: str):
        super().__init__(f"{reason} in field {field!r}")
        self.reason = reason
        self.field = field


@dataclass
class DropCounts:
    """Rows kept and dropped per split and reason, with a few located examples of each reason."""

    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, split: str, reason: str, source: str, row: int, field_name: str) -> None:
        self.dropped.setdefault(split, Counter())[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < MAX_EXAMPLES_PER_REASON:
            self.examples.append(
                {"split": split, "reason": reason, "file": source, "row": row, "field": field_name}
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": dict(self.kept),
            "dropped": {split: dict(counter) for split, counter in self.dropped.items()},
            "examples": self.examples,
        }

    def summary(self) -> str:
        lines = []
        for split in sorted(set(self.kept) | set(self.dropped)):
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.get(split, {}).items())) or "none"
            lines.append(f"{split}: kept {self.kept.get(split, 0)}, dropped: {reasons}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def split_hh(chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """Split two hh-rlhf transcripts at their final Assistant turn into (prompt, chosen, rejected).

    The prompt keeps the trailing ``"\\n\\nAssistant:"``; answers keep their leading space. The two
    transcripts must share the same history, or the row is unusable.
    """
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise RowError("not_text", name)
        if HUMAN not in text:
            raise RowError("no_human_turn", name)
        if ASSISTANT not in text:
            raise RowError("no_assistant_turn", name)
    prompt, chosen_answer = split_last_turn(chosen)
    rejected_prompt, rejected_answer = split_last_turn(rejected)
    if prompt != rejected_prompt:
        raise RowError("history_mismatch", "rejected")
    return prompt, chosen_answer, rejected_answer


def parse_row(row: dict[str, Any], args: DataArgs) -> tuple[str, str, str]:
    """One raw row -> (prompt, chosen, rejected), raising RowError for unusable rows."""
    if args.dataset_format == "hh-rlhf":
        prompt, chosen, rejected = split_hh(row.get("chosen"), row.get("rejected"))
    elif args.dataset_format == "preference":
        prompt, chosen, rejected = (
            row.get(args.prompt_column),
            row.get(args.chosen_column),
            row.get(args.rejected_column),
        )
        for name, value in (
            (args.prompt_column, prompt),
            (args.chosen_column, chosen),
            (args.rejected_column, rejected),
        ):
            if not isinstance(value, str):
                raise RowError("not_text", name)
        if not prompt.lstrip().startswith(HUMAN.strip()):
            prompt = format_prompt(prompt)
        chosen, rejected = (
            text if text.startswith((" ", "\n")) else " " + text for text in (chosen, rejected)
        )
    else:
        raise DataError(f"dataset_format must be 'hh-rlhf' or 'preference', got {args.dataset_format!r}")
    if not chosen.strip():
        raise RowError("empty_answer", "chosen")
    if not rejected.strip():
        raise RowError("empty_answer", "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError("identical_answers", "rejected")
    return prompt, chosen, rejected


def required_columns(args: DataArgs) -> list[str]:
    if args.dataset_format == "hh-rlhf":
        return ["chosen", "rejected"]
    return [args.prompt_column, args.chosen_column, args.rejected_column]


def embedded_folder(args: DataArgs) -> Path:
    """Generate the embedded task once per (seed, sizes) and return its folder.

    Safe with several processes (ranks of one run, or separate runs sharing ``$ALIGN_KIT_HOME``): one
    generates under a file lock while the others wait, then reuse its files. A lock rather than a
    barrier, so a caller on rank 0 alone cannot hang. ``task.write`` writes test.jsonl last.
    """
    from filelock import FileLock

    name = f"v{task.VERSION}-seed{args.split_seed}-{args.embedded_train_size}-{args.embedded_test_size}"
    folder = home() / "embedded" / name
    if not (folder / "test.jsonl").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not (folder / "test.jsonl").exists():
                task.write(folder, args.embedded_train_size, args.embedded_test_size, seed=args.split_seed)
    return folder


def _split_files(path: Path, args: DataArgs) -> dict[str, Path]:
    """Local sources: a file is the train split; a folder holds files named after the splits."""
    if path.is_file():
        return {args.train_split: path}
    found = {}
    for split in (args.train_split, args.test_split):
        matches = sorted(p for p in path.iterdir() if p.stem == split and p.suffix in DATA_SUFFIXES)
        if matches:
            found[split] = matches[0]
    if args.train_split not in found:
        raise DataError(f"{path}: no {args.train_split}.json/.jsonl/.parquet file in this folder")
    return found


def load_raw(args: DataArgs) -> dict[str, tuple[str, Any]]:
    """Raw splits as {split: (source name, datasets.Dataset)} from the embedded task, files or the Hub."""
    from datasets import load_dataset

    path = embedded_folder(args) if args.dataset == "embedded" else Path(args.dataset)
    if path.exists():
        out = {}
        for split, file in _split_files(path, args).items():
            if file.suffix not in DATA_SUFFIXES:
                raise DataError(f"{file}: unsupported file type (use .json, .jsonl or .parquet)")
            builder = DATA_SUFFIXES[file.suffix]
            try:
                out[split] = (str(file), load_dataset(builder, data_files=str(file), split="train"))
            except Exception as error:  # datasets raises many types for unreadable files
                raise DataError(f"{file}: cannot be read as {builder}: {error}") from error
        return out
    if args.dataset.startswith((".", "/")) or Path(args.dataset).suffix in DATA_SUFFIXES:
        raise DataError(f"{args.dataset}: no such file or folder")
    hub = load_dataset(args.dataset, args.dataset_config)
    return {
        split: (f"{args.dataset}[{split}]", hub[split])
        for split in (args.train_split, args.test_split)
        if split in hub
    }


def clean(
    raw, source: str, split: str, args: DataArgs, counts: DropCounts, tokenizer=None
) -> list[dict[str, str]]:
    """Parse and filter one split; every dropped row is counted by reason."""
    missing = [c for c in required_columns(args) if c not in raw.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the file has {raw.column_names}")
    rows, seen = [], set()
    for index, row in enumerate(raw):
        try:
            prompt, chosen, rejected = parse_row(row, args)
        except RowError as error:
            counts.drop(split, error.reason, source, index, error.field)
            continue
        if args.single_turn and count_turns(prompt) != (1, 1):
            counts.drop(split, "multi_turn", source, index, "chosen")
            continue
        key = (prompt, chosen, rejected)
        if args.deduplicate and key in seen:
            counts.drop(split, "duplicate", source, index, "chosen")
            continue
        seen.add(key)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source_row": index})
    if args.max_pair_tokens is not None and rows:
        texts = [r["prompt"] + max(r["chosen"], r["rejected"], key=len) for r in rows]
        rows = _drop_too_long(rows, texts, "chosen", split, source, args, counts, tokenizer)
    return rows


def _drop_too_long(
    rows: list[dict],
    texts: list[str],
    field_name: str,
    split: str,
    source: str,
    args: DataArgs,
    counts: DropCounts,
    tokenizer,
) -> list[dict]:
    """The rows whose text (plus the EOS the trainers append) fits in ``max_pair_tokens``; the others
    are counted as too_long under ``field_name``."""
    if tokenizer is None:
        raise ValueError("max_pair_tokens needs a tokenizer")
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = []
    for row, length in zip(rows, lengths, strict=True):
        if length + 1 > args.max_pair_tokens:
            counts.drop(split, "too_long", source, row["source_row"], field_name)
        else:
            kept.append(row)
    return kept


def split_by_prompt(rows: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/test split that keeps every prompt on one side (no prompt leaks into the test set)."""
    prompts = sorted({r["prompt"] for r in rows}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    random.Random(seed).shuffle(prompts)
    n_test = max(1, round(len(prompts) * test_size)) if len(prompts) > 1 else 0
    test_prompts = set(prompts[:n_test])
    return [r for r in rows if r["prompt"] not in test_prompts], [
        r for r in rows if r["prompt"] in test_prompts
    ]


def load_preferences(args: DataArgs, tokenizer=None) -> tuple[dict[str, list[dict]], DropCounts]:
    """Clean train and test rows as plain dicts (``prompt``, ``chosen``, ``rejected``, ``source_row``)."""
    if args.dataset_format == "unpaired":
        raise DataError(
            "dataset_format 'unpaired': its rows hold one answer each, not pairs; recipes/kto.py reads them"
        )
    counts = DropCounts()
    raw = load_raw(args)
    splits = {}
    for split, (source, dataset) in raw.items():
        splits[split] = clean(dataset, source, split, args, counts, tokenizer)
    return _split_and_cap(splits, raw[args.train_split][0], args, counts), counts


def _split_and_cap(
    splits: dict[str, list[dict]], train_source: str, args: DataArgs, counts: DropCounts
) -> dict[str, list[dict]]:
    """{'train', 'test'} rows: an empty training split is an error; a missing test split is held out of
    train by prompt; both are capped; the kept rows are counted."""
    if not splits[args.train_split]:
        reasons = dict(counts.dropped.get(args.train_split, {}))
        raise DataError(f"{train_source}: no usable rows; dropped by reason: {reasons or 'file is empty'}")
    if args.test_split not in splits:
        splits[args.train_split], splits[args.test_split] = split_by_prompt(
            splits[args.train_split], args.test_size, args.split_seed
        )
    for split, cap in ((args.train_split, args.max_train_samples), (args.test_split, args.max_eval_samples)):
        if cap is not None and len(splits[split]) > cap:
            splits[split] = splits[split][:cap]
    out = {"train": splits[args.train_split], "test": splits[args.test_split]}
    for split, rows in out.items():
        counts.kept[split] = len(rows)
    return out


def to_sft(rows: list[dict], target: str, seed: int) -> list[dict[str, str]]:
    """Prompt/completion rows for SFT: the chosen answer, the rejected one, or a seeded 50/50 mix."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        if target == "chosen":
            pick = "chosen"
        elif target == "rejected":
            pick = "rejected"
        elif target == "mix":
            pick = "chosen" if rng.random() < 0.5 else "rejected"
        else:
            raise ValueError(f"sft_target must be chosen, rejected or mix, got {target!r}")
        out.append({"prompt": row["prompt"], "completion": row[pick]})
    return out


def distinct_prompts(rows: list[dict]) -> list[str]:
    """The prompts of ``rows`` in order of first appearance, each once (the prompts an online method samples)."""
    return list(dict.fromkeys(row["prompt"] for row in rows))


def subsample(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded random ``fraction`` of ``rows`` (all of them at 1.0), in their original order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), max(1, round(fraction * len(rows)))))
    return [row for i, row in enumerate(rows) if i in keep]


def attach_margins(splits: dict[str, list[dict]], data_args: DataArgs, column: str) -> dict[str, list[dict]]:
    """Add ``margin`` to every cleaned row from the raw source row it came from (``source_row``)."""
    raw = load_raw(data_args)
    sources = {"train": data_args.train_split, "test": data_args.test_split}
    out = {}
    for split, rows in splits.items():
        source = sources[split] if sources[split] in raw else data_args.train_split  # test made from train
        name, dataset = raw[source]
        if column not in dataset.column_names:
            raise DataError(f"{name}: no margin column {column!r}; the file has {dataset.column_names}")
        values = dataset[column]
        out[split] = [{**row, "margin": float(values[row["source_row"]])} for row in rows]
    return out


# ---------------------------------------------------------------------------------------------------------
# Unpaired rows (KTO): one answer per row, labelled desirable or not

UNPAIRED_COLUMNS = ("completion", "label")  # with DataArgs.prompt_column


def parse_unpaired_row(row: dict[str, Any], args: DataArgs) -> tuple[str, str, bool]:
    """One raw unpaired row -> (prompt, completion, label), raising RowError for unusable rows.

    ``label`` must be a boolean or 0/1 (True: a desirable answer). Prompt and completion are normalised
    as in ``dataset_format: preference``.
    """
    prompt, completion, label = row.get(args.prompt_column), row.get("completion"), row.get("label")
    for name, value in ((args.prompt_column, prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise RowError("not_text", name)
    if isinstance(label, int) and label in (0, 1):  # bool is an int: True/False pass here too
        label = bool(label)
    else:
        raise RowError("bad_label", "label")
    if not prompt.lstrip().startswith(HUMAN.strip()):
        prompt = format_prompt(prompt)
    completion = completion if completion.startswith((" ", "\n")) else " " + completion
    if not completion.strip():
        raise RowError("empty_answer", "completion")
    return prompt, completion, label


def clean_unpaired(
    raw, source: str, split: str, args: DataArgs, counts: DropCounts, tokenizer=None
) -> list[dict[str, Any]]:
    """Parse and filter one split of unpaired rows; every dropped row is counted by reason."""
    missing = [c for c in (args.prompt_column, *UNPAIRED_COLUMNS) if c not in raw.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the file has {raw.column_names}")
    rows, seen = [], set()
    for index, row in enumerate(raw):
        try:
            prompt, completion, label = parse_unpaired_row(row, args)
        except RowError as error:
            counts.drop(split, error.reason, source, index, error.field)
            continue
        if args.single_turn and count_turns(prompt) != (1, 1):
            counts.drop(split, "multi_turn", source, index, args.prompt_column)
            continue
        if args.deduplicate and (prompt, completion, label) in seen:
            counts.drop(split, "duplicate", source, index, "completion")
            continue
        seen.add((prompt, completion, label))
        rows.append({"prompt": prompt, "completion": completion, "label": label, "source_row": index})
    if args.max_pair_tokens is not None and rows:
        texts = [r["prompt"] + r["completion"] for r in rows]
        rows = _drop_too_long(rows, texts, "completion", split, source, args, counts, tokenizer)
    return rows


def load_unpaired(args: DataArgs, tokenizer=None) -> tuple[dict[str, list[dict]], DropCounts]:
    """Clean train and test rows of an unpaired source (``prompt``, ``completion``, ``label``,
    ``source_row``), from files or the Hub as ``load_preferences`` reads them."""
    counts = DropCounts()
    raw = load_raw(args)
    splits = {
        split: clean_unpaired(data, source, split, args, counts, tokenizer)
        for split, (source, data) in raw.items()
    }
    return _split_and_cap(splits, raw[args.train_split][0], args, counts), counts


def to_unpaired(rows: list[dict], seed: int) -> list[dict[str, Any]]:
    """Preference rows -> unpaired rows: the chosen answer desirable, the rejected one undesirable, in a
    seeded shuffle (so that an answer's batch neighbour is rarely the other answer to its prompt)."""
    out = [
        {"prompt": row["prompt"], "completion": row[key], "label": key == "chosen"}
        for row in rows
        for key in ("chosen", "rejected")
    ]
    random.Random(seed).shuffle(out)
    return out
