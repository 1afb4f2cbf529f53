"""Protects the judges behind every win rate: the both-orders combination table (strict and average
rules), strict parsing, the on-disk cache (a finished run is free to repeat, an interrupted one keeps its
verdicts, the judge's raw text and rationale survive it, old files stay readable), the judge YAML loader,
torch_dtype auto, and the local-LM judge's left-padded batching against a manual computation."""

from __future__ import annotations

import dataclasses
import json
from itertools import product

import pytest
import torch
from conftest import ScriptedJudge, keyword_judge

from align_kit.data import task
from align_kit.data.prompts import instruction_of
from align_kit.judges.backends import HFLogitsJudge, ScoreJudge, load_judge
from align_kit.judges.cache import JudgmentCache, cache_key
from align_kit.judges.config import JudgeConfig, judge_identity, read_judge_config, read_template
from align_kit.judges.protocol import PairItem, Reply, judge_both_orders, parse_verdict, render_prompt
from align_kit.judges.verdicts import combine_orders, pair_score
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2
from align_kit.models.rewards import SequenceClassifierScorer
from align_kit.resources import judges_dir

PROMPT = "\n\nHuman: What is 2 plus 2?\n\nAssistant:"


def table_judge(table: dict[tuple[str, str], str | None]) -> ScriptedJudge:
    """Answers from a table keyed by (answer_a, answer_b)."""
    return ScriptedJudge(lambda i: table[(i.answer_a, i.answer_b)], batch_size=3)


def test_fake_judge_is_deterministic():
    judge = keyword_judge(keyword="good")
    items = [
        PairItem(PROMPT, "a good answer", "a bad answer"),
        PairItem(PROMPT, "bad", "good"),
        PairItem(PROMPT, "good", "also good"),
        PairItem(PROMPT, "bad", "worse"),
        PairItem(PROMPT + " [unparseable]", "good", "bad"),
    ]
    assert judge.judge_batch(items) == ["A", "B", "tie", "tie", None]
    assert judge.judge_batch(items) == ["A", "B", "tie", "tie", None]
    assert judge.stats.calls == 10 and judge.stats.parse_failures == 2
    assert keyword_judge(always="A").judge_batch(items[:2]) == ["A", "A"]


# (verdict with the system in slot A, verdict with it in slot B) -> (outcome, parse failures)
SLOT_TABLE = {
    ("A", "B"): ("win", 0),
    ("B", "A"): ("loss", 0),
    ("A", "A"): ("tie", 0),
    ("B", "B"): ("tie", 0),
    ("A", "tie"): ("tie", 0),
    ("tie", "B"): ("tie", 0),
    ("B", "tie"): ("tie", 0),
    ("tie", "A"): ("tie", 0),
    ("tie", "tie"): ("tie", 0),
    ("A", None): ("tie", 1),
    (None, "B"): ("tie", 1),
    ("B", None): ("tie", 1),
    (None, "A"): ("tie", 1),
    ("tie", None): ("tie", 1),
    (None, "tie"): ("tie", 1),
    (None, None): (None, 2),
}


def test_combine_orders_covers_every_case():
    assert len(SLOT_TABLE) == 16
    for (first, swapped), expected in SLOT_TABLE.items():
        assert combine_orders(first, swapped) == expected, (first, swapped)


# (first, swapped) -> the system's score under the average rule: the mean of its two single-order scores
AVERAGE_TABLE = {
    ("A", "B"): 1.0, ("B", "A"): 0.0, ("A", "A"): 0.5, ("B", "B"): 0.5,
    ("A", "tie"): 0.75, ("tie", "B"): 0.75, ("B", "tie"): 0.25, ("tie", "A"): 0.25, ("tie", "tie"): 0.5,
    ("A", None): 0.5, (None, "B"): 0.5, ("B", None): 0.5, (None, "A"): 0.5, ("tie", None): 0.5,
    (None, "tie"): 0.5, (None, None): None,
}  # fmt: skip


def test_pair_scores_under_both_combine_rules():
    strict_scores = {"win": 1.0, "tie": 0.5, "loss": 0.0, None: None}
    for (first, swapped), expected in AVERAGE_TABLE.items():
        assert pair_score(first, swapped, "average") == expected, (first, swapped)
        assert pair_score(first, swapped, "strict") == strict_scores[SLOT_TABLE[(first, swapped)][0]]
    with pytest.raises(ValueError, match="combine rule"):
        pair_score("A", "B", "mean")


