"""Issue 15: what a hostile edit file, a failed load or a killed save could still do. One test (or group) per finding:
foreign keys (1), rollback of PEFT-side failures (2), unchecked indices (3), LoRA shapes before the product (4), atomic
save (5), checksums (6), FIFOs (7), non-finite weights (8), loaders' errors naming the file (9)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_edit_file import NAME, WEIGHTS, assert_untouched, load_must_fail, rewrite, save_edit, snapshot
from tiny_models import random_core, tiny_llama

import dft_peft
from dft_peft.format import edit_file
from dft_peft.format.checkpoint import CheckpointReader
from dft_peft.format.edit_file import CHECKSUM_PART, decode_module, read_edit_file

UP_PROJ = "model.layers.0.mlp.up_proj"  # 48 x 32


@pytest.fixture
def edit_dir(tmp_path):
    return save_edit(tmp_path)


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Turn a hang (a FIFO opened for reading) into a test failure instead of a stuck suite."""
    def expire(*_):
        raise TimeoutError("hung: a non-regular file was opened")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cores_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].indices, b[n].indices) and torch.equal(a[n].values, b[n].values) for n in a)


def existing_model(seed: int = 9):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig())
    model.add_core(random_core(model, seed=seed))
    return model, copy.deepcopy(model.base_model.get_core())


def assert_only_default(model, core) -> None:
    """The model holds adapter `default` with `core` and nothing else: modules, weights and requires_grad as
    `existing_model` made them."""
    assert list(model.peft_config) == ["default"]
    assert all(list(m.dft_values) == ["default"] for m in model.base_model.dft_layers().values())
    assert cores_equal(model.base_model.get_core(), core)
    reference, _ = existing_model()
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in reference.named_modules()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in reference.named_parameters()}
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


# --- 1. an edit file adds exactly its adapter's DFT parts ------------------------------------------------------------


@pytest.mark.parametrize("key", [
    "base_model.model.lm_head.weight",
    "base_model.model.model.norm.weight",
    "base_model.model.lm_head.modules_to_save.default.weight",
])
def test_foreign_key_is_refused_before_anything_changes(edit_dir, key):
    model = tiny_llama()
    tensors = load_file(edit_dir / WEIGHTS)
    tensors[key] = -dict(model.named_parameters())[key.removeprefix("base_model.model.").replace(
        "modules_to_save.default.", "")].detach().clone()
    save_file(tensors, edit_dir / WEIGHTS, metadata={"format": "pt"})
    load_must_fail(edit_dir, key.replace(".", r"\."), base=model)


def test_file_loaded_as_second_cannot_touch_default(edit_dir):
    model, core = existing_model()
    hostile = torch.arange(core[UP_PROJ].nnz)  # as many as default holds, so a non-strict load would take them
    hostile[1], hostile[-1] = 0, 10**8  # duplicated and out of range
    rewrite(edit_dir, lambda t: t.update({f"{NAME}.dft_indices.default": hostile}))
    with pytest.raises(ValueError, match="raw indices"):
        model.load_adapter(edit_dir, adapter_name="second")
    assert_only_default(model, core)


def test_raw_indices_are_refused(edit_dir):
    rewrite(edit_dir, lambda t: t.update({f"{NAME}.dft_indices": torch.tensor([1, 2])}))
    load_must_fail(edit_dir, "raw indices")


def test_valid_modules_to_save_still_load(tmp_path):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig(modules_to_save=["lm_head"]))
    model.add_core(random_core(model))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded.base_model.model.lm_head.modules_to_save["default"].weight,
                               model.base_model.model.lm_head.modules_to_save["default"].weight)


# --- 2. every failure during loading leaves the caller's model as it was ---------------------------------------------


@pytest.fixture
def edit_with_head(tmp_path):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig(modules_to_save=["lm_head"]))
    model.add_core(random_core(model))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_missing_weights_file_changes_nothing(edit_dir):
    (edit_dir / WEIGHTS).unlink()
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match=WEIGHTS):
        PeftModel.from_pretrained(base, edit_dir)
    assert_untouched(base, before)
    model, core = existing_model()
    with pytest.raises(ValueError, match=WEIGHTS):
        model.load_adapter(edit_dir, adapter_name="second")
    assert_only_default(model, core)


