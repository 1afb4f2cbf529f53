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

Every row becomes a conversation (a history of ``{"role", "content"}`` messages and its answers) and is
rendered with the run's ``ChatFormat`` (``chat_template``: the hh format or a chat template). Every row
that is not used is counted under a reason, and its first occurrences are kept with file, row, line and
field, so a run shows exactly what it dropped. A source that cannot be read or has no usable rows is an
error naming the file (and the line, for bad bytes or bad JSON).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_kit import task
from align_kit.configs import DataArgs
from align_kit.prompts import (
    ASSISTANT,
    HH,
    HUMAN,
    ROLES,
    TOKENIZER,
    ChatFormat,
    chat_format,
    count_turns,  # noqa: F401  (part of this module's interface since it read hh prompts)
    parse_hh,
)
from align_kit.resources import home

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MAX_EXAMPLES_PER_REASON = 5
DETECT_ROWS = 1000  # rows of a Hub or parquet split read to detect its layout (its schema is uniform)

PAIR_FORMATS = ("hh-rlhf", "preference", "chat-preference", "chat-transcripts", "tldr-comparisons")
INSTRUCTION = "instruction"
UNPAIRED = "unpaired"
UNPAIRED_COLUMNS = ("completion", "label")  # with DataArgs.prompt_column
TLDR_QUERY = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"  # Stiennon et al. 2020
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's {"from", "value"} messages
LAYOUTS_HELP = (
    "chosen+rejected (hh-rlhf transcripts, or chat-transcripts), prompt+chosen+rejected (preference or "
    "chat-preference), prompt+completion (instruction), messages (instruction), prompt+completion+label "
    "(unpaired) or info+summaries+choice (tldr-comparisons)"
)


class DataError(ValueError):
    """A data source that cannot be used at all (unreadable, missing column, unknown layout, no usable rows)."""


class RowError(ValueError):
    """One unusable row: ``reason`` is the counter key, ``field`` the offending column (or message key)."""

    def __init__(self, reason: str, field: str):
        super().__init__(f"{reason} in field {field!r}")
        self.reason = reason
        self.field = field