def test_judge_both_orders_combines_all_slot_verdict_pairs():
    """All 16 (first-order, swapped-order) slot verdicts, through the real function, end to end."""
    slot = ("A", "B", "tie", None)
    table, systems, baselines = {}, [], []
    for k, (first, swapped) in enumerate(product(slot, slot)):
        s, b = f"sys{k}", f"base{k}"
        table[(s, b)], table[(b, s)] = first, swapped
        systems.append(s)
        baselines.append(b)
    judge = table_judge(table)
    rows = judge_both_orders(
        judge, [PROMPT] * 16, systems, baselines, prompt_ids=[f"p{k}" for k in range(16)]
    )
    assert judge.stats.calls == 32
    for k, (first, swapped) in enumerate(product(slot, slot)):
        row = rows[k]
        assert (row.first, row.swapped) == (first, swapped)
        assert (row.outcome, row.parse_failures) == SLOT_TABLE[(first, swapped)]
        assert row.prompt_id == f"p{k}" and row.judge == "scripted"
    # the system in slot A then in slot B, preferred both times: a win
    assert rows[1].outcome == "win"  # first 'A' (system), swapped 'B' (system)
    assert rows[4].outcome == "loss"  # first 'B', swapped 'A': baseline both times
    assert rows[0].outcome == "tie"  # 'A' twice: pure position bias


def test_position_biased_judge_gives_only_ties():
    rows = judge_both_orders(
        keyword_judge(always="A"), [PROMPT] * 3, ["good", "bad", "x"], ["bad", "good", "y"]
    )
    assert [r.outcome for r in rows] == ["tie", "tie", "tie"]


def test_cache_rerun_makes_zero_backend_calls(tmp_path):
    prompts = [f"{PROMPT} {k}" for k in range(10)]
    systems = ["good one" if k % 3 else "bad one" for k in range(10)]
    baselines = ["bad two" if k % 2 else "good two" for k in range(10)]
    path = tmp_path / "verdicts.jsonl"
    first_judge = keyword_judge(batch_size=3)
    first = judge_both_orders(first_judge, prompts, systems, baselines, JudgmentCache(path))
    assert first_judge.stats.calls == 20
    assert len(path.read_text().splitlines()) == 20
    again = keyword_judge(batch_size=3)
    second = judge_both_orders(again, prompts, systems, baselines, JudgmentCache(path))
    assert again.stats.calls == 0
    assert second == first
    assert [r.outcome for r in first] == [
        {(True, False): "win", (False, True): "loss"}.get(("good" in s, "good" in b), "tie")
        for s, b in zip(systems, baselines, strict=True)
    ]


def test_interrupted_run_keeps_finished_verdicts(tmp_path):
    class Crashing(ScriptedJudge):
        def judge_batch(self, items):
            if self.stats.calls >= 8:
                raise RuntimeError("backend died")
            return super().judge_batch(items)

    prompts = [f"{PROMPT} {k}" for k in range(10)]
    systems, baselines = ["good"] * 10, ["bad"] * 10
    path = tmp_path / "verdicts.jsonl"
    with pytest.raises(RuntimeError, match="backend died"):
        judge_both_orders(
            Crashing(keyword_judge().verdict, batch_size=4, identity=keyword_judge().identity),
            prompts,
            systems,
            baselines,
            JudgmentCache(path),
        )
    assert len(JudgmentCache(path)) == 8  # two batches of four finished before the crash
    resumed = keyword_judge(batch_size=4)
    rows = judge_both_orders(resumed, prompts, systems, baselines, JudgmentCache(path))
    assert resumed.stats.calls == 12
    assert [r.outcome for r in rows] == ["win"] * 10


def test_cache_stores_parse_failures_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    cache = JudgmentCache(path)
    cache.put("k1", None, "j")
    cache.put("k2", "A", "j")
    with open(path, "a") as handle:
        handle.write('{"key": "k3", "verd')  # a crash in the middle of a write
    reread = JudgmentCache(path)
    assert len(reread) == 2 and reread.skipped_lines == 1
    assert "k1" in reread and reread.get("k1") is None and reread.get("k2") == "A"
    with pytest.raises(ValueError):
        cache.put("k4", "win")
    assert json.loads(path.read_text().splitlines()[0]) == {"key": "k1", "verdict": None, "judge": "j"}


