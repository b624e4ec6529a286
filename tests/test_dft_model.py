"""PEFT's generic tuner checks for DFT, on tiny Llama (Linear), GPT-2 (Conv1D) and an embedding target."""

from __future__ import annotations

import copy
import importlib
import json
import os
import types

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors import safe_open
from tiny_models import MODELS, dense_reference, random_core, tiny_llama

import dft_peft
from dft_peft.tuner.layer import DFTLayer

CASES = [
    ("llama", "all-linear"),
    ("gpt2", "all-linear"),
    ("llama", ["embed_tokens", "q_proj", "down_proj"]),
]
CASE_IDS = ["llama-linear", "gpt2-conv1d", "llama-embedding"]


def make(model_kind: str, target, dtype=torch.float32, **config_kwargs):
    base = MODELS[model_kind](dtype)
    config = dft_peft.DFTConfig(top_t=0.05, target_modules=target, **config_kwargs)
    return base, get_peft_model(copy.deepcopy(base), config)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


# --- registration --------------------------------------------------------------------------------------------


def test_peft_type_registered():
    assert PeftType.DFT == "DFT"
    assert PeftType("DFT") is PeftType.DFT is PeftType["DFT"]
    assert PeftType.DFT in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.DFT] is dft_peft.DFTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DFT] is dft_peft.DFTModel


def test_registration_survives_reload(input_ids):
    module = importlib.reload(dft_peft)
    model = get_peft_model(tiny_llama(), module.DFTConfig())
    assert isinstance(model.base_model, module.DFTModel)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DFT] is module.DFTModel


def test_every_loader_resolves_dft(tmp_path, input_ids):
    base = tiny_llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir).eval()
    model = get_peft_model(copy.deepcopy(base), dft_peft.DFTConfig())
    model.add_core(random_core(model))
    model.save_pretrained(tmp_path / "edit")
    expected = logits(model, input_ids)

    config = PeftConfig.from_pretrained(tmp_path / "edit")
    assert isinstance(config, dft_peft.DFTConfig) and config.peft_type == PeftType.DFT
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "edit")
    assert isinstance(loaded.base_model, dft_peft.DFTModel)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "edit")
    torch.testing.assert_close(logits(auto, input_ids), expected, rtol=0, atol=0)


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_t": 0.0}, "top_t"),
        ({"top_t": 1.5}, "top_t"),
        ({"top_t": "0.1"}, "top_t"),
        ({"lam": 0.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"selection": "local"}, "selection"),
        ({"value_dtype": "int8"}, "value_dtype"),
        ({"target_modules": []}, "target_modules"),
        ({"layers_to_transform": [-1], "target_modules": ["q_proj"]}, "layers_to_transform"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        dft_peft.DFTConfig(**kwargs)


def test_default_targets_every_linear_but_the_head():
    llama = get_peft_model(tiny_llama(), dft_peft.DFTConfig(top_t=0.05))
    targeted = set(llama.base_model.targeted_module_names)
    linears = {n for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    assert targeted == linears - {"lm_head"}
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        gpt2 = get_peft_model(MODELS["gpt2"](), dft_peft.DFTConfig(top_t=0.05))
    assert {n.rsplit(".", 1)[-1] for n in gpt2.base_model.targeted_module_names} == {"c_attn", "c_proj", "c_fc"}
    assert all(m.fan_in_fan_out for m in gpt2.base_model.dft_layers().values())


def test_layers_to_transform_and_exclude():
    config = dft_peft.DFTConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], exclude_modules=None)
    model = get_peft_model(tiny_llama(), config)
    assert sorted(model.base_model.targeted_module_names) == ["model.layers.1.self_attn.q_proj",
                                                               "model.layers.1.self_attn.v_proj"]
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig(exclude_modules=["down_proj"]))
    assert not any(n.endswith("down_proj") for n in model.base_model.targeted_module_names)


# --- forward / merge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "target"), CASES, ids=CASE_IDS)
def test_empty_adapter_is_identity(kind, target, input_ids):
    base, model = make(kind, target)
    torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "target"), CASES, ids=CASE_IDS)
