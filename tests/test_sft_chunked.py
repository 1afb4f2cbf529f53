"""Protects SFT's chunked NLL with its gradient made in the forward (align_kit/models/logprobs.py ``chunked_nll``,
align_kit/training/sft.py):

- the summed NLL, entropy, argmax hits and gradients equal full logits (relative 1e-5), with a bias and
  ignored labels, and the head runs once: nothing vocabulary-sized is saved for backward;
- the SFTTrainer's loss, logged metrics (entropy, mean_token_accuracy) and gradients equal TRL's own chunked_nll
  (``logprob_chunk_size: 0``) for a full model and both adapter designs, and so do the weights after three
  training steps;
- without labels the patched forward is the model's own (generation keeps its logits);
- a second backward through the same forward is refused rather than doubling the gradients;
- settings the chunked NLL cannot compute keep TRL's path and say so.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from align_kit.configs import AdapterArgs, DataArgs
from align_kit.data.loading import load_sft
from align_kit.models import adapters
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2
from align_kit.models.logprobs import chunked_nll
from align_kit.training.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("one_thread_and_a_frozen_heap")

SHAPE = TinyGPT2Shape(n_layer=2, n_embd=32, n_head=2, n_positions=128)
REL = 1e-5


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    scale = want.abs().max().clamp(min=1e-12)
    assert ((got - want).abs().max() / scale).item() <= rel, (got, want)


def head_case(bias: bool):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 16, generator=generator).requires_grad_()
    weight = torch.randn(70, 16, generator=generator).requires_grad_()
    b = torch.randn(70, generator=generator).requires_grad_() if bias else None
    labels = torch.randint(0, 70, (3, 11), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    return hidden, weight, b, labels


@pytest.mark.parametrize("bias", [False, True])
def test_nll_statistics_and_gradients_equal_full_logits(bias):
    hidden, weight, b, labels = head_case(bias)
    params = [p for p in (hidden, weight, b) if p is not None]
    logits = torch.nn.functional.linear(hidden, weight, b)  # (N, T, V): what chunked_nll never makes
    valid = labels != -100
    want = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
    log_p = logits[valid].log_softmax(-1)
    want_entropy = -(log_p.exp() * log_p).sum()
    want_correct = (logits[valid].argmax(-1) == labels[valid]).sum()
    (want / 7.0).backward()
    want_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    nll, correct, entropy, count = chunked_nll(hidden, labels, (weight, b), chunk_size=5)
    (nll / 7.0).backward()
    assert count.item() == valid.sum().item() == 27
    assert nll.item() == pytest.approx(want.item(), rel=REL)
    assert entropy.item() == pytest.approx(want_entropy.item(), rel=REL)
    assert correct.item() == want_correct.item()
    for p, grad in zip(params, want_grads, strict=True):
        assert_close(p.grad, grad)
    assert (hidden.grad[~valid] == 0).all() and hidden.grad[valid].abs().sum() > 0


def test_nothing_vocabulary_sized_is_saved_and_a_second_backward_is_refused():
    hidden, weight, _, labels = head_case(False)
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll = chunked_nll(hidden, labels, (weight, None), chunk_size=4)[0]
    assert not [s for s in shapes if 70 in s], shapes
    nll.backward(retain_graph=True)
    first = weight.grad.clone()
    with pytest.raises(RuntimeError, match="used once"):
        nll.backward()
    assert torch.equal(weight.grad, first)


def test_under_bf16_autocast_the_head_runs_in_bf16():
    hidden, weight, _, labels = head_case(False)
    in_fp32 = chunked_nll(hidden, labels, (weight, None), chunk_size=4)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = chunked_nll(hidden, labels, (weight, None), chunk_size=4)[0]
    in_bf16.backward()
    assert in_bf16.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert 0 < abs(in_bf16.item() - in_fp32.item()) < 0.02 * abs(in_fp32.item())


# ---------------------------------------------------------------------------------------------------------
# SFTTrainer: against TRL's own chunked_nll on the same batch


def sft_trainer(tmp_path, chunk: int, adapter: str | None = None, **settings) -> SFTTrainer:
    tokenizer = build_byte_tokenizer()
    splits, _ = load_sft(DataArgs(embedded_train_size=6, embedded_test_size=2), tokenizer)
    train = Dataset.from_list(splits["train"]).select_columns(["prompt", "completion"])
    torch.manual_seed(0)
    model = build_tiny_gpt2(SHAPE, vocab_size=len(tokenizer))
    if adapter:
        adapters.inject_adapters(model, AdapterArgs(adapter=adapter, adapter_rank=4, adapter_init="random"))
        adapters.freeze_non_adapter(model)
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=6, max_length=96, report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, logprob_chunk_size=chunk, learning_rate=1e-3,
        max_steps=3, save_strategy="no", logging_steps=1, seed=0, **settings,
    )  # fmt: skip
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


def loss_metrics_grads(trainer: SFTTrainer, inputs):
    trainer._metrics["train"].clear()
    trainer.model.train()
    loss = trainer.compute_loss(
        trainer.model, inputs, num_items_in_batch=inputs["labels"][:, 1:].ne(-100).sum()
    )
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("adapter", [None, "residual", "replace"])
def test_loss_metrics_and_gradients_equal_trls_chunked_nll(tmp_path, adapter):
    ours, trls = sft_trainer(tmp_path, 16, adapter), sft_trainer(tmp_path, 0, adapter)
    assert ours.model.forward.__func__.__qualname__.startswith("patch_forward")
    assert trls.model.forward.__func__.__name__ == "_chunked_ce_forward"  # TRL's own patch, kept
    inputs = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    assert (inputs["labels"] == -100).any() and (inputs["labels"] != -100).sum() > 16  # prompts and >1 chunk
    loss, metrics, grads = loss_metrics_grads(ours, inputs)
    want_loss, want_metrics, want_grads = loss_metrics_grads(trls, inputs)
    assert loss.item() == pytest.approx(want_loss.item(), rel=REL)
    assert set(metrics) == set(want_metrics) >= {"entropy", "mean_token_accuracy"}
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=REL, abs=1e-6), name
    assert set(grads) == set(want_grads) and want_grads
    if adapter:
        assert all(adapters.is_adapter_parameter(name) for name in grads)
    for name, grad in want_grads.items():
        assert_close(grads[name], grad)


def test_three_training_steps_end_at_trls_weights(tmp_path):
    ours, trls = sft_trainer(tmp_path / "ours", 16), sft_trainer(tmp_path / "trl", 0)
    ours.train()
    trls.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (ours, trls)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    start = build_tiny_gpt2(SHAPE, vocab_size=ours.model.config.vocab_size)
    moved = False
    for (name, got), want in zip(
        ours.model.state_dict().items(), trls.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # Adam's steps are about 1e-3 each
        moved |= not torch.equal(got, start.state_dict()[name]) if name in start.state_dict() else False
    assert moved


def test_without_labels_the_forward_is_the_models_own(tmp_path):
    trainer = sft_trainer(tmp_path, 16)
    model = trainer.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        want = type(model).forward(model, input_ids=ids).logits
        answer = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.equal(logits, want)
    assert answer.shape == (1, 7)


def test_settings_it_cannot_compute_keep_trls_path_and_say_so(tmp_path, capsys):
    trainer = sft_trainer(tmp_path, 16, loss_type="nll")
    assert trainer.model.forward.__func__ is type(trainer.model).forward  # loss_type nll: nothing patched
    chunked = sft_trainer(tmp_path, 16)
    model = build_tiny_gpt2(SHAPE, vocab_size=chunked.model.config.vocab_size)
    model.config.logit_scale = 0.5  # rescaled logits: TRL's chunked_nll applies the scale, ours does not
    trainer = SFTTrainer(
        model=model,
        args=chunked.args,
        train_dataset=chunked.train_dataset,
        processing_class=chunked.processing_class,
    )
    assert trainer.model.forward.__func__.__name__ == "_chunked_ce_forward"
    assert "logprob_chunk_size=16 not used" in capsys.readouterr().out
