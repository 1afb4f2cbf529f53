"""Protects the DPO loss family and KTO, run through their recipes on a one-layer GPT-2:

- at step 0 the policy equals its reference, so every log-ratio is 0 and each of TRL's 15 ``loss_type``
  values (alone, combined with ``loss_weights``, under an f-divergence) logs the value its formula gives at 0;
- settings that make a loss infinite, constant or silently ignored fail when the config is parsed, naming
  the setting;
- a user-defined ``loss_function`` written as DPO's formula reproduces TRL's sigmoid loss bit for bit (losses,
  rewards and weights), works against the adapter-off reference and with two processes, and broken ones
  (missing, wrong shape, non-finite, no gradient) are refused in one line;
- KTO reads unpaired rows with counted drops, and starts at 1 - sigmoid(0) = 0.5 per answer times its weight;
  its recipe on chunked log-probabilities (the default) logs what TRL's path logs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_recipe, recipe_argv, tiny_run_args

from align_kit.configs import DataArgs, ModelArgs
from align_kit.data.loading import load_preferences, load_unpaired, to_unpaired
from align_kit.models.loading import load_model, load_tokenizer
from align_kit.parsing import parse
from align_kit.training.losses import LossFunctionError, split_output

pytestmark = pytest.mark.usefixtures("one_thread_and_a_frozen_heap")

BETA = 0.25
N_PAIRS = 6  # every training pair fits in the first batch, so its loss is over known rows
USER = str(ROOT / "tests" / "assets" / "user_losses.py")
LN2 = math.log(2)


def run_args(out, micro_model_dir, *extra: str, **overrides) -> list[str]:
    values = {
        "model_name_or_path": micro_model_dir,
        "max_steps": 1,
        "embedded_train_size": N_PAIRS,
        "embedded_test_size": 4,
        "per_device_train_batch_size": 2 * N_PAIRS,
        "max_length": 160,
        "beta": BETA,
        **overrides,
    }
    return tiny_run_args(out, **values) + list(extra)


def first_step(metrics: dict) -> dict:
    return next(entry for entry in metrics["log_history"] if "loss" in entry)


def training_rows() -> list[dict]:
    splits, _ = load_preferences(DataArgs(embedded_train_size=N_PAIRS, embedded_test_size=4))
    return splits["train"]


@torch.no_grad()
def chosen_token_nll(micro_model_dir) -> float:
    """Mean cross-entropy of the chosen answers' tokens (answer + EOS) given their prompts: TRL's sft term."""
    model, tokenizer = (
        load_model(ModelArgs(model_name_or_path=str(micro_model_dir))),
        load_tokenizer(str(micro_model_dir)),
    )
    total, count = 0.0, 0
    for row in training_rows():
        prompt = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, V): logits[t] predicts ids[t+1]
        total += F.cross_entropy(logits[len(prompt) - 1 :], torch.tensor(ids[len(prompt) :]), reduction="sum")
        count += len(ids) - len(prompt)
    return float(total / count)


# Each loss of TRL 1.12 (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss) at step 0, where the policy is
# the reference: every log-ratio h is 0, so delta = h_w - h_l = 0 and sigma(0) = 1/2.
# (name, extra settings, value as a function of beta and the sft term's cross-entropy)
STEP0 = [
    ("sigmoid", {}, lambda b, nll: LN2),  # -log sigma(beta delta) (DPO, Eq. 7)
    ("hinge", {}, lambda b, nll: 1.0),  # relu(1 - beta delta) (SLiC)
    ("ipo", {}, lambda b, nll: 1 / (2 * b) ** 2),  # (delta/|y| - 1/(2 beta))^2 (IPO, Eq. 17)
    # sigma(bd)(log sigma(bd) - log(1-e)) + sigma(-bd)(log sigma(-bd) - log e) (EXO, Eq. 16)
    ("exo_pair", {"label_smoothing": 1e-3}, lambda b, nll: -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),
    ("nca_pair", {}, lambda b, nll: 2 * LN2),  # -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)
    ("robust", {"label_smoothing": 0.1}, lambda b, nll: LN2),  # ((1-e) - e) ln 2 / (1 - 2e)
    ("bco_pair", {}, lambda b, nll: 2 * LN2),  # -log sigma(r_w) - log sigma(-r_l)
    ("sppo_hard", {}, lambda b, nll: 2 / (2 * b) ** 2),  # (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2
    ("aot", {"label_smoothing": 0.2}, lambda b, nll: LN2),  # sorted deltas are all 0: (1-e) ln 2 + e ln 2
    ("aot_unpaired", {}, lambda b, nll: LN2),
    ("apo_zero", {}, lambda b, nll: 1.0),  # (1 - sigma(beta h_w)) + sigma(beta h_l) (APO, Eq. 7)
    ("apo_down", {}, lambda b, nll: 1.0),  # sigma(beta h_w) + 1 - sigma(beta delta) (APO, Eq. 8)
    (
        "discopop",
        {},
        lambda b, nll: (LN2 + 1) / 2,
    ),  # (1 - s) ln 2 + s e^0 with s = sigma(0/tau) (DiscoPOP, Eq. 5)
    ("sft", {}, lambda b, nll: nll),  # cross-entropy of the chosen answers: no log-ratio in it
    ("sigmoid_norm", {}, lambda b, nll: LN2),  # -log sigma(beta delta/|y|)
]


def expected_step0(types: list[str], weights: list[float], beta: float, nll: float) -> float:
    values = {name: value for name, _, value in STEP0}
    return sum(w * values[t](beta, nll) for t, w in zip(types, weights, strict=True))


@pytest.fixture(scope="module")
def nll(micro_model_dir) -> float:
    return chosen_token_nll(micro_model_dir)


def test_the_table_covers_every_trl_loss_type():
    from align_kit.training.losses import DPO_LOSS_TYPES

    assert [name for name, _, _ in STEP0] == list(DPO_LOSS_TYPES)


CASES = [pytest.param([name], None, settings, id=name) for name, settings, _ in STEP0] + [
    pytest.param(["sigmoid", "ipo", "hinge"], [0.5, 2.0, 1.0], {}, id="sigmoid+ipo+hinge weighted"),
    pytest.param(["sigmoid", "sft"], [1.0, 0.3], {}, id="sigmoid+sft (RPO-style)"),
    pytest.param(["apo_zero", "bco_pair"], None, {}, id="apo_zero+bco_pair default weights"),
    pytest.param(["sigmoid"], None, {"f_divergence_type": "js_divergence"}, id="sigmoid, JS divergence"),
    pytest.param(
        ["ipo", "discopop"], [1.0, 0.5], {"f_divergence_type": "alpha_divergence"}, id="ipo+discopop, alpha"
    ),
]


@pytest.mark.parametrize(("types", "weights", "settings"), CASES)
def test_step0_loss_equals_its_analytic_value(micro_model_dir, nll, tmp_path, types, weights, settings):
    extra = ["--loss_type", *types] + (["--loss_weights", *map(str, weights)] if weights else [])
    metrics = load_recipe("dpo").main(run_args(tmp_path / "run", micro_model_dir, *extra, **settings))
    step = first_step(metrics)
    expected = expected_step0(types, weights or [1.0] * len(types), BETA, nll)
    assert step["loss"] == pytest.approx(expected, rel=1e-5)
    assert step["rewards/margins"] == 0.0  # the policy is its reference, bit for bit


def parse_dpo(*argv: str):
    return parse(load_recipe("dpo").CONFIG, [*argv, "--output_dir", "unused", "--use_cpu", "true"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss_type", "exo_pair"], r"exo_pair needs 0 < label_smoothing < 0.5, got 0.0: EXO takes log"),
        (["--loss_type", "exo_pair", "--label_smoothing", "0.5"], "label_smoothing"),
        (
            ["--loss_type", "sigmoid", "ipo", "--loss_weights", "1.0"],
            r"loss_weights=\[1.0\]: 1 weight\(s\) for 2",
        ),
        (["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "-1"], "loss_weights=.*>= 0"),
        (["--loss_type", "sigmoid", "--loss_weights", "0"], "not all 0"),
        (["--beta", "0"], "beta: 0.0 must be above 0"),
        (["--beta", "-0.1", "--loss_type", "ipo"], "beta: -0.1"),
        (["--loss_type", "dpo"], r"loss_type: unknown \['dpo'\]"),
        (["--loss_type", "robust", "--label_smoothing", "0.5"], r"label_smoothing=0.5.*\[0, 0.5\)"),
        (["--loss_type", "sigmoid", "--label_smoothing", "0.1"], "label_smoothing=0.1 has no effect"),
        (["--loss_type", "discopop", "--discopop_tau", "0"], "discopop_tau=0.0"),
        (
            ["--loss_type", "bco_pair", "--f_divergence_type", "js_divergence"],
            "f_divergence_type='js_divergence'",
        ),
        (["--ld_alpha", "1.5"], r"ld_alpha=1.5: must lie in \[0, 1\]"),
        (["--loss_type", "aot", "--use_weighting", "true"], "use_weighting"),
        (["--loss_function", f"{USER}:dpo_sigmoid", "--loss_type", "sigmoid"], "loss_type would be ignored"),
        (["--loss_function", f"{USER}:dpo_sigmoid", "--label_smoothing", "0.1"], "label_smoothing would be"),
        (["--loss_function", f"{USER}:dpo_sigmoid", "--beta", "0"], "beta: 0.0"),
    ],
)
def test_meaningless_settings_fail_at_parse_time_naming_the_setting(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_dpo(*argv)


def test_a_yaml_with_exo_pair_and_no_label_smoothing_fails_when_parsed(tmp_path):
    path = tmp_path / "exo.yaml"
    path.write_text("output_dir: unused\nuse_cpu: true\nloss_type: [exo_pair]\n")
    with pytest.raises(ValueError, match="label_smoothing"):
        parse(load_recipe("dpo").CONFIG, ["--config", str(path)])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package.losses:f", "cannot import module 'no_such_package.losses'"),
        (str(ROOT / "tests" / "assets" / "missing.py:f"), "no such file .*missing.py"),
        (f"{USER}:nope", "has no function 'nope'"),
        (f"{USER}:not_a_function", "has no function 'not_a_function'"),
        (f"{USER}", "expected 'package.module:function'"),
        (f"{USER}:batch_mean", r"losses has shape \(\); expected one value per pair, \(4,\)"),
        (f"{USER}:log_of_zero", r"returned a non-finite loss \(inf\)"),
        (f"{USER}:constant", "its losses have no gradient"),
        (f"{USER}:zero_gradient", "gradient with respect to the policy's log-probabilities is zero"),
        ("torch.nn.functional:logsigmoid", "raised TypeError"),
    ],
)
def test_broken_loss_functions_are_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as error:  # parse's ConfigError, from LossFunctionError
        parse_dpo("--loss_function", spec)
    assert "\n" not in str(error.value) and spec in str(error.value)


def test_a_module_path_loss_function_is_accepted(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "assets"))
    args = parse_dpo("--loss_function", "user_losses:dpo_sigmoid")[-1]
    assert args.loss_function == "user_losses:dpo_sigmoid" and args.loss_type == []


def test_output_of_a_loss_function_is_split_and_checked():
    losses = torch.ones(3)
    assert split_output("f", losses, 3) == (losses, None, None)
    _, chosen, rejected = split_output("f", (losses, torch.zeros(3), -torch.ones(3)), 3)
    assert chosen.tolist() == [0.0] * 3 and rejected.tolist() == [-1.0] * 3
    with pytest.raises(LossFunctionError, match="a tuple of 2"):
        split_output("f", (losses, losses), 3)
    with pytest.raises(LossFunctionError, match=r"chosen_rewards has shape \(3, 1\)"):
        split_output("f", (losses, torch.zeros(3, 1), losses), 3)
    with pytest.raises(LossFunctionError, match="non-finite loss \\(nan\\)"):
        split_output("f", torch.tensor([1.0, float("nan"), 2.0]), 3)


@pytest.fixture(scope="module")
def sigmoid_three_ways(micro_model_dir, tmp_path_factory):
    """Two steps at a real learning rate: TRL's sigmoid, the same formula as a loss_function, and that
    formula returning its own rewards (twice DPO's)."""
    out = tmp_path_factory.mktemp("three")
    runs = {}
    for name, extra in [
        ("trl", ["--loss_type", "sigmoid"]),
        ("user", ["--loss_function", f"{USER}:dpo_sigmoid"]),
        ("rewards", ["--loss_function", f"{USER}:dpo_with_rewards"]),
    ]:
        args = run_args(
            out / name,
            micro_model_dir,
            *extra,
            max_steps=2,
            learning_rate=1e-2,
            per_device_train_batch_size=4,
        )
        runs[name] = load_recipe("dpo").main(args)
    return out, runs


def weights(folder) -> dict[str, torch.Tensor]:
    return load_model(ModelArgs(model_name_or_path=str(folder))).state_dict()


def test_dpo_formula_as_a_loss_function_reproduces_trls_sigmoid_exactly(sigmoid_three_ways, micro_model_dir):
    out, runs = sigmoid_three_ways
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    keys += ["logps/chosen", "logps/rejected"]
    trl_steps = [{k: e[k] for k in keys} for e in runs["trl"]["log_history"] if "loss" in e]
    user_steps = [{k: e[k] for k in keys} for e in runs["user"]["log_history"] if "loss" in e]
    assert len(trl_steps) == 2 and trl_steps == user_steps
    assert trl_steps[1]["loss"] != trl_steps[0]["loss"]  # the first step changed the policy
    trained, user, start = weights(out / "trl"), weights(out / "user"), weights(micro_model_dir)
    assert all(torch.equal(trained[k], user[k]) for k in trained)
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-3


def test_rewards_returned_by_a_loss_function_are_the_ones_logged(sigmoid_three_ways):
    _, runs = sigmoid_three_ways
    trl, own = (next(e for e in runs[n]["log_history"][1:] if "loss" in e) for n in ("trl", "rewards"))
    assert trl["loss"] == own["loss"]
    assert own["rewards/chosen"] == pytest.approx(2 * trl["rewards/chosen"], rel=1e-5)
    assert own["rewards/margins"] == pytest.approx(2 * trl["rewards/margins"], rel=1e-5)
    assert abs(trl["rewards/margins"]) > 0


def test_a_loss_function_against_the_adapter_off_reference(micro_model_dir, tmp_path):
    args = run_args(
        tmp_path / "adapted", micro_model_dir, "--loss_function", f"{USER}:dpo_sigmoid",
        max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4, adapter="residual", adapter_rank=4,
    )  # fmt: skip
    metrics = load_recipe("dpo").main(args)
    steps = [e for e in metrics["log_history"] if "loss" in e]
    assert steps[0]["loss"] == pytest.approx(LN2, abs=1e-6) and steps[0]["rewards/margins"] == 0.0
    assert steps[1]["rewards/margins"] != 0.0  # the reference stayed put while the adapter moved
    config = json.loads((tmp_path / "adapted" / "run_config.json").read_text())
    assert config["loss_function"] == f"{USER}:dpo_sigmoid" and config["loss_type"] == []
    assert (tmp_path / "adapted" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_loss_function_on_two_processes_equals_one_process(micro_model_dir, tmp_path, align_kit_home):
    from test_multiprocess import launch_two_processes, losses

    # a full batch (all pairs) per step, so both runs see the same rows whatever the sampler and sharding
    common = {"learning_rate": 1e-2, "max_steps": 2}
    spec = ["--loss_function", f"{USER}:dpo_sigmoid"]
    two = run_args(
        tmp_path / "two", micro_model_dir, *spec, per_device_train_batch_size=N_PAIRS // 2, **common
    )
    launch_two_processes("dpo", [*two, "--ddp_find_unused_parameters", "false"], tmp_path, align_kit_home)
    one = load_recipe("dpo").main(
        run_args(tmp_path / "one", micro_model_dir, *spec, per_device_train_batch_size=N_PAIRS, **common)
    )
    two_history = json.loads((tmp_path / "two" / "metrics.json").read_text())["log_history"]
    two_steps, one_steps = losses(two_history), losses(one["log_history"])
    assert len(two_steps) == 2 and two_steps[1]["rewards/margins"] != 0.0
    for a, b in zip(two_steps, one_steps, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# KTO


def write_unpaired(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_unpaired_rows_are_read_with_counted_drops(tmp_path):
    good = [
        {"prompt": "What is 2 + 2?", "completion": "4.", "label": True},
        {"prompt": "What is 2 + 2?", "completion": "5.", "label": 0},
        {"prompt": "Greet me.", "completion": "Hello!", "label": 1},
    ]
    bad = [
        {"prompt": "Greet me.", "completion": "Hello!", "label": 1},  # duplicate
        {"prompt": "Hi", "completion": "", "label": True},
        {"prompt": "Hi", "completion": "Hey", "label": "yes"},
        {"prompt": "Hi", "completion": None, "label": False},
        {"prompt": "Hi", "completion": "Hey", "label": 2},
    ]
    write_unpaired(tmp_path / "train.jsonl", good + bad)
    args = DataArgs(dataset=str(tmp_path / "train.jsonl"), dataset_format="unpaired", test_size=0.3)
    splits, counts = load_unpaired(args)
    rows = splits["train"] + splits["test"]
    assert sorted((r["completion"], r["label"]) for r in rows) == [
        (" 4.", True),
        (" 5.", False),
        (" Hello!", True),
    ]
    assert all(r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert counts.dropped["train"] == {"duplicate": 1, "empty_answer": 1, "bad_label": 2, "not_text": 1}
    located = {(e["reason"], e["row"], e["field"]) for e in counts.examples}
    assert {
        ("bad_label", 5, "label"),
        ("not_text", 6, "completion"),
        ("empty_answer", 4, "completion"),
    } <= located
    assert {e["file"] for e in counts.examples} == {str(tmp_path / "train.jsonl")}


def test_unpaired_file_missing_the_label_column_names_it(tmp_path):
    from align_kit.data.formats import DataError

    write_unpaired(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"x.jsonl: missing column\(s\) \['label'\]"):
        load_unpaired(DataArgs(dataset=str(tmp_path / "x.jsonl"), dataset_format="unpaired"))


def test_preference_pairs_become_one_desirable_and_one_undesirable_row_each():
    rows = training_rows()
    unpaired = to_unpaired(rows, seed=0)
    assert len(unpaired) == 2 * len(rows) and sum(r["label"] for r in unpaired) == len(rows)
    assert {(r["prompt"], r["completion"]) for r in unpaired if r["label"]} == {
        (r["prompt"], r["chosen"]) for r in rows
    }
    assert {(r["prompt"], r["completion"]) for r in unpaired if not r["label"]} == {
        (r["prompt"], r["rejected"]) for r in rows
    }
    assert unpaired == to_unpaired(rows, seed=0) and unpaired != to_unpaired(rows, seed=1)


@pytest.mark.parametrize(
    ("loss_type", "desirable_weight"), [("kto", 1.0), ("kto", 3.0), ("apo_zero_unpaired", 1.0)]
)
def test_kto_step0_loss_is_half_the_weight_of_each_answer(
    micro_model_dir, tmp_path, loss_type, desirable_weight
):
    """KTO (Ethayarajh et al. 2024, Eq. 7, TRL's KTOTrainer): 1 - sigma(beta (h - z)) for a desirable answer and
    1 - sigma(beta (z - h)) for an undesirable one, h the log-ratio and z the KL estimate, both 0 at step 0;
    apo_zero_unpaired: 1 - sigma(beta h) and sigma(beta h). Either way 1/2 per answer, times its weight,
    averaged over the first batch (read in order: KTO samples sequentially)."""
    batch = 4
    args = run_args(
        tmp_path / "kto", micro_model_dir, max_steps=1, per_device_train_batch_size=batch, loss_type=loss_type,
        desirable_weight=desirable_weight, learning_rate=1e-2,
    )  # fmt: skip
    metrics = load_recipe("kto").main(args)
    first = to_unpaired(training_rows(), seed=0)[:batch]
    n_desirable = sum(r["label"] for r in first)
    assert 0 < n_desirable < batch  # both halves of the loss are exercised
    expected = 0.5 * (desirable_weight * n_desirable + (batch - n_desirable)) / batch
    step = first_step(metrics)
    assert step["loss"] == pytest.approx(expected, rel=1e-6)
    assert step["rewards/margins"] == 0.0


def test_kto_recipe_trains_on_unpaired_rows_and_writes_the_run(micro_model_dir, tmp_path):
    rows = [
        {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
        for r in training_rows()
        for key in ("rejected", "chosen")
    ]
    write_unpaired(tmp_path / "train.jsonl", rows)
    out = tmp_path / "kto"
    args = run_args(
        out, micro_model_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, dataset=tmp_path / "train.jsonl",
        dataset_format="unpaired", test_size=0.25,
    )  # fmt: skip
    metrics = load_recipe("kto").main(args)
    steps = [e for e in metrics["log_history"] if "loss" in e]
    assert len(steps) == 3 and all(math.isfinite(s["loss"]) for s in steps)
    assert steps[-1]["rewards/margins"] != 0.0
    start, trained = weights(micro_model_dir), weights(out)
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for name in (
        "run_config.json",
        "data_counts.json",
        "metrics.json",
        "run_complete.json",
        "model.safetensors",
    ):
        assert (out / name).exists()
    counts = json.loads((out / "data_counts.json").read_text())
    assert counts["kept"]["train"] + counts["kept"]["test"] == len(rows)


def test_kto_with_a_new_adapter_uses_the_adapter_off_reference(micro_model_dir, tmp_path):
    """KTOTrainer takes ref_model like DPOTrainer: the adapter-off view of the policy is the starting model,
    so step 0 is 1/2 exactly, and the reference stays put while the adapter trains."""
    args = run_args(
        tmp_path / "kto", micro_model_dir, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        adapter="residual", adapter_rank=4,
    )  # fmt: skip
    steps = [e for e in load_recipe("kto").main(args)["log_history"] if "loss" in e]
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-7) and steps[0]["kl"] == 0.0
    assert steps[1]["rewards/chosen"] != 0.0
    assert (tmp_path / "kto" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "kto" / "model.safetensors").exists()  # only the adapter was trained and saved


def test_kto_recipe_on_chunked_logprobs_logs_what_trls_path_logs(micro_model_dir, tmp_path, capsys):
    """kto_tiny.yaml cut to two steps and one evaluation: the default chunked path and ``logprob_chunk_size: 0``
    (TRL's own ``_compute_loss``) log the same loss and metrics at each step, the second one after a real
    update, and in the evaluation."""
    logged = {}
    for chunk in (0, 1024):
        argv = [
            "--config",
            str(ROOT / "recipes" / "configs" / "kto_tiny.yaml"),
            "--logprob_chunk_size",
            str(chunk),
        ]
        argv += recipe_argv({
            "model_name_or_path": micro_model_dir, "output_dir": tmp_path / str(chunk), "embedded_train_size": N_PAIRS,
            "embedded_test_size": 4, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
            "warmup_steps": 0, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no",
        })  # fmt: skip
        history = load_recipe("kto").main(argv)["log_history"]
        logged[chunk] = [e for e in history if "loss" in e or "eval_loss" in e]
    assert "logprob_chunk_size" not in capsys.readouterr().out  # no fallback line: the chunked path ran
    assert len(logged[0]) == 3 and logged[0][0]["loss"] == pytest.approx(0.5, abs=1e-7)
    assert logged[0][2]["eval_loss"] != pytest.approx(0.5, abs=1e-4)
    assert logged[0][1]["loss"] != pytest.approx(0.5, abs=1e-4) and logged[0][1]["rewards/margins"] != 0.0
    for trl_step, chunked_step in zip(logged[0], logged[1024], strict=True):
        assert set(chunked_step) == set(trl_step)
        for name, value in trl_step.items():
            if name.endswith(("_runtime", "_per_second")):
                continue
            # rewards/* are beta (0.1) times a difference of two answer sums near 200 nats, whose float32
            # spacing is 1.5e-5: the paths' rounding of those sums, not of the reward, sets the tolerance
            slack = 0.1 * 2 * 1.5e-5 if "rewards/" in name else 1e-7
            assert chunked_step[name] == pytest.approx(value, rel=1e-5, abs=slack), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--beta", "0"], "beta: 0.0"),
        (["--desirable_weight", "0"], "desirable_weight=0.0: must be > 0"),
        (["--undesirable_weight", "-1"], "undesirable_weight=-1.0"),
    ],
)
def test_kto_settings_that_make_the_loss_constant_fail_when_parsed(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(load_recipe("kto").CONFIG, [*argv, "--output_dir", "unused", "--use_cpu", "true"])


def test_a_field_equals_value_error_names_its_file_and_line(tmp_path):
    """``loss_weights=[1.0]: ...`` starts with no bare setting name: parse reads the error's field, not its text."""
    from align_kit.configs import ConfigError

    config = tmp_path / "dpo.yaml"
    config.write_text("output_dir: unused\nuse_cpu: true\nloss_type: [sigmoid, ipo]\nloss_weights: [1.0]\n")
    with pytest.raises(
        ConfigError, match=rf"^{config}:4: loss_weights=\[1.0\]: 1 weight\(s\) for 2"
    ) as caught:
        parse(load_recipe("dpo").CONFIG, ["--config", str(config)])
    assert caught.value.field == "loss_weights"
    with pytest.raises(ConfigError, match=r"^command line: loss_weights=\[1.0\]"):
        parse(load_recipe("dpo").CONFIG, ["--config", str(config), "--loss_weights", "1.0"])