def test_modules_to_save_without_weights_changes_nothing(edit_with_head):
    rewrite(edit_with_head, lambda t: t.pop("base_model.model.lm_head.weight"))
    load_must_fail(edit_with_head, "modules_to_save")


def test_wrongly_shaped_extra_tensor_changes_nothing(edit_with_head):
    rewrite(edit_with_head, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(3, 3)}))
    load_must_fail(edit_with_head, "shape")


def test_failed_load_into_an_existing_adapter_keeps_it(edit_dir):
    model, core = existing_model()
    rewrite(edit_dir, lambda t: t.update({f"{NAME}.dft_values": torch.full_like(t[f"{NAME}.dft_values"], 1e30)
                                          * float("inf")}))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.load_adapter(edit_dir, adapter_name="default")
    assert_only_default(model, core)


# --- 3. indices are checked where they enter the model ---------------------------------------------------------------


def test_set_sparse_delta_refuses_out_of_range_indices():
    model, core = existing_model()
    layer = model.base_model.dft_layers()[UP_PROJ]
    for indices in ([0, 10**8], [5, 5], [-1, 3]):
        delta = dft_peft.SparseDelta(torch.tensor(indices), torch.ones(2), layer.base_shape)
        with pytest.raises(ValueError, match=r"outside|duplicated|unsorted"):
            layer.set_sparse_delta("default", delta)
    assert cores_equal(model.base_model.get_core(), core)


def test_state_dict_load_refuses_out_of_range_indices():
    model, core = existing_model()
    key = f"base_model.model.{UP_PROJ}.dft_indices.default"
    state = model.state_dict()
    hostile = state[key].clone()
    hostile[-1] = 10**8
    with pytest.raises(ValueError, match="outside"):
        model.load_state_dict({key: hostile}, strict=False)
    assert cores_equal(model.base_model.get_core(), core)


# --- 4. build_edit checks LoRA shapes, ranks and dtypes before reading or multiplying -------------------------------


