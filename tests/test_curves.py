"""Protects the over-optimisation curves (align_kit/training/curves.py, align_kit/evaluation/curve_report.py) and the alignment tax
(align_kit/evaluation/tax.py): a PPO run's curve points equal proxy, gold and KL computed directly at the checkpoint the run
kept; stop_at_gold_peak keeps the policy of the step it names; Gao et al.'s forms are recovered from synthetic
curves within their stated uncertainty; the alarm fires once on an over-optimising series and never on a
monotone one; perplexity is exp of the mean token NLL; a bad general-text row is named."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from conftest import load_recipe, max_change
from test_ppo import ppo_args

from align_kit.configs import ModelArgs
from align_kit.data.formats import DataError
from align_kit.data.prompts import format_prompt
from align_kit.data.task import OracleScorer
from align_kit.evaluation import curve_report, tax
from align_kit.models.loading import build_byte_tokenizer, build_tiny_gpt2, load_model, load_reward_model
from align_kit.models.rewards import reward_scorer
from align_kit.training import curves


def sequence_logprob(model, ids: list[int], prompt_len: int) -> float:
    """log p(answer | prompt) of one unpadded sequence by a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    log_p = torch.log_softmax(logits[:-1].float(), -1)
    return sum(log_p[t - 1, ids[t]].item() for t in range(prompt_len, len(ids)))


