"""Over-optimisation curves of the demo, and what measuring them costs.

Trains whatever the demo has not (recipes/configs/{sft,reward,dpo,ppo,grpo,best_of_n}_tiny.yaml into runs/demo,
as ``make demo`` does; the curve stages record curves at the ``curve_steps`` their YAML sets, the value the
demo ships and the default measured here), then draws their curves with ``align-kit curves`` into
bench/results/curves/. The overhead is measured side by side in this one process: the demo's PPO trained
twice into runs/bench_curves, without curves (curve_steps 0) and with them; its CPU time with curves over the
CPU time without, and the points' own CPU time over the run without (the one held to <= 10%; CPU rather than
wall seconds, which on a shared machine measure the neighbours' load; wall times are kept too). The demo
evaluation's alignment tax (``make demo``), when there, is copied into bench/results/alignment_tax.json.
Writes bench/results/curves.json and prints the tables.

    .venv/bin/python bench/curves.py [--skip_overhead]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import RESULTS, table, write_result

from align_kit import demo
from align_kit.evaluation import curve_report

TARGET = 0.10  # the curve callback's share of a PPO run's training time
PPO = "recipes/configs/ppo_tiny.yaml"


def ppo_pair(out: Path) -> dict:
    """The demo's PPO without and with curves, one after the other after a short warm-up run (imports, the
    tokenized data's cache); wall and CPU seconds of each and the overhead."""
    from align_kit.resources import load_script, locate

    wall, cpu = {}, {}
    warm_up = ["--output_dir", str(out / "ppo_warm_up"), "--curve_steps", "0", "--total_episodes", "64"]
    shutil.rmtree(out / "ppo_warm_up", ignore_errors=True)  # the first run in a process pays one-time costs
    load_script(locate("recipes/ppo.py"), "bench_ppo_warm_up").main(["--config", PPO, *warm_up])
    for name, extra in (("off", ["--curve_steps", "0"]), ("on", [])):
        folder = out / f"ppo_{name}"
        shutil.rmtree(folder, ignore_errors=True)  # a rerun measures again
        start, cpu_start = time.perf_counter(), time.process_time()
        load_script(locate("recipes/ppo.py"), f"bench_ppo_{name}").main(
            ["--config", PPO, "--output_dir", str(folder), *extra]
        )
        wall[name], cpu[name] = time.perf_counter() - start, time.process_time() - cpu_start
    points = [json.loads(line) for line in (out / "ppo_on" / "curves.jsonl").read_text().splitlines()]
    curve_s, curve_cpu = sum(p["seconds"] for p in points), sum(p["cpu_seconds"] for p in points)
    return {
        "wall_off_s": wall["off"],
        "wall_on_s": wall["on"],
        "cpu_off_s": cpu["off"],
        "cpu_on_s": cpu["on"],
        # CPU seconds: on a machine shared with other jobs the wall times measure the neighbours' load
        "overhead": cpu["on"] / cpu["off"] - 1,
        "overhead_wall": wall["on"] / wall["off"] - 1,
        "points": len(points),
        "curve_cpu_seconds": curve_cpu,
        "overhead_from_points": curve_cpu / cpu["off"],
        "seconds_per_point": curve_s / len(points),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_overhead", action="store_true", help="Only the curves of the demo's runs.")
    parser.add_argument("--out", default="runs/bench_curves", help="Folder of the two overhead PPO runs.")
    args = parser.parse_args(argv)
    stages = {}
    for stage in demo.STAGES:
        config = f"recipes/configs/{stage}_tiny.yaml"
        stages[stage] = demo.run(stage, f"recipes/{stage}.py", config, demo.OUT / stage / "run_complete.json")
    runs = [str(demo.OUT / name) for name in demo.CURVE_RUNS]
    report = curve_report.main([*runs, "--out", str(RESULTS / "curves")])
    rows = [
        [s["method"], s["points"], s["gold_peak"]["kl"], s["gold_peak"]["gold"], s["gold_end"],
         s["proxy_peak"]["kl"], s["proxy_peak"]["proxy"], s["proxy_end"], s["kl_end"], s["gold_peaks_before_proxy"]]
        for s in report["runs"]
    ]  # fmt: skip
    header = ["method", "points", "KL@gold peak", "gold@peak", "gold end", "KL@proxy peak", "proxy peak"]
    print(table(rows, [*header, "proxy end", "KL end", "gold before proxy"]))
    figures: dict = {"runs": report["runs"], "stage_s": stages, "curve_steps": {}}
    for name in demo.CURVE_RUNS:
        config = json.loads((demo.OUT / name / "run_config.json").read_text())
        figures["curve_steps"][name] = _find(config, "curve_steps")
    passed = {}
    if not args.skip_overhead:
        pair = ppo_pair(Path(args.out))
        figures["ppo_overhead"] = pair
        # the points' own CPU time is the callback's cost measured directly; the side-by-side difference of two
        # trainings also carries their run-to-run noise (a few percent here), so it is reported, not judged
        passed["overhead"] = pair["overhead_from_points"] <= TARGET
        print(
            f"\nPPO (ppo_tiny.yaml, curve_steps {figures['curve_steps']['ppo']}), CPU seconds: "
            f"{pair['cpu_off_s']:.1f} without curves, {pair['cpu_on_s']:.1f} with {pair['points']} points: "
            f"overhead {100 * pair['overhead']:.1f}% (target <= {100 * TARGET:.0f}%); the points' own CPU "
            f"time {pair['curve_cpu_seconds']:.1f} s = {100 * pair['overhead_from_points']:.1f}% of the run "
            f"without; wall {pair['wall_off_s']:.1f} vs {pair['wall_on_s']:.1f} s ({100 * pair['overhead_wall']:+.1f}%)"
        )
    evaluation = demo.OUT / "eval" / "evaluation.json"
    if evaluation.exists() and "tax" in (result := json.loads(evaluation.read_text())):
        write_result("alignment_tax", result["tax"], {}, {})
    path = write_result("curves", figures, {"overhead_max": TARGET}, passed)
    print(f"[bench] {path}")
    return figures


def _find(config: dict, key: str):
    """``key`` of a run_config.json, wherever its section puts it."""
    if key in config:
        return config[key]
    return next((v[key] for v in config.values() if isinstance(v, dict) and key in v), None)


if __name__ == "__main__":
    main()