def test_forward_merge_unload_match_dense_reference(kind, target, input_ids):
    base, model = make(kind, target)
    core = random_core(model, seed=3)
    model.add_core(core)
    expected = logits(dense_reference(base, [core]), input_ids)
    assert (expected - logits(base, input_ids)).abs().max() > 1e-3  # the edit does change the model
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, DFTLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kind", "target"), CASES, ids=CASE_IDS)
def test_unload_and_disable_give_the_base(kind, target, input_ids):
    base, model = make(kind, target)
    model.add_core(random_core(model))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    assert (logits(model, input_ids) - logits(base, input_ids)).abs().max() > 1e-3
    model.merge_adapter()
    with model.disable_adapter():  # disabling a merged adapter unmerges it
        torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    unloaded = model.unload()
    torch.testing.assert_close(logits(unloaded, input_ids), logits(base, input_ids), rtol=0, atol=0)


def test_merge_is_idempotent_with_a_warning(input_ids):
    _, model = make("llama", "all-linear")
    model.add_core(random_core(model))
    model.merge_adapter()
    once = logits(model, input_ids)
    with pytest.warns(UserWarning, match="[Aa]lready"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), once, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("kind", "target"), CASES, ids=CASE_IDS)
def test_unmerge_restores_weights_bit_exactly(kind, target, dtype):
    _, model = make(kind, target, dtype)
    model.add_core(random_core(model, seed=5, scale=0.37))
    model.add_adapter("second", dft_peft.DFTConfig(target_modules=target))
    model.add_core(random_core(model, seed=6, scale=1.3, adapter_name="second"), adapter_name="second")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    model.base_model.set_adapter(["default", "second"])
    model.merge_adapter(["default", "second"])
    after_merge = model.get_base_model().state_dict()
    assert any(not torch.equal(after_merge[k], v) for k, v in before.items())
    model.unmerge_adapter()
    for key, value in model.get_base_model().state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_forward_and_merge(dtype, input_ids):
    base, model = make("llama", "all-linear", dtype)
    core = random_core(model, seed=2)
    model.add_core(core)
    expected = logits(dense_reference(base, [core]), input_ids)
    unmerged = logits(model, input_ids)
    model.merge_adapter()
    # Unmerged and merged forwards apply the same rounded weights: identical in every dtype.
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=0, atol=0)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=tolerance)


def test_safe_merge_refuses_nan_and_changes_nothing():
    _, model = make("llama", "all-linear")
    core = random_core(model)
    model.add_core(core)
    name = next(iter(core))
    layer = model.base_model.dft_layers()[name]
    with torch.no_grad():
        layer.dft_values["default"][0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(before[k], v, ) or torch.isnan(v).any() for k, v in model.state_dict().items())
    assert not layer.merged


# --- several adapters ------------------------------------------------------------------------------------------


def test_several_adapters_set_and_delete(input_ids):
    base, model = make("llama", "all-linear")
    first = random_core(model, seed=1)
    model.add_core(first)
    model.add_adapter("other", dft_peft.DFTConfig(target_modules=["q_proj", "up_proj"]))
    second = random_core(model, seed=2, adapter_name="other")
    model.add_core(second, adapter_name="other")
    torch.testing.assert_close(logits(model, input_ids), logits(dense_reference(base, [first]), input_ids),
                               rtol=0, atol=1e-5)
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, input_ids), logits(dense_reference(base, [second]), input_ids),
                               rtol=0, atol=1e-5)
    model.base_model.set_adapter(["default", "other"])
    both = logits(dense_reference(base, [first, second]), input_ids)
    torch.testing.assert_close(logits(model, input_ids), both, rtol=0, atol=1e-5)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in m.dft_values for m in model.base_model.dft_layers().values())
    torch.testing.assert_close(logits(model, input_ids), logits(dense_reference(base, [first]), input_ids),
                               rtol=0, atol=1e-5)


def test_add_weighted_adapter_is_the_weighted_sparse_sum(input_ids):
    base, model = make("llama", "all-linear")
    a, b = random_core(model, seed=1), random_core(model, seed=2)
    model.add_core(a)
    model.add_adapter("b", dft_peft.DFTConfig())
    model.add_core(b, adapter_name="b")
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "mix")
    model.set_adapter("mix")
    mixed = model.base_model.get_core("mix")
    for name in a:
        expected = 0.5 * a[name].to_dense() - 2.0 * b[name].to_dense()
        torch.testing.assert_close(mixed[name].to_dense(), expected)
        assert mixed[name].nnz == int((expected != 0).sum())
    expected_model = dense_reference(base, [{n: a[n].scaled(0.5) for n in a}, {n: b[n].scaled(-2.0) for n in b}])
    torch.testing.assert_close(logits(model, input_ids), logits(expected_model, input_ids), rtol=0, atol=1e-4)


# --- training ----------------------------------------------------------------------------------------------------


