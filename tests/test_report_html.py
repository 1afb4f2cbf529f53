"""Protects what a reader actually sees: report.html written by a real evaluation, rendered by headless
Chromium, shows its plots (win rates with intervals, answer lengths, ratings) and not blank boxes or
broken images. Chromium is required (Debian: apt-get install chromium); set ALIGN_KIT_ALLOW_NO_BROWSER=1
to skip where it cannot be installed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ScriptedJudge
from PIL import Image

from align_kit.configs import DataArgs
from align_kit.evaluation import answers
from align_kit.evaluation.pipeline import evaluate_systems
from align_kit.evaluation.settings import EvalArgs

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MATPLOTLIB_BLUE, MATPLOTLIB_ORANGE = (31, 119, 180), (255, 127, 14)  # colours C0 and C1 of the plots


def shorter_is_better(item) -> str:
    """Prefers the shorter answer with a per-pair coin, so the plots show rates away from 0, 0.5 and 1."""
    a, b = item.answer_a.strip(), item.answer_b.strip()
    coin = hashlib.sha256("|".join(sorted((a, b))).encode()).digest()[0] / 255 - 0.5
    margin = (len(b) - len(a)) / 40 + (coin if a < b else -coin)
    return "A" if margin > 0 else "B"


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(html_path, png_path, profile_dir) -> None:
    command = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile_dir}",
        f"--screenshot={png_path}",
        "--window-size=1200,2000",
        html_path.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels lie within ``tolerance`` (per channel) of ``colour``."""
    return int(np.all(np.abs(pixels.astype(int) - np.array(colour)) <= tolerance, axis=-1).sum())


@pytest.mark.slow
def test_report_html_shows_its_plots_in_a_browser(tmp_path):
    if browser() is None:
        if os.environ.get("ALIGN_KIT_ALLOW_NO_BROWSER") == "1":
            pytest.skip("no Chromium and ALIGN_KIT_ALLOW_NO_BROWSER=1")
        pytest.fail("Chromium is needed to check report.html (apt-get install chromium)")
    data = {"embedded_train_size": 60, "embedded_test_size": 60}
    held = answers.held_out(EvalArgs(n_prompts=40), DataArgs(**data))
    systems = {}
    for name, words in (("terse", 2), ("verbose", 9)):
        path = tmp_path / f"{name}.jsonl"
        rows = [
            {"prompt": p, "answer": " " + " ".join(["word"] * (words + i % 4))}
            for i, p in enumerate(held.prompts)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        systems[name] = str(path)
    settings = {**data, "n_prompts": 40, "n_honeypots": 10, "n_human": 20, "n_boot": 200, "progress": False}
    result = evaluate_systems(
        systems,
        "terse",
        [ScriptedJudge(shorter_is_better, "shorter", batch_size=64)],
        tmp_path / "eval",
        **settings,
    )
    html = tmp_path / "eval" / "shorter" / "report.html"
    assert result["reports"]["shorter"]["report.html"] == str(html)
    assert html.read_text().count('src="data:image/png;base64,') == 3 and "http" not in html.read_text()

    png = tmp_path / "report.png"
    screenshot(html, png, tmp_path / "profile")
    image = Image.open(png).convert("RGB")
    pixels = np.asarray(image)
    assert image.size == (1200, 2000) and png.stat().st_size > 50_000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 150  # text, tables and plots, not a blank page
    # Only the plots are drawn in saturated colour (the text is grey, the tables grey and white): the
    # win-rate plot and the length histograms must both show up as bands of coloured rows.
    coloured = pixels.astype(int).max(axis=-1) - pixels.astype(int).min(axis=-1) > 60  # (H, W)
    rows = np.flatnonzero(coloured.any(axis=1))
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 80) + 1)
    sizes = [int(coloured[band[0] : band[-1] + 1].sum()) for band in bands]
    assert len([s for s in sizes if s > 1_000]) >= 2 and sum(sizes) > 10_000, sizes
    assert near(pixels, MATPLOTLIB_BLUE) > 300 and near(pixels, MATPLOTLIB_ORANGE) > 300  # the markers
