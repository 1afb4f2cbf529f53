"""The dataset layouts users bring, read into conversations: files, Hub splits, layout detection, row parsers.

``load_raw`` reads the embedded task, local JSON / JSON Lines / parquet files (JSON checked here, so that bad
bytes, an empty file or bad JSON are reported with the file and line) or a Hub dataset; ``detect_format``
tells the layouts apart by their columns; ``parse_pair`` and ``parse_single`` turn one row into a history of
``{"role", "content"}`` messages and its answers, or raise RowError naming the reason and the field. What is
kept, rendered and counted is decided in ``align_kit.data.loading``.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align_kit.configs import DataArgs
from align_kit.data import task
from align_kit.data.prompts import ASSISTANT, HUMAN, ROLES, parse_hh
from align_kit.resources import home

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
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
    """A source that cannot be used at all (unreadable, missing column, unknown layout, no usable rows)."""


class RowError(ValueError):
    """One unusable row: ``reason`` is the counter key, ``field`` the offending column (or message key)."""

    def __init__(self, reason: str, field: str):
        super().__init__(f"{reason} in field {field!r}")
        self.reason = reason
        self.field = field


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
            f"{raw.source}: mixed layouts: {'; '.join(parts)}; "
            "a file holds one layout (or set dataset_format)"
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


def check_columns(raw: RawSplit, layout: str, args: DataArgs) -> None:
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


def check_answer(content: str, name: str) -> None:
    if not content.strip():
        raise RowError("empty_answer", name)
    if content.lstrip().startswith((HUMAN.strip(), ASSISTANT.strip())):
        raise RowError("answer_holds_transcript", name)


def is_single_turn(history: Messages) -> bool:
    return [m["role"] for m in history if m["role"] != "system"] == ["user"]
