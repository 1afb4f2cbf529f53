"""Run files written whole or not at all, and as strict JSON; data paths checked before they are opened.

A file is written to a temporary name next to it and renamed into place, so a reader (or a resume after a
kill) finds the old file or the new one, never half of one. JSON holds no ``NaN`` or ``Infinity`` literals,
which most JSON readers refuse: a non-finite number is written as ``null`` and the key that held it is named
in a ``"non_finite"`` list of the object that holds it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

NON_FINITE = "non_finite"  # the key that lists which keys of an object held NaN or an infinity


def json_safe(value: Any) -> Any:
    """``value`` as JSON-ready data (see ``to_jsonable``), each dict that held a NaN or an infinity (directly
    or in a list of numbers) naming those keys in ``"non_finite": [its keys]``."""
    return _clean(value, name_non_finite=True)[0]


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python numbers and lists, NaN and infinities as None,
    tuples as lists, dataclasses as dicts, keys and other objects (Paths, ...) as strings, so that
    ``json.dumps(..., allow_nan=False)`` accepts it. The one JSON sanitiser (``json_safe`` names the keys)."""
    return _clean(value, name_non_finite=False)[0]


def _clean(value: Any, name_non_finite: bool) -> tuple[Any, bool]:
    """(cleaned value, whether the value itself or a number directly in it was non-finite)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (None, True)
    if value is None or isinstance(value, bool | int | str):
        return value, False
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out, flagged = {}, []
        for key, item in value.items():
            out[str(key)], bad = _clean(item, name_non_finite)
            if bad:
                flagged.append(str(key))
        if flagged and name_non_finite:
            out[NON_FINITE] = sorted(set(out.get(NON_FINITE) or []) | set(flagged))
        return out, False
    if isinstance(value, list | tuple | np.ndarray):
        cleaned = [_clean(item, name_non_finite) for item in value]
        return [item for item, _ in cleaned], any(bad for _, bad in cleaned)
    return str(value), False


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (see ``json_safe``); objects JSON does not know are written as str."""
    return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, value: Any, **kwargs: Any) -> None:
    """Strict JSON (``dumps``), written whole or not at all."""
    write_text(path, dumps(value, **kwargs))


def jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file, the value None for a line that is no
    JSON (one cut short by a crash mid-write); nothing for a file that is absent. The one JSONL reader."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError:
                    yield number, None


def read_jsonl(path: str | Path, skip_bad: bool = False) -> list[Any]:
    """The values of a JSON-lines file ([] when absent); a line that is no JSON is left out with
    ``skip_bad``, else a ValueError names the file and line."""
    values = []
    for number, value in jsonl_records(path):
        if value is None and not skip_bad:
            raise ValueError(f"{path}:{number}: not a JSON line")
        if value is not None:
            values.append(value)
    return values


# Data paths (read by ``formats``): what a reader would hang on, read forever, or crash on with a traceback.
MAX_DATA_BYTES = 8 * 2**30  # a data file is read into memory whole: refuse what cannot be meant
SHOWN = 80  # characters of an over-long path shown in a message


def shown(path: str | Path) -> str:
    text = str(path)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text):,} characters)"


def data_path_problem(path: str | Path) -> str | None:
    """None for a local data path align-kit can read (a regular file of bounded size, or a folder), else the
    one line that says why not: too long for the system, a symlink loop, a FIFO or device (which would hang
    or never end), a folder named like a data file, a file too large to read. Nothing is opened."""
    text = str(path)
    limit = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    name_limit = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if len(text.encode()) >= limit or any(len(part.encode()) > name_limit for part in Path(text).parts):
        return f"{shown(text)}: the path is longer than this system allows ({limit} bytes, {name_limit} per name)"
    try:
        info = os.stat(text)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{shown(text)}: a symlink loop (the link points back at itself)"
        return None  # absent: the caller says so, or reads a Hub dataset of that name
    if stat.S_ISDIR(info.st_mode):
        if Path(text).suffix in (".json", ".jsonl", ".parquet"):
            return f"{shown(text)}: a folder named like a data file; give a .json, .jsonl or .parquet file"
        return None
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO (pipe)" if stat.S_ISFIFO(info.st_mode) else "a device or special file"
        return f"{shown(text)}: {kind}, not a regular file; align-kit reads data from regular files only"
    if info.st_size > MAX_DATA_BYTES:
        return f"{shown(text)}: {info.st_size:,} bytes, over the {MAX_DATA_BYTES:,} a data file may hold"
    return None
