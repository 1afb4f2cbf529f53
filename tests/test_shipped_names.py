"""Protects shipped config names in every subcommand: ``align-kit <command> --config <name>`` (``dpo_tiny``,
``loss_sweep_tiny``, ``embedded``) loads that shipped file from any folder, and every command that reads the
config after parsing reads the file parse resolved, not the name it was given (the loss sweep once failed
with FileNotFoundError: 'loss_sweep_tiny'). Each command stops with a sentinel right after its config is
loaded, so no data, model or judge loads."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from align_kit import cli
from align_kit.evaluation import pipeline
from align_kit.loss_lab import sweep as loss_sweep
from align_kit.parsing import config_file
from align_kit.training import runs

HEADER = re.compile(r"^# (?:accelerate launch|python) (?:--config_file \S+ )?(\w+/\w+)\.py --config (\S+)")
NO_CONFIG = {"leaderboard", "demo", "curves"}  # their own argparse options, no --config


class Loaded(Exception):
    """Raised where a command would start its work: carries the config file it loaded."""

    def __init__(self, path: str | None):
        super().__init__(path)
        self.path = path


def shipped_name(command: str) -> tuple[str, str]:
    """A shipped config of ``command`` (the first its script's header names): (name, repository path)."""
    script = cli.COMMANDS[command][0].replace("align_kit.", "").replace(".", "/")
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")) + sorted(
        (ROOT / "eval" / "configs").glob("*.yaml")
    ):
        match = HEADER.match(path.read_text().splitlines()[0])
        if match and match.group(1) == script:
            return path.stem, str(path.relative_to(ROOT))
    raise AssertionError(f"no shipped config for {command} ({script}.py)")


def stop_at_start(monkeypatch) -> None:
    """Each command raises Loaded where its work would begin: a recipe's run folder, a sweep's members,
    an evaluation's steps."""

    def start(args, *configs, **_):
        raise Loaded(config_file(args))

    def refuse_output_dir(output_dir, args=None):  # labelling makes its folder without a trainer
        raise Loaded(config_file(args))

    def run(sweep):
        raise Loaded(sweep.config_path)

    def evaluate(args, data_args):
        raise Loaded(config_file(args))

    monkeypatch.setattr(runs, "start", start)
    monkeypatch.setattr(runs, "refuse_output_dir", refuse_output_dir)
    monkeypatch.setattr(loss_sweep.Sweep, "run", run)
    monkeypatch.setattr(pipeline, "evaluate", evaluate)


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - NO_CONFIG))
def test_every_subcommand_loads_a_shipped_config_by_name(command, tmp_path, monkeypatch):
    name, repo_path = shipped_name(command)
    monkeypatch.chdir(tmp_path)  # not the checkout: the name alone must find the file
    stop_at_start(monkeypatch)
    with pytest.raises(Loaded) as loaded:
        cli.main([command, "--config", name])
    assert loaded.value.path is not None and loaded.value.path.endswith(repo_path)
