"""How a conversation becomes the text a model reads: the hh format, or a Jinja chat template.

The hh format (Anthropic/hh-rlhf transcripts) is the plain form every stage can read: a prompt is
``"\\n\\nHuman: <question>\\n\\nAssistant:"`` (more turns for a conversation), and an answer follows it
with a leading space. The oracle, the judges and the evaluation's prompt ids read prompts in this form.
Training renders each conversation (a list of ``{"role", "content"}`` messages) with a ``ChatFormat``:
the hh format, or a chat template (the tokenizer's or a ``.jinja`` file's) for instruct models.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """What a judge is shown as the request: the plain conversation, never template tokens (every stage
    hands judges the hh form). The question of a single-turn prompt; the whole (multi-turn, with a system
    preamble, or plain) prompt stripped otherwise."""
    if prompt.startswith(HUMAN) and prompt.count(HUMAN) == 1 and prompt.rstrip().endswith(ASSISTANT.strip()):
        return prompt[len(HUMAN) : prompt.rfind(ASSISTANT)].strip()
    return prompt.strip()


# ---------------------------------------------------------------------------------------------------------
# Conversations: lists of {"role", "content"} messages

ROLES = ("system", "user", "assistant")
MARKERS = {"user": HUMAN, "assistant": ASSISTANT}
_MARKER = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


def hh_prompt(messages: list[dict[str, str]]) -> str:
    """A conversation that ends with a user turn in the hh format, up to the Assistant marker its answer
    follows. A system message is the text before the first Human turn (hh-rlhf has no system role)."""
    parts = []
    for message in messages:
        content = message["content"].strip()
        parts.append(content if message["role"] == "system" else f"{MARKERS[message['role']]} {content}")
    return "".join(parts) + ASSISTANT


def hh_answer(content: str) -> str:
    """An answer in the hh format: after the Assistant marker, with one leading space."""
    return " " + content.strip()


def parse_hh(prompt: str) -> list[dict[str, str]]:
    """The messages of an hh prompt (the inverse of ``hh_prompt``): text before the first marker is a system
    message, the final empty Assistant turn is where the answer goes and is not a message."""
    pieces = _MARKER.split(prompt)
    messages = [{"role": "system", "content": pieces[0].strip()}] if pieces[0].strip() else []
    for marker, text in zip(pieces[1::2], pieces[2::2], strict=True):
        messages.append({"role": "user" if marker == HUMAN else "assistant", "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


# ---------------------------------------------------------------------------------------------------------
# Rendering: the hh format or a chat template

HH = "hh"
TOKENIZER = "tokenizer"
CHAT_TEMPLATES = ("auto", HH, TOKENIZER)  # or the path of a .jinja file


@dataclass
class ChatFormat:
    """How a conversation is rendered for a model: ``name`` is 'hh', 'tokenizer' (the tokenizer's chat
    template) or the path of a .jinja file (``template``, rendered with the tokenizer's special tokens).

    A template's answer is what the template adds after the generation prompt when the answer is appended
    (its end-of-turn marker included, trailing whitespace dropped); ``strip_bos`` drops a leading BOS the
    template writes when the tokenizer adds one itself, so that it is not doubled.
    """

    name: str = HH
    tokenizer: Any = None
    template: str | None = None
    strip_bos: bool = False

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return text[len(self.tokenizer.bos_token) :] if self.strip_bos else text

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text a model reads before its answer to ``messages`` (which end with a user turn)."""
        return hh_prompt(messages) if self.name == HH else self._apply(messages, True)

    def answer(self, messages: list[dict[str, str]], content: str) -> str:
        """The text of an assistant answer ``content`` to ``messages``, as it follows ``prompt(messages)``."""
        if self.name == HH:
            return hh_answer(content)
        prompt = self._apply(messages, True)
        full = self._apply([*messages, {"role": "assistant", "content": content.strip()}], False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render prompt + answer as the prompt followed by the answer"
            )
        return full[len(prompt) :].rstrip()

    def identity(self) -> str:
        """'hh', or the name with a hash of the template text (answers made under another are not reused)."""
        if self.name == HH:
            return HH
        text = self.template or str(self.tokenizer.chat_template)
        return f"{self.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def chat_format(setting: str, tokenizer: Any = None) -> ChatFormat:
    """The ``chat_template`` setting resolved: 'auto' is the tokenizer's chat template when it has one and the
    hh format otherwise (GPT-2 and the embedded model have none); 'hh'; 'tokenizer'; or a .jinja file."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == HH or (setting == "auto" and not has_template):
        return ChatFormat()
    if tokenizer is None:
        raise ValueError(f"chat_template {setting!r} needs the model's tokenizer")
    if setting in ("auto", TOKENIZER):
        if not has_template:
            raise ValueError(
                "chat_template: tokenizer, but the tokenizer has no chat template; "
                "use auto or hh, or a .jinja file"
            )
        name, template = TOKENIZER, None
    else:
        name, template = setting, Path(setting).read_text(encoding="utf-8")
    bos = tokenizer.bos_token
    ids = tokenizer("x")["input_ids"] if bos else []
    adds_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    probe = ChatFormat(name, tokenizer, template)._apply([{"role": "user", "content": "x"}], True)
    return ChatFormat(name, tokenizer, template, strip_bos=adds_bos and probe.startswith(bos))
