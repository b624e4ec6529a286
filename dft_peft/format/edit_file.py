"""The edit file, read and written in one place: per edited module its values, Elias–Fano coded indices, metadata
and base-weight fingerprint (`encode_module` / `decode_module`, used by the tuner's state-dict hooks), the checks a
file passes before PEFT touches the user's model (`preflight`), and its per-module summary without a model
(`read_edit_file`, used by `inspect_edit` and the model card)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open

from . import codec
from .sparse import SparseDelta, check_indices

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# Tensors a saved edit holds per edited module (after PEFT strips the adapter name from the key), with their dtypes.
FILE_PARTS = {
    "dft_values": (torch.float32, torch.bfloat16, torch.float16),
    "dft_code": (torch.uint8,),
    "dft_meta": (torch.int64,),
    "dft_fingerprint": (torch.float32,),
}


def preflight(directory: str) -> None:
    """Refuse a local edit that is a pickle or whose safetensors file is corrupt, before any model is modified.

    The full validation (indices, shapes, fingerprints) needs the model and runs when the weights are loaded; this
    catches what would otherwise fail after PEFT has already injected the adapter.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, PICKLE_NAME)):
            raise ValueError(f"{directory} holds a pickled {PICKLE_NAME}; DFT edits load only from safetensors "
                             "(a pickle can run code when loaded)")
        return
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                part = key.rpartition(".")[2]
                if part in FILE_PARTS:
                    dtype = f.get_slice(key).get_dtype()
                    allowed = [str(d).removeprefix("torch.") for d in FILE_PARTS[part]]
                    if _safetensors_dtype_name(dtype) not in allowed:
                        raise ValueError(f"{path}: tensor {key} has dtype {dtype}, expected one of {allowed}")
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from err


def _safetensors_dtype_name(dtype: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "U8": "uint8", "I64": "int64"}.get(dtype, dtype)


PEFT_PREFIX = "base_model.model."
LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
T = TypeVar("T")


def encode_module(delta: SparseDelta, value_dtype: torch.dtype, fingerprint: torch.Tensor) -> dict[str, torch.Tensor]:
    """A module's file parts: values in `value_dtype`, Elias–Fano coded indices, their metadata, the fingerprint."""
    code, meta = codec.encode_indices(delta.indices.cpu(), delta.numel)
    return {"dft_values": delta.values.detach().to("cpu", value_dtype), "dft_code": code, "dft_meta": meta,
            "dft_fingerprint": fingerprint.clone()}


def group_parts(items: Iterable[tuple[str, T]], extra_parts: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, T]],
                                                                                          dict[str, T]]:
    """(module prefix → part name → item, items that are no module part) from (key, item) pairs keyed
    `<module prefix>.<part>`: the grouping every reader of an edit file shares."""
    groups: dict[str, dict[str, T]] = {}
    others: dict[str, T] = {}
    for key, item in items:
        prefix, _, part = key.rpartition(".")
        if part in FILE_PARTS or part in extra_parts:
            groups.setdefault(prefix, {})[part] = item
        else:
            others[key] = item
    return groups, others


