"""The judge backends that ``judges.build_judge`` builds: the exact oracle and reward models (a higher
score wins), a local causal LM reading label logits (or generating a verdict), an OpenAI-compatible
chat-completions endpoint with counted retries, and a deterministic fake for tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from align_kit.judges import (
    JudgeConfig,
    JudgeStats,
    PairItem,
    Scorer,
    Verdict,
    judge_identity,
    parse_verdict,
    render_prompt,
    verdict_from_margin,
)


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class FakeJudge:
    """Deterministic judge for tests: prefers the answer containing ``keyword`` (tie when both or
    neither do); ``always`` makes it answer that verdict for every pair (a fully position-biased
    judge); a prompt containing ``fail_marker`` gives a parse failure."""

    def __init__(
        self,
        keyword: str = "good",
        always: Verdict = None,
        fail_marker: str = "[unparseable]",
        name: str = "fake",
        batch_size: int = 4,
    ):
        self.keyword, self.always, self.fail_marker = keyword, always, fail_marker
        self.name, self.batch_size = name, batch_size
        self.identity = f"fake:{keyword}:{always}:{fail_marker}"
        self.stats = JudgeStats()

    def judge_batch(self, items: list[PairItem]) -> list[Verdict]:
        self.stats.calls += len(items)
        return [self._one(item) for item in items]

    def _one(self, item: PairItem) -> Verdict:
        if self.fail_marker in item.prompt:
            self.stats.parse_failures += 1
            return None
        if self.always is not None:
            return self.always
        in_a, in_b = self.keyword in item.answer_a, self.keyword in item.answer_b
        return "A" if in_a and not in_b else "B" if in_b and not in_a else "tie"


class OracleScorer:
    """The embedded task's checker as a scorer (1.0 correct, helpful and harmless; else 0.0)."""

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        from align_kit.task import oracle_score

        return [float(oracle_score(p, a)) for p, a in zip(prompts, answers, strict=True)]


class SequenceClassifierScorer:
    """A reward model (sequence classification, one label) scoring ``prompt + answer``.

    Texts are tokenized as TRL's RewardTrainer does in training (EOS appended), right-padded, and the
    model's own pooling picks the last non-pad token. ``score`` returns r(x, y) per pair.
    """

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int = 16, device: str | None = None, append_eos=True
    ):
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.batch_size, self.append_eos = tokenizer, batch_size, append_eos
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        eos = self.tokenizer.eos_token if self.append_eos else ""
        texts = [p + a + eos for p, a in zip(prompts, answers, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                return_tensors="pt",
                add_special_tokens=False,
            ).to(self.device)
            out.extend(self.model(**batch).logits[:, 0].float().tolist())  # (B,)
        return out


class ScoreJudge:
    """Scores both answers independently; the higher score wins, within ``tie_margin`` it is a tie.
    Backs both ``oracle`` and ``reward_model``. Each distinct (prompt, answer) is scored once per batch."""

    def __init__(self, config: JudgeConfig, scorer: Scorer):
        self.config, self.scorer = config, scorer
        self.name, self.batch_size = config.name, config.batch_size
        self.identity = judge_identity(config, None)
        self.stats = JudgeStats()

    def judge_batch(self, items: list[PairItem]) -> list[Verdict]:
        self.stats.calls += len(items)
        pairs = list(dict.fromkeys((i.prompt, a) for i in items for a in (i.answer_a, i.answer_b)))
        scores = dict(
            zip(pairs, self.scorer.score([p for p, _ in pairs], [a for _, a in pairs]), strict=True)
        )
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

    def __init__(self, config: JudgeConfig, template: str, lm: Any, tokenizer: Any):
        self.config, self.template, self.tokenizer = config, template, tokenizer
        self.name, self.batch_size = config.name, config.batch_size
        self.identity = judge_identity(config, template)
        self.stats = JudgeStats()
        self.device = _device(config.device)
        self.lm = lm.to(self.device).eval()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.chat = config.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        limit = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        self.max_length = config.max_length or limit

    def text(self, item: PairItem) -> str:
        """The exact string the model reads (chat template applied when configured and available)."""
        rendered = render_prompt(self.template, item)
        if not self.chat:
            return rendered
        messages = (
            [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        )
        messages.append({"role": "user", "content": rendered})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

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

    def judge_batch(self, items: list[PairItem]) -> list[Verdict]:
        self.stats.calls += len(items)
        if self.config.mode == "logits":
            return [verdict_from_margin(m, self.config.tie_margin) for m in self.margins(items)]
        verdicts = [
            parse_verdict(t, self.config.labels, self.config.tie_label, self.config.parse_regex)
            for t in self.generate(items)
        ]
        self.stats.parse_failures += sum(v is None for v in verdicts)
        return verdicts
