"""On-disk cache of single-order judge verdicts: an append-only JSONL file.

One line per judged pair, written (and flushed) as soon as the verdict arrives, so an interrupted
evaluation keeps everything it finished and a rerun of a finished one calls the backend zero times.
Parse failures are stored too (verdict ``null``): at temperature 0 asking again gives the same answer;
delete the file (or change the judge) to ask again.

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
    """``key -> verdict`` backed by an append-only JSONL file; ``None`` verdicts are parse failures."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._verdicts: dict[str, str | None] = {}
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

    def __contains__(self, key: str) -> bool:
        return key in self._verdicts

    def __len__(self) -> int:
        return len(self._verdicts)

    def get(self, key: str) -> str | None:
        """The cached verdict; raises KeyError when absent (``None`` is a cached parse failure)."""
        return self._verdicts[key]

    def put(self, key: str, verdict: str | None, judge: str = "") -> None:
        """Record one verdict in memory and append it to the file in a single write."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self._verdicts[key] = verdict
        line = json.dumps({"key": key, "verdict": verdict, "judge": judge}, ensure_ascii=False) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
