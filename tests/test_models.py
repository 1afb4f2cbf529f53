"""Protects model and tokenizer loading: embedded default, folders, weight files, byte-level round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from align_kit.configs import ModelArgs
from align_kit.models.loading import (
    EMBEDDED_NAME,
    build_byte_tokenizer,
    build_tiny_gpt2,
    ensure_embedded_default,
    load_model,
    load_tokenizer,
    load_weights_file,
)

TEXT = "\n\nHuman: Grüße aus Köln! 東京 😀 — naïve café?\n\nAssistant: Ça va."


def logits(model, text="\n\nHuman: hi\n\nAssistant:"):
    model.eval()  # dropout off
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_byte_tokenizer_round_trips_non_ascii_text():
    tokenizer = build_byte_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token_id == 256 and tokenizer.pad_token_id == 257
    assert tokenizer(TEXT + tokenizer.eos_token)["input_ids"][-1] == 256


def test_embedded_default_is_built_once_and_loads_like_any_model():
    folder = ensure_embedded_default()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded_default() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model = load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))
    assert torch.allclose(logits(model), logits(build_tiny_gpt2()))
    tokenizer = load_tokenizer(EMBEDDED_NAME)
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT


def test_directory_and_weight_files_give_identical_logits(tmp_path):
    model = build_tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.5)  # differs from a fresh init
    model.save_pretrained(tmp_path / "folder")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "gpt2.safetensors")
    torch.save(state, tmp_path / "gpt2.bin")
    # The original GPT-2 release has no "transformer." prefix in its keys.
    torch.save({k.removeprefix("transformer."): v for k, v in state.items()}, tmp_path / "gpt2_release.pt")
    config = str(tmp_path / "folder")
    expected = logits(model)
    from_folder = load_model(ModelArgs(model_name_or_path=str(tmp_path / "folder")))
    assert torch.equal(logits(from_folder), expected)
    for name in ("gpt2.safetensors", "gpt2.bin", "gpt2_release.pt"):
        loaded = load_model(ModelArgs(weights_file=str(tmp_path / name), model_config=config))
        assert torch.equal(logits(loaded), expected), name


def test_weight_file_that_does_not_match_the_config_is_an_error(tmp_path):
    model = build_tiny_gpt2()
    state = {k: v for k, v in model.state_dict().items() if ".h.1." not in k and k != "lm_head.weight"}
    save_file(state, tmp_path / "partial.safetensors")
    model.save_pretrained(tmp_path / "cfg")
    with pytest.raises(ValueError, match=r"partial\.safetensors.*missing"):
        load_weights_file(str(tmp_path / "partial.safetensors"), str(tmp_path / "cfg"))


def test_pickled_weights_are_read_without_code_execution(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    build_tiny_gpt2().save_pretrained(tmp_path / "cfg")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_weights_file(str(tmp_path / "evil.bin"), str(tmp_path / "cfg"))


def test_gpt2_style_tokenizer_without_pad_gets_eos_as_pad(tmp_path):
    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token
    assert loaded.padding_side == "right"
