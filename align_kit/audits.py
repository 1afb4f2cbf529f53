"""Pairs whose better answer is known, for auditing a judge: honeypots (the chosen answer against a
truncated, word-shuffled, empty or off-topic copy of itself) and the dataset's own chosen/rejected labels."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from align_kit.answers import HeldOut, prompt_id
from align_kit.configs import HONEYPOT_KINDS


@dataclass(frozen=True)
class AuditPair:
    """One audit pair: ``first`` against ``second``; ``expected`` is the verdict for ``first``."""

    group: str  # e.g. 'honeypot:shuffled' or 'labels'
    prompt_id: str
    prompt: str
    first: str
    second: str
    expected: str


def _words(text: str) -> list[str]:
    return text.split()


def honeypots(held: HeldOut, n: int, kinds: Sequence[str], seed: int) -> tuple[list[AuditPair], Counter]:
    """The chosen answer of the first ``n`` held-out prompts against corrupted copies of itself:
    truncated to its first quarter of words, its words shuffled, empty, or the answer to another prompt
    sharing the fewest words with it. Answers too short to corrupt are counted, not used."""
    unknown = sorted(set(kinds) - set(HONEYPOT_KINDS))
    if unknown:
        raise ValueError(f"unknown honeypot kind(s) {unknown}; choose from {HONEYPOT_KINDS}")
    rng = random.Random(seed)
    pairs, skipped = [], Counter()
    for i, (pid, prompt, real) in enumerate(
        zip(held.prompt_ids[:n], held.prompts[:n], held.chosen[:n], strict=True)
    ):
        words = _words(real)
        for kind in kinds:
            fake = None
            if kind == "truncated" and len(words) >= 2:
                fake = " " + " ".join(words[: max(1, len(words) // 4)])
            elif kind == "shuffled" and len(set(words)) >= 2:
                shuffled = list(words)
                while shuffled == words:
                    rng.shuffle(shuffled)
                fake = " " + " ".join(shuffled)
            elif kind == "empty":
                fake = ""
            elif kind == "off_topic":
                fake = _off_topic(i, held, rng)
            if fake is None or fake.strip() == real.strip():
                skipped[f"honeypot {kind}: answer too short to corrupt"] += 1
            else:
                pairs.append(AuditPair(f"honeypot:{kind}", pid, prompt, real, fake, "win"))
    return pairs, skipped


def _off_topic(index: int, held: HeldOut, rng: random.Random, candidates: int = 16) -> str | None:
    """The chosen answer of another prompt with the least word overlap (Jaccard) with this one's."""
    others = [k for k in range(len(held.prompts)) if k != index and held.chosen[k] != held.chosen[index]]
    if not others:
        return None
    own = set(w.lower() for w in _words(held.chosen[index]))

    def overlap(k: int) -> float:
        theirs = set(w.lower() for w in _words(held.chosen[k]))
        return len(own & theirs) / max(1, len(own | theirs))

    return held.chosen[min(rng.sample(others, min(candidates, len(others))), key=overlap)]


def label_pairs(held: HeldOut, n: int, seed: int) -> list[AuditPair]:
    """Held-out chosen/rejected rows as pairs, the chosen answer first or second by a seeded coin, so the
    dataset's labels hold both 'win' and 'loss' and Cohen's kappa is defined."""
    rng = random.Random(seed + 1)
    pairs = []
    for row in held.rows[:n]:
        pid = prompt_id(row["prompt"])
        if rng.random() < 0.5:
            pairs.append(AuditPair("labels", pid, row["prompt"], row["chosen"], row["rejected"], "win"))
        else:
            pairs.append(AuditPair("labels", pid, row["prompt"], row["rejected"], row["chosen"], "loss"))
    return pairs
