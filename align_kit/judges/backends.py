"""Judges built from their configs: ``load_judge`` reads a judge's YAML and ``build_judge`` makes its
backend, the exact oracle and reward models (a higher score wins), a local causal LM reading label
logits (or generating a verdict), or an OpenAI-compatible endpoint (``judges.openai_client``).

A backend loads its model on first use, not when it is built: its identity, which keys the verdict
cache, needs only the config and template, so a rerun answered from the cache loads nothing."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align_kit.configs import ModelArgs
from align_kit.data.task import OracleScorer
from align_kit.judges.config import JudgeConfig, judge_identity, read_judge_config, read_template
from align_kit.judges.openai_client import OpenAIClient
from align_kit.judges.protocol import (
    Judge,
    JudgeStats,
    PairItem,
    Reply,
    ScoreItem,
    Scorer,
    Verdict,
    parse_verdict,
    render_prompt,
    verdict_from_margin,
)
from align_kit.models.loading import default_device, load_model, load_reward_model, load_tokenizer
from align_kit.models.rewards import SequenceClassifierScorer


def load_judge(
    name_or_path: str | Path,
    *,
    lm: Any = None,
    tokenizer: Any = None,
    scorer: Scorer | None = None,
    **overrides: Any,
) -> Judge:
    """Read a judge's YAML (plus ``overrides`` of its keys) and build its backend.

    ``lm``/``tokenizer`` (hf_logits, reward_model) and ``scorer`` (reward_model) pass objects already
    in memory instead of loading ``model`` from disk; then also override ``model`` with a name for
    those weights, since it keys the cache.
    """
    return build_judge(
        read_judge_config(name_or_path, **overrides), lm=lm, tokenizer=tokenizer, scorer=scorer
    )


def build_judge(
    config: JudgeConfig, *, lm: Any = None, tokenizer: Any = None, scorer: Scorer | None = None
) -> Judge:
    """The backend named by ``config.backend``; models are loaded on first use. ``torch_dtype: auto`` is
    resolved here (``resolve_dtype``), so the judge's identity names the dtype its verdicts come from."""
    template = read_template(config.template, config.grading) if config.template else None
    if config.torch_dtype == "auto":
        config = dataclasses.replace(config, torch_dtype=resolve_dtype(config.torch_dtype, config.device))
    if config.backend == "oracle":
        return ScoreJudge(config, OracleScorer())
    if config.backend == "reward_model":
        if scorer is None and lm is not None:
            scorer = SequenceClassifierScorer(
                lm, tokenizer, config.batch_size, config.device, config.append_eos
            )
        return ScoreJudge(config, scorer)
    if config.backend == "hf_logits":
        return HFLogitsJudge(config, template, lm, tokenizer)
    if config.backend == "openai":
        return OpenAIJudge(config, template)
    raise ValueError(f"unknown backend {config.backend!r}")


def resolve_dtype(torch_dtype: str, device: str | None = None) -> str:
    """``auto``: bfloat16 on a CUDA device that supports it, float32 otherwise (a CPU runs float32 many
    times faster than bfloat16); any other name is returned unchanged."""
    if torch_dtype != "auto":
        return torch_dtype
    on_cuda = default_device(device).type == "cuda"
    return "bfloat16" if on_cuda and torch.cuda.is_bf16_supported() else "float32"


