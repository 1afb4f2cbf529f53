"""Protects the promise that a user's mistake gets one clear line, never a traceback or a silent run.

Every case of the corpus under tests/assets/bad/ (a YAML file whose header names the recipe, the kind of
mistake and the expected text), every command-line mistake and every run-folder mistake below goes through a
recipe's ``main()`` and must raise one of ``console.USER_MISTAKES`` whose first line holds the expected text
and, for a setting from a file, names the file and line; nearly all are refused before the run folder is
made or any model loads. ``console.exit_status`` turns them into one line on stderr and status 2, lets a bug
keep its traceback, and ``ALIGN_KIT_DEBUG=1`` shows every traceback; a subprocess checks the real commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS, ROOT, load_recipe

from align_kit import configs, console, parsing
from align_kit.training import guards, runs

CORPUS = sorted((ASSETS / "bad").glob("*.yaml"))
CPU = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none"]
TINY = ["--dataset", "embedded", "--embedded_train_size", "16", "--embedded_test_size", "8", *CPU]


def header(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^# (\w+): (.*)$", path.read_bytes().decode("utf-8", "replace"), re.M))


def refusal(recipe: str, argv: list[str]) -> str:
    """The first line of the user's-mistake error that ``recipe.main(argv)`` raises."""
    with pytest.raises(console.USER_MISTAKES) as caught:
        load_recipe(recipe).main(argv)
    return str(caught.value).splitlines()[0]


def test_the_corpus_has_at_least_40_kinds_of_mistake():
    assert len(CORPUS) >= 40
    assert all({"recipe", "kind", "expect"} <= set(header(p)) for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_a_bad_config_gets_one_line_naming_the_setting_and_the_file(path, tmp_path, tiny_reward_dir):
    case = header(path)
    config = tmp_path / path.name
    config.write_bytes(path.read_bytes().replace(b"@REWARD@", str(tiny_reward_dir).encode()))
    out = tmp_path / "out"
    line = refusal(case["recipe"], ["--config", str(config), "--output_dir", str(out)])
    assert case["expect"] in line
    if case.get("names_file") != "no":
        assert line.startswith(str(config)), line
    if case.get("before_run_folder") != "no":
        assert not out.exists()  # refused before anything was written


CLI_CASES = {
    "float for an integer": ("sft", ["--max_steps", "2.5"], "command line: --max_steps must be an integer, got '2.5'"),
    "word for a boolean": ("sft", ["--use_cpu", "maybe"], "command line: argument --use_cpu/--use-cpu: Truthy value"),
    "unknown choice": ("dpo", ["--adapter", "lora"], "command line: argument --adapter: invalid choice: 'lora'"),
    "unknown argument": ("sft", ["--lerning_rate", "0.1"], "command line: unknown argument(s) ['--lerning_rate', '0.1']"),
    "abbreviated option": ("sft", ["--learning_rat", "0.1"], "command line: unknown argument(s) ['--learning_rat', '0.1']"),
    "beta 0 on the command line": ("dpo", ["--beta", "0"], "command line: beta: 0.0 must be above 0"),
    "evaluation off under a file's early stopping": (
        "sft", ["--config", "sft_gpt2_hh", "--eval_strategy", "no"],
        "sft_gpt2_hh.yaml:27: early_stopping_patience: 3 stops on evaluations and load_best_model_at_end: true",
    ),
    "missing config file": ("sft", ["--config", "no_such_config.yaml"], "--config: no config 'no_such_config.yaml'"),
    "config flag without a file": ("sft", ["--config"], "command line: --config needs a file or a shipped config name"),
    "shipped DPO config before SFT ran": (
        "dpo", ["--config", "dpo_tiny"], "model_name_or_path: no such folder runs/demo/sft (an align-kit run folder: run sft first)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=str)
def test_a_bad_command_line_gets_one_line(case, tmp_path, monkeypatch):
    recipe, argv, expect = CLI_CASES[case]
    monkeypatch.chdir(tmp_path)  # runs/demo/sft does not exist here
    out = tmp_path / "out"
    line = refusal(recipe, ["--output_dir", str(out), *TINY, "--max_steps", "1", *argv])  # quick if accepted
    assert expect in line
    assert not out.exists()


def unfinished_run(tmp_path: Path) -> list[str]:
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / runs.RUN_CONFIG).write_text("{}")
    return ["--model_name_or_path", str(tmp_path / "sft")]


def weights_file(tmp_path: Path) -> list[str]:
    (tmp_path / "gpt2.safetensors").write_bytes(b"not really weights")
    return ["--model_name_or_path", str(tmp_path / "gpt2.safetensors")]


def output_dir_is_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "out").write_text("a file")
    return []


def output_dir_below_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "out").write_text("a file")
    return ["--output_dir", str(tmp_path / "out" / "sft")]


def finished_run(tmp_path: Path) -> list[str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / runs.COMPLETE).write_text("{}")
    return []


def interrupted_ppo(tmp_path: Path) -> list[str]:
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / runs.TRAINER_STATE_NAME).write_text("{}")
    return []