@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom")  # TRL's statistics of a 1-row micro-batch
def test_ppo_curve_points_match_a_direct_computation_and_the_kept_peak(
    reward_folders, micro_model_dir, tmp_path
):
    out = tmp_path / "ppo"
    gold_rm = reward_folders[1]  # a held-out reward model the run never optimises
    argv = ppo_args(
        out, reward_folders[:1], model_name_or_path=str(micro_model_dir), learning_rate=0.03, total_episodes=8,
        gradient_accumulation_steps=1, num_ppo_epochs=1, response_length=8, curve_steps=1, curve_prompts=4,
        curve_max_new_tokens=8,
    )  # fmt: skip
    metrics = load_recipe("ppo").main(
        [*argv, "--curve_gold", gold_rm, "oracle", "--stop_at_gold_peak", "true"]
    )
    points = [json.loads(line) for line in (out / curves.CURVES).read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2]
    assert all(p["seconds"] > 0 and p["cpu_seconds"] > 0 for p in points)  # the overhead benchmark's timers
    assert points[0]["kl"] == pytest.approx(0.0, abs=1e-5) and points[-1]["kl"] != pytest.approx(
        0.0, abs=1e-4
    )
    assert set(points[0]["gold"]) == {gold_rm.rsplit("/", 1)[-1], "oracle"}

    marker = json.loads((out / "run_complete.json").read_text())
    peak = marker["curves"]["gold_peak"]
    gold_name = next(iter(points[0]["gold"]))
    best = max(points, key=lambda p: p["gold"][gold_name])
    assert peak["step"] == best["step"] and peak["value"] == best["gold"][gold_name]
    assert metrics["curves"] == marker["curves"]

    # the run's model is the policy of the peak step: recompute that point from it directly
    policy = load_model(ModelArgs(model_name_or_path=str(out))).eval()
    reference = load_model(ModelArgs(model_name_or_path=str(micro_model_dir))).eval()
    assert (max_change(policy, reference) > 1e-6) == (peak["step"] > 0)
    tokenizer = build_byte_tokenizer()
    prompts = _held_out_prompts(4)
    torch.manual_seed(0)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    sequences = policy.generate(
        **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    ratios, answers = [], []
    for row, mask in zip(sequences.tolist(), batch["attention_mask"].tolist(), strict=True):
        prompt = [t for t, m in zip(row[:width], mask, strict=True) if m]
        answer = row[width:]
        if tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
        ids = prompt + answer
        ratios.append(
            sequence_logprob(policy, ids, len(prompt)) - sequence_logprob(reference, ids, len(prompt))
        )
        answers.append(tokenizer.decode([t for t in answer if t < 256]))
    tokenizer.padding_side = (
        "right"  # as the recipe's tokenizer scores (reward models pool at the last real token)
    )
    point = next(p for p in points if p["step"] == peak["step"])
    assert point["kl"] == pytest.approx(sum(ratios) / 4, abs=1e-4)
    proxy = reward_scorer(load_reward_model(reward_folders[0], pad_token_id=257).eval(), tokenizer)
    assert point["proxy"] == pytest.approx(sum(proxy.score(prompts, answers)) / 4, abs=1e-4)
    gold = reward_scorer(load_reward_model(gold_rm, pad_token_id=257).eval(), tokenizer)
    assert point["gold"][gold_name] == pytest.approx(sum(gold.score(prompts, answers)) / 4, abs=1e-4)
    assert point["gold"]["oracle"] == sum(OracleScorer().score(prompts, answers)) / 4


def _held_out_prompts(n: int) -> list[str]:
    """The prompts the recipe's curves use: the first ``n`` distinct held-out prompts of the run's data."""
    from align_kit.configs import DataArgs
    from align_kit.data.loading import distinct_prompts, load_preferences

    splits, _ = load_preferences(
        DataArgs(dataset="embedded", embedded_train_size=48, embedded_test_size=24), build_byte_tokenizer()
    )
    return distinct_prompts(splits["test"])[:n]


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.2, 0.25), ("rl", 0.9, 0.4)])
def test_fit_recovers_known_coefficients_within_their_uncertainty(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.linspace(0.05, 4.0, 40)
    function = curve_report.bon_form if form == "bon" else curve_report.rl_form
    gain = function(d, alpha, beta) + rng.normal(0, 0.02, d.size)
    fit = curve_report.fit_form(d, gain, form)
    assert fit["poor"] is None and fit["r2"] > 0.95
    assert abs(fit["alpha"] - alpha) < 3 * fit["alpha_se"] and abs(fit["beta"] - beta) < 3 * fit["beta_se"]
    assert fit["alpha_se"] < 0.05 and fit["beta_se"] < 0.05


def test_poor_fit_is_flagged():
    rng = np.random.default_rng(1)
    d = np.linspace(0.1, 3.0, 12)
    assert curve_report.fit_form(d, rng.normal(0, 1.0, d.size), "rl")["poor"]
    assert "at least 3" in curve_report.fit_form([0.1, 0.2], [0.0, 0.1], "bon")["poor"]


class ScriptedRecorder(curves.CurveRecorder):
    """A recorder whose points come from a script (proxy, gold or spread per step) instead of sampling."""

    def __init__(self, run_dir, series, key="gold", **kwargs):
        model = build_tiny_gpt2()
        super().__init__(
            run_dir, "ppo", model, model, build_byte_tokenizer(), ["p"], proxy=object(), **kwargs
        )
        self.series, self.key = series, key

    def measure(self, step):
        proxy, value = self.series[step]
        point = {"step": step, "proxy": proxy, "kl": step * 0.5, "sqrt_kl": math.sqrt(step * 0.5), "gold": {}}
        if self.key == "gold":
            point["gold"] = {"oracle": value}
        else:
            point |= {"member_spread": value, "member_min": proxy - value}
        return point


OVER = [(0.0, 0.2), (0.3, 0.5), (0.6, 0.6), (0.9, 0.5), (1.2, 0.3), (1.5, 0.1), (1.8, 0.0)]
MONOTONE = [(0.1 * i, 0.1 * i) for i in range(7)]


def test_alarm_fires_once_on_over_optimisation_and_never_on_a_monotone_curve(tmp_path, capsys):
    over = ScriptedRecorder(tmp_path / "over", OVER, window=3)
    for step in range(len(OVER)):
        over.record(step)
    printed = capsys.readouterr().out
    assert printed.count("over-optimisation alarm") == 1 and "at step 4" in printed
    lines = [json.loads(line) for line in (tmp_path / "over" / curves.CURVES).read_text().splitlines()]
    assert [bool(p.get("alarm")) for p in lines] == [False] * 4 + [True] + [False] * 2
    monotone = ScriptedRecorder(tmp_path / "mono", MONOTONE, window=3)
    for step in range(len(MONOTONE)):
        monotone.record(step)
    assert monotone.alarm is None and "alarm" not in capsys.readouterr().out
    spread = ScriptedRecorder(tmp_path / "spread", [(0.1 * i, 0.05 * i) for i in range(5)], key="spread")
    for step in range(5):
        spread.record(step)
    assert spread.alarm and "disagree" in spread.alarm
    resumed = ScriptedRecorder(tmp_path / "over", OVER, window=3)  # a resumed run keeps its points
    assert resumed.record(2) is None and len(resumed.points) == len(OVER) and resumed.alarm == over.alarm


def test_a_point_leaves_trainings_random_stream_where_it_was(tmp_path):
    class Reseeding(ScriptedRecorder):
        def measure(self, step):  # what sampling answers does to the global generator
            torch.manual_seed(self.seed)
            torch.rand(3)
            return super().measure(step)

    recorder = Reseeding(tmp_path, OVER)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    recorder.record(0)
    assert torch.equal(torch.rand(4), want)


def test_stop_at_gold_peak_keeps_the_policy_of_the_step_it_names(tmp_path):
    run = tmp_path / "run"
    recorder = ScriptedRecorder(run, OVER, window=3, keep_peak=True)
    snapshots = {}
    for step in range(len(OVER)):
        with torch.no_grad():
            recorder.policy.lm_head.weight.add_(0.01)  # training moves the policy between points
        snapshots[step] = {k: v.clone() for k, v in recorder.policy.state_dict().items()}
        recorder.record(step)
        if recorder.should_stop():
            break
    assert step == 4  # stopped when the alarm fired
    marker = curves.adopt_peak(recorder, run)
    assert marker["curves"]["gold_peak"]["step"] == 2 and marker["curves"]["gold_peak"]["value"] == 0.6
    kept = load_model(ModelArgs(model_name_or_path=str(run)))
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in snapshots[2].items())
    assert json.loads((run / curves.PEAK_DIR / "curve_point.json").read_text())["step"] == 2


