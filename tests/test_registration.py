"""DFT resolves through every PEFT entry point. PEFT has no public way to add a method type, so registration patches
`PeftType`: a PEFT release that changes its registry fails here, with the version named, before users see it."""

from __future__ import annotations

import importlib.metadata

import pytest
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from tiny_models import tiny_llama

import dft_peft

BROKEN = (f"peft {importlib.metadata.version('peft')} no longer accepts DFT's registration; dft-peft pins the "
          "tested range in pyproject.toml: widen it only once this test passes")


def test_peft_type_member_resolves_every_way():
    member = PeftType["DFT"]
    assert PeftType.DFT is member and PeftType("DFT") is member and member in list(PeftType), BROKEN
    assert dft_peft.DFTConfig().peft_type is member, BROKEN


def test_registry_maps_dft_to_its_classes():
    member = PeftType.DFT
    assert PEFT_TYPE_TO_CONFIG_MAPPING.get(member) is dft_peft.DFTConfig, BROKEN
    assert PEFT_TYPE_TO_TUNER_MAPPING.get(member) is dft_peft.DFTModel, BROKEN
    assert PEFT_TYPE_TO_PREFIX_MAPPING.get(member) == dft_peft.DFTModel.prefix, BROKEN


def test_get_peft_model_and_from_pretrained_resolve_dft(tmp_path):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig(top_t=0.1))
    assert isinstance(model.base_model, dft_peft.DFTModel), BROKEN
    model.save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), dft_peft.DFTConfig), BROKEN
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(loaded.base_model, dft_peft.DFTModel), BROKEN


def test_registration_is_idempotent():
    before = dict(PEFT_TYPE_TO_TUNER_MAPPING)
    dft_peft.tuner.registration.register(dft_peft.DFTConfig, dft_peft.DFTModel)
    assert dict(PEFT_TYPE_TO_TUNER_MAPPING) == before
    assert list(PeftType).count(PeftType.DFT) == 1


@pytest.mark.parametrize("name", ["DFT", "LORA"])
def test_existing_members_are_untouched(name):
    assert PeftType[name].value == name
