"""The datasets users bring, as clean rows: preference pairs, instruction rows (SFT), unpaired rows (KTO).

Layouts (``DataArgs.dataset_format``; ``auto`` tells them apart by their columns):

- ``hh-rlhf``: ``chosen``/``rejected`` transcripts sharing their history (Anthropic/hh-rlhf);
- ``preference``: ``prompt``/``chosen``/``rejected`` strings;
- ``chat-preference``: ``prompt`` messages and ``chosen``/``rejected`` assistant messages (TRL's
  conversational layout with an explicit prompt; whole conversations in ``chosen``/``rejected`` work too);
- ``chat-transcripts``: ``chosen``/``rejected`` conversations sharing their history (implicit prompt);
- ``tldr-comparisons``: the summarize-from-feedback comparisons (``info``, ``summaries``, ``choice``);
- ``instruction``: ``prompt``/``completion`` (strings or messages), or a ``messages`` conversation;
- ``unpaired``: ``prompt``/``completion``/``label`` (True: a desirable answer).

Files and Hub splits are read and each row parsed into a conversation (a history of ``{"role",
"content"}`` messages and its answers) in ``align_kit.data.formats``; here each conversation is checked and
rendered with the run's ``ChatFormat`` (``chat_template``: the hh format or a chat template). Every row
that is not used is counted under a reason, and its first occurrences are kept with file, row, line and
field, so a run shows exactly what it dropped. A source that cannot be read or has no usable rows is an
error naming the file (and the line, for bad bytes or bad JSON).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.configs import DataArgs
from align_kit.console import is_main_process
from align_kit.data.counts import DropCounts
from align_kit.data.formats import (
    INSTRUCTION,
    PAIR_FORMATS,
    UNPAIRED,
    DataError,
    RawSplit,
    RowError,
    answer_problems,
    check_columns,
    detect_format,
    is_single_turn,
    load_raw,
    parse_pair,
    parse_single,
)
from align_kit.data.prompts import HH, TOKENIZER, ChatFormat, chat_format, parse_hh


def clean(
    raw: RawSplit,
    split: str,
    layout: str,
    args: DataArgs,
    counts: DropCounts,
    fmt: ChatFormat,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Parse, check and render one split; every dropped row is counted by reason with its file, row, line
    and field. Pair rows have ``prompt``/``chosen``/``rejected``; instruction rows ``prompt``/``completion``;
    unpaired rows also ``label``; all keep ``messages`` (the history) and ``source_row``."""
    from jinja2 import TemplateError

    check_columns(raw, layout, args)
    answer_keys = ("chosen", "rejected") if layout in PAIR_FORMATS else ("completion",)
    rows, seen = [], set()
    for index, row in enumerate(raw.rows):

        def drop(reason: str, name: str, more: Sequence = (), index: int = index, row: Any = row) -> None:
            counts.drop(split, reason, raw.source, index, name, raw.line(index), more, row)

        try:
            if layout in PAIR_FORMATS:
                history, *answers = parse_pair(row, layout, args)
                label = None
                names = (
                    ("summaries",) * 2
                    if layout == "tldr-comparisons"
                    else (args.chosen_column, args.rejected_column)
                )
            else:
                history, answer, label = parse_single(row, layout, args)
                answers, names = [answer], ("completion",)
        except RowError as error:
            drop(error.reason, error.field)
            continue
        problems = content_problems(history, answers, names, args.single_turn)
        if problems:
            drop(*problems[0], problems[1:])
            continue
        try:
            rendered = {"prompt": fmt.prompt(history)}
            rendered |= {key: fmt.answer(history, a) for key, a in zip(answer_keys, answers, strict=True)}
        except (ValueError, TemplateError):
            drop("template_error", names[0])
            continue
        key = tuple(rendered.values()) + (label,)
        if args.deduplicate and key in seen:
            drop("duplicate", names[0])
            continue
        seen.add(key)
        extra = {"label": label} if layout == UNPAIRED else {}
        rows.append({**rendered, **extra, "messages": history, "source_row": index})
    if args.max_pair_tokens is not None and rows:
        rows = _drop_too_long(rows, answer_keys, split, raw, args, counts, tokenizer)
    return rows