def test_the_stop_is_rank_zeros_decision_on_every_rank(tmp_path, monkeypatch):
    sent = []

    def broadcast(objects, from_process):  # what a rank whose recorder measured nothing receives
        sent.append((list(objects), from_process))
        return [True]

    monkeypatch.setattr(curves, "broadcast_object_list", broadcast)
    other_rank = ScriptedRecorder(tmp_path / "run", OVER, window=3, keep_peak=True)
    assert other_rank.alarm is None and other_rank.should_stop() is True
    assert sent == [([False], 0)]
    assert ScriptedRecorder(tmp_path / "off", OVER, window=3).should_stop() is False and len(sent) == 1


def test_curves_command_writes_the_page_table_and_fits(tmp_path):
    rng = np.random.default_rng(0)
    for name, method, function in (
        ("bon", "best_of_n", curve_report.bon_form),
        ("rl", "ppo", curve_report.rl_form),
    ):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for step, d in enumerate(np.linspace(0, 3, 8)):
            gold = float(function(d, 1.0, 0.4) + rng.normal(0, 0.01))
            point = {
                "step": step,
                "method": method,
                "proxy": float(d),
                "gold": {"oracle": gold},
                "kl": float(d * d),
            }
            greedy = {"gold_greedy": {"oracle": 0.5 * gold}} if name == "rl" else {}
            rows.append(json.dumps({**point, **greedy, "sqrt_kl": float(d), "kl_estimator": "k1"}))
        (folder / curves.CURVES).write_text("\n".join(rows) + "\n")
    result = curve_report.main(
        [str(tmp_path / "bon"), str(tmp_path / "rl"), "--out", str(tmp_path / "report")]
    )
    bon, rl = result["runs"]
    assert bon["fits"]["gold"]["form"] == "d (alpha - beta d)" and rl["fits"]["gold"]["form"].endswith(
        "log d)"
    )
    assert bon["gold_peaks_before_proxy"] and bon["fits"]["gold"]["alpha"] == pytest.approx(1.0, abs=0.1)
    page = (tmp_path / "report" / "curves.html").read_text()
    assert "data:image/png;base64," in page and "KL at gold peak" in page
    assert (
        "greedy" in rl
        and "greedy" not in bon
        and rl["greedy"]["gold_peak"]["step"] == rl["gold_peak"]["step"]
    )
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000
    with pytest.raises(Exception, match="no curves.jsonl"):
        curve_report.main([str(tmp_path), "--out", str(tmp_path / "x")])