def test_replies_keep_their_text_and_rationale_through_the_cache(tmp_path):
    def reply(item):
        verdict = "A" if "good" in item.answer_a else "B" if "good" in item.answer_b else None
        return Reply(verdict, text=f"Output ({verdict or '?'})", rationale=f"about {item.answer_a.strip()}")

    prompts, systems, baselines = [PROMPT] * 3, ["good", "bad", "meh"], ["bad", "good", "meh too"]
    path = tmp_path / "verdicts.jsonl"
    first = judge_both_orders(ScriptedJudge(reply), prompts, systems, baselines, JudgmentCache(path))
    assert [r.outcome for r in first] == ["win", "loss", None]
    assert first[0].first_reply == Reply("A", "Output (A)", "about good")
    assert first[0].swapped_reply == Reply("B", "Output (B)", "about bad")
    assert first[2].first_reply.text == "Output (?)" and first[2].first_reply.verdict is None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["text"] for line in lines} == {"Output (A)", "Output (B)", "Output (?)"}
    again = ScriptedJudge(reply)
    assert judge_both_orders(again, prompts, systems, baselines, JudgmentCache(path)) == first
    assert again.stats.calls == 0
    # bare verdicts (the older protocol) still work, and a file written before texts were kept still reads
    bare = judge_both_orders(keyword_judge(), prompts, systems, baselines)
    assert [r.outcome for r in bare] == ["win", "loss", "tie"] and bare[0].first_reply == Reply("A")
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"key": "k", "verdict": "B", "judge": "j"}) + "\n")
    cache = JudgmentCache(old)
    assert cache.get("k") == "B" and cache.text("k") is None and cache.rationale("k") is None


def test_auto_dtype_is_float32_without_a_gpu_and_names_the_judge(monkeypatch):
    from align_kit.judges import backends as judge_backends

    assert judge_backends.resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert judge_backends.resolve_dtype("auto") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert judge_backends.resolve_dtype("auto") == "bfloat16"
    assert judge_backends.resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert judge_backends.resolve_dtype("auto") == "float32"
    # the resolved dtype keys the cache: auto on a bf16 GPU is the same judge as bfloat16 written out
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    auto, explicit = load_judge("local_hf_pairwise"), load_judge("local_hf_pairwise", torch_dtype="bfloat16")
    assert (
        read_judge_config("local_hf_pairwise").torch_dtype == "auto" and auto.config.torch_dtype == "bfloat16"
    )
    assert (
        auto.identity == explicit.identity != load_judge("local_hf_pairwise", torch_dtype="float32").identity
    )


def test_cache_key_depends_on_order_and_identity():
    base = cache_key("judge:1", PROMPT, "x", "y")
    assert base == cache_key("judge:1", PROMPT, "x", "y")
    assert len({base, cache_key("judge:1", PROMPT, "y", "x"), cache_key("judge:2", PROMPT, "x", "y")}) == 3


def test_parse_verdict_is_strict():
    labels = ["1", "2"]
    assert [parse_verdict(t, labels) for t in ("1", " 2\n", "1.", "Reply 1", "12", "", None)] == [
        "A",
        "B",
        None,
        None,
        None,
        None,
        None,
    ]
    assert parse_verdict("tie", labels, tie_label="tie") == "tie"
    assert parse_verdict("Output (b)", ["a", "b"], regex=r"Output \((?P<verdict>[ab])\)") == "B"
    assert parse_verdict("Output (b) because", ["a", "b"], regex=r"Output \((?P<verdict>[ab])\)") is None


def test_render_prompt_fills_placeholders_once():
    template = "Q: {instruction}\n1: {output_1}\n2: {output_2}"
    item = PairItem(PROMPT, " says {output_2}", "four")
    assert render_prompt(template, item) == "Q: What is 2 plus 2?\n1: says {output_2}\n2: four"
    multi = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert instruction_of(multi) == multi.strip()
    assert instruction_of("Plain request") == "Plain request"


