"""Offline models of a named shape: ``model_name_or_path: random:gpt2`` is a GPT-2-124M-shaped model with
random (seeded) weights and a byte-level BPE tokenizer trained with ``tokenizers`` on the run's own data.

For machines without the Hub and for benchmarks: token lengths and compute resemble GPT-2's, the weights know
nothing. The tokenizer is trained to the shape's vocabulary size (50257 for GPT-2, ``<|endoftext|>``
included); data too small to give that many merges yields a smaller tokenizer, and the model keeps the
shape's full embedding table (the unused rows are never looked up), so the parameter count stays the
shape's. Both are built once under ``$ALIGN_KIT_HOME`` in a folder named by shape and data fingerprint
(``random-gpt2-v1-<sha256 of shape and texts, 16 hex digits>``), so a second run on the same data and its
evaluation reuse them; ``shape.json`` there records the spec, the sizes, the seed and the tokenizer's real
vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from align_kit.configs import ConfigError, DataArgs, ModelArgs
from align_kit.console import log
from align_kit.data.formats import load_raw
from align_kit.models.loading import EOS_TOKEN, RANDOM_PREFIX, build_once, random_dir, save_on_this_rank

# GPT2Config's own defaults are the 124M shape; the others differ only in depth and width.
SHAPES: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
}
SHAPE_FILE = "shape.json"


def is_random(name_or_path: str | None) -> bool:
    return bool(name_or_path) and name_or_path.startswith(RANDOM_PREFIX)


def shape_of(spec: str) -> dict[str, int]:
    """The sizes of ``random:<shape>``, or a ConfigError naming the shapes there are."""
    name = spec.removeprefix(RANDOM_PREFIX)
    if name not in SHAPES:
        raise ConfigError(
            f"model_name_or_path: {spec!r}: unknown shape {name!r}; known: "
            f"{', '.join(RANDOM_PREFIX + s for s in SHAPES)}",
            field="model_name_or_path",
        )
    return SHAPES[name]


def shape_config(spec: str, eos_id: int = 0) -> GPT2Config:
    """The GPT2Config of ``random:<shape>`` (no weights are made here)."""
    sizes = shape_of(spec)
    return GPT2Config(**sizes, bos_token_id=eos_id, eos_token_id=eos_id)


def data_texts(args: DataArgs) -> Iterator[str]:
    """Every string in the training split's raw rows (prompts, answers, message contents), in file order."""
    raws = load_raw(args)
    yield from _strings(raws[args.train_split].rows)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def fingerprint(spec: str, texts: Iterable[str]) -> str:
    digest = hashlib.sha256(json.dumps(shape_of(spec), sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
    return digest.hexdigest()


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (GPT-2's pre-tokenizer regex, no prefix space) trained on ``texts`` to
    at most ``vocab_size`` tokens, ``<|endoftext|>`` included (as BOS, EOS and UNK, as in GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=max_length,
    )


def build_random(spec: str, texts: list[str], folder: Path, seed: int = 0) -> None:
    """Train the tokenizer, build the seeded random model of ``spec`` and save both into ``folder``."""
    import torch

    sizes = shape_of(spec)
    tokenizer = train_tokenizer(texts, sizes["vocab_size"], sizes["n_positions"])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(shape_config(spec, tokenizer.convert_tokens_to_ids(EOS_TOKEN)))
    save_on_this_rank(model, folder)
    tokenizer.save_pretrained(folder)
    record = {"spec": spec, "shape": sizes, "tokenizer_vocab": len(tokenizer), "seed": seed}
    (folder / SHAPE_FILE).write_text(json.dumps(record, indent=2))


def resolve_random_model(configs: tuple[Any, ...]) -> None:
    """A run's ``model_name_or_path: random:<shape>`` (and a reference model of the same spec) becomes the
    folder built for it on the run's training data, before anything reads it; run_config.json then names
    that folder, and its shape.json the spec."""
    data = next((c for c in configs if isinstance(c, DataArgs)), None)
    model = next((c for c in configs if isinstance(c, ModelArgs)), None)
    if model is None or not is_random(model.model_name_or_path):
        return
    spec = model.model_name_or_path
    shape_of(spec)
    if data is None:
        raise ConfigError(f"model_name_or_path: {spec} needs the run's training data to train its tokenizer")
    folder = str(ensure_random(spec, data))
    log(f"{spec}: {folder}")
    model.model_name_or_path = folder
    for name in ("ref_model_name_or_path", "tokenizer_name_or_path"):
        if getattr(model, name, None) == spec:
            setattr(model, name, folder)


def ensure_random(spec: str, args: DataArgs) -> Path:
    """The folder of ``spec`` built on the training data of ``args`` (built on first use, then reused)."""
    texts = list(data_texts(args))
    built = build_once(random_dir(spec, fingerprint(spec, texts)), lambda tmp: build_random(spec, texts, tmp))
    record = json.loads((built / SHAPE_FILE).read_text())
    if record["tokenizer_vocab"] < record["shape"]["vocab_size"]:
        log(
            f"{spec}: the data allows a tokenizer of {record['tokenizer_vocab']} tokens, under the shape's "
            f"{record['shape']['vocab_size']}: the model keeps {record['shape']['vocab_size']} embedding rows"
        )
    return built
