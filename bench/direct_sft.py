"""The embedded SFT job written directly against TRL, with no align-kit code: the baseline that
bench/recipe_overhead.py compares the recipe with. Same model folder, data files, split and settings."""

from __future__ import annotations

import dataclasses
import json
import sys

import yaml
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


def main(model_dir: str, data_dir: str, output_dir: str, max_steps: int, config: str) -> None:
    """Train with the trainer settings of the recipe's YAML, so both sides run the same job."""
    with open(config) as handle:
        settings = yaml.safe_load(handle)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    kwargs = {k: v for k, v in settings.items() if k in fields}
    kwargs.update(output_dir=output_dir, max_steps=max_steps, save_strategy="no", eval_strategy="no")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    train = Dataset.from_list(rows(f"{data_dir}/train.jsonl"))
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**kwargs), train_dataset=train, processing_class=tokenizer
    )
    trainer.train()
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
