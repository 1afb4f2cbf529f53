"""Protects the one-line answer to hostile paths and values (issue 23, item 7): a FIFO or device as data (which
hung or read until memory ran out), a folder named like a data file, a symlink loop and a path longer than
the system allows (tracebacks, one printing a 10 MB line) are each one line naming the path, shown cut;
NaN and infinite numbers are refused at parse time; a max_length that leaves no room for an answer is
refused before loading; a mistyped secret option never echoes its value. Each case goes through a recipe's
command line and ends with exit status 2 and exactly one line on stderr."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import load_recipe, tiny_run_args

from align_kit import console


def fifo_folder(tmp: Path) -> str:
    (tmp / "data").mkdir()
    os.mkfifo(tmp / "data" / "train.jsonl")
    return str(tmp / "data")


def fifo_file(tmp: Path) -> str:
    os.mkfifo(tmp / "pipe.jsonl")
    return str(tmp / "pipe.jsonl")


def zero_link(tmp: Path) -> str:
    (tmp / "data").mkdir()
    (tmp / "data" / "train.jsonl").symlink_to("/dev/zero")
    return str(tmp / "data")


def folder_named_like_a_file(tmp: Path) -> str:
    (tmp / "data" / "train.jsonl").mkdir(parents=True)
    return str(tmp / "data")


def symlink_loop(tmp: Path) -> str:
    (tmp / "loop.jsonl").symlink_to(tmp / "loop.jsonl")
    return str(tmp / "loop.jsonl")


# case, the dataset setting (made in tmp_path), or other settings, and the line's expected text
PATHS = [
    ("FIFO in a folder", fifo_folder, "train.jsonl: a FIFO (pipe), not a regular file"),
    ("FIFO as dataset", fifo_file, "pipe.jsonl: a FIFO (pipe), not a regular file"),
    ("link to /dev/zero", zero_link, "train.jsonl: a device or special file, not a regular file"),
    ("/dev/zero as dataset", lambda tmp: "/dev/zero", "dataset: /dev/zero: a device or special file"),
    ("folder named train.jsonl", folder_named_like_a_file, "train.jsonl: a folder named like a data file"),
    ("symlink loop", symlink_loop, "loop.jsonl: a symlink loop"),
    (
        "10 MB dataset string",
        lambda tmp: "x" * 10_000_000,
        "(10,000,000 characters): the path is longer than",
    ),
]
VALUES = [
    ("NaN learning rate", {"learning_rate": "nan"}, "learning_rate: nan is not a finite number"),
    (
        "NaN in the YAML file",
        {"config": "learning_rate: .nan\n"},
        "learning_rate: nan is not a finite number",
    ),
    ("infinite weight decay", {"weight_decay": "inf"}, "weight_decay: inf is not a finite number"),
    ("max_length 1", {"max_length": "1"}, "max_length: 1 leaves no room for an answer"),
]


def one_line(capsys, argv: list[str]) -> str:
    status = console.exit_status(lambda: load_recipe("sft").main(argv))
    err = capsys.readouterr().err
    assert status == console.EXIT_MISTAKE, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align-kit: "), err[-2000:]
    assert len(lines[0]) < 400  # a path is shown cut
    return lines[0]


@pytest.mark.parametrize(("case", "make", "says"), PATHS, ids=[p[0] for p in PATHS])
def test_hostile_data_paths_are_one_line(tmp_path, capsys, case, make, says):
    line = one_line(capsys, tiny_run_args(tmp_path / "run", dataset=make(tmp_path)))
    assert says in line


@pytest.mark.parametrize(("case", "settings", "says"), VALUES, ids=[v[0] for v in VALUES])
def test_hostile_values_are_refused_at_parse_time(tmp_path, capsys, case, settings, says):
    if "config" in settings:
        (tmp_path / "run.yaml").write_text(settings["config"])
        settings = {"config": tmp_path / "run.yaml"}
    line = one_line(capsys, tiny_run_args(tmp_path / "run", **settings))
    assert says in line
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_mistyped_secret_option_never_echoes_its_value(tmp_path, capsys):
    for extra in (["--hub_tokn", "hf_SECRETVALUE"], ["--hub_tokn=hf_SECRETVALUE"]):
        line = one_line(capsys, [*tiny_run_args(tmp_path / "run"), *extra])
        assert "--hub_tokn" in line and "SECRETVALUE" not in line