def test_every_shipped_judge_parses_with_its_template():
    names = sorted(p.name for p in judges_dir().iterdir() if (p / "judge.yaml").exists())
    assert {"oracle", "reward_model", "local_hf_pairwise", "openai_pairwise"} <= set(names)
    for name in names:
        config = read_judge_config(name)
        assert config.name == name
        if config.template:
            assert "{output_1}" in read_template(config.template)
    openai = read_judge_config("openai_pairwise")
    assert openai.api_key_env == "OPENAI_API_KEY" and openai.temperature == 0.0
    assert read_judge_config("local_hf_pairwise", tie_margin=0.5).tie_margin == 0.5


def test_loader_rejects_unknown_keys_and_bad_values(tmp_path):
    (tmp_path / "judge.yaml").write_text("backend: oracle\ntie_margn: 0.1\n")
    with pytest.raises(ValueError, match="tie_margn"):
        read_judge_config(tmp_path)
    with pytest.raises(ValueError, match="temprature"):
        read_judge_config("oracle", temprature=0.0)
    (tmp_path / "judge.yaml").write_text("backend: oracle\nlabels: [1, 2]\n")
    with pytest.raises(ValueError, match="quote"):
        read_judge_config(tmp_path / "judge.yaml")
    (tmp_path / "judge.yaml").write_text("backend: chatgpt\n")
    with pytest.raises(ValueError, match="backend"):
        read_judge_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="oracle"):
        read_judge_config("no_such_judge")


def test_identity_changes_with_template_text_and_decoding_only():
    config = JudgeConfig(backend="hf_logits", model="m", template="t.txt")
    same = dataclasses.replace(config, batch_size=99, max_concurrency=3, name="other")
    assert judge_identity(config, "T") == judge_identity(same, "T")
    assert judge_identity(config, "T") != judge_identity(config, "T2")
    assert judge_identity(config, "T") != judge_identity(dataclasses.replace(config, tie_margin=0.5), "T")
    assert judge_identity(config, "T") != judge_identity(dataclasses.replace(config, model="m2"), "T")


# ---- score judges (oracle, reward model) -----------------------------------------------------------


class CountingScorer:
    def __init__(self):
        self.scored = 0

    def score(self, prompts, answers):
        self.scored += len(answers)
        return [float(len(a)) for a in answers]


def test_score_judge_higher_wins_with_tie_band_and_shared_scoring():
    scorer = CountingScorer()
    judge = load_judge("reward_model", scorer=scorer, model="length", tie_margin=1.0)
    assert isinstance(judge, ScoreJudge)
    items = [PairItem(PROMPT, "long answer", "short"), PairItem(PROMPT, "short", "long answer")]
    items.append(PairItem(PROMPT, "abcd", "abc"))  # within the tie band
    assert judge.judge_batch(items) == ["A", "B", "tie"]
    assert scorer.scored == 4  # 'long answer', 'short', 'abcd', 'abc': each scored once


def test_oracle_judge_uses_task_oracle(monkeypatch):
    monkeypatch.setattr(task, "oracle_score", lambda prompt, answer: 1.0 if answer.strip() == "4" else 0.0)
    rows = judge_both_orders(load_judge("oracle"), [PROMPT] * 3, [" 4", " 5", " 4"], [" 5", " 4", " 4"])
    assert [r.outcome for r in rows] == ["win", "loss", "tie"]