def write_lora(directory, config: dict, tensors: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({f"base_model.model.{UP_PROJ}.lora_{k}.weight": v for k, v in tensors.items()},
              directory / "adapter_model.safetensors")
    return str(directory)


@pytest.mark.parametrize(("config", "tensors", "message"), [
    ({"r": 1}, {"A": torch.zeros(1, 4096), "B": torch.zeros(4096, 1)}, "lora_A .*shape"),
    ({"r": 1}, {"A": torch.zeros(2, 32), "B": torch.zeros(48, 2)}, "lora_A .*shape"),
    ({"r": 2}, {"A": torch.zeros(2, 32), "B": torch.zeros(48, 3)}, "lora_B .*shape"),
    ({"r": 2}, {"A": torch.zeros(2, 32, dtype=torch.int32), "B": torch.zeros(48, 2)}, "dtype"),
    ({"r": 2}, {"A": torch.zeros(2, 32)}, "only one"),
    ({}, {"A": torch.zeros(1, 32), "B": torch.zeros(48, 1)}, r"adapter_config\.json\.r"),
    ({"r": "4"}, {"A": torch.zeros(1, 32), "B": torch.zeros(48, 1)}, r"adapter_config\.json\.r"),
    ({"r": 1, "use_rslora": "yes"}, {"A": torch.zeros(1, 32), "B": torch.zeros(48, 1)}, "use_rslora"),
], ids=["huge-product", "rank-above-r", "b-mismatch", "int-dtype", "missing-b", "no-r", "r-string", "flag-type"])
def test_build_edit_checks_lora_before_multiplying(tmp_path, monkeypatch, config, tensors, message):
    good = write_lora(tmp_path / "good", {"r": 1}, {"A": torch.randn(1, 32), "B": torch.randn(48, 1)})
    bad = write_lora(tmp_path / "bad", config, tensors)
    reads = []
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name, rows=None: reads.append(name) or
                        (_ for _ in ()).throw(AssertionError(f"read {name} before checking its shape")))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        dft_peft.build_edit(model, good, bad, dft_peft.DFTConfig(target_modules=["up_proj"]))
    assert not any(isinstance(m, dft_peft.DFTLayer) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --- 5. save_pretrained is atomic as a whole -------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash(*_, **__):
    raise Crash


def crash_after(function):
    def wrapped(*args, **kwargs):
        function(*args, **kwargs)
        raise Crash
    return wrapped


def save_steps():
    """(name, monkeypatch target, replacement factory) for each step of `save_pretrained` a crash can interrupt."""
    import peft.peft_model

    from dft_peft.format import model_card
    from dft_peft.tuner import model as model_module

    return {
        "model-card-first": (PeftModel, "create_or_update_model_card", lambda f: crash),
        "encoding": (model_module, "encode_module", lambda f: crash),
        "weights-write": (peft.peft_model, "safe_save_file", lambda f: crash),
        "after-weights": (peft.peft_model, "safe_save_file", crash_after),
        "weights-fsync": (edit_file, "_fsync", lambda f: crash),
        "config-written": (PeftConfig, "save_pretrained", crash_after),
        "config-rename": (edit_file.os, "replace", lambda f: crash),
        "after-config-rename": (edit_file.os, "replace", crash_after),
        "cleanup": (edit_file, "remove_stale_temporaries", lambda f: crash),
        "model-card-last": (model_card, "update_model_card", lambda f: crash),
    }


@pytest.mark.parametrize("step", list(save_steps()))
def test_save_crash_at_each_step_leaves_old_or_new_edit(tmp_path, monkeypatch, step):
    target = tmp_path / "edit"
    old = get_peft_model(tiny_llama(), dft_peft.DFTConfig(target_modules=["q_proj", "v_proj"]))
    old.add_core(random_core(old, seed=1))
    old.save_pretrained(target)
    new = get_peft_model(tiny_llama(), dft_peft.DFTConfig(target_modules="all-linear"))
    new.add_core(random_core(new, seed=2))
    owner, attribute, replacement = save_steps()[step]
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, replacement(getattr(owner, attribute)))
        with pytest.raises(Crash):
            new.save_pretrained(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), target).base_model.get_core()
    nonempty = {n: d for n, d in loaded.items() if d.nnz}
    old_core = {n: d for n, d in old.base_model.get_core().items() if d.nnz}
    new_core = {n: d for n, d in new.base_model.get_core().items() if d.nnz}
    assert cores_equal(nonempty, old_core) or cores_equal(nonempty, new_core)
    assert {p.name for p in target.iterdir()} <= {WEIGHTS, "adapter_config.json", "README.md"}


def test_successful_save_leaves_no_temporary_file(tmp_path):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig())
    model.add_core(random_core(model))
    for _ in range(2):
        model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS, "adapter_config.json", "README.md"}


def test_later_save_removes_what_a_killed_save_left(tmp_path):
    model = get_peft_model(tiny_llama(), dft_peft.DFTConfig())
    model.add_core(random_core(model))
    model.save_pretrained(tmp_path)
    weights = (tmp_path / WEIGHTS).read_bytes()
    stale, recent, foreign = tmp_path / ".tmpAb12Cd", tmp_path / ".tmpXy34Zw", tmp_path / ".tmpQq56Rr"
    stale.write_bytes(weights)  # safetensors' copy of the weights, killed before its rename
    recent.write_bytes(weights)  # another save still writing
    foreign.write_bytes(b"not an edit")
    (tmp_path / f"{edit_file.STAGING_PREFIX}dead").mkdir()
    old = os.path.getmtime(tmp_path) - 2 * edit_file.STALE_SECONDS
    for path in (stale, foreign, tmp_path / f"{edit_file.STAGING_PREFIX}dead"):
        os.utime(path, (old, old))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS, "adapter_config.json", "README.md", recent.name,
                                                    foreign.name}


# --- 6. a checksum over the coded parts ------------------------------------------------------------------------------


def small_module_parts(edit_dir):
    tensors = load_file(edit_dir / WEIGHTS)
    return {part: tensors[f"{NAME}.{part}"] for part in (*edit_file.FILE_PARTS, CHECKSUM_PART)}