class ScoreJudge:
    """Scores both answers independently; the higher score wins, within ``tie_margin`` it is a tie.
    Backs both ``oracle`` and ``reward_model``. Each distinct (prompt, answer) is scored once per batch.
    Without a ``scorer``, the reward model named by ``config.model`` is loaded on the first batch (the same
    loader as training: a reward model saved with an adapter is rebuilt on its base model)."""

    def __init__(self, config: JudgeConfig, scorer: Scorer | None = None):
        self.config, self.scorer = config, scorer
        self.name, self.batch_size = config.name, config.batch_size
        self.identity = judge_identity(config, None)
        self.stats = JudgeStats()

    def _scorer(self) -> Scorer:
        if self.scorer is None:
            tokenizer = load_tokenizer(self.config.model)
            model = load_reward_model(self.config.model, self.config.torch_dtype, tokenizer.pad_token_id)
            self.scorer = SequenceClassifierScorer(
                model, tokenizer, self.config.batch_size, self.config.device, self.config.append_eos
            )
        return self.scorer

    def fits(self, items: list[PairItem | ScoreItem]) -> list[bool]:
        """Whether every answer of each item, after its prompt, fits the scorer (a scorer without ``fits``,
        such as the oracle, takes anything)."""
        check = getattr(self._scorer(), "fits", None)
        if check is None:
            return [True] * len(items)
        answers = [(i.answer,) if isinstance(i, ScoreItem) else (i.answer_a, i.answer_b) for i in items]
        flat = check(
            [i.prompt for i, a in zip(items, answers, strict=True) for _ in a],
            [x for a in answers for x in a],
        )
        out, at = [], 0
        for a in answers:
            out.append(all(flat[at : at + len(a)]))
            at += len(a)
        return out

    def score_batch(self, items: list[ScoreItem]) -> list[float]:
        """Single grading: the scorer's own score of each answer (its scale, not 1-10)."""
        self.stats.calls += len(items)
        return list(self._scorer().score([i.prompt for i in items], [i.answer for i in items]))

    def judge_batch(self, items: list[PairItem]) -> list[Verdict]:
        self.stats.calls += len(items)
        scorer = self._scorer()
        pairs = list(dict.fromkeys((i.prompt, a) for i in items for a in (i.answer_a, i.answer_b)))
        scores = dict(zip(pairs, scorer.score([p for p, _ in pairs], [a for _, a in pairs]), strict=True))
        return [
            verdict_from_margin(
                scores[(i.prompt, i.answer_a)] - scores[(i.prompt, i.answer_b)], self.config.tie_margin
            )
            for i in items
        ]


