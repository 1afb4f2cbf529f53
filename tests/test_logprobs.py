"""Protects the chunked log-probability path (align_kit/models/logprobs.py) and its use in DPOTrainer and KTOTrainer:

- per-token answer log-probabilities and their gradients equal TRL's full-logits path (relative 1e-5) for a
  full model, both adapter designs and the adapter-off reference, with right and left padding;
- no tensor with a vocabulary-sized last dimension and more than ``chunk_size`` rows is saved for backward;
- DPOTrainer's loss, logged metrics and gradients with ``logprob_chunk_size > 0`` equal ``0`` (TRL's own
  ``_compute_loss``) for every loss type the chunked path computes, for the adapter-off and a separate reference;
- KTOTrainer's per-answer and KL-row log-probabilities (policy and reference), loss, logged metrics and
  gradients with ``logprob_chunk_size > 0`` equal ``0`` (TRL's own ``compute_ref_log_probs`` and
  ``_compute_loss``) for a full model, both adapters with the adapter-off reference, right and left padding,
  kto and apo_zero_unpaired; its precomputed reference is computed on the chunked path and equals the live one;
- with bf16 the trainers' head runs under the run's autocast, as TRL's runs inside the model's forward;
- settings the chunked path cannot compute fall back to TRL's path, saying so.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl.trainer.utils import selective_log_softmax

from align_kit.configs import AdapterArgs, DataArgs
from align_kit.data.loading import load_preferences, load_unpaired
from align_kit.models import adapters
from align_kit.models.loading import TinyGPT2Shape, build_byte_tokenizer, build_tiny_gpt2
from align_kit.models.logprobs import answer_token_logps
from align_kit.training.losses import DPO_LOSS_TYPES, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from align_kit.training.sft import SFTConfig

pytestmark = pytest.mark.usefixtures("one_thread_and_a_frozen_heap")

VOCAB = 300
SHAPE = TinyGPT2Shape(n_layer=2, n_embd=32, n_head=2, n_positions=128)
REL = 1e-5


def tiny_model(seed: int = 0, adapter: str | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_tiny_gpt2(SHAPE, vocab_size=VOCAB)
    if adapter:
        adapters.inject_adapters(model, AdapterArgs(adapter=adapter, adapter_rank=4, adapter_init="random"))
        adapters.freeze_non_adapter(model)
        for name, param in model.named_parameters():  # move the zero-initialised outputs off zero
            if adapters.is_adapter_parameter(name):
                param.data.normal_(0, 0.2)
    return model


def batch(padding_side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five rows of different lengths, padded on one side; the answer is each row's last half."""
    generator = torch.Generator().manual_seed(1)
    lengths = [20, 13, 17, 9, 20]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask, answer = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        cols = slice(0, length) if padding_side == "right" else slice(width - length, width)
        ids[row, cols] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, cols] = 1
        start = cols.start + length // 2
        answer[row, start : cols.stop] = 1
    return ids, mask, answer


def full_logits_logps(model, ids, mask, answer) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits  # (N, T, V): what the chunked path avoids
    return selective_log_softmax(logits[:, :-1], ids[:, 1:]).masked_fill(answer[:, 1:] == 0, 0.0)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().clamp(min=1e-12)
    assert ((got - want).abs().max() / scale).item() <= REL, (got, want)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("adapter", [None, "residual", "replace"])
def test_logps_and_gradients_equal_the_full_logits_path(adapter, padding_side):
    model = tiny_model(adapter=adapter)
    ids, mask, answer = batch(padding_side)
    weights = torch.linspace(0.5, 2.0, ids.shape[1] - 1)  # a loss that weighs every position differently
    want = full_logits_logps(model, ids, mask, answer)
    (want * weights).sum().backward()
    want_grads = grads(model)
    got = answer_token_logps(model, ids, mask, answer, chunk_size=7)
    (got.logps * weights).sum().backward()
    got_grads = grads(model)
    assert_close(got.logps, want)
    assert (want != 0).sum() == answer[:, 1:].sum() and (got.logps[answer[:, 1:] == 0] == 0).all()
    assert set(got_grads) == set(want_grads) and len(want_grads) > 0
    if adapter:
        assert all(adapters.is_adapter_parameter(name) for name in got_grads)
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad)


