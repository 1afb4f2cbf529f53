"""Run files written whole or not at all, and as strict JSON.

A file is written to a temporary name next to it and renamed into place, so a reader (or a resume after a
kill) finds the old file or the new one, never half of one. JSON holds no ``NaN`` or ``Infinity`` literals,
which most JSON readers refuse: a non-finite number is written as ``null`` and the key that held it is named
in a ``"non_finite"`` list of the object that holds it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

NON_FINITE = "non_finite"  # the key that lists which keys of an object held NaN or an infinity


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None; each dict that held one (directly or in a
    list of numbers) gets ``"non_finite": [its keys]``."""
    return _clean(value)[0]


def _clean(value: Any) -> tuple[Any, bool]:
    """(cleaned value, whether the value itself or a number directly in it was non-finite)."""
    if isinstance(value, float):
        return (value, False) if math.isfinite(value) else (None, True)
    if isinstance(value, dict):
        out, flagged = {}, []
        for key, item in value.items():
            out[key], bad = _clean(item)
            if bad:
                flagged.append(str(key))
        if flagged:
            out[NON_FINITE] = sorted(set(out.get(NON_FINITE) or []) | set(flagged))
        return out, False
    if isinstance(value, (list, tuple)):
        cleaned = [_clean(item) for item in value]
        return [item for item, _ in cleaned], any(bad for _, bad in cleaned)
    return value, False


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
