"""The embedded SFT job written directly against TRL, with no align-kit code: the baseline that
bench/recipe_overhead.py compares the recipe with. Same model folder, data files, split and settings."""

from __future__ import annotations

import json
import sys

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

MARK = "\n\nAssistant:"


def rows(path: str) -> list[dict[str, str]]:
    out = []
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            cut = record["chosen"].rfind(MARK) + len(MARK)
            out.append({"prompt": record["chosen"][:cut], "completion": record["chosen"][cut:]})
    return out


def main(model_dir: str, data_dir: str, output_dir: str, max_steps: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.0,
        max_length=160,
        loss_type="nll",
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        seed=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        dataloader_num_workers=0,
    )
    train = Dataset.from_list(rows(f"{data_dir}/train.jsonl"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
