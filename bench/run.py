"""Run every benchmark (``make bench``): each prints its table and writes bench/results/<name>.json;
this script ends with one summary line per target.

    .venv/bin/python bench/run.py [--quick] [--only adapters,judges]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["recipe_overhead", "adapters", "judges", "generation"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smoke versions (seconds, not minutes).")
    parser.add_argument("--only", default="", help="Comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    chosen = [b for b in BENCHMARKS if not args.only or b in args.only.split(",")]
    for name in chosen:
        print(f"\n=== bench/{name}.py", flush=True)
        importlib.import_module(name).main(["--quick"] if args.quick else [])
    print("\n=== summary")
    missed = 0
    for name in chosen:
        result_name = f"{name}_quick" if args.quick else name
        result = json.loads((HERE / "results" / f"{result_name}.json").read_text())
        for target, ok in result["passed"].items():
            missed += not ok
            print(f"{name:<16} {target:<40} {'ok' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