def content_problems(
    history: list[dict], answers: Sequence[str], names: Sequence[str], single_turn: bool
) -> list[tuple[str, str]]:
    """Every (reason, field) a parsed row fails, in the documented order (``DropCounts``)."""
    problems = []
    if len(answers) == 2 and answers[0].strip() == answers[1].strip() and answers[0].strip():
        problems.append(("identical_answers", names[1]))
    for content, name in zip(answers, names, strict=True):
        problems += answer_problems(content, name)
    if any("\x00" in message["content"] for message in history):
        problems.append(("nul_bytes", "prompt"))
    if single_turn and not is_single_turn(history):
        problems.append(("multi_turn", names[0]))
    return problems


def _drop_too_long(
    rows: list[dict], answer_keys: Sequence[str], split: str, raw: RawSplit, args: DataArgs, counts, tokenizer
) -> list[dict]:
    """The rows whose prompt plus longest answer, in tokens (plus the EOS the trainers append), fits in
    ``max_pair_tokens``; the others are counted as too_long under their longer answer."""
    if tokenizer is None:
        raise ValueError("max_pair_tokens needs a tokenizer")
    kept = []
    for row, per_answer in zip(rows, token_lengths(rows, answer_keys, tokenizer), strict=True):
        if max(per_answer) + 1 > args.max_pair_tokens:
            longest = answer_keys[per_answer.index(max(per_answer))]
            index = row["source_row"]
            counts.drop(split, "too_long", raw.source, index, longest, raw.line(index), data=raw.rows[index])
        else:
            kept.append(row)
    return kept