def decode_module(name: str, parts: Mapping[str, torch.Tensor], numel: int, shape: tuple[int, ...],
                  fingerprint: torch.Tensor | None) -> SparseDelta:
    """Validate one module's file parts against the module it is loaded into and decode them.

    `fingerprint` is the module's own base-weight fingerprint, or None to skip that check. Any malformed or
    mismatched part raises ValueError naming the module.
    """
    missing = [p for p in FILE_PARTS if p not in parts]
    if missing:
        raise ValueError(f"module {name!r}: the edit file lacks {missing} (it holds {sorted(parts)})")
    for part, allowed in FILE_PARTS.items():
        if parts[part].dtype not in allowed:
            raise ValueError(f"module {name!r}: {part} has dtype {parts[part].dtype}, expected one of {allowed}")
    meta, code, values = parts["dft_meta"], parts["dft_code"], parts["dft_values"]
    if meta.dtype == torch.int64 and meta.dim() == 1 and meta.numel() >= 2 and int(meta[1]) != numel:
        raise ValueError(f"module {name!r}: the edit was made for a weight of {int(meta[1])} elements but this "
                         f"model's has {numel} (shape {shape}): wrong base model")
    indices = codec.decode_indices(code, meta, numel, name)
    check_indices(indices, numel, f"module {name!r}")
    if values.dim() != 1:
        raise ValueError(f"module {name!r}: values must be 1-D, got shape {tuple(values.shape)}")
    if values.numel() != indices.numel():
        raise ValueError(f"module {name!r}: {indices.numel()} indices but {values.numel()} values")
    if not torch.isfinite(values).all():
        raise ValueError(f"module {name!r}: the edit's values contain NaN or inf")
    if fingerprint is not None:
        stored = parts["dft_fingerprint"]
        if stored.shape != fingerprint.shape:
            raise ValueError(f"module {name!r}: malformed base-weight fingerprint of shape {tuple(stored.shape)}")
        tolerance = 1e-2 * fingerprint.abs().max().clamp_min(1e-12)
        if not torch.allclose(stored, fingerprint, rtol=1e-2, atol=float(tolerance)):
            raise ValueError(
                f"module {name!r}: the base weights differ from those the edit was made for (fingerprint "
                "mismatch): wrong base model. If you know the edit applies, load with a config whose "
                "verify_base_fingerprint=False (PeftModel.from_pretrained(base, path, config=config))."
            )
    return SparseDelta(indices, values.float(), shape)


@dataclass(frozen=True)
class ModuleCore:
    """One edited module of an edit file: how many of its `numel` weight entries the edit changes, in `nbytes`."""

    name: str
    count: int
    numel: int
    nbytes: int

    @property
    def layer(self) -> int | None:
        match = LAYER_INDEX.search(self.name)
        return int(match[1]) if match else None

    @property
    def density(self) -> float:
        return self.count / self.numel if self.numel else 0.0


def read_edit_file(directory: str | os.PathLike[str]) -> list[ModuleCore]:
    """The edited modules of a saved edit, from its weights file alone (no model needed), in layer order."""
    path = Path(directory) / WEIGHTS_NAME
    if not Path(directory).is_dir():
        raise ValueError(f"edit directory {directory} does not exist")
    if not path.is_file():
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME}: not a saved DFT edit (save one with "
                         "`dft-peft edit` or peft_model.save_pretrained(dir))")
    preflight(str(directory))
    modules = []
    with safe_open(path, framework="pt") as f:
        groups, _ = group_parts((key, key) for key in f.keys())  # noqa: SIM118 - safe_open handles are not mappings
        if not groups:
            raise ValueError(f"{path} holds no DFT cores (no *.dft_values tensors): not a DFT edit")
        for prefix, parts in groups.items():
            name = prefix.removeprefix(PEFT_PREFIX)
            if missing := [p for p in FILE_PARTS if p not in parts]:
                raise ValueError(f"{path}: module {name!r} lacks {missing}: the edit file is incomplete")
            tensors = {part: f.get_tensor(key) for part, key in parts.items()}
            meta = tensors["dft_meta"]
            if meta.shape != (len(codec.META_FIELDS),):
                raise ValueError(f"{path}: module {name!r} has a malformed dft_meta of shape {tuple(meta.shape)}, "
                                 f"expected {len(codec.META_FIELDS)} values {codec.META_FIELDS}")
            _, numel, count, _ = meta.tolist()
            if count != tensors["dft_values"].numel() or not 0 <= count <= numel:
                raise ValueError(f"{path}: module {name!r} claims {count} edited entries of {numel} but holds "
                                 f"{tensors['dft_values'].numel()} values: the edit file is corrupt")
            modules.append(ModuleCore(name, count, numel, sum(t.nbytes for t in tensors.values())))
    return sorted(modules, key=lambda m: (m.layer is None, m.layer or 0, m.name))
