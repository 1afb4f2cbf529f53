"""Protects align-kit as an installed package and as a command on a fresh machine: the wheel carries every
shipped judge, config and template; an installed copy, run from outside any checkout, finds them and
evaluates a finished run; the `align-kit` command opens every recipe; configs are found by name; and the
Makefile's browser step installs Chromium where it can and says how where it cannot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, tiny_run_args

from align_kit import cli, resources
from align_kit.judges.backends import load_judge

BIN = Path(sys.executable).parent
SHIPPED = {  # repository folder -> where the wheel puts it
    "recipes/configs": "align_kit/recipes/configs",
    "recipes/accelerate": "align_kit/recipes/accelerate",
    "eval/configs": "align_kit/eval/configs",
    "eval/judges": "align_kit/eval/judges",
    "eval/metrics": "align_kit/eval/metrics",
    "align_kit/templates": "align_kit/templates",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the project's sources (the checkout gets no build folders)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("align_kit", "recipes", "eval"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("align_kit-*.whl")
    return path


def shipped_files() -> set[str]:
    return {
        f"{target}/{path.relative_to(ROOT / folder)}"
        for folder, target in SHIPPED.items()
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.mark.slow
def test_the_wheel_holds_every_shipped_judge_config_and_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert shipped_files() - names == set()
    assert {"align_kit/recipes/dpo.py", "align_kit/eval/win_rate.py", "align_kit/cli.py"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "align-kit = align_kit.cli:console" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_an_installed_copy_evaluates_a_finished_run_from_outside_the_checkout(
    wheel, tiny_model_dir, tmp_path
):
    """A throwaway venv that reuses the project venv's packages (not its editable align-kit) gets the wheel;
    from an empty folder, `align-kit eval` with the oracle judge reports on a tiny finished run."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    shared = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "_project_packages.pth").write_text(shared + "\n")  # a .pth line adds a path, runs no other .pth
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    run = tmp_path / "runs" / "sft"
    shutil.copytree(tiny_model_dir, run)
    (run / "run_complete.json").write_text("{}")
    (run / "run_config.json").write_text("{}")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "ALIGN_KIT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [python, "-c", "import align_kit, align_kit.resources as r; print(align_kit.__file__); print(r.judges_dir())"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert all(str(site) in line for line in where), where  # the installed copy, not the checkout
    (work / "eval.yaml").write_text(
        f"systems: [sft={run}]\nbase: sft\njudges: [oracle]\ndataset: embedded\nembedded_train_size: 60\n"
        "embedded_test_size: 30\nn_prompts: 10\nmax_new_tokens: 6\nn_honeypots: 5\nn_human: 10\nn_boot: 100\n"
        "progress: false\noutput_dir: eval\n"
    )
    command = [venv / "bin" / "align-kit", "eval", "--config", "eval.yaml"]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluation = json.loads((work / "eval" / "evaluation.json").read_text())
    (comparison,) = [c for c in evaluation["judges"]["oracle"]["comparisons"] if c["baseline"] == "chosen"]
    assert comparison["system"] == "sft" and comparison["n"] == 10
    assert "Win-rate report" in (work / "eval" / "oracle" / "report.md").read_text()


def test_shipped_judges_and_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_judge("oracle").name == "oracle"
    for name in ("dpo_tiny", "dpo_tiny.yaml", "recipes/configs/dpo_tiny.yaml"):
        assert resources.find_config(name) == resources.shipped("recipes") / "configs" / "dpo_tiny.yaml"
    assert resources.find_config("embedded") == resources.shipped("eval") / "configs" / "embedded.yaml"
    with pytest.raises(FileNotFoundError, match="no config 'dpo_tyni'"):
        resources.find_config("dpo_tyni")


def test_the_command_lists_every_recipe_and_passes_help_to_it():
    listing = subprocess.run([BIN / "align-kit", "--help"], capture_output=True, text=True, check=True).stdout
    for name, (_, line) in cli.COMMANDS.items():
        assert name in listing and line.split()[0] in listing
    recipes = {p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__"}
    assert recipes <= {module.rsplit(".", 1)[1] for module, _ in cli.COMMANDS.values()}
    dpo = subprocess.run([BIN / "align-kit", "dpo", "--help"], capture_output=True, text=True, timeout=120)
    assert dpo.returncode == 0 and "--beta" in dpo.stdout and "--adapter" in dpo.stdout


def test_the_command_runs_sft_for_two_steps_from_a_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config is found by name, outside the checkout
    argv = tiny_run_args(tmp_path / "sft", max_steps=2, model_name_or_path="tiny-gpt2")
    metrics = cli.main(["sft", "--config", "sft_tiny", *argv])
    assert len([e for e in metrics["log_history"] if "loss" in e]) == 2
    assert (tmp_path / "sft" / "run_complete.json").exists() and (
        tmp_path / "sft" / "model.safetensors"
    ).exists()


def fake_tools(folder: Path, uid: int, with_apt: bool) -> Path:
    """A PATH holding only what tools/ensure-browser.sh calls: id, and a fake apt-get that records its
    arguments and 'installs' chromium."""
    folder.mkdir()
    (folder / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    if with_apt:
        (folder / "apt-get").write_text(
            f'#!/bin/sh\necho "$@" >> {folder}/apt.log\n'
            f'case "$*" in *install*) printf "#!/bin/sh\\n" > {folder}/chromium; /bin/chmod +x {folder}/chromium;; esac\n'
        )
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


@pytest.mark.parametrize("uid, with_apt", [(0, True), (1000, True), (0, False)])
def test_the_browser_step_installs_chromium_as_root_with_apt_and_otherwise_says_how(tmp_path, uid, with_apt):
    tools = fake_tools(tmp_path / "bin", uid, with_apt)
    done = subprocess.run(
        ["/bin/sh", ROOT / "tools" / "ensure-browser.sh"],
        env={"PATH": str(tools)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    apt = (tools / "apt.log").read_text() if (tools / "apt.log").exists() else ""
    if uid == 0 and with_apt:
        assert "install -y -qq --no-install-recommends chromium fonts-dejavu-core" in apt
        assert (tools / "chromium").exists() and "no headless browser" not in done.stderr
    else:
        assert (
            apt == ""
            and "apt-get install chromium" in done.stderr
            and "ALIGN_KIT_ALLOW_NO_BROWSER=1" in done.stderr
        )


def test_the_makefile_runs_the_browser_step_before_the_tests():
    makefile = (ROOT / "Makefile").read_text()
    assert "test: $(STAMP) browser" in makefile and "sh tools/ensure-browser.sh" in makefile
