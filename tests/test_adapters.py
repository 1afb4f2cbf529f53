"""Invariants of the hand-written GPT-2 MLP adapter (align_kit/models/adapters.py).

Protects: the adapted model equals the base at init (residual; replace at full width) and whenever the
adapters are disabled; training moves adapter weights only; save -> load gives identical logits; removal
restores the original modules; adapter_layers picks the blocks; parameter counts; and the adapter-off DPO
reference computes the same log-probs as a separate copy of the base model inside a real DPOTrainer.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from align_kit.configs import AdapterArgs
from align_kit.models.adapters import (
    AdapterOffReference,
    LeanGelu,
    MLPAdapter,
    adapters_disabled,
    count_parameters,
    describe_parameters,
    freeze_non_adapter,
    has_adapters,
    inject_adapters,
    is_adapter_parameter,
    lean_activations,
    load_adapter_weights,
    remove_adapters,
    save_adapter,
)
from align_kit.models.loading import build_byte_tokenizer, build_tiny_gpt2, load_adapted

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on shared cores two spinning threads can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 256, (3, 24), generator=generator),
        "attention_mask": torch.ones(3, 24),
    }


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _adapted(**kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base copy, adapted model with non-adapter weights frozen) from the same tiny GPT-2."""
    model = build_tiny_gpt2()
    base = copy.deepcopy(model)
    inject_adapters(model, AdapterArgs(**kwargs))
    freeze_non_adapter(model)
    return base, model


@torch.no_grad()
def _perturb_adapters(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            param.add_(0.1 * torch.randn_like(param))


def test_residual_equals_base_at_init():
    base, model = _adapted(adapter="residual", adapter_rank=8)
    inputs = _inputs()
    assert torch.allclose(_logits(model, inputs), _logits(base, inputs), atol=1e-6, rtol=0)
    assert all(isinstance(block.mlp, MLPAdapter) for block in model.transformer.h)


def test_residual_gradients_equal_plain_autograd():
    """The frozen MLP's lean GELU backward gives the gradients autograd gives on GPT-2's own op chain."""
    base, model = _adapted(adapter="residual", adapter_rank=8)
    _perturb_adapters(model)
    for param in base.parameters():
        param.requires_grad_(False)
    for block, adapted in zip(base.transformer.h, model.transformer.h, strict=True):
        adapter = (
            adapted.mlp
        )  # the same adapter Linear modules, added to the stock GPT2MLP's output by a hook
        block.mlp.register_forward_hook(
            lambda _mod, args, out, a=adapter: out + a.adapter_up(a.base_layer.act(a.adapter_down(args[0])))
        )
    batch = _inputs()
    grads = []
    for net in (model.eval(), base.eval()):  # eval: no dropout, so both see the same function
        model.zero_grad()
        net(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 16
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-7), name


def test_replace_pretrained_at_full_width_equals_base():
    base, model = _adapted(adapter="replace", adapter_rank=4 * 128, adapter_init="pretrained")
    inputs = _inputs()
    assert torch.allclose(_logits(model, inputs), _logits(base, inputs), atol=1e-5, rtol=0)


def test_replace_narrow_keeps_top_units_and_random_differs():
    base, model = _adapted(adapter="replace", adapter_rank=32, adapter_init="pretrained")
    mlp = base.transformer.h[0].mlp
    score = mlp.c_fc.weight.norm(dim=0) * mlp.c_proj.weight.norm(dim=1)  # (inner,)
    best = score.argmax()
    kept = model.transformer.h[0].mlp.adapter_fc.weight  # (rank, n_embd)
    assert (kept == mlp.c_fc.weight[:, best]).all(dim=1).any()  # the top unit's input weights were copied
    _, scratch = _adapted(adapter="replace", adapter_rank=32, adapter_init="random")
    assert not torch.equal(scratch.transformer.h[0].mlp.adapter_fc.weight, kept)


@pytest.mark.parametrize("design", ["residual", "replace"])
def test_disabled_equals_base_after_perturbing(design):
    base, model = _adapted(adapter=design, adapter_rank=16)
    _perturb_adapters(model)
    inputs = _inputs()
    assert (_logits(model, inputs) - _logits(base, inputs)).abs().max() > 1e-3
    with adapters_disabled(model):
        assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    assert (_logits(model, inputs) - _logits(base, inputs)).abs().max() > 1e-3  # switched back on


@pytest.mark.parametrize("design", ["residual", "replace"])
def test_training_moves_adapter_parameters_only(design):
    base, model = _adapted(adapter=design, adapter_rank=16, adapter_dropout=0.1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        batch = _inputs(seed=step)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == is_adapter_parameter(name), name
    # the base weights, replace's unused base_layer included, are exactly the original model's
    original = dict(base.named_parameters())
    for name, param in model.named_parameters():
        if not is_adapter_parameter(name):
            assert torch.equal(param, original[name.replace(".base_layer", "")]), name


def test_save_then_load_adapted_gives_identical_logits(tmp_path, tiny_model_dir):
    base_dir, adapter_dir = tiny_model_dir, tmp_path / "adapter"
    args = AdapterArgs(adapter="residual", adapter_rank=8, adapter_layers="1,3")
    model = GPT2LMHeadModel.from_pretrained(base_dir)
    inject_adapters(model, args)
    _perturb_adapters(model)
    save_adapter(model, adapter_dir, base_model=str(base_dir), args=args)

    loaded = load_adapted(adapter_dir)
    inputs = _inputs()
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    assert [name for name, p in loaded.named_parameters() if p.requires_grad] == [
        name for name, _ in model.named_parameters() if is_adapter_parameter(name)
    ]

    other = GPT2LMHeadModel.from_pretrained(base_dir)
    inject_adapters(other, AdapterArgs(adapter="residual", adapter_rank=4, adapter_layers="1,3"))
    with pytest.raises(ValueError, match=str(adapter_dir)):
        load_adapter_weights(other, adapter_dir)


def test_models_load_model_rebuilds_adapter_folder(tmp_path, tiny_model_dir):
    from align_kit.configs import ModelArgs
    from align_kit.models.loading import load_model

    args = AdapterArgs(adapter="replace", adapter_rank=64)
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    inject_adapters(model, args)
    save_adapter(model, tmp_path / "run", base_model=str(tiny_model_dir), args=args)
    loaded = load_model(ModelArgs(model_name_or_path=str(tmp_path / "run")))
    inputs = _inputs()
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_remove_restores_original_modules():
    base, model = _adapted(adapter="replace", adapter_rank=16)
    originals = [block.mlp.base_layer for block in model.transformer.h]
    _perturb_adapters(model)
    removed = remove_adapters(model)
    assert removed == [f"transformer.h.{i}.mlp" for i in range(4)]
    assert [block.mlp for block in model.transformer.h] == originals
    assert all(type(block.mlp) is GPT2MLP for block in model.transformer.h)
    assert not has_adapters(model)
    inputs = _inputs()
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))


