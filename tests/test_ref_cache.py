"""Protects the precomputed reference (align_kit/training/ref_cache.py) of DPO and KTO: computed once into the run folder, equal to
computing it live (adapter-off reference and a separate reference model), reused by a second trainer on the same
run folder (a resumed run) without running the reference, and recomputed when the data, the reference's weights
or a setting that changes the values differ."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import dpo_trainer, first_kto_batch, kto_trainer

pytestmark = pytest.mark.usefixtures("one_thread_and_a_frozen_heap")


def forbid_the_reference(monkeypatch, trainer) -> None:
    """From here on, running the reference fails the test: a second trainer must read the run folder."""

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran although its log-probabilities were in the run folder")

    monkeypatch.setattr(type(trainer), "compute_ref_log_probs", no_reference)


@pytest.mark.parametrize("reference", ["adapter-off", "separate"])
def test_precomputed_equals_live_and_is_reused_from_the_run_folder(tmp_path, reference, monkeypatch, capsys):
    trainer = dpo_trainer(tmp_path, reference, precompute_ref_log_probs=True, logprob_chunk_size=16)
    files = list((tmp_path / "ref_logps").glob("train-*.pt"))
    assert len(files) == 1 and "computed once for 6 rows" in capsys.readouterr().out
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    live_chosen, live_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert torch.equal(batch["ref_chosen_logps"], live_chosen.float())
    assert torch.equal(batch["ref_rejected_logps"], live_rejected.float())
    with torch.no_grad():  # the loss with the precomputed reference equals the loss with the live one
        trainer.model.train()
        precomputed_loss = trainer.compute_loss(trainer.model, batch)
        trainer.precompute_ref_logps = False
        assert trainer.compute_loss(trainer.model, batch).item() == precomputed_loss.item()
    forbid_the_reference(monkeypatch, trainer)
    again = dpo_trainer(tmp_path, reference, precompute_ref_log_probs=True, logprob_chunk_size=16)
    assert "reused from" in capsys.readouterr().out
    assert again.train_dataset["ref_chosen_logps"] == data["ref_chosen_logps"]


def test_another_setting_or_reference_is_computed_again(tmp_path, capsys):
    dpo_trainer(tmp_path, "separate", precompute_ref_log_probs=True, logprob_chunk_size=16)
    dpo_trainer(tmp_path, "separate", precompute_ref_log_probs=True, logprob_chunk_size=16, max_length=64)
    dpo_trainer(tmp_path, "adapter-off", precompute_ref_log_probs=True, logprob_chunk_size=16)
    out = capsys.readouterr().out
    assert out.count("computed once") == 3 and "reused" not in out
    assert len(list((tmp_path / "ref_logps").glob("train-*.pt"))) == 3


@pytest.mark.parametrize("reference", ["residual", "separate"])
def test_kto_reference_with_its_kl_rows_is_kept_in_the_run_folder_and_reused(
    tmp_path, reference, monkeypatch, capsys
):
    trainer = kto_trainer(tmp_path, reference, precompute_ref_log_probs=True, logprob_chunk_size=16)
    files = list((tmp_path / "ref_logps").glob("train-*.pt"))
    data = trainer.train_dataset
    assert len(files) == 1 and f"computed once for {len(data)} rows" in capsys.readouterr().out
    batch = first_kto_batch(trainer)
    live_answers, live_kl_rows = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert torch.equal(batch["ref_logps"], live_answers.float())
    assert torch.equal(batch["ref_KL_logps"], live_kl_rows.float())
    forbid_the_reference(monkeypatch, trainer)
    again = kto_trainer(tmp_path, reference, precompute_ref_log_probs=True, logprob_chunk_size=16)
    assert "reused from" in capsys.readouterr().out
    assert again.train_dataset["ref_KL_logps"] == data["ref_KL_logps"]