def test_every_flipped_code_bit_is_refused(edit_dir):
    parts = small_module_parts(edit_dir)
    numel, shape = 48 * 32, (48, 32)
    decode_module(NAME, parts, numel, shape, None)
    for bit in range(parts["dft_code"].numel() * 8):
        code = parts["dft_code"].clone()
        code[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ValueError, match="checksum"):
            decode_module(NAME, {**parts, "dft_code": code}, numel, shape, None)


def test_flipped_value_bits_are_refused_on_load(edit_dir):
    original = (edit_dir / WEIGHTS).read_bytes()
    values = load_file(edit_dir / WEIGHTS)[f"{NAME}.dft_values"]
    raw = values.numpy().tobytes()
    offset = original.index(raw)  # the values' bytes, as stored
    for bit in (0, 13, 31, 8 * len(raw) - 1):
        data = bytearray(original)
        data[offset + bit // 8] ^= 1 << (bit % 8)
        (edit_dir / WEIGHTS).write_bytes(bytes(data))
        load_must_fail(edit_dir, "checksum")


def test_file_without_checksums_loads_with_a_warning(edit_dir):
    tensors = {k: v for k, v in load_file(edit_dir / WEIGHTS).items() if not k.endswith(CHECKSUM_PART)}
    save_file(tensors, edit_dir / WEIGHTS, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="checksums"):
        model = PeftModel.from_pretrained(tiny_llama(), edit_dir)
    assert sum(d.nnz for d in model.base_model.get_core().values()) > 0
    with pytest.warns(UserWarning, match="checksums"):
        read_edit_file(edit_dir)


# --- 7. a FIFO named as the weights or a shard never hangs -----------------------------------------------------------


def test_fifo_as_edit_weights_is_refused(edit_dir):
    (edit_dir / WEIGHTS).unlink()
    os.mkfifo(edit_dir / WEIGHTS)
    with deadline():
        load_must_fail(edit_dir, "not a regular file")
        with pytest.raises(ValueError, match="not a regular file"):
            read_edit_file(edit_dir)


def test_fifo_as_checkpoint_shard_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "good")
    shard = tmp_path / "ckpt"
    shard.mkdir()
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {f"{UP_PROJ}.weight": "a.bin"}}))
    os.mkfifo(shard / "a.bin")
    model = tiny_llama()
    with deadline(), pytest.raises(ValueError, match="not a regular file"):
        dft_peft.build_edit(model, str(tmp_path / "good"), str(shard), dft_peft.DFTConfig(target_modules=["up_proj"]))
    with deadline(), pytest.raises(ValueError, match="not a regular file"):
        CheckpointReader(str(shard)).tensor(f"{UP_PROJ}.weight")


# --- 8. add_weighted_adapter refuses non-finite weights --------------------------------------------------------------


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), "1"])
def test_add_weighted_adapter_refuses_non_finite_weights(weight):
    model, core = existing_model()
    with pytest.raises(ValueError, match="finite"):
        model.add_weighted_adapter(["default"], [weight], "mix")
    assert_only_default(model, core)


# --- 9. loaders raise ValueError naming the file ---------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "{not json", "[1, 2]", "\xff\xfe", "[" * 100_000 + "]" * 100_000,
    json.dumps({"peft_type": "DFT", "top_t": "lots"}),
    json.dumps({"peft_type": "DFT", "modules_to_save": 5}),
], ids=["not-json", "not-object", "not-utf8", "deep", "field-type", "modules-to-save-type"])
def test_malformed_adapter_config_names_the_file(edit_dir, text):
    (edit_dir / "adapter_config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        dft_peft.DFTConfig.from_pretrained(edit_dir)


@pytest.mark.parametrize("index", [
    "{", "[]", json.dumps({"weight_map": [1]}), json.dumps({"weight_map": {"w": 5}}), "[" * 100_000,
], ids=["not-json", "not-object", "list", "non-string-file", "deep"])
def test_malformed_checkpoint_index_names_the_file(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        CheckpointReader(str(tmp_path))