def test_sequence_classifier_scorer_matches_one_by_one():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=258, n_positions=128, n_embd=32, n_layer=2, n_head=2, num_labels=1)
    config.pad_token_id = 257
    model = GPT2ForSequenceClassification(config)
    tokenizer = build_byte_tokenizer()
    scorer = SequenceClassifierScorer(model, tokenizer, batch_size=4, device="cpu")
    answers = [" 4", " four, I think", " 5"]
    batched = scorer.score([PROMPT] * 3, answers)
    for answer, value in zip(answers, batched, strict=True):
        ids = torch.tensor([tokenizer(PROMPT + answer + tokenizer.eos_token)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert value == pytest.approx(expected, abs=1e-5)


# ---- hf_logits on a tiny GPT-2 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    return build_tiny_gpt2(
        TinyGPT2Shape(n_layer=2, n_embd=64, n_head=2, n_positions=512)
    ), build_byte_tokenizer()


def _tiny_judge(tmp_path, lm, tokenizer, **overrides):
    (tmp_path / "t.txt").write_text("Q: {instruction}\nR1: {output_1}\nR2: {output_2}\nBest:\n")
    (tmp_path / "judge.yaml").write_text(
        "backend: hf_logits\nmodel: tiny\ntemplate: t.txt\nlabels: ['1', '2']\nbatch_size: 4\ndevice: cpu\n"
    )
    return load_judge(tmp_path, lm=lm, tokenizer=tokenizer, **overrides)


ITEMS = [
    PairItem(PROMPT, " 4", " five"),
    PairItem(PROMPT, " The answer is four, because two and two make four.", " 5"),
    PairItem("\n\nHuman: Say hello.\n\nAssistant:", " Hello!", " No."),
    PairItem(PROMPT, " 4", " 4"),
    PairItem("\n\nHuman: Name a colour.\n\nAssistant:", " Blue is a colour that many people like.", " Red"),
]


def test_hf_logits_batched_equals_one_by_one_and_manual(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    judge = _tiny_judge(tmp_path, lm, tokenizer)
    assert isinstance(judge, HFLogitsJudge)
    batched = judge.margins(ITEMS)
    single = [judge.margins([item])[0] for item in ITEMS]
    assert batched == pytest.approx(single, abs=1e-4)
    for item, margin in zip(ITEMS, batched, strict=True):
        ids = torch.tensor([tokenizer(judge.text(item))["input_ids"]])  # no padding at all
        with torch.no_grad():
            last = lm(input_ids=ids).logits[0, -1]
        assert margin == pytest.approx((last[ord("1")] - last[ord("2")]).item(), abs=1e-4)
    assert judge.judge_batch(ITEMS) == ["A" if m > 0 else "B" for m in batched]
    assert len({m > 0 for m in batched}) == 2  # the check sees both verdicts, not one constant


def test_hf_logits_tie_margin_and_spaced_labels(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    wide = _tiny_judge(tmp_path, lm, tokenizer, tie_margin=1e6)
    assert wide.judge_batch(ITEMS[:3]) == ["tie"] * 3
    spaced = _tiny_judge(tmp_path, lm, tokenizer, labels=[" 1", " 2"])  # shared space goes into the context
    ids = torch.tensor([tokenizer(spaced.text(ITEMS[0]) + " ")["input_ids"]])
    with torch.no_grad():
        last = lm(input_ids=ids).logits[0, -1]
    assert spaced.margins(ITEMS[:1])[0] == pytest.approx((last[ord("1")] - last[ord("2")]).item(), abs=1e-4)
    with pytest.raises(ValueError, match="one differing token"):
        _tiny_judge(tmp_path, lm, tokenizer, labels=["1", "12"]).margins(ITEMS[:1])


def test_hf_generate_mode_parses_and_matches_one_by_one(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    judge = _tiny_judge(tmp_path, lm, tokenizer, mode="generate", max_new_tokens=3)
    texts = judge.generate(ITEMS)
    assert texts == [judge.generate([item])[0] for item in ITEMS]
    replies = judge.judge_batch(ITEMS)  # generate mode keeps the text each verdict was parsed from
    assert [r.verdict for r in replies] == [parse_verdict(t, ["1", "2"]) for t in texts]
    assert [r.text for r in replies] == texts
    assert judge.stats.parse_failures == sum(r.verdict is None for r in replies)


def test_hf_chat_template_is_used_only_when_asked_and_present(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    chat_tokenizer = build_byte_tokenizer()
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    judge = _tiny_judge(tmp_path, lm, chat_tokenizer, use_chat_template=True, system_prompt="Be fair.")
    text = judge.text(ITEMS[0])
    assert text.startswith("<system>Be fair.\n<user>Q: What is 2 plus 2?") and text.endswith("<assistant>")
    assert _tiny_judge(tmp_path, lm, tokenizer, use_chat_template=True).text(ITEMS[0]).startswith("Q: ")
    assert _tiny_judge(tmp_path, lm, chat_tokenizer).text(ITEMS[0]).startswith("Q: ")


def test_hf_judge_refuses_prompts_longer_than_the_model(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    judge = _tiny_judge(tmp_path, lm, tokenizer, max_length=20)
    with pytest.raises(ValueError, match="max_length 20"):
        judge.margins(ITEMS[:1])


def test_identical_answers_are_judged_once():
    judge = keyword_judge()
    rows = judge_both_orders(judge, [PROMPT], ["same good"], ["same good"])
    assert judge.stats.calls == 1 and rows[0].outcome == "tie"
