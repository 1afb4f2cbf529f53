"""Run every benchmark (``make bench``): each prints its table and writes bench/results/<name>.json;
this script ends with one summary line per target.

    .venv/bin/python bench/run.py [--quick] [--only adapters,judges]

bench/gpu.py measures only where torch sees a CUDA GPU (writing gpu.json). Elsewhere, and with --quick,
it runs its CPU dry run into gpu_dry_run.json, whose targets are listed but not judged: a committed GPU
result is never overwritten with CPU numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["recipe_overhead", "adapters", "judges", "generation", "mfu", "gpu"]


def invocation(name: str, quick: bool) -> tuple[list[str], str]:
    """A benchmark's arguments and the name of the result file they make it write."""
    if name == "gpu":
        import torch

        if quick or not torch.cuda.is_available():
            return ["--dry-run"], "gpu_dry_run"
        return [], "gpu"
    return (["--quick"], f"{name}_quick") if quick else ([], name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smoke versions (seconds, not minutes).")
    parser.add_argument("--only", default="", help="Comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    chosen = [b for b in BENCHMARKS if not args.only or b in args.only.split(",")]
    for name in chosen:
        arguments, _ = invocation(name, args.quick)
        print(f"\n=== bench/{name}.py {' '.join(arguments)}", flush=True)
        importlib.import_module(name).main(arguments)
    print("\n=== summary")
    missed = 0
    for name in chosen:
        result = json.loads((HERE / "results" / f"{invocation(name, args.quick)[1]}.json").read_text())
        dry_run = result["machine"].get("dry_run", False)
        for target, ok in result["passed"].items():
            missed += not ok and not dry_run
            verdict = "dry run, not judged" if dry_run else "ok" if ok else "MISSED"
            print(f"{name:<16} {target:<40} {verdict}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