def test_adapter_layers_subset_touches_only_those_blocks():
    model = build_tiny_gpt2()
    names = inject_adapters(model, AdapterArgs(adapter="residual", adapter_rank=4, adapter_layers="0,2"))
    assert names == ["transformer.h.0.mlp", "transformer.h.2.mlp"]
    assert [isinstance(block.mlp, MLPAdapter) for block in model.transformer.h] == [True, False, True, False]
    assert inject_adapters(build_tiny_gpt2(), AdapterArgs(adapter="none")) == []
    with pytest.raises(ValueError, match="adapter_layers"):
        inject_adapters(build_tiny_gpt2(), AdapterArgs(adapter="residual", adapter_layers="0,4"))
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, AdapterArgs(adapter="residual"))
    with pytest.raises(ValueError, match="no adapters"):
        freeze_non_adapter(build_tiny_gpt2())  # would silently leave nothing to train


def test_parameter_counts_by_hand():
    # 2 layers, width 32, vocab 100, 16 positions, inner 128; wte and lm_head tied (counted once)
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    block = 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)  # = 12_704
    mlp = (32 * 128 + 128) + (128 * 32 + 32)  # = 8_352
    base_total = 100 * 32 + 16 * 32 + 2 * block + 2 * 32  # = 29_184
    assert count_parameters(GPT2LMHeadModel(config)) == (base_total, base_total)

    model = GPT2LMHeadModel(config)
    inject_adapters(model, AdapterArgs(adapter="residual", adapter_rank=4))
    freeze_non_adapter(model)
    residual = 2 * (32 * 4 + 4 + 4 * 32 + 32)  # two blocks of down + up with biases = 584
    assert count_parameters(model) == (residual, base_total + residual)

    model.transformer.ln_f.requires_grad_(True)
    assert "64 of the trainable parameters are outside the adapters" in describe_parameters(model)

    model = GPT2LMHeadModel(config)
    inject_adapters(model, AdapterArgs(adapter="replace", adapter_rank=8, adapter_layers="1"))
    freeze_non_adapter(model)
    replace = 32 * 8 + 8 + 8 * 32 + 32  # one block: fc + proj with biases = 552
    assert count_parameters(model) == (
        replace,
        base_total - mlp + replace,
    )  # the kept base MLP is not computed
    assert f"plus {mlp:,} kept base-MLP parameters" in describe_parameters(model)