class HFLogitsJudge:
    """A local causal LM as a pairwise judge.

    ``logits`` mode: for each rendered prompt x, the margin is
    ``logit(label_1 | x) - logit(label_2 | x)`` at the next token (equal to the log-probability
    difference, as softmax's normaliser cancels); one forward pass per batch, left-padded so every
    row's next token sits in the last column. ``generate`` mode generates ``max_new_tokens`` and parses.
    """

    def __init__(self, config: JudgeConfig, template: str, lm: Any = None, tokenizer: Any = None):
        self.config, self.template = config, template
        self.name, self.batch_size = config.name, config.batch_size
        self.identity = judge_identity(config, template)
        self.stats = JudgeStats()
        self.device = default_device(config.device)
        self.lm, self.tokenizer = lm, tokenizer
        if lm is not None:
            self._attach(lm, tokenizer)

    def _attach(self, lm: Any, tokenizer: Any) -> None:
        self.lm, self.tokenizer = lm.to(self.device).eval(), tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.chat = self.config.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        limit = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        self.max_length = self.config.max_length or limit

    def _load(self) -> None:
        """Load ``config.model`` on first use."""
        if self.lm is None:
            model_args = ModelArgs(model_name_or_path=self.config.model, torch_dtype=self.config.torch_dtype)
            self._attach(load_model(model_args), load_tokenizer(self.config.model))

    def text(self, item: PairItem) -> str:
        """The exact string the model reads (chat template applied when configured and available)."""
        self._load()
        rendered = render_prompt(self.template, item)
        if not self.chat:  # no chat template to hold it: the system prompt leads the text, never dropped
            return f"{self.config.system_prompt}\n\n{rendered}" if self.config.system_prompt else rendered
        messages = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        messages.append({"role": "user", "content": rendered})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def fits(self, items: list[PairItem]) -> list[bool]:
        """Whether each item's rendered prompt (plus the one verdict token, or ``max_new_tokens`` in generate
        mode) fits the model's context; the evaluation counts the others instead of asking them."""
        self._load()
        if self.max_length is None:
            return [True] * len(items)
        extra = 1 if self.config.mode == "logits" else self.config.max_new_tokens
        return [len(ids) + extra <= self.max_length for ids in self._encode([self.text(i) for i in items])]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # a chat template already holds the special tokens it wants
        return self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]

    def _label_inputs(self, items: list[PairItem]) -> tuple[list[list[int]], list[int], list[int]]:
        """Context ids and the two competing next tokens per item.

        ``text + label`` is tokenized for both labels; the shared prefix is the context and the first
        differing token must be the last of each (so ' 1'/' 2' or 'A'/'B' work with any tokenizer).
        """
        texts = [self.text(item) for item in items]
        with_a = self._encode([t + self.config.labels[0] for t in texts])
        with_b = self._encode([t + self.config.labels[1] for t in texts])
        contexts, label_a, label_b = [], [], []
        for ids_a, ids_b in zip(with_a, with_b, strict=True):
            n = 0
            while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
                n += 1
            if len(ids_a) != n + 1 or len(ids_b) != n + 1:
                raise ValueError(
                    f"labels {self.config.labels!r} must end in one differing token after the prompt; "
                    f"got {ids_a[n:]} vs {ids_b[n:]}"
                )
            contexts.append(ids_a[:n])
            label_a.append(ids_a[n])
            label_b.append(ids_b[n])
        return contexts, label_a, label_b

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) input ids and attention mask, padded on the left."""
        width = max(len(r) for r in rows)
        if self.max_length is not None and width > self.max_length:
            raise ValueError(f"a judge prompt has {width} tokens, over max_length {self.max_length}")
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices in batches of similar length (less padding), longest first."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    @torch.inference_mode()
    def margins(self, items: list[PairItem]) -> list[float]:
        """``logit(label_1) - logit(label_2)`` at the next token of each rendered prompt."""
        self._load()
        contexts, label_a, label_b = self._label_inputs(items)
        out = [0.0] * len(items)
        for batch in self._batches([len(c) for c in contexts]):
            ids, mask = self._left_pad([contexts[i] for i in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 despite left padding
            logits = self.lm(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
            ).logits
            last = logits[:, -1, :].float()  # (B, V)
            rows = torch.arange(len(batch), device=last.device)
            a = torch.tensor([label_a[i] for i in batch], device=last.device)
            b = torch.tensor([label_b[i] for i in batch], device=last.device)
            for i, margin in zip(batch, (last[rows, a] - last[rows, b]).tolist(), strict=True):
                out[i] = margin
        return out

    @torch.inference_mode()
    def generate(self, items: list[PairItem]) -> list[str]:
        """Greedy (or sampled, if temperature > 0) continuations of each rendered prompt, decoded."""
        self._load()
        prompts = self._encode([self.text(item) for item in items])
        out = [""] * len(items)
        sampling = {"do_sample": self.config.temperature > 0}
        if self.config.temperature > 0:
            sampling["temperature"] = self.config.temperature
        for batch in self._batches([len(p) for p in prompts]):
            ids, mask = self._left_pad([prompts[i] for i in batch])
            new = self.lm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.config.max_new_tokens,
                pad_token_id=self.pad_id,
                **sampling,
            )[:, ids.shape[1] :]
            for i, text in zip(
                batch, self.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True
            ):
                out[i] = text
        return out

    @torch.inference_mode()
    def label_scores(self, items: list[ScoreItem]) -> list[float]:
        """Single grading in logits mode: the expected label value under the softmax over the labels' next-token
        logits (labels such as "1".."9", each ending in one token after the prompt)."""
        self._load()
        texts = [self.text(item) for item in items]
        values = torch.tensor([float(label) for label in self.config.labels])  # (L,)
        out = []
        for text in texts:
            rows = self._encode([text + label for label in self.config.labels])
            context = self._encode([text])[0]
            ids, mask = self._left_pad([context])
            logits = (
                self.lm(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[0, -1].float()
            )  # (V,)
            label_ids = torch.tensor(
                [row[len(context)] if len(row) > len(context) else row[-1] for row in rows]
            )
            probs = torch.softmax(logits[label_ids.to(logits.device)], dim=-1).cpu()  # (L,)
            out.append(float((probs * values).sum()))
        return out

    def score_batch(self, items: list[ScoreItem]) -> list[float | None]:
        """Single grading: the expected label value (logits mode), or the number the generated text gives
        (generate mode: ``parse_regex`` group 1, else the first number), None when there is none."""
        self.stats.calls += len(items)
        if self.config.mode == "logits":
            return self.label_scores(items)
        scores = []
        for text in self.generate(items):
            match = re.search(self.config.parse_regex or r"(\d+(?:\.\d+)?)", text)
            scores.append(float(match.group(1)) if match else None)
        self.stats.parse_failures += sum(s is None for s in scores)
        return scores

    def judge_batch(self, items: list[PairItem]) -> list[Verdict] | list[Reply]:
        """Verdicts from the label logits, or (generate mode) Replies with the generated text."""
        self.stats.calls += len(items)
        if self.config.mode == "logits":
            return [verdict_from_margin(m, self.config.tie_margin) for m in self.margins(items)]
        replies = [
            Reply(parse_verdict(t, self.config.labels, self.config.tie_label, self.config.parse_regex), t)
            for t in self.generate(items)
        ]
        self.stats.parse_failures += sum(r.verdict is None for r in replies)
        return replies


# ---------------------------------------------------------------------------------------------------
# An OpenAI-compatible endpoint


@dataclass(frozen=True)
class JudgeReply(Reply):
    """A ``Reply`` (verdict, raw text, rationale in mode: reason) with what only this backend knows."""

    margin: float | None = None  # verdict_from: logprobs, logprob(label A) - logprob(label B)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class OpenAIJudge(OpenAIClient):
    """An OpenAI-compatible chat-completions judge (see the module docstring).

    ``replies`` keeps the reply (raw text, rationale, margin, tokens) of every pair this judge answered,
    keyed by its ``PairItem``.
    """

    def __init__(self, config: JudgeConfig, template: str):
        super().__init__(config.name, config, "judge")
        self.config, self.template = config, template
        self.batch_size = config.batch_size
        self.identity = judge_identity(config, template)
        self.replies: dict[PairItem, JudgeReply] = {}

    def messages(self, item: PairItem) -> list[dict[str, str]]:
        messages = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        messages.append({"role": "user", "content": render_prompt(self.template, item)})
        return messages

    def ask(self, item: PairItem) -> JudgeReply:
        """One pair in one order; raises JudgeRequestError when it fails for good."""
        config = self.config
        request: dict[str, Any] = {
            "temperature": config.temperature,
            config.max_tokens_field: config.max_new_tokens,
        }
        if config.verdict_from == "logprobs":
            request.update(logprobs=True, top_logprobs=config.top_logprobs)
        return self.reply(self.complete(self.messages(item), **request))

    def reply(self, response: Any) -> JudgeReply:
        """Verdict, text and tokens of one (metered) response; counts parse failures."""
        config = self.config
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice is not None else None
        usage = getattr(response, "usage", None)
        tokens = {
            "prompt_tokens": getattr(usage, "prompt_tokens", None) or 0,
            "completion_tokens": getattr(usage, "completion_tokens", None) or 0,
        }
        margin = label_margin(choice, config.labels) if config.verdict_from == "logprobs" else None
        if margin is not None:
            return JudgeReply(verdict_from_margin(margin, config.tie_margin), text, margin=margin, **tokens)
        if config.verdict_from == "logprobs":
            self.count(logprob_fallbacks=1)
        regex = config.parse_regex if config.parser == "regex" else None
        verdict = parse_verdict(text, config.labels, config.tie_label, regex)
        if verdict is None:
            self.count(parse_failures=1)
        rationale = rationale_of(text, regex) if config.mode == "reason" else None
        return JudgeReply(verdict, text, rationale, **tokens)

    def judge_stream(self, items: list[PairItem]) -> Iterator[tuple[int, JudgeReply]]:
        """``(index in items, reply)`` for each pair, in the order the answers arrive (``stream``)."""
        for index, reply in self.stream(items, self.ask):
            self.replies[items[index]] = reply
            yield index, reply

    def judge_batch(self, items: list[PairItem]) -> list[JudgeReply]:
        """One reply per item; raises as ``judge_stream`` does, after all replies it got are in ``replies``."""
        replies: dict[int, JudgeReply] = dict(self.judge_stream(items))
        return [replies[index] for index in range(len(items))]


def label_margin(choice: Any, labels: list[str]) -> float | None:
    """log P(label A) - log P(label B) at the first answer token, from its top_logprobs (tokens that
    spell the same label, such as '1' and ' 1', are summed); None when either label is not listed."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    by_label: dict[str, list[float]] = {label.strip(): [] for label in labels}
    for candidate in content[0].top_logprobs or []:
        if candidate.token.strip() in by_label:
            by_label[candidate.token.strip()].append(candidate.logprob)
    first, second = (by_label[label.strip()] for label in labels)
    if not first or not second:
        return None
    return _logsumexp(first) - _logsumexp(second)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def rationale_of(text: str | None, regex: str | None) -> str | None:
    """mode: reason: the regex's group 'rationale', else the text before the verdict; None without a match."""
    if text is None or regex is None:
        return None
    match = re.fullmatch(regex, text.strip(), flags=re.DOTALL)
    if match is None:
        return None
    if "rationale" in match.re.groupindex:
        return (match.group("rationale") or "").strip()
    group = "verdict" if "verdict" in match.re.groupindex else 1
    return match.string[: match.start(group)].strip()
