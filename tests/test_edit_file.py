"""Hostile and broken edit files: each raises a clear error and leaves the user's model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import random_core, tiny_llama

import dft_peft
from dft_peft.format import codec
from dft_peft.format.edit_file import CHECKSUM_PART, FILE_PARTS, group_parts, module_checksum
from dft_peft.tuner.layer import DFTLayer

NAME = "base_model.model.model.layers.0.mlp.up_proj"  # a module every saved edit below changes
WEIGHTS = "adapter_model.safetensors"


def save_edit(directory):
    """A valid edit of tiny Llama (seeded core) saved in `directory`."""
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig(top_t=0.05))
    model.add_core(random_core(model, density=0.05))
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def edit_dir(tmp_path):
    return save_edit(tmp_path)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    assert not any(isinstance(m, DFTLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert {n: type(m) for n, m in model.named_modules()} == before["types"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["grad"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    assert model.training == before["training"]


def rewrite(edit_dir, change) -> None:
    """Apply `change` to the saved tensors and recompute the checksums, as a hostile writer would: the validation
    behind them is what must refuse the file."""
    tensors = load_file(edit_dir / WEIGHTS)
    change(tensors)
    groups, _ = group_parts(tensors.items())
    for prefix, parts in groups.items():
        if all(p in parts for p in FILE_PARTS):
            tensors[f"{prefix}.{CHECKSUM_PART}"] = module_checksum(prefix, parts)
    save_file(tensors, edit_dir / WEIGHTS, metadata={"format": "pt"})


def raw_code(indices: list[int], numel: int, low_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elias–Fano bytes for an arbitrary (possibly invalid) index list: what a hostile file could contain."""
    idx = torch.tensor(indices, dtype=torch.int64)
    low_nbytes, high_nbytes = codec._code_bytes(len(indices), numel, low_bits)
    low = codec._pack_low(idx & ((1 << low_bits) - 1), low_bits, low_nbytes)
    positions = (idx >> low_bits) + torch.arange(len(indices))
    high = torch.zeros(high_nbytes, dtype=torch.uint8)
    for p in positions.tolist():
        high[p // 8] |= 1 << (p % 8)
    meta = torch.tensor([codec.FORMAT_VERSION, numel, len(indices), low_bits], dtype=torch.int64)
    return torch.cat([low, high]), meta


def set_indices(indices: list[int], low_bits: int = 4):
    def change(tensors):
        numel = int(tensors[f"{NAME}.dft_meta"][1])
        tensors[f"{NAME}.dft_code"], tensors[f"{NAME}.dft_meta"] = raw_code(indices, numel, low_bits)
        tensors[f"{NAME}.dft_values"] = torch.ones(len(indices))

    return change


def load_must_fail(edit_dir, message: str, base=None, **kwargs) -> None:
    base = base if base is not None else tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, edit_dir, **kwargs)
    assert_untouched(base, before)


def test_valid_file_loads(edit_dir):
    """The untouched file loads, with the saved core: the hostile cases below differ from it only by their change."""
    saved = get_peft_model(tiny_llama(), dft_peft.DFTConfig(top_t=0.05))
    saved.add_core(random_core(saved, density=0.05))  # the fixture's core: random_core is seeded
    loaded = PeftModel.from_pretrained(tiny_llama(), edit_dir).base_model.get_core()
    for name, delta in saved.base_model.get_core().items():
        assert torch.equal(loaded[name].indices, delta.indices)
        assert torch.equal(loaded[name].values, delta.values)


def test_index_out_of_range(edit_dir):
    # up_proj has 48 x 32 = 1536 elements; with 10 low bits the code can express indices up to 2047.
    rewrite(edit_dir, set_indices([3, 1540], low_bits=10))
    load_must_fail(edit_dir, "outside")


def test_unsorted_indices(edit_dir):
    rewrite(edit_dir, set_indices([9, 5]))
    load_must_fail(edit_dir, "unsorted")


def test_duplicated_indices(edit_dir):
    rewrite(edit_dir, set_indices([7, 7]))
    load_must_fail(edit_dir, "duplicated")


def test_length_mismatch(edit_dir):
    rewrite(edit_dir, lambda t: t.__setitem__(f"{NAME}.dft_values", t[f"{NAME}.dft_values"][:-1].clone()))
    load_must_fail(edit_dir, "indices but")


def test_wrong_dtype(edit_dir):
    rewrite(edit_dir, lambda t: t.__setitem__(f"{NAME}.dft_values", t[f"{NAME}.dft_values"].to(torch.int32)))
    load_must_fail(edit_dir, "dtype")


def test_nan_values(edit_dir):
    def change(tensors):
        tensors[f"{NAME}.dft_values"][0] = float("nan")

    rewrite(edit_dir, change)
    load_must_fail(edit_dir, "NaN")


def test_missing_part(edit_dir):
    rewrite(edit_dir, lambda t: t.pop(f"{NAME}.dft_meta"))
    load_must_fail(edit_dir, "lacks")


def test_unknown_module(edit_dir):
    def change(tensors):
        for part in ("dft_values", "dft_code", "dft_meta", "dft_fingerprint"):
            tensors[f"base_model.model.model.layers.7.mlp.up_proj.{part}"] = tensors.pop(f"{NAME}.{part}")

    rewrite(edit_dir, change)
    load_must_fail(edit_dir, "no DFT layer")


def test_corrupt_safetensors(edit_dir):
    data = (edit_dir / WEIGHTS).read_bytes()
    (edit_dir / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_must_fail(edit_dir, "not a valid safetensors")


def test_pickle_is_refused(edit_dir):
    (edit_dir / WEIGHTS).rename(edit_dir / "adapter_model.bin")
    load_must_fail(edit_dir, "pickle")


def test_other_base_model_shape(edit_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )).eval()
    load_must_fail(edit_dir, "different base model|wrong base model", base=other)


def test_other_base_model_fingerprint_and_override(edit_dir):
    load_must_fail(edit_dir, "fingerprint", base=tiny_llama(seed=123))
    config = dft_peft.DFTConfig.from_pretrained(edit_dir)
    config.verify_base_fingerprint = False
    model = PeftModel.from_pretrained(tiny_llama(seed=123), edit_dir, config=config)
    assert sum(d.nnz for d in model.base_model.get_core().values()) > 0


def test_hostile_file_into_existing_peft_model(edit_dir, tmp_path):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig())
    core = random_core(model, seed=9)
    model.add_core(core)
    before = copy.deepcopy(model.base_model.get_core())
    rewrite(edit_dir, set_indices([9, 5]))
    with pytest.raises(ValueError, match="unsorted"):
        model.load_adapter(edit_dir, adapter_name="hostile")
    assert list(model.peft_config) == ["default"]
    assert all("hostile" not in m.dft_values for m in model.base_model.dft_layers().values())
    after = model.base_model.get_core()
    assert all(torch.equal(after[n].indices, d.indices) and torch.equal(after[n].values, d.values)
               for n, d in before.items())