def token_lengths(rows: list[dict], answer_keys: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Per row, the token count of its prompt plus each answer (no special tokens)."""
    texts = [row["prompt"] + row[key] for row in rows for key in answer_keys]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    width = len(answer_keys)
    return [[len(x) for x in ids[i : i + width]] for i in range(0, len(ids), width)]


# ---------------------------------------------------------------------------------------------------------
# Splits


def split_by_prompt(rows: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/test split that keeps every prompt on one side (no prompt leaks into the test set);
    with two or more prompts each side gets at least one."""
    prompts = sorted({r["prompt"] for r in rows}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    random.Random(seed).shuffle(prompts)
    n_test = min(max(1, round(len(prompts) * test_size)), len(prompts) - 1) if len(prompts) > 1 else 0
    test_prompts = set(prompts[:n_test])
    return [r for r in rows if r["prompt"] not in test_prompts], [
        r for r in rows if r["prompt"] in test_prompts
    ]


def _reasons(counts: DropCounts, split: str) -> str:
    return str(dict(counts.dropped.get(split, {})) or "none")


def _split_and_cap(
    splits: dict[str, list[dict]], raws: dict[str, RawSplit], args: DataArgs, counts: DropCounts
) -> dict[str, list[dict]]:
    """{'train', 'test'} rows. An empty training or held-out split is an error naming the file and why:
    every recipe reports on its held-out rows (DPO and reward evaluation, reward accuracy, the PPO and
    best-of-N reports, the evaluation), so no run starts without one. A missing test split is held out of
    train by prompt; both are capped, every cut row counted."""
    train, test = "train", "test"
    train_source = raws[train].source
    if not splits[train]:
        raise DataError(f"{train_source}: no usable rows; dropped by reason: {_reasons(counts, train)}")
    if test in splits and not splits[test]:
        raise DataError(
            f"{raws[test].source}: no usable rows in the held-out split; dropped by reason: "
            f"{_reasons(counts, test)}"
        )
    if test not in splits:
        n_prompts = len({row["prompt"] for row in splits[train]})
        if n_prompts < 2:
            raise DataError(
                f"{train_source}: {len(splits[train])} usable row(s) with {n_prompts} distinct prompt, "
                f"nothing left to hold out (dropped by reason: {_reasons(counts, train)}); at least 2 "
                f"distinct prompts are needed, or a {args.test_split} file"
            )
        splits[train], splits[test] = split_by_prompt(splits[train], args.test_size, args.split_seed)
    sources = {train: raws[train], test: raws.get(test, raws[train])}
    for split, cap, name in (
        (train, args.max_train_samples, "max_train_samples"),
        (test, args.max_eval_samples, "max_eval_samples"),
    ):
        if cap is not None and len(splits[split]) > cap:
            raw = sources[split]
            for row in splits[split][cap:]:
                index = row["source_row"]
                reason = f"over_{name}"
                counts.drop(split, reason, raw.source, index, name, raw.line(index), data=raw.rows[index])
            splits[split] = splits[split][:cap]
    out = {"train": splits[train], "test": splits[test]}
    for split, rows in out.items():
        counts.kept[split] = len(rows)
    return out


# ---------------------------------------------------------------------------------------------------------
# Loaders: pairs (DPO, reward, PPO, best-of-N), SFT rows, unpaired rows (KTO)


def resolve_chat_format(args: DataArgs, tokenizer: Any = None) -> ChatFormat:
    """The run's ChatFormat. A .jinja template becomes the tokenizer's chat template, so the run folder's
    saved tokenizer carries it and the evaluation of that run renders the same way."""
    fmt = chat_format(args.chat_template, tokenizer)
    if fmt.template is not None:
        tokenizer.chat_template = fmt.template
    return fmt


def _load(
    args: DataArgs, tokenizer: Any, kinds: tuple[str, ...], raws: dict[str, RawSplit] | None = None
) -> tuple[dict[str, list], DropCounts]:
    """Read (unless ``raws`` were read already), detect, clean, split and cap; ``kinds`` are the layouts the
    caller reads ('pairs', 'instruction', 'unpaired')."""
    fmt = resolve_chat_format(args, tokenizer)
    counts = DropCounts(requested_format=args.dataset_format, chat_template=fmt.name)
    counts.rows = [] if args.write_dropped else None
    read = raws if raws is not None else load_raw(args)
    raws = {("train" if split == args.train_split else "test"): raw for split, raw in read.items()}
    splits = {}
    for split, raw in raws.items():
        layout = detect_format(raw, args) if args.dataset_format == "auto" else args.dataset_format
        kind = "pairs" if layout in PAIR_FORMATS else layout
        if kind not in kinds:
            readers = {
                "pairs": "DPO, reward, PPO, best-of-N, SFT and KTO",
                INSTRUCTION: "SFT",
                UNPAIRED: "KTO",
            }
            raise DataError(f"{raw.source}: {layout} rows are read by {readers[kind]} only")
        counts.formats[split] = layout
        splits[split] = clean(raw, split, layout, args, counts, fmt, tokenizer)
    counts.formats.setdefault("test", counts.formats["train"])  # held out of train
    try:
        out = _split_and_cap(splits, raws, args, counts)
    except DataError as error:
        hint = _format_hint(raws, args)
        raise DataError(f"{error}{hint}") from None
    finally:
        if args.write_dropped and is_main_process():
            lines = "".join(files.dumps(row, ensure_ascii=False) + "\n" for row in counts.rows)
            files.write_text(args.write_dropped, lines)
    for split, rows in out.items() if tokenizer is not None else ():
        keys = ("chosen", "rejected") if counts.formats[split] in PAIR_FORMATS else ("completion",)
        counts.lengths[split] = [max(n) + 1 for n in token_lengths(rows, keys, tokenizer)]  # + EOS
    return out, counts


def count_cut(counts: DropCounts, max_length: int | None, by_trl: str = "cut") -> None:
    """Count the kept rows whose prompt plus longest answer (and EOS) exceeds the trainer's ``max_length``,
    which TRL cuts (``by_trl``; its RewardTrainer drops them), so that data_counts.json says how many."""
    if max_length is None or not counts.lengths:
        return
    counts.over_max_length = {"max_length": max_length, "by_trl": by_trl} | {
        split: sum(n > max_length for n in lengths) for split, lengths in counts.lengths.items()
    }


def _format_hint(raws: dict[str, RawSplit], args: DataArgs) -> str:
    """When an explicit dataset_format left no usable rows, the layout auto detection sees instead."""
    if args.dataset_format == "auto":
        return ""
    try:
        seen = detect_format(raws["train"], args)
    except DataError:
        return ""
    return f"; the rows look like {seen!r}: try dataset_format: auto" if seen != args.dataset_format else ""


def load_preferences(
    args: DataArgs, tokenizer: Any = None, raws: dict[str, RawSplit] | None = None
) -> tuple[dict[str, list[dict]], DropCounts]:
    """Clean train and test preference rows (``prompt``, ``chosen``, ``rejected`` rendered with the chat
    template; ``messages``; ``source_row``) and the counts of what was kept and dropped (``raws``: the
    splits as ``load_raw`` reads them, when the caller read them already)."""
    return _load(args, tokenizer, ("pairs",), raws)


def load_sft(
    args: DataArgs, tokenizer: Any = None, seed: int = 0
) -> tuple[dict[str, list[dict]], DropCounts]:
    """Prompt/completion rows for SFT: instruction rows and conversations as they are; preference rows
    through ``to_sft`` (``sft_target``: chosen, rejected or a seeded mix; the test split with
    ``seed + 1``)."""
    splits, counts = _load(args, tokenizer, ("pairs", INSTRUCTION))
    for offset, split in enumerate(("train", "test")):
        if counts.formats[split] in PAIR_FORMATS:
            splits[split] = to_sft(splits[split], args.sft_target, seed + offset)
    return splits, counts


def load_unpaired(args: DataArgs, tokenizer: Any = None) -> tuple[dict[str, list[dict]], DropCounts]:
    """Unpaired rows for KTO (``prompt``, ``completion``, ``label``): unpaired sources as they are,
    preference sources split into a desirable and an undesirable row per pair (counts are of pairs)."""
    splits, counts = _load(args, tokenizer, ("pairs", UNPAIRED))
    for split in ("train", "test"):
        if counts.formats[split] in PAIR_FORMATS:
            splits[split] = to_unpaired(splits[split], args.split_seed)
    return splits, counts


def to_sft(rows: list[dict], target: str, seed: int) -> list[dict[str, Any]]:
    """Prompt/completion rows for SFT: the chosen answer, the rejected one, or a seeded 50/50 mix."""
    rng = random.Random(seed)
    out = []
    if target not in ("chosen", "rejected", "mix"):
        raise ValueError(f"sft_target must be chosen, rejected or mix, got {target!r}")
    for row in rows:
        pick = target if target != "mix" else "chosen" if rng.random() < 0.5 else "rejected"
        out.append({"prompt": row["prompt"], "completion": row[pick]})
    return out


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


# Written by recipes/label.py beside a judge-labelled dataset whose judge failed its audits; a run trained on
# such a dataset copies it into its folder (``runs.start``), so the weakness travels with the model.
LABELLING_MARK = "judge_failed_audits.json"


def labelling_mark(args: DataArgs) -> dict[str, Any] | None:
    """The failed-audit mark of a local dataset labelled by a judge (in its folder, or beside its file), or
    None when the dataset carries none."""
    path = Path(args.dataset)
    if files.data_path_problem(path):  # a FIFO, a device, a path too long: the loader says so in one line
        return None
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if folder is None or not (folder / LABELLING_MARK).is_file():
        return None
    return json.loads((folder / LABELLING_MARK).read_text(encoding="utf-8"))


def distinct_prompts(rows: list[dict]) -> list[str]:
    """The prompts of ``rows`` in order of first appearance, each once (what an online method samples)."""
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
        if column not in raw[source].columns:
            raise DataError(
                f"{raw[source].source}: no margin column {column!r}; the file has {raw[source].columns}"
            )
        values = raw[source].column(column)
        out[split] = [{**row, "margin": float(values[row["source_row"]])} for row in rows]
    return out


# ---------------------------------------------------------------------------------------------------------
# The evaluation: held-out prompts rendered for each system as its training rendered them


def recorded_chat_template(model_path: str | Path) -> str | None:
    """The chat template an align-kit run rendered its data with (``chat_template_used`` in its
    run_config.json; 'hh' for runs from before the setting), or None for a folder that is no align-kit run."""
    config = Path(model_path) / "run_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("chat_template_used", HH)


def system_chat_format(model_path: str, setting: str, load_tokenizer: Callable[[str], Any]) -> ChatFormat:
    """How to render prompts for a system: as its align-kit run was trained (a template other than hh is in
    the run's saved tokenizer), else by ``setting`` (the evaluation's ``chat_template``); the system's
    tokenizer is loaded (``load_tokenizer(model_path)``) only when a template may be needed."""
    recorded = recorded_chat_template(model_path)
    if recorded == HH or (recorded is None and setting == HH):
        return ChatFormat()
    return chat_format(setting if recorded is None else TOKENIZER, load_tokenizer(model_path))


def render_held_out(prompts: Sequence[str], rows: Sequence[dict], fmt: ChatFormat) -> list[str]:
    """Held-out prompts (hh text, the form judges and prompt ids use) rendered with ``fmt``: from each
    prompt's messages where its row kept them, else read back from the hh text."""
    if fmt.name == HH:
        return list(prompts)
    history = {row["prompt"]: row["messages"] for row in rows if "messages" in row}
    return [fmt.prompt(history.get(prompt) or parse_hh(prompt)) for prompt in prompts]
