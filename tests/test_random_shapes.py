"""Protects offline models of a named shape (``random:<shape>``): GPT-2's 124M shape, a byte-level BPE
trained on the run's data, built once per shape and data and reused by a second run and the evaluation;
unknown shapes and unbuilt specs are one clear line. Tests build a tiny shape added to the table."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_recipe, tiny_run_args
from transformers import AutoTokenizer, GPT2LMHeadModel

from align_kit.configs import ConfigError, DataArgs, ModelArgs
from align_kit.models import loading, shapes

TINY = "random:test-tiny"


@pytest.fixture
def tiny_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_KIT_HOME", str(tmp_path / "home"))  # built folders of this test only
    sizes = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128, "vocab_size": 400}
    monkeypatch.setitem(shapes.SHAPES, "test-tiny", sizes)
    return sizes


def test_gpt2_shape_has_124m_parameters_and_medium_355m():
    with torch.device("meta"):  # the config only: no weights are allocated
        small = GPT2LMHeadModel(shapes.shape_config("random:gpt2"))
        medium = GPT2LMHeadModel(shapes.shape_config("random:gpt2-medium"))
    assert sum(p.numel() for p in small.parameters()) == 124_439_808  # GPT-2 small, tied LM head
    assert sum(p.numel() for p in medium.parameters()) == 354_823_168
    assert small.config.n_positions == 1024 and small.config.vocab_size == 50257


def test_unknown_shape_and_unbuilt_spec_are_one_line():
    with pytest.raises(ConfigError, match="unknown shape 'gpt5'; known: random:gpt2, random:gpt2-medium"):
        shapes.shape_of("random:gpt5")
    with pytest.raises(ConfigError, match="built on a run's training data"):
        loading.resolve("random:gpt2-medium")


def test_built_once_per_data_with_a_bpe_trained_on_it(tiny_shape, monkeypatch):
    built = []
    real = shapes.build_random
    monkeypatch.setattr(shapes, "build_random", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    data = DataArgs(dataset="embedded", embedded_train_size=200, embedded_test_size=20)
    folder = shapes.ensure_random(TINY, data)
    assert shapes.ensure_random(TINY, data) == folder and built == [TINY]  # reused, not rebuilt
    record = json.loads((folder / shapes.SHAPE_FILE).read_text())
    assert record["spec"] == TINY and record["tokenizer_vocab"] == 400  # the data allows 400 tokens
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = next(shapes.data_texts(data))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text.encode()) / 2  # merges learned from the data, not bytes
    assert tokenizer.decode(ids) == text
    config = json.loads((folder / "config.json").read_text())
    assert (config["n_layer"], config["vocab_size"]) == (1, 400)
    assert config["eos_token_id"] == tokenizer.eos_token_id
    other = shapes.ensure_random(TINY, DataArgs(dataset="embedded", embedded_train_size=100))
    assert other != folder and len(built) == 2  # other data, other tokenizer
    with pytest.raises(ConfigError, match="built on 2 datasets; name its folder"):
        loading.resolve(TINY)  # outside a run (an evaluation) the spec must be unambiguous


def test_small_data_gives_a_smaller_tokenizer_and_the_full_embedding(tiny_shape, tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = shapes.ensure_random(TINY, DataArgs(dataset=str(path)))
    record = json.loads((folder / shapes.SHAPE_FILE).read_text())
    assert 257 <= record["tokenizer_vocab"] < 400  # 256 bytes + EOS + the few merges 4 rows allow
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 400


def test_a_recipe_trains_from_a_random_shape_and_the_evaluation_loads_it(tiny_shape, tmp_path):
    out = tmp_path / "sft"
    argv = tiny_run_args(out, model_name_or_path=TINY, max_steps=2, max_length=64)
    metrics = load_recipe("sft").main(argv)
    assert metrics["first_loss"] is not None
    config = json.loads((out / "run_config.json").read_text())
    folder = config["model_name_or_path"]
    assert folder == str(loading.resolve(TINY))  # the one folder built: what an evaluation of the spec loads
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400
    base = loading.load_model(ModelArgs(model_name_or_path=TINY))
    assert base.config.n_layer == 1