def test_perplexity_is_exp_of_the_mean_token_nll(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_gpt2().eval(), build_byte_tokenizer()
    texts = [
        "Hello there, general text.",
        "A longer paragraph of text to score, with more tokens in it.",
        "x y",
    ]
    result = tax.perplexity(model, tokenizer, texts, batch_size=2)
    nll, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean over len-1
        nll, tokens = nll + loss * (len(ids) - 1), tokens + len(ids) - 1
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["log_likelihood"] == pytest.approx(-nll, rel=1e-5)


def test_general_text_files_are_read_and_a_bad_row_is_named(tmp_path):
    txt = tmp_path / "general.txt"
    txt.write_text("First paragraph\nstill first.\n\nSecond one.\n")
    assert tax.read_general_text(txt) == ["First paragraph\nstill first.", "Second one."]
    rows = tmp_path / "general.jsonl"
    rows.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"general\.jsonl:2: no string field 'text'"):
        tax.read_general_text(rows)


def test_alignment_tax_against_the_base(tmp_path):
    tokenizer = build_byte_tokenizer()
    for name, seed in (("base", 0), ("tuned", 1)):
        torch.manual_seed(seed)
        build_tiny_gpt2().save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = [format_prompt("What is 2 plus 3?"), format_prompt("My name is Alice. Please greet me.")]
    answers = {
        "base": ["2 plus 3 is 5.", "Hi"],
        "tuned": ["2 plus 3 is 6.", "Hello, Alice! Nice to meet you."],
    }
    systems = {n: str(tmp_path / n) for n in ("base", "tuned")}
    result = tax.alignment_tax(systems, "base", ["Some general text.", "More of it."], prompts, answers)
    tuned = result["systems"]["tuned"]
    direct = tax.perplexity(
        load_model(ModelArgs(model_name_or_path=systems["tuned"])),
        tokenizer,
        ["Some general text.", "More of it."],
    )
    assert tuned["perplexity"] == pytest.approx(direct["perplexity"])
    base_ppl = result["systems"]["base"]["perplexity"]
    assert tuned["perplexity_change_pct"] == pytest.approx(100 * (tuned["perplexity"] / base_ppl - 1))
    assert tuned["oracle_change"] == {"add": -1.0, "greet": 1.0}
    (line,) = tax.tax_lines(result)
    assert (
        line.startswith("alignment tax, tuned vs base: perplexity on general text")
        and "oracle add -1.000" in line
    )