def test_only_adapter_values_train(input_ids):
    _, model = make("llama", "all-linear")
    model.add_core(random_core(model))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dft_values.default" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, values[n]) for n, p in model.named_parameters() if n in values)


# --- cores -------------------------------------------------------------------------------------------------------


def test_add_core_accumulates_and_scales():
    _, model = make("llama", "all-linear")
    name = "model.layers.0.mlp.up_proj"
    shape = model.base_model.dft_layers()[name].base_shape
    first = dft_peft.SparseDelta(torch.tensor([1, 5, 9]), torch.tensor([1.0, 2.0, 3.0]), shape)
    second = dft_peft.SparseDelta(torch.tensor([5, 7]), torch.tensor([10.0, 20.0]), shape)
    model.add_core({name: first})
    model.add_core({"base_model.model." + name: second}, lam=0.5)
    core = model.base_model.get_core()[name]
    assert core.indices.tolist() == [1, 5, 7, 9]
    assert core.values.tolist() == [1.0, 7.0, 10.0, 3.0]
    assert core.indices.dtype == torch.int32


def test_add_core_consume_empties_the_dict_only_once_all_is_valid():
    _, model = make("llama", "all-linear")
    core = random_core(model, density=0.05)
    expected = {n: (d.indices.clone(), d.values.clone()) for n, d in core.items()}
    bad = {**core, "model.layers.0.no_such_module": next(iter(core.values()))}
    with pytest.raises(ValueError, match="no_such_module"):
        model.add_core(bad, consume=True)
    assert len(bad) == len(core) + 1  # refused: nothing consumed
    model.add_core(core, lam=2.0, consume=True)
    assert core == {}
    for name, delta in model.base_model.get_core().items():
        assert torch.equal(delta.indices, expected[name][0])
        assert torch.equal(delta.values, 2.0 * expected[name][1])
    with pytest.raises(TypeError, match="dict"):
        model.add_core(types.MappingProxyType(dict(random_core(model))), consume=True)


@pytest.mark.parametrize(
    ("indices", "message"),
    [([3, 1], "unsorted"), ([2, 2], "duplicated"), ([10**9], "outside"), ([-1], "outside")],
)
def test_add_core_refuses_bad_indices(indices, message):
    _, model = make("llama", "all-linear")
    name = "model.layers.0.mlp.up_proj"
    shape = model.base_model.dft_layers()[name].base_shape
    delta = dft_peft.SparseDelta(torch.tensor(indices), torch.ones(len(indices)), shape)
    with pytest.raises(ValueError, match=message):
        model.add_core({name: delta})
    assert model.base_model.get_core()[name].nnz == 0


def test_add_core_refuses_unknown_module_and_wrong_shape():
    _, model = make("llama", ["q_proj"])
    with pytest.raises(ValueError, match="no DFT adapter"):
        model.add_core({"model.layers.0.mlp.up_proj": dft_peft.SparseDelta.empty((48, 32))})
    with pytest.raises(ValueError, match="elements"):
        model.add_core({"model.layers.0.self_attn.q_proj": dft_peft.SparseDelta.empty((3, 3))})


# --- edit files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "target"), CASES, ids=CASE_IDS)
def test_save_load_round_trip(kind, target, tmp_path, input_ids):
    base, model = make(kind, target)
    model.add_core(random_core(model, seed=4))
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        parts = {k.rpartition(".")[2] for k in f.keys()}  # noqa: SIM118
    assert parts == {"dft_values", "dft_code", "dft_meta", "dft_fingerprint", "dft_checksum", "dft_edit_config"}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)
    original, reloaded = model.base_model.get_core(), loaded.base_model.get_core()
    for name, delta in original.items():
        assert torch.equal(delta.indices, reloaded[name].indices)
        assert torch.equal(delta.values, reloaded[name].values)


def test_value_dtype_and_file_is_tiny(tmp_path):
    _, model = make("llama", "all-linear", value_dtype="bfloat16")
    model.add_core(random_core(model, density=0.05))
    nnz = sum(d.nnz for d in model.base_model.get_core().values())
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("dft_values")}  # noqa: SIM118
    assert dtypes == {"BF16"}
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert size < nnz * 6 + 1200 * len(model.base_model.dft_layers())  # values + coded indices + headers


def test_model_card(tmp_path):
    _, model = make("llama", "all-linear")
    model.add_core(random_core(model, density=0.02))
    nnz = sum(d.nnz for d in model.base_model.get_core().values())
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "- dft" in card and "- knowledge-editing" in card
    assert f"{nnz:,} edited parameters" in card
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DFT"