def interrupted_with_other_settings(tmp_path: Path) -> list[str]:
    """An SFT folder killed after checkpoint-2, started with learning_rate 1e-3 and max_steps 4."""
    module = load_recipe("sft")
    *parsed, args = parsing.parse(
        module.CONFIG,
        ["--output_dir", str(tmp_path / "out"), "--learning_rate", "1e-3", "--max_steps", "4", *TINY],
    )
    interrupted_ppo(tmp_path)
    parsing.save_resolved(str(tmp_path / "out" / runs.RUN_CONFIG), *parsed, args)
    return ["--learning_rate", "2e-3", "--max_steps", "8"]


FOLDER_CASES = {
    "model folder of an unfinished run": ("sft", unfinished_run, "is an unfinished align-kit run (no run_complete.json)"),
    "weights file as model folder": ("sft", weights_file, "is a weights file, not a model folder: set weights_file"),
    "output_dir is a file": ("sft", output_dir_is_a_file, "is a file, not a folder"),
    "output_dir below a file": ("dpo", output_dir_below_a_file, "is a file, not a folder"),
    "output_dir holds a finished run": ("sft", finished_run, "already holds a finished run (run_complete.json)"),
    "PPO folder with a checkpoint": (
        "ppo", interrupted_ppo, "holds checkpoint-2 of an interrupted run, and TRL 1.12's PPOTrainer cannot resume",
    ),
    "resume with changed settings": (
        "sft", interrupted_with_other_settings,
        "started with other settings (learning_rate: 0.001 -> 0.002; max_steps: 4 -> 8)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FOLDER_CASES, ids=str)
def test_a_run_folder_mistake_gets_one_line_and_changes_nothing(case, tmp_path, tiny_reward_dir):
    recipe, setup, expect = FOLDER_CASES[case]
    extra = setup(tmp_path)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    argv = ["--output_dir", str(tmp_path / "out"), *TINY, *extra]
    if recipe == "ppo":
        argv += ["--model_name_or_path", "tiny-gpt2", "--reward_models", str(tiny_reward_dir)]
    assert expect in refusal(recipe, argv)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_exit_status_prints_one_line_for_a_mistake_and_keeps_a_bugs_traceback(capsys, monkeypatch):
    def mistake():
        raise configs.ConfigError("x.yaml:3: beta: 0.0 must be above 0\nsecond line")

    def diverged():
        raise guards.TrainingDiverged("training diverged: loss is nan at step 3")

    assert console.exit_status(mistake) == console.EXIT_MISTAKE == 2
    assert capsys.readouterr().err == "align-kit: x.yaml:3: beta: 0.0 must be above 0 second line\n"
    assert console.exit_status(diverged) == console.EXIT_DIVERGED == 3
    assert capsys.readouterr().err == "align-kit: training diverged: loss is nan at step 3\n"
    assert console.exit_status(lambda: {"metrics": 1}) == 0 and console.exit_status(lambda: 2) == 2
    with pytest.raises(ZeroDivisionError):
        console.exit_status(lambda: 1 / 0)  # a bug is no user's mistake: its traceback stays
    monkeypatch.setenv("ALIGN_KIT_DEBUG", "1")
    with pytest.raises(configs.ConfigError):
        console.exit_status(mistake)


@pytest.mark.slow
def test_the_commands_print_one_line_without_traceback_and_debug_shows_it(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_steps: 2.5\n")
    env = {**os.environ, "ALIGN_KIT_DEBUG": "0"}
    commands = {
        "recipe": ([sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", str(config)], env),
        "debug": ([sys.executable, "-m", "align_kit.cli", "sft", "--config", str(config)], {**env, "ALIGN_KIT_DEBUG": "1"}),
    }  # fmt: skip
    started = {
        name: subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (cmd, e) in commands.items()
    }
    done = {name: (p.wait(timeout=300), p.stderr.read()) for name, p in started.items()}
    status, err = done["recipe"]
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"align-kit: {config}:1: max_steps must be an integer, got 2.5"
    status, err = done["debug"]
    assert status == 1 and "Traceback" in err and "ConfigError" in err


def test_parse_records_where_each_setting_came_from():
    """What runs.start names when it refuses a setting after parsing (a model folder that does not exist)."""
    module = load_recipe("dpo")
    path = ROOT / "recipes" / "configs" / "dpo_tiny.yaml"
    *_, args = parsing.parse(module.CONFIG, ["--config", str(path), "--beta", "0.2"])
    lines = path.read_text().splitlines()
    where = parsing.setting_source(args, "learning_rate")
    assert where.startswith(f"{path}:") and lines[int(where.rsplit(":", 1)[1]) - 1].startswith(
        "learning_rate:"
    )
    assert parsing.setting_source(args, "beta") == "command line" and args.beta == 0.2
    assert parsing.setting_source(args, "hub_model_id") == str(path)  # a default: the file's run
    assert parsing.SOURCES not in parsing.to_dict(args)  # not a setting: never saved
