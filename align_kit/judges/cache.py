"""On-disk cache of single-order judge verdicts: an append-only JSONL file.

One line per judged pair, written (and flushed) as soon as the verdict arrives, so an interrupted
evaluation keeps everything it finished and a rerun of a finished one calls the backend zero times.
Parse failures are stored too (verdict ``null``): at temperature 0 asking again gives the same answer;
delete the file (or change the judge) to ask again. When the judge gives them, a line also holds the raw
``text`` the verdict was parsed from and a ``rationale``; lines written without them (older files) read
as having none.

Two processes may append to the same file: each record is one ``write`` on a descriptor opened with
``O_APPEND``, which POSIX keeps whole on a local filesystem (not on NFS). Each process reads the file
only when it opens it, so two concurrent runs may judge the same pair twice but never corrupt a line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

VERDICTS = ("A", "B", "tie", None)


def cache_key(judge_identity: str, prompt: str, answer_a: str, answer_b: str) -> str:
    """SHA-256 over the judge's identity and the exact texts in slot A and slot B (order matters)."""
    payload = json.dumps([judge_identity, prompt, answer_a, answer_b], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    """``key -> verdict`` (plus the judge's raw text and rationale) backed by an append-only JSONL file;
    ``None`` verdicts are parse failures."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._verdicts: dict[str, str | None] = {}
        self._texts: dict[str, tuple[str | None, str | None]] = {}  # key -> (text, rationale) when given
        self.skipped_lines = 0  # a line cut short by a crash mid-write is ignored, and counted
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                        key, verdict = record["key"], record["verdict"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.skipped_lines += 1
                        continue
                    if verdict not in VERDICTS:
                        self.skipped_lines += 1
                        continue
                    self._verdicts[key] = verdict
                    self._remember(key, record.get("text"), record.get("rationale"))

    def __contains__(self, key: str) -> bool:
        return key in self._verdicts

    def __len__(self) -> int:
        return len(self._verdicts)

    def get(self, key: str) -> str | None:
        """The cached verdict; raises KeyError when absent (``None`` is a cached parse failure)."""
        return self._verdicts[key]

    def text(self, key: str) -> str | None:
        """The judge's raw answer behind the cached verdict, or None when it gave none (or was cached
        before texts were kept)."""
        return self._texts.get(key, (None, None))[0]

    def rationale(self, key: str) -> str | None:
        """The rationale the judge gave with the cached verdict, or None."""
        return self._texts.get(key, (None, None))[1]

    def _remember(self, key: str, text: str | None, rationale: str | None) -> None:
        if text is not None or rationale is not None:
            self._texts[key] = (text, rationale)
        else:
            self._texts.pop(key, None)

    def put(
        self,
        key: str,
        verdict: str | None,
        judge: str = "",
        text: str | None = None,
        rationale: str | None = None,
    ) -> None:
        """Record one verdict (and the text and rationale it came with) in memory and append it to the
        file in a single write."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self._verdicts[key] = verdict
        self._remember(key, text, rationale)
        record = {"key": key, "verdict": verdict, "judge": judge}
        record |= {k: v for k, v in (("text", text), ("rationale", rationale)) if v is not None}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