def test_under_bf16_autocast_the_head_runs_in_bf16_both_ways_and_gradients_keep_their_dtype():
    model = tiny_model()
    ids, mask, answer = batch("right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = full_logits_logps(model, ids, mask, answer).float()
        want.sum().backward()
        want_grads = grads(model)
        got = answer_token_logps(model, ids, mask, answer, chunk_size=6).logps
        got.sum().backward()
        got_grads = grads(model)
    in_fp32 = answer_token_logps(model, ids, mask, answer, chunk_size=6).logps.detach()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # both paths round the head's matmul to bf16
    assert (got.detach() - in_fp32).abs().max() > 1e-6  # ... which float32 does not
    for name, grad in want_grads.items():
        assert got_grads[name].dtype == torch.float32
        assert (got_grads[name] - grad).norm() <= 0.05 * grad.norm(), name


def test_the_adapter_off_reference_equals_the_base_model():
    model = tiny_model(adapter="residual")
    ids, mask, answer = batch("left")
    reference = adapters.AdapterOffReference(model)
    got = answer_token_logps(reference, ids, mask, answer, chunk_size=5).logps
    with adapters.adapters_disabled(model), torch.no_grad():
        want = full_logits_logps(model, ids, mask, answer)
    assert_close(got, want)
    with torch.no_grad():
        adapted = full_logits_logps(model, ids, mask, answer)
    assert (adapted - want).abs().max() > 1e-3  # the adapter does change the model


def test_no_vocabulary_sized_tensor_beyond_one_chunk_is_kept_for_backward():
    model = tiny_model()
    ids, mask, answer = batch("right")
    chunk = 4
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_token_logps(model, ids, mask, answer, chunk_size=chunk).logps.sum().backward()
    weight_shapes = {(VOCAB, SHAPE.n_embd), (SHAPE.n_embd, VOCAB)}  # the tied head weight itself
    vocab_sized = [s for s in shapes if VOCAB in s and s not in weight_shapes]
    assert all(torch.Size(s).numel() <= chunk * VOCAB for s in vocab_sized), vocab_sized
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_logits_logps(model, ids, mask, answer).sum().backward()
    assert any(len(s) == 3 and s[-1] == VOCAB for s in shapes)  # the hook does see TRL's (N, T, V) logits


# ---------------------------------------------------------------------------------------------------------
# DPOTrainer: chunked against TRL's own _compute_loss on the same batch


def tiny_trainer(trainer_class, config_class, train, tokenizer, tmp_path, reference: str, settings: dict):
    """A batch of 6 rows on a tiny GPT-2; ``reference``: "separate" (a full model and its own reference) or the
    adapter-off view of an adapter design ("residual", "replace"; "adapter-off" is residual)."""
    torch.manual_seed(0)
    model = build_tiny_gpt2(SHAPE, vocab_size=len(tokenizer))
    if reference == "separate":
        ref_model = build_tiny_gpt2(SHAPE, vocab_size=len(tokenizer)).eval().requires_grad_(False)
    else:
        design = "residual" if reference == "adapter-off" else reference
        adapters.inject_adapters(model, AdapterArgs(adapter=design, adapter_rank=4))
        adapters.freeze_non_adapter(model)
        ref_model = adapters.AdapterOffReference(model)
    argv = dict(output_dir=str(tmp_path), per_device_train_batch_size=6, max_length=96, report_to="none")
    fixed = dict(use_cpu=True, bf16=False, gradient_checkpointing=False)
    args = config_class(**{**argv, **fixed, **settings})
    return trainer_class(
        model=model, ref_model=ref_model, args=args, train_dataset=train, processing_class=tokenizer
    )


def dpo_trainer(tmp_path, reference: str, **settings) -> DPOTrainer:
    tokenizer = build_byte_tokenizer()
    splits, _ = load_preferences(DataArgs(embedded_train_size=6, embedded_test_size=2), tokenizer)
    train = Dataset.from_list(splits["train"]).select_columns(["prompt", "chosen", "rejected"])
    return tiny_trainer(DPOTrainer, DPOConfig, train, tokenizer, tmp_path, reference, settings)


def loss_metrics_grads(trainer: DPOTrainer, inputs, chunk_size: int, backward: bool = True):
    trainer._chunk_size = chunk_size
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.set_grad_enabled(backward):
        loss = trainer.compute_loss(trainer.model, inputs)
    if backward:
        loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.detach(), metrics, grads(trainer.model)


def move_off_the_reference(model) -> None:
    """Perturb the trained weights so that no log-ratio is 0."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)


def assert_chunked_equals_trls_path(trainer, inputs) -> tuple[torch.Tensor, dict, dict]:
    """Loss, logged metrics and gradients with chunk size 16 equal chunk size 0 (TRL's own path) on
    ``inputs``; returns TRL's loss and metrics and the chunked path's gradients."""
    trl_loss, trl_metrics, trl_grads = loss_metrics_grads(trainer, inputs, 0)
    loss, metrics, chunked_grads = loss_metrics_grads(trainer, inputs, 16)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=REL)
    assert set(metrics) == set(trl_metrics)
    for name, value in trl_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=REL, abs=1e-6), name
    assert set(chunked_grads) == set(trl_grads) and trl_grads
    for name, grad in trl_grads.items():
        assert_close(chunked_grads[name], grad)
    return trl_loss, trl_metrics, chunked_grads


@pytest.mark.parametrize("reference", ["adapter-off", "separate"])
def test_dpo_loss_metrics_and_gradients_equal_trls_path(tmp_path, reference):
    types = [t for t in DPO_LOSS_TYPES if t != "exo_pair"]  # exo_pair needs label_smoothing: below
    weights = torch.linspace(0.2, 1.5, len(types)).tolist()
    trainer = dpo_trainer(tmp_path, reference, loss_type=types, loss_weights=weights)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    move_off_the_reference(trainer.model)
    trl_metrics = assert_chunked_equals_trls_path(trainer, inputs)[1]  # all terms, weighted
    assert trl_metrics["rewards/margins"] != 0.0
    for loss_type in types:  # each term on its own, forward only
        trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        want = loss_metrics_grads(trainer, inputs, 0, backward=False)[0]
        got = loss_metrics_grads(trainer, inputs, 16, backward=False)[0]
        assert got.item() == pytest.approx(want.item(), rel=REL, abs=1e-7), loss_type


def test_exo_pair_and_label_smoothing_equal_trls_path(tmp_path):
    trainer = dpo_trainer(tmp_path, "separate", loss_type=["exo_pair", "robust"], label_smoothing=0.1)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert_chunked_equals_trls_path(trainer, inputs)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_settings_the_chunked_path_cannot_compute_use_trls_path_and_say_so(tmp_path, capsys, method):
    if method == "dpo":
        trainer, reason = dpo_trainer(tmp_path, "separate", use_weighting=True), "use_weighting: WPO's"
    else:
        trainer, reason = kto_trainer(tmp_path, "separate"), "compute_metrics: TRL's prediction_step"
        trainer.compute_metrics = lambda prediction: {}
    assert trainer.chunk_size == 0
    out = capsys.readouterr().out
    assert "logprob_chunk_size=1024 not used" in out and reason in out
    assert (dpo_trainer if method == "dpo" else kto_trainer)(tmp_path, "separate").chunk_size == 1024


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_with_bf16_the_trainers_head_runs_in_bf16_as_inside_the_models_forward(tmp_path, method):
    make = dpo_trainer if method == "dpo" else kto_trainer
    trainer, in_fp32 = make(tmp_path, "separate", bf16=True), make(tmp_path, "separate")
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    got = trainer._answer_logps(trainer.model, inputs).logps
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the model's forward in
        want = answer_token_logps(
            trainer.model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], 1024
        ).logps
    assert torch.equal(got, want)
    assert (got - in_fp32._answer_logps(trainer.model, inputs).logps).abs().max() > 1e-4


@pytest.mark.parametrize("config", [DPOConfig, KTOConfig, SFTConfig])
def test_a_negative_chunk_size_is_refused_when_parsed(config):
    from align_kit.configs import ConfigError

    with pytest.raises(ConfigError, match="logprob_chunk_size"):
        config(output_dir="x", logprob_chunk_size=-1, report_to="none")


def test_generation_answer_logprobs_equal_the_full_softmax_with_left_padded_prompts():
    from align_kit.models.generation import answer_logprobs

    model = tiny_model().eval()
    sequences = torch.randint(1, VOCAB, (3, 18), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(sequences)
    mask[0, :4], mask[1, :2] = 0, 0  # prompts left padded to width 8
    with torch.no_grad():
        got = answer_logprobs(model, sequences, mask, 8)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
        want = torch.log_softmax(logits[:, 7:-1], -1).gather(-1, sequences[:, 8:, None]).squeeze(-1)
    assert got.shape == want.shape == (3, 10)
    assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# KTOTrainer: chunked against TRL's own _compute_loss and compute_ref_log_probs on the same batch


def kto_trainer(tmp_path, reference: str, **settings) -> KTOTrainer:
    """Three pairs as six unpaired rows (a desirable and an undesirable answer each), the policy moved off
    its reference."""
    tokenizer = build_byte_tokenizer()
    splits, _ = load_unpaired(DataArgs(embedded_train_size=3, embedded_test_size=2), tokenizer)
    train = Dataset.from_list(splits["train"]).select_columns(["prompt", "completion", "label"])
    trainer = tiny_trainer(KTOTrainer, KTOConfig, train, tokenizer, tmp_path, reference, settings)
    move_off_the_reference(trainer.model)
    return trainer


def left_padded(inputs: dict) -> dict:
    """TRL's KTO collator pads on the right; the same rows with their padding moved to the left."""
    out = dict(inputs)
    for prefix in ("", "KL_") if "KL_input_ids" in inputs else ("",):
        shifts = (inputs[f"{prefix}attention_mask"] == 0).sum(dim=1)  # (N,)
        for name in ("input_ids", "attention_mask", "completion_mask"):
            key = f"{prefix}{name}"
            out[key] = torch.stack([row.roll(int(s)) for row, s in zip(inputs[key], shifts, strict=True)])
    assert (out["attention_mask"][:, 0] == 0).any()
    return out


def first_kto_batch(trainer: KTOTrainer, padding_side: str = "right") -> dict:
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert 0 < inputs["label"].sum() < len(inputs["label"])  # desirable and undesirable answers
    return left_padded(inputs) if padding_side == "left" else inputs


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("reference", ["separate", "residual", "replace"])
def test_kto_logps_loss_metrics_and_gradients_equal_trls_path(tmp_path, reference, padding_side):
    trainer = kto_trainer(tmp_path, reference, desirable_weight=2.0, undesirable_weight=0.5)
    inputs = first_kto_batch(trainer, padding_side)
    for model in (trainer.model, trainer.ref_model):  # per answer and per KL row, under policy and reference
        trainer._chunk_size = 0
        want_answers, want_kl = trainer.compute_ref_log_probs(model, inputs)
        trainer._chunk_size = 16
        got_answers, got_kl = trainer.compute_ref_log_probs(model, inputs)
        assert_close(got_answers, want_answers)
        assert_close(got_kl, want_kl)
    trl_loss, trl_metrics, chunked_grads = assert_chunked_equals_trls_path(trainer, inputs)
    assert {"kl", "entropy", "logits/rejected", "rewards/margins"} <= set(trl_metrics)
    assert trl_metrics["rewards/margins"] != 0.0 and trl_loss.item() != pytest.approx(0.5 * 1.25 / 2)
    if reference != "separate":
        assert all(adapters.is_adapter_parameter(name) for name in chunked_grads)


def test_apo_zero_unpaired_equals_trls_path(tmp_path):
    trainer = kto_trainer(tmp_path, "separate", loss_type="apo_zero_unpaired")
    inputs = first_kto_batch(trainer)
    assert "KL_input_ids" not in inputs  # no KL estimate for APO
    assert assert_chunked_equals_trls_path(trainer, inputs)[1]["kl"] == 0.0


def test_kto_precomputed_reference_goes_through_the_chunked_path_and_equals_live(tmp_path):
    live = kto_trainer(tmp_path / "live", "residual")
    trainer = kto_trainer(tmp_path / "pre", "residual", precompute_ref_log_probs=True, logprob_chunk_size=16)
    assert trainer.__dict__["_chunk_size"] == 16  # decided by TRL's precompute, in __init__, via our override
    inputs = first_kto_batch(trainer)
    trainer._chunk_size = 0  # TRL's reference pass on the same rows
    want = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    assert_close(inputs["ref_logps"], want[0])
    assert_close(inputs["ref_KL_logps"], want[1])
    trainer.model.load_state_dict(live.model.state_dict())  # the same perturbed policy
    got = loss_metrics_grads(trainer, inputs, 16)[0]
    assert got.item() == pytest.approx(loss_metrics_grads(live, first_kto_batch(live), 0)[0].item(), rel=REL)