@pytest.mark.quality  # importing lm-eval (scikit-learn, nltk, ...) and its evaluate() take about a minute here
def test_lm_eval_local_task_runs_offline_and_lands_in_the_report(tmp_path):
    pytest.importorskip("lm_eval")
    from conftest import ASSETS

    folder = tmp_path / "tasks"
    folder.mkdir()
    data = ASSETS / "lm_eval_tiny" / "tiny_task.jsonl"
    yaml_text = (ASSETS / "lm_eval_tiny" / "align_kit_tiny.yaml").read_text().replace("DATA", str(data))
    (folder / "align_kit_tiny.yaml").write_text(yaml_text)
    tokenizer = build_byte_tokenizer()
    for name, seed in (("base", 0), ("tuned", 1)):
        torch.manual_seed(seed)
        build_tiny_gpt2().save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    systems = {n: str(tmp_path / n) for n in ("base", "tuned")}
    result = tax.alignment_tax(
        systems, "base", ["general text"], lm_eval=["align_kit_tiny"], include_path=str(folder)
    )
    for name, path in systems.items():  # accuracy computed directly: the choice of highest log-likelihood
        model = load_model(ModelArgs(model_name_or_path=path)).eval()
        correct = 0
        for row in map(json.loads, data.read_text().splitlines()):
            context = tokenizer(row["question"])["input_ids"]
            scores = [
                sequence_logprob(model, context + tokenizer(" " + c)["input_ids"], len(context))
                for c in row["choices"]
            ]
            correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
        assert result["systems"][name]["lm_eval"]["align_kit_tiny"]["acc,none"] == correct / 4
    change = result["systems"]["tuned"]["lm_eval_change"]["align_kit_tiny"]["acc,none"]
    assert f"lm-eval align_kit_tiny acc,none {change:+.3f}" in tax.tax_lines(result)[0]


def test_dpo_curve_records_the_implicit_reward_as_proxy(micro_model_dir, tmp_path):
    from conftest import tiny_run_args

    out = tmp_path / "dpo"
    argv = tiny_run_args(
        out, model_name_or_path=str(micro_model_dir), max_steps=2, learning_rate=0.01, beta=0.5, curve_steps=1,
        curve_prompts=4, curve_max_new_tokens=6,
    )  # fmt: skip
    tensorboard = (
        importlib.util.find_spec("tensorboard") is not None
    )  # not a dependency: checked where installed
    if tensorboard:
        argv[argv.index("--report_to") + 1] = "tensorboard"
    load_recipe("dpo").main(argv)
    points = [json.loads(line) for line in (out / curves.CURVES).read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2] and points[0]["proxy_kind"] == "implicit_reward"
    assert all(p["proxy"] == pytest.approx(0.5 * p["kl"]) for p in points) and points[-1]["kl"] != 0.0
    assert json.loads((out / "run_complete.json").read_text())["curves"]["points"] == 3
    if tensorboard:  # the points reached the tracker too, offline
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = {p.parent for p in out.rglob("events.out.tfevents.*")}
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        proxy = accumulator.Scalars("train/curves/proxy")
        assert [e.value for e in proxy] == pytest.approx([p["proxy"] for p in points], rel=1e-5)


@pytest.mark.quality  # a whole evaluation (judge audits included): 80 s on this shared machine
def test_evaluation_reports_the_tax_beside_the_win_rates(tmp_path):
    from align_kit.evaluation.pipeline import evaluate_systems

    tokenizer = build_byte_tokenizer()
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        build_tiny_gpt2().save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    systems = {name: str(tmp_path / name) for name in ("a", "b")}
    small = {"embedded_train_size": 30, "embedded_test_size": 20, "n_prompts": 6, "max_new_tokens": 4}
    small |= {"n_honeypots": 0, "n_human": 0, "n_boot": 50, "progress": False}
    result = evaluate_systems(systems, "a", ["oracle"], tmp_path / "eval", tax_text="embedded", **small)
    b = result["tax"]["systems"]["b"]
    assert result["tax"]["n_texts"] == 6 and set(b["oracle_by_family"]) <= {"add", "greet", "harm"}
    assert any(n.startswith("alignment tax, b vs a: perplexity on general text") for n in result["notes"])
    report = (tmp_path / "eval" / "oracle" / "report.md").read_text()
    assert "alignment tax, b vs a" in report
