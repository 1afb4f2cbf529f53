"""One leaderboard across evaluation runs that share a judge and held-out prompts: Bradley-Terry ratings
with bootstrap intervals over prompts, win rates against chosen, and each run's judge audits (see
align_kit/evaluation/leaderboard.py for how runs are merged and when they are refused).

    python eval/leaderboard.py --runs runs/demo/eval runs/other/eval --output_dir runs/leaderboard
    python eval/leaderboard.py --runs runs/a/eval runs/b/eval --judge oracle
"""

from __future__ import annotations

from typing import Any

from align_kit.evaluation import leaderboard


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return leaderboard.main(argv)


if __name__ == "__main__":
    main()
