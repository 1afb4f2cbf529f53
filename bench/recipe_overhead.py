"""Recipe wall time vs the same SFT job written directly against TRL (bench/direct_sft.py).

Both run as fresh processes on the embedded task, alternating, after one untimed pair; the ratio of medians is
held to <= 1.03, i.e. align-kit's layer (config parsing, data checks and counts, run folder) costs at
most 3% of a job's time.

    .venv/bin/python bench/recipe_overhead.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import PYTHON, table, timed_child, write_result

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.03


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps per run.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="Timed runs of each variant (alternating), after one untimed pair.",
    )
    parser.add_argument("--quick", action="store_true", help="Smoke version: 6 steps, 1 repeat.")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 6, 1

    from align_kit.configs import DataArgs
    from align_kit.data.loading import embedded_folder
    from align_kit.models.loading import ensure_embedded_default

    model_dir = str(ensure_embedded_default())
    data = DataArgs(embedded_train_size=3000, embedded_test_size=300)
    data_dir = str(embedded_folder(data))
    config = ROOT / "recipes" / "configs" / "sft_tiny.yaml"
    times: dict[str, list[float]] = {"recipe": [], "direct_trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(-1, args.repeats):  # run -1 warms the page cache and is not timed
            recipe = [
                PYTHON,
                str(ROOT / "recipes" / "sft.py"),
                "--config",
                str(config),
                "--output_dir",
                f"{tmp}/recipe{i}",
                "--max_steps",
                str(args.steps),
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
                "--sft_target",
                "chosen",
            ]
            direct = [
                PYTHON,
                str(ROOT / "bench" / "direct_sft.py"),
                model_dir,
                data_dir,
                f"{tmp}/direct{i}",
                str(args.steps),
                str(config),
            ]
            order = [("recipe", recipe), ("direct_trl", direct)]
            for name, command in order if i % 2 == 0 else order[::-1]:
                wall = timed_child(command)["wall_s"]
                if i >= 0:
                    times[name].append(wall)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["recipe"] / medians["direct_trl"]
    figures = {
        "steps": args.steps,
        "repeats": args.repeats,
        "wall_s": times,
        "median_s": medians,
        "recipe_over_direct": ratio,
    }
    passed = {"recipe_over_direct": ratio <= TARGET}
    print(table([[name, medians[name], len(times[name])] for name in times], ["variant", "median_s", "runs"]))
    print(
        f"recipe / direct TRL = {ratio:.3f} (target <= {TARGET}) {'ok' if passed['recipe_over_direct'] else 'MISSED'}"
    )
    write_result(
        "recipe_overhead_quick" if args.quick else "recipe_overhead",
        figures,
        {"recipe_over_direct": TARGET},
        passed,
    )
    return figures


if __name__ == "__main__":
    main()
