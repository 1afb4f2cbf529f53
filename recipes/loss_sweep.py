"""Loss sweep: one starting model trained with each listed loss and beta under one budget and seed, each
member evaluated on the same held-out prompts and pairs, and one ranked table (see align_kit/loss_lab/sweep.py).

    accelerate launch recipes/loss_sweep.py --config recipes/configs/loss_sweep_tiny.yaml
    python recipes/loss_sweep.py --config recipes/configs/loss_sweep_tiny.yaml --max_steps 10

One process: every member is recipes/dpo.py or recipes/kto.py run on a YAML written into its folder
(<output_dir>/<member>/member.yaml), so any member can be rerun alone. Finished members are reused.
"""

from __future__ import annotations

import sys

from align_kit.console import log
from align_kit.loss_lab import sweep as loss_sweep

CONFIG = (
    loss_sweep.CONFIG
)  # the sweep's own settings, then the data, model and training ones shared by members


def main(argv: list[str] | None = None) -> dict:
    # 1. config: the sweep's settings, shared by every member; each member's own config is checked before
    # any member trains
    sweep = loss_sweep.Sweep(sys.argv[1:] if argv is None else argv)
    log(f"loss sweep: {len(sweep.members())} members in {sweep.root}")

    # 2-7. each member: its recipe (seed, run folder, data, model and reference, trainer, train, save), then
    # its evaluation; a finished member is not trained again
    payload = sweep.run()

    # 8. report: loss_sweep.json, loss_sweep.md and loss_sweep.png in output_dir
    log("ranking:\n" + loss_sweep.markdown_table(payload["ranking"], payload["base"]))
    return payload


if __name__ == "__main__":
    main()
