"""What the loader keeps and drops: rows kept per split, drops counted by reason with the file, row and field
of the first few, every failing reason of a dropped row, and (``write_dropped``) every dropped row."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align_kit import files

MAX_EXAMPLES_PER_REASON = 5


@dataclass
class DropCounts:
    """Rows kept and dropped per split and reason, with a few located examples of each reason, and what the
    rows were read as: the layout of each split and the chat template they were rendered with.

    ``dropped`` counts each dropped row once, under its first reason (the counts add up to the rows dropped);
    ``failing`` under every reason it fails. Order: parsing (a row that cannot be read stops there), then
    every content check (``content_problems``), then, for rows that pass them, template_error, duplicate,
    too_long and the caps. ``over_max_length``: kept rows over the trainer's max_length (``count_cut``)."""

    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=dict)
    failing: dict[str, Counter] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    requested_format: str | None = None
    chat_template: str | None = None
    over_max_length: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] | None = None  # every dropped row with its reasons (``write_dropped``)
    lengths: dict[str, list[int]] = field(default_factory=dict, repr=False)  # kept rows' token lengths

    def drop(
        self,
        split: str,
        reason: str,
        source: str,
        row: int,
        field_name: str,
        line: int | None = None,
        more: Sequence[tuple[str, str]] = (),
        data: Any = None,
    ) -> None:
        """Count a dropped row under ``reason`` (its first) and every reason of ``more`` (reason, field)."""
        self.dropped.setdefault(split, Counter())[reason] += 1
        reasons = [(reason, field_name), *[m for m in more if m != (reason, field_name)]]
        self.failing.setdefault(split, Counter()).update(set(r for r, _ in reasons))
        where = {"split": split, "file": source, "row": row} | ({"line": line} if line is not None else {})
        if sum(1 for e in self.examples if e["reason"] == reason) < MAX_EXAMPLES_PER_REASON:
            also = {"also": [f"{r} ({f})" for r, f in reasons[1:]]} if len(reasons) > 1 else {}
            self.examples.append({"reason": reason, "field": field_name} | where | also)
        if self.rows is not None:
            listed = [{"reason": r, "field": f} for r, f in reasons]
            self.rows.append(where | {"reasons": listed, "row_data": data})

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_format": {"requested": self.requested_format, **self.formats},
            "chat_template": self.chat_template,
            "kept": dict(self.kept),
            "dropped": {split: dict(counter) for split, counter in self.dropped.items()},
            "failing": {split: dict(counter) for split, counter in self.failing.items()},
            "over_max_length": self.over_max_length,
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
            failing = self.failing.get(split, {})
            if sum(failing.values()) > sum(self.dropped.get(split, {}).values()):
                every = ", ".join(f"{r}={n}" for r, n in sorted(failing.items()))
                lines.append(f"{split}: dropped rows failing each check (a row may fail several): {every}")
        if self.over_max_length:
            over, limit = self.over_max_length, self.over_max_length["max_length"]
            n = ", ".join(f"{split} {over[split]}" for split in self.lengths)
            lines.append(f"longer than max_length {limit} ({over['by_trl']} by TRL): {n}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        files.write_json(path, self.to_dict(), indent=2)


# ---------------------------------------------------------------------------------------------------------
# Cleaning one split: parse, check, render, deduplicate, length filter
