"""Protects the OpenAI judge against a server nobody here wrote: `transformers serve` on 127.0.0.1 with a
tiny local chat model, started, killed and restarted by the test. A server killed mid-run stops the
judge with "nothing listening" after the verdicts that arrived were cached, counted as connection
errors and retries; after a restart the rerun asks only the missing pairs. The real server's usage,
max_completion_tokens, ignored logprobs, bare 500 for a too-long prompt and 400 for a wrong model name
are what the judge expects."""

from __future__ import annotations

import pytest
from servers import TransformersServe, build_chat_model, serving_missing

from align_kit.judges.backends import load_judge
from align_kit.judges.cache import JudgmentCache, cache_key
from align_kit.judges.openai_client import REFUSED_ATTEMPTS, JudgeRequestError, OpenAIJudge
from align_kit.judges.protocol import PairItem, judge_both_orders

pytestmark = pytest.mark.slow

TEMPLATE = "Q: {instruction}\nA: {output_1}\nB: {output_2}\nBetter (1 or 2):"


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    missing = serving_missing()
    if missing:
        pytest.fail(missing)
    folder = tmp_path_factory.mktemp("transformers_serve")
    model = build_chat_model(folder / "always-1")  # answers '1' to everything
    with TransformersServe(model, folder / "serve.log") as server:
        yield server


@pytest.fixture(autouse=True)
def loopback_without_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def make_judge(serve: TransformersServe, tmp_path, **overrides) -> OpenAIJudge:
    (tmp_path / "prompt.txt").write_text(TEMPLATE)
    (tmp_path / "judge.yaml").write_text(
        "backend: openai\ntemplate: prompt.txt\napi_key_env: null\nlabels: ['1', '2']\nmax_new_tokens: 1\n"
    )
    settings = {"model": str(serve.model), "base_url": serve.url, "timeout": 30.0, **overrides}
    return load_judge(tmp_path, **settings)


def verdicts(replies) -> list:
    return [reply.verdict for reply in replies]


def prompts(n: int) -> list[str]:
    return [f"\n\nHuman: what is {k} + {k}?\n\nAssistant:" for k in range(n)]


def test_a_server_killed_mid_run_stops_the_judge_and_the_rerun_asks_only_missing_pairs(serve, tmp_path):
    n = 10  # 20 single-order pairs

    class KillAfterFour(JudgmentCache):
        def put(self, key, verdict, judge="", **texts):
            super().put(key, verdict, judge, **texts)
            if len(self) == 4:
                serve.kill()

    cache = KillAfterFour(tmp_path / "verdicts.jsonl")
    judge = make_judge(serve, tmp_path, max_concurrency=4)
    with pytest.raises(JudgeRequestError, match=f"nothing listening at {serve.url}"):
        judge_both_orders(judge, prompts(n), ["ten"] * n, ["eleven"] * n, cache)
    reread = JudgmentCache(cache.path)
    cached = len(reread)
    assert 4 <= cached < 2 * n
    # every reply that arrived was cached, with the raw answer it was parsed from
    keys = [cache_key(judge.identity, item.prompt, item.answer_a, item.answer_b) for item in judge.replies]
    assert len(keys) == cached and {reread.text(key) for key in keys} == {"1"}
    stats = judge.stats
    assert stats.connection_errors >= REFUSED_ATTEMPTS and stats.retries >= REFUSED_ATTEMPTS - 1

    serve.restart()
    again = make_judge(serve, tmp_path, max_concurrency=4)
    rows = judge_both_orders(again, prompts(n), ["ten"] * n, ["eleven"] * n, JudgmentCache(cache.path))
    assert again.stats.calls == again.stats.requests == 2 * n - cached  # only the missing pairs
    assert len(JudgmentCache(cache.path)) == 2 * n
    # the model always says '1', slot A, in both orders: a position-dependent preference is a tie
    assert [(r.first, r.swapped, r.outcome) for r in rows] == [("A", "A", "tie")] * n


def test_usage_prices_and_max_completion_tokens_against_the_real_server(serve, tmp_path):
    judge = make_judge(
        serve,
        tmp_path,
        max_tokens_field="max_completion_tokens",
        max_new_tokens=3,
        input_price_per_million=1.0,
        output_price_per_million=4.0,
    )
    item = PairItem(prompts(1)[0], "two", "three")
    assert verdicts(judge.judge_batch([item])) == [None]  # '111' is no label: a parse failure, its text kept
    reply = judge.replies[item]
    assert reply.text == "111" and reply.completion_tokens == 3 and reply.prompt_tokens > 20
    stats = judge.stats
    assert stats.cost == pytest.approx((stats.prompt_tokens * 1.0 + 3 * 4.0) / 1e6)


def test_the_real_server_ignores_logprobs_so_the_text_decides(serve, tmp_path):
    judge = make_judge(serve, tmp_path, verdict_from="logprobs")
    items = [PairItem(p, "x", "y") for p in prompts(3)]
    assert verdicts(judge.judge_batch(items)) == ["A"] * 3
    assert judge.stats.logprob_fallbacks == 3 and all(judge.replies[i].margin is None for i in items)


def test_a_prompt_longer_than_the_context_is_a_bare_500_explained(serve, tmp_path):
    judge = make_judge(serve, tmp_path, max_retries=1)
    with pytest.raises(JudgeRequestError) as caught:
        judge.judge_batch([PairItem(prompts(1)[0], "x" * 300, "y")])  # the model has 256 positions
    assert "HTTP 500 after 2 attempts: Internal Server Error (the server gave no reason" in str(caught.value)
    assert "longer than the model's context" in str(caught.value) and judge.stats.server_errors == 2
    assert "index out of range" in serve.log_tail(200)  # the cause is only in the server's log


def test_a_wrong_model_name_stops_at_once_with_the_servers_message(serve, tmp_path):
    judge = make_judge(serve, tmp_path, model="gpt-4o-mini")
    with pytest.raises(
        JudgeRequestError, match=r"HTTP 400: Server is pinned to '.*'; requested 'gpt-4o-mini'"
    ):
        judge.judge_batch([PairItem(p, "x", "y") for p in prompts(4)])
    assert judge.stats.requests == 1 and judge.stats.retries == 0
