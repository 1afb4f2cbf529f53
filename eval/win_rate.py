"""Judged win rates of several systems against the dataset's chosen answers and a base system, with judge
audits, as one report per judge (see align_kit/evaluation/pipeline.py for the steps and the output layout).

    python eval/win_rate.py --config eval/configs/embedded.yaml
    accelerate launch eval/win_rate.py --config eval/configs/embedded.yaml   # generation split by rank
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml eval/win_rate.py \
        --config eval/configs/embedded.yaml                                    # two CPU processes
    python eval/win_rate.py --config eval/configs/embedded.yaml --n_prompts 50 --output_dir /tmp/eval
"""

from __future__ import annotations

from typing import Any

from align_kit.evaluation import pipeline as evaluation


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        return evaluation.main(argv)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # several processes sometimes abort at exit without it


if __name__ == "__main__":
    from align_kit.console import run_command

    run_command(main)
