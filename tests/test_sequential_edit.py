"""Editing over time: repeated `edit` calls on one adapter keep what earlier calls stored and report retention."""

from __future__ import annotations

import copy

import torch
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

import dft_peft
from dft_peft import EditArguments, edit

TARGETS = ["q_proj", "up_proj", "down_proj"]
ARGS = EditArguments(max_rounds=3, epochs=2, learning_rate=0.2, optimizer="sgd", batch_size=2, core_epochs=2,
                     core_learning_rate=0.5, seed=3)


def test_a_later_edit_trains_only_its_own_entries():
    tokenizer = tiny_tokenizer()
    config = dft_peft.DFTConfig(top_t=0.1, target_modules=TARGETS)
    first, second = TOY_FACTS[:1], TOY_FACTS[1:]
    model, _ = edit(tiny_llama(), tokenizer, first, config, ARGS, progress=False)
    earlier = {n: copy.deepcopy(d) for n, d in model.base_model.get_core().items()}
    after_locate = {}

    def keep_located(peft_model, round_report):
        if round_report.kind == "locate":
            after_locate.update({n: copy.deepcopy(d) for n, d in peft_model.base_model.get_core().items()})

    model, report = edit(model, tokenizer, second, args=ARGS, progress=False, retain=first, on_round=keep_located)
    assert [r.kind for r in report.rounds][:2] == ["locate", "train_core"]  # the core's values did train
    now = model.base_model.get_core()
    grown = sum(d.nnz for d in now.values()) - sum(d.nnz for d in earlier.values())
    assert 0 < grown <= report.rounds[0].core_size  # the adapter grows by the new core only
    trained = 0
    for name, before in earlier.items():
        position = torch.searchsorted(now[name].indices.long(), before.indices.long())
        assert torch.equal(now[name].indices.long()[position], before.indices.long())  # no earlier entry is lost
        # earlier entries keep the values the locate round left them (it adds where the two cores coincide)
        assert torch.equal(now[name].values[position], after_locate[name].values[position])
        new_entries = ~torch.isin(now[name].indices.long(), before.indices.long())
        trained += int((now[name].values[new_entries] != after_locate[name].values[new_entries]).sum())
    assert trained > 0  # while the new entries did move
    retention = report.retention
    assert retention is not None and retention.requests == len(first)
    assert 0 <= retention.held_after <= 1 and 0.0 <= retention.reliability_after <= 1.0


def test_core_training_leaves_frozen_entries_exactly():
    tokenizer = tiny_tokenizer()
    config = dft_peft.DFTConfig(top_t=0.1, target_modules=TARGETS)
    model, _ = edit(tiny_llama(), tokenizer, TOY_FACTS[:1], config,
                    EditArguments(max_rounds=1, epochs=2, learning_rate=0.2, optimizer="sgd"), progress=False)
    layers = model.base_model._layers_with("default")
    values = dft_peft.editing.sources.CoreValues.create(model, layers, ARGS, torch.Generator(), "default")
    stored = {n: layers[n].dft_values["default"].detach().clone() for n in values.names}
    values.freeze({n: layers[n].dft_indices["default"] for n in values.names})
    with torch.no_grad():
        for t in values.trained:
            t.add_(1.0)  # what an optimiser step would do
    values.result()
    for name in values.names:
        assert torch.equal(layers[name].dft_values["default"].detach(), stored[name])
