"""Run files written whole or not at all, and as strict JSON.

A file is written to a temporary name next to it and renamed into place, so a reader (or a resume after a
kill) finds the old file or the new one, never half of one. JSON holds no ``NaN`` or ``Infinity`` literals,
which most JSON readers refuse: a non-finite number is written as ``null`` and the key that held it is named
in a ``"non_finite"`` list of the object that holds it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