@dataclass
class DropCounts:
    """Rows kept and dropped per split and reason, with a few located examples of each reason, and what the
    rows were read as: the layout of each split and the chat template they were rendered with."""

    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    requested_format: str | None = None
    chat_template: str | None = None

    def drop(
        self, split: str, reason: str, source: str, row: int, field_name: str, line: int | None = None
    ) -> None:
        self.dropped.setdefault(split, Counter())[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < MAX_EXAMPLES_PER_REASON:
            example = {"split": split, "reason": reason, "file": source, "row": row, "field": field_name}
            self.examples.append(example | ({"line": line} if line is not None else {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_format": {"requested": self.requested_format, **self.formats},
            "chat_template": self.chat_template,
            "kept": dict(self.kept),
            "dropped": {split: dict(counter) for split, counter in self.dropped.items()},
            "examples": self.examples,
        }

    def summary(self) -> str:
        lines = []
        if self.formats:
            read_as = ", ".join(f"{split} {layout}" for split, layout in self.formats.items())
            lines.append(f"read as: {read_as} (dataset_format {self.requested_format}); chat template: "
                         f"{self.chat_template}")  # fmt: skip
        for split in sorted(set(self.kept) | set(self.dropped)):
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.get(split, {}).items())) or "none"
            lines.append(f"{split}: kept {self.kept.get(split, 0)}, dropped: {reasons}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# ---------------------------------------------------------------------------------------------------------
# Reading files and Hub datasets


@dataclass
class RawSplit:
    """One split as read: its rows (a list of dicts, or a ``datasets.Dataset``), its columns, and for a JSON
    Lines file the line number of each row."""

    source: str
    rows: Sequence[dict[str, Any]]
    columns: list[str]
    lines: list[int] | None = None

    def line(self, index: int) -> int | None:
        return self.lines[index] if self.lines is not None else None

    def column(self, name: str) -> list[Any]:
        if isinstance(self.rows, list):
            return [row.get(name) for row in self.rows]
        return list(self.rows[name])


def read_json_rows(path: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a JSON Lines file (or of a .json file holding a list of objects) and their line numbers,
    checked here so that bad bytes, an empty file or bad JSON are reported with the file and line."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    texts = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}: line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                f"{error.start + 1}); save the file as UTF-8"
            ) from None
    if path.suffix == ".json":
        try:
            whole = json.loads("\n".join(texts))
        except json.JSONDecodeError:
            whole = None  # not one JSON document: read it as JSON Lines below
        if isinstance(whole, list):
            for index, row in enumerate(whole):
                if not isinstance(row, dict):
                    raise DataError(f"{path}: item {index}: expected a JSON object, got {type(row).__name__}")
            return whole, None
        if isinstance(whole, dict) and sum(1 for text in texts if text.strip()) > 1:  # one object, many lines
            raise DataError(f"{path}: expected a list of objects or one object per line, got one object")
    rows, numbers = [], []
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: line {number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(value, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(value).__name__}")
        rows.append(value)
        numbers.append(number)
    return rows, numbers


def read_file(file: Path) -> RawSplit:
    """One local file as a RawSplit: JSON and JSON Lines read and checked here, parquet by ``datasets``."""
    if file.suffix not in DATA_SUFFIXES:
        raise DataError(f"{file}: unsupported file type (use .json, .jsonl or .parquet)")
    if DATA_SUFFIXES[file.suffix] == "json":
        rows, lines = read_json_rows(file)
        return RawSplit(str(file), rows, list(dict.fromkeys(k for row in rows for k in row)), lines)
    from datasets import load_dataset

    try:
        dataset = load_dataset("parquet", data_files=str(file), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        raise DataError(f"{file}: cannot be read as parquet: {error}") from error
    if len(dataset) == 0:
        raise DataError(f"{file}: the file is empty")
    return RawSplit(str(file), dataset, list(dataset.column_names))


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


def load_raw(args: DataArgs) -> dict[str, RawSplit]:
    """Raw splits ({split: RawSplit}) from the embedded task, local files or the Hub; a Hub dataset goes
    through the same parsing as a local file once ``load_dataset`` has read it."""
    path = embedded_folder(args) if args.dataset == "embedded" else Path(args.dataset)
    if path.exists():
        return {split: read_file(file) for split, file in _split_files(path, args).items()}
    if args.dataset.startswith((".", "/")) or Path(args.dataset).suffix in DATA_SUFFIXES:
        raise DataError(f"{args.dataset}: no such file or folder")
    from datasets import load_dataset

    hub = load_dataset(args.dataset, args.dataset_config)
    return {
        split: RawSplit(f"{args.dataset}[{split}]", hub[split], list(hub[split].column_names))
        for split in (args.train_split, args.test_split)
        if split in hub
    }


# ---------------------------------------------------------------------------------------------------------
# Layouts


def layout_of(row: dict[str, Any], args: DataArgs) -> str | None:
    """The layout one row has by its keys (and by whether its values are messages), or None."""
    prompt, chosen, rejected = args.prompt_column, args.chosen_column, args.rejected_column
    listed = any(isinstance(row.get(key), list) for key in (prompt, chosen, rejected))
    if isinstance(row.get("info"), dict) and "summaries" in row and "choice" in row:
        return "tldr-comparisons"
    if chosen in row and rejected in row:
        if prompt in row:
            return "chat-preference" if listed else "preference"
        return "chat-transcripts" if listed else "hh-rlhf"
    if prompt in row and "completion" in row:
        return UNPAIRED if "label" in row else INSTRUCTION
    if "messages" in row:
        return INSTRUCTION
    return None


def detect_format(raw: RawSplit, args: DataArgs) -> str:
    """The one layout of a split (every row of a file; the first DETECT_ROWS of a Hub or parquet split),
    or DataError for an unknown or mixed layout. Rows without a layout are left to be counted as skips."""
    rows = raw.rows if isinstance(raw.rows, list) else raw.rows.select(range(min(DETECT_ROWS, len(raw.rows))))
    found: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        layout = layout_of(row, args)
        if layout is not None:
            found.setdefault(layout, []).append(index)
    if not found:
        raise DataError(f"{raw.source}: unknown layout: columns {raw.columns}; expected {LAYOUTS_HELP}")
    if len(found) > 1:

        def where(index: int) -> str:
            return f"row {index}" + (f" (line {raw.line(index)})" if raw.lines is not None else "")

        parts = [f"{len(where_found)} row(s) {layout}, first {where(where_found[0])}"
                 for layout, where_found in found.items()]  # fmt: skip
        raise DataError(
            f"{raw.source}: mixed layouts: {'; '.join(parts)}; a file holds one layout (or set dataset_format)"
        )
    return next(iter(found))


def required_columns(layout: str, args: DataArgs) -> list[str]:
    """Columns a split in ``layout`` must have (instruction rows need prompt+completion or messages)."""
    if layout in ("hh-rlhf", "chat-transcripts"):
        return [args.chosen_column, args.rejected_column]
    if layout in ("preference", "chat-preference"):
        return [args.prompt_column, args.chosen_column, args.rejected_column]
    if layout == "tldr-comparisons":
        return ["info", "summaries", "choice"]
    if layout == UNPAIRED:
        return [args.prompt_column, *UNPAIRED_COLUMNS]
    return [args.prompt_column, "completion"]  # instruction rows: or a messages column


def _check_columns(raw: RawSplit, layout: str, args: DataArgs) -> None:
    if layout == INSTRUCTION and "messages" in raw.columns:
        return
    missing = [c for c in required_columns(layout, args) if c not in raw.columns]
    if missing:
        raise DataError(f"{raw.source}: missing column(s) {missing}; the file has {raw.columns}")


# ---------------------------------------------------------------------------------------------------------
# Rows -> conversations (a history of messages, ending with a user turn, and the answers to it)

Messages = list[dict[str, str]]


def split_hh(chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """Split two hh-rlhf transcripts at their final Assistant turn into (prompt, chosen, rejected).

    The prompt keeps the trailing ``"\\n\\nAssistant:"``; answers keep their leading space. The cut is the
    chosen transcript's last Assistant marker at which both transcripts still agree and which answers a
    Human turn, so that an answer quoting a marker ("\\n\\nHuman:") is not cut there. Two transcripts that
    share no such history are unusable (``history_mismatch``; ``broken_markers`` when they agree only up
    to an Assistant turn that follows no Human turn).
    """
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise RowError("not_text", name)
        if HUMAN not in text:
            raise RowError("no_human_turn", name)
        if ASSISTANT not in text:
            raise RowError("no_assistant_turn", name)
    shared = False
    start = chosen.rfind(ASSISTANT)
    while start >= 0:
        cut = start + len(ASSISTANT)
        if rejected[:cut] == chosen[:cut]:
            shared = True
            if chosen.rfind(HUMAN, 0, start) > chosen.rfind(ASSISTANT, 0, start):
                return chosen[:cut], chosen[cut:], rejected[cut:]
        start = chosen.rfind(ASSISTANT, 0, start)
    if shared:
        raise RowError("broken_markers", "chosen")
    raise RowError("history_mismatch", "rejected")


def _messages(value: Any, name: str) -> Messages:
    """A list of ``{"role", "content"}`` (or ShareGPT ``{"from", "value"}``) messages, checked."""
    if not isinstance(value, list) or not value:
        raise RowError("not_messages", name)
    out = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RowError("not_messages", where)
        role = message.get("role", message.get("from"))
        role = SHAREGPT_ROLES.get(role, role)
        content = message.get("content", message.get("value"))
        if role not in ROLES:
            raise RowError("unknown_role", f"{where}.role")
        if not isinstance(content, str):
            raise RowError("not_text", f"{where}.content")
        if not content.strip():
            raise RowError("empty_content", f"{where}.content")
        if role == "system" and index > 0:
            raise RowError("misplaced_system", f"{where}.role")
        out.append({"role": role, "content": content})
    return out


def _history(messages: Messages, name: str) -> Messages:
    """``messages`` as the history an answer follows: a user turn in it, and last."""
    if messages[-1]["role"] != "user":
        raise RowError("last_turn_not_user", f"{name}[{len(messages) - 1}].role")
    return messages


def _conversation(value: Any, name: str) -> tuple[Messages, str]:
    """A whole conversation -> (its history, the content of its final assistant turn)."""
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"{name}[{len(messages) - 1}].role")
    if len(messages) < 2:
        raise RowError("no_user_turn", f"{name}[0].role")
    return _history(messages[:-1], name), messages[-1]["content"]


def _same_history(a: Messages, b: Messages) -> bool:
    return [(m["role"], m["content"].strip()) for m in a] == [(m["role"], m["content"].strip()) for m in b]


def _text_prompt(text: str, name: str) -> Messages:
    """A prompt string as messages: an hh-format prompt (starting with "Human:") is read turn by turn;
    plain text is one user turn; markers anywhere else mean a broken prompt."""
    if not text.strip():
        raise RowError("empty_prompt", name)
    stripped = text.strip()
    if stripped.startswith(HUMAN.strip()):
        hh = "\n\n" + stripped
        if not hh.endswith(ASSISTANT):
            raise RowError("broken_markers", name)
        messages = parse_hh(hh)
        if not messages or messages[-1]["role"] != "user" or messages[0]["role"] != "user":
            raise RowError("broken_markers", name)
        if any(not m["content"] for m in messages):
            raise RowError("empty_prompt", name)
        return messages
    if HUMAN in text or ASSISTANT in text:
        raise RowError("broken_markers", name)
    return [{"role": "user", "content": text}]


def _prompt(value: Any, name: str, messages_allowed: bool) -> Messages:
    if isinstance(value, str):
        return _text_prompt(value, name)
    if messages_allowed and isinstance(value, list):
        return _history(_messages(value, name), name)
    raise RowError("not_text", name)


def _answer(value: Any, name: str, history: Messages, messages_allowed: bool) -> str:
    """An answer: a string, or (where messages are allowed) one assistant message or a whole conversation
    whose history is the prompt."""
    if isinstance(value, str):
        return value
    if not (messages_allowed and isinstance(value, list)):
        raise RowError("not_text", name)
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"{name}[{len(messages) - 1}].role")
    if len(messages) > 1 and not _same_history(messages[:-1], history):
        raise RowError("history_mismatch", name)
    return messages[-1]["content"]


def _tldr(row: dict[str, Any]) -> tuple[Messages, str, str]:
    """A TL;DR comparison -> (the paper's query as the user turn, preferred summary, other summary)."""
    info = row.get("info")
    if not isinstance(info, dict):
        raise RowError("not_text", "info")
    fields = {}
    for key in ("post", "title", "subreddit"):  # a news article of the CNN/DM rows has no post
        if not isinstance(info.get(key), str):
            raise RowError("not_text", f"info.{key}")
        fields[key] = info[key].strip()
    if not fields["post"]:
        raise RowError("empty_prompt", "info.post")
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise RowError("not_two_summaries", "summaries")
    for index, summary in enumerate(summaries):
        if not isinstance(summary, dict) or not isinstance(summary.get("text"), str):
            raise RowError("not_text", f"summaries[{index}].text")
    choice = row.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise RowError("bad_choice", "choice")
    query = TLDR_QUERY.format(**fields)
    return [{"role": "user", "content": query}], summaries[choice]["text"], summaries[1 - choice]["text"]


def parse_pair(row: dict[str, Any], layout: str, args: DataArgs) -> tuple[Messages, str, str]:
    """One raw preference row -> (history, chosen content, rejected content), raising RowError."""
    if layout == "hh-rlhf":
        prompt, chosen, rejected = split_hh(row.get(args.chosen_column), row.get(args.rejected_column))
        history = parse_hh(prompt)
        if any(not m["content"] for m in history):
            raise RowError("empty_prompt", args.chosen_column)
        return history, chosen, rejected
    if layout == "chat-transcripts":
        history, chosen = _conversation(row.get(args.chosen_column), args.chosen_column)
        rejected_history, rejected = _conversation(row.get(args.rejected_column), args.rejected_column)
        if not _same_history(history, rejected_history):
            raise RowError("history_mismatch", args.rejected_column)
        return history, chosen, rejected
    if layout in ("preference", "chat-preference"):
        messages_allowed = layout == "chat-preference"
        history = _prompt(row.get(args.prompt_column), args.prompt_column, messages_allowed)
        chosen, rejected = (
            _answer(row.get(name), name, history, messages_allowed)
            for name in (args.chosen_column, args.rejected_column)
        )
        return history, chosen, rejected
    if layout == "tldr-comparisons":
        return _tldr(row)
    raise DataError(f"dataset_format {layout!r} holds no preference pairs")


def parse_single(row: dict[str, Any], layout: str, args: DataArgs) -> tuple[Messages, str, bool | None]:
    """One instruction or unpaired row -> (history, answer content, label or None), raising RowError."""
    if layout == INSTRUCTION and args.prompt_column not in row and "messages" in row:
        history, completion = _conversation(row.get("messages"), "messages")
        return history, completion, None
    history = _prompt(row.get(args.prompt_column), args.prompt_column, True)
    completion = _answer(row.get("completion"), "completion", history, True)
    if layout == INSTRUCTION:
        return history, completion, None
    label = row.get("label")
    if not (isinstance(label, int) and label in (0, 1)):  # bool is an int: True/False pass here too
        raise RowError("bad_label", "label")
    return history, completion, bool(label)


def _check_answer(content: str, name: str) -> None:
    if not content.strip():
        raise RowError("empty_answer", name)
    if content.lstrip().startswith((HUMAN.strip(), ASSISTANT.strip())):
        raise RowError("answer_holds_transcript", name)


def _single_turn(history: Messages) -> bool:
    return [m["role"] for m in history if m["role"] != "system"] == ["user"]


# ---------------------------------------------------------------------------------------------------------
# Cleaning one split: parse, check, render, deduplicate, length filter


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

    _check_columns(raw, layout, args)
    answer_keys = ("chosen", "rejected") if layout in PAIR_FORMATS else ("completion",)
    rows, seen = [], set()
    for index, row in enumerate(raw.rows):

        def drop(reason: str, name: str, index: int = index) -> None:
            counts.drop(split, reason, raw.source, index, name, raw.line(index))

        try:
            if layout in PAIR_FORMATS:
                history, *answers = parse_pair(row, layout, args)
                label = None
                names = (
                    ("summaries",) * 2
                    if layout == "tldr-comparisons"
                    else (args.chosen_column, args.rejected_column)
                )
                if answers[0].strip() == answers[1].strip() and answers[0].strip():
                    raise RowError("identical_answers", names[1])
            else:
                history, answer, label = parse_single(row, layout, args)
                answers, names = [answer], ("completion",)
            for content, name in zip(answers, names, strict=True):
                _check_answer(content, name)
        except RowError as error:
            drop(error.reason, error.field)
            continue
        if args.single_turn and not _single_turn(history):
            drop("multi_turn", names[0])
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


def _drop_too_long(
    rows: list[dict], answer_keys: Sequence[str], split: str, raw: RawSplit, args: DataArgs, counts, tokenizer
) -> list[dict]:
    """The rows whose prompt plus longest answer, in tokens (plus the EOS the trainers append), fits in
    ``max_pair_tokens``; the others are counted as too_long under their longer answer."""
    if tokenizer is None:
        raise ValueError("max_pair_tokens needs a tokenizer")
    texts = [row["prompt"] + row[key] for row in rows for key in answer_keys]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = []
    for i, row in enumerate(rows):
        per_answer = lengths[i * len(answer_keys) : (i + 1) * len(answer_keys)]
        if max(per_answer) + 1 > args.max_pair_tokens:
            longest = answer_keys[per_answer.index(max(per_answer))]
            counts.drop(
                split, "too_long", raw.source, row["source_row"], longest, raw.line(row["source_row"])
            )
        else:
            kept.append(row)
    return kept


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
                f"{train_source}: {len(splits[train])} usable row(s) with {n_prompts} distinct prompt, nothing "
                f"left to hold out (dropped by reason: {_reasons(counts, train)}); at least 2 distinct prompts "
                f"are needed, or a {args.test_split} file"
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
                counts.drop(split, f"over_{name}", raw.source, index, name, raw.line(index))
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


def _load(args: DataArgs, tokenizer: Any, kinds: tuple[str, ...]) -> tuple[dict[str, list], DropCounts]:
    """Read, detect, clean, split and cap; ``kinds`` are the layouts the caller reads ('pairs',
    'instruction', 'unpaired')."""
    fmt = resolve_chat_format(args, tokenizer)
    counts = DropCounts(requested_format=args.dataset_format, chat_template=fmt.name)
    raws = {("train" if split == args.train_split else "test"): raw for split, raw in load_raw(args).items()}
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
        return _split_and_cap(splits, raws, args, counts), counts
    except DataError as error:
        hint = _format_hint(raws, args)
        raise DataError(f"{error}{hint}") from None


def _format_hint(raws: dict[str, RawSplit], args: DataArgs) -> str:
    """When an explicit dataset_format left no usable rows, the layout auto detection sees instead."""
    if args.dataset_format == "auto":
        return ""
    try:
        seen = detect_format(raws["train"], args)
    except DataError:
        return ""
    return f"; the rows look like {seen!r}: try dataset_format: auto" if seen != args.dataset_format else ""


def load_preferences(args: DataArgs, tokenizer: Any = None) -> tuple[dict[str, list[dict]], DropCounts]:
    """Clean train and test preference rows (``prompt``, ``chosen``, ``rejected`` rendered with the chat
    template; ``messages``; ``source_row``) and the counts of what was kept and dropped."""
    return _load(args, tokenizer, ("pairs",))


def load_sft(
    args: DataArgs, tokenizer: Any = None, seed: int = 0
) -> tuple[dict[str, list[dict]], DropCounts]:
    """Prompt/completion rows for SFT: instruction rows and conversations as they are; preference rows
    through ``to_sft`` (``sft_target``: chosen, rejected or a seeded mix; the test split with ``seed + 1``)."""
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