def test_adapter_off_reference_is_base_without_touching_policy_mode():
    base, policy = _adapted(adapter="residual", adapter_rank=8, adapter_dropout=0.5)
    _perturb_adapters(policy)
    reference = AdapterOffReference(policy)
    policy.train()
    inputs = _inputs()
    out = reference(**inputs).logits
    assert not out.requires_grad and policy.training
    assert torch.equal(out, _logits(base, inputs))
    assert set(reference.state_dict()) == {
        name for name, _ in policy.state_dict().items() if "adapter_" not in name
    }
    with pytest.raises(ValueError, match="needs a policy with adapters"):
        AdapterOffReference(build_tiny_gpt2())
    policy.transformer.wte.requires_grad_(True)  # a base that trains would drag the reference along
    with pytest.raises(RuntimeError, match="freeze_non_adapter"):
        reference(**inputs)


def _preference_rows(n: int) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        question = f"What is {i} plus {i + 1}?"
        rows.append(
            {
                "prompt": f"\n\nHuman: {question}\n\nAssistant:",
                "chosen": f" It is {2 * i + 1}.",
                "rejected": f" No idea, maybe {i}{i}.",
            }
        )
    return rows


def test_adapter_off_reference_in_dpo_trainer_equals_copied_base(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = build_tiny_gpt2()
    base_copy = copy.deepcopy(policy).eval()  # a fresh model, never touched by a trainer
    inject_adapters(policy, AdapterArgs(adapter="residual", adapter_rank=8))
    freeze_non_adapter(policy)
    reference = AdapterOffReference(policy)
    assert list(reference.parameters()) == [] and reference.config is policy.config
    calls = []
    reference.register_forward_hook(lambda *_: calls.append(1))

    config = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=5e-2,
        max_length=64,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    dataset = Dataset.from_list(_preference_rows(8))
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=dataset,
        processing_class=build_byte_tokenizer(),
    )
    assert trainer.ref_model is reference
    trainer.train()
    assert len(calls) == 2  # the reference ran once per step

    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    copy_chosen, copy_rejected = trainer.compute_ref_log_probs(base_copy, batch)
    assert torch.allclose(ref_chosen, copy_chosen, atol=1e-5)
    assert torch.allclose(ref_rejected, copy_rejected, atol=1e-5)
    policy_chosen, _ = trainer.compute_ref_log_probs(policy, batch)  # the trained policy itself
    assert (policy_chosen - copy_chosen).abs().max() > 1e-3  # the adapter moved, so the check above has teeth
    first_loss = trainer.state.log_history[0]["loss"]
    assert first_loss == pytest.approx(0.6931, abs=1e-3)  # ln 2: policy == reference at step 0


def test_lean_activations_keep_outputs_bit_for_bit_and_one_saved_tensor_per_activation():
    from transformers.activations import NewGELUActivation

    torch.manual_seed(0)
    plain = build_tiny_gpt2()
    lean = build_tiny_gpt2()
    assert lean_activations(lean) == lean.config.n_layer
    assert all(isinstance(block.mlp.act, LeanGelu) for block in lean.transformer.h)
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
    assert lean_activations(lean) == 0  # a second call finds nothing left to wrap
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, lean(ids).logits)  # evaluation is untouched
    saved = {}
    for name, model in (("plain", plain), ("lean", lean)):
        kept: list[torch.Size] = []

        def pack(tensor, kept=kept):
            kept.append(tensor.shape)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        saved[name] = len(kept)
    per_layer = (saved["plain"] - saved["lean"]) / plain.config.n_layer
    assert per_layer >= 3  # x^3, tanh(...) and 0.5 x are no longer kept for backward
    for (name, p), (_, q) in zip(plain.named_parameters(), lean.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
