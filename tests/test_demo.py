"""Protects `make demo`'s runner: each stage is its script's main() called with its YAML, every config
the demo names exists, and a stage whose run folder is complete is skipped rather than overwritten."""

from __future__ import annotations

from conftest import ROOT

from align_kit import demo


def test_a_stage_calls_its_scripts_main_with_its_config_and_a_finished_one_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "stage.py").write_text(
        "from pathlib import Path\ndef main(argv):\n    Path('called.txt').write_text(' '.join(argv))\n"
    )
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "out" / "run_complete.json"
    seconds = demo.run("stage", "stage.py", "configs/stage.yaml", done)
    assert (tmp_path / "called.txt").read_text() == "--config configs/stage.yaml" and seconds >= 0
    (tmp_path / "called.txt").unlink()
    done.parent.mkdir()
    done.write_text("{}")
    assert demo.run("stage", "stage.py", "configs/stage.yaml", done) == 0.0
    assert not (tmp_path / "called.txt").exists()


def test_every_stage_the_demo_runs_has_its_script_and_tiny_config():
    for stage in demo.STAGES:
        assert (ROOT / "recipes" / f"{stage}.py").exists(), stage
        assert (ROOT / "recipes" / "configs" / f"{stage}_tiny.yaml").exists(), stage
    assert (ROOT / "eval" / "win_rate.py").exists() and (ROOT / "eval" / "configs" / "embedded.yaml").exists()
