"""The one prompt format every stage uses: Anthropic/hh-rlhf transcripts.

A prompt is ``"\\n\\nHuman: <question>\\n\\nAssistant:"`` (more turns for a conversation), and an answer
follows it with a leading space. Training, generation, the oracle and the judges all read and write
prompts through these functions, so the format is defined here and nowhere else.
"""

from __future__ import annotations

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def format_prompt(question: str) -> str:
    """One Human turn, then the Assistant marker the answer follows."""
    return f"{HUMAN} {question.strip()}{ASSISTANT}"


def count_turns(prompt: str) -> tuple[int, int]:
    """(Human turns, Assistant turns) in a prompt, including its trailing Assistant marker."""
    return prompt.count(HUMAN), prompt.count(ASSISTANT)


def split_last_turn(transcript: str) -> tuple[str, str]:
    """(prompt, answer) of a transcript cut after its final Assistant marker; the answer keeps its
    leading space. Raises ValueError when there is no Assistant turn."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {ASSISTANT.strip()!r} turn in {transcript[:80]!r}")
    cut += len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def last_question(prompt: str) -> str:
    """The text of the final Human turn of a prompt."""
    start = prompt.rfind(HUMAN)
    end = prompt.rfind(ASSISTANT)
    if start < 0 or end < start:
        raise ValueError(f"not an hh-rlhf prompt: {prompt[:80]!r}")
    return prompt[start + len(HUMAN) : end].strip()


def instruction_of(prompt: str) -> str:
    """What a judge is shown as the request: the question of a single-turn prompt, else the whole
    (multi-turn or plain) prompt stripped."""
    if prompt.count(HUMAN) == 1 and prompt.rstrip().endswith(ASSISTANT.strip()):
        start = prompt.find(HUMAN) + len(HUMAN)
        return prompt[start : prompt.rfind(ASSISTANT)].strip()
    return prompt.strip()
