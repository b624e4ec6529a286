"""The edit file, read and written in one place: per edited module its values, Elias–Fano coded indices, metadata,
base-weight fingerprint and checksum (`encode_module` / `decode_module`, used by the tuner's state-dict hooks), the
edit's own config stored with them (`encode_config` / `decode_config`), which keys a file may hold at all
(`check_foreign_keys`, `check_extra_tensors`), the checks a file passes before PEFT touches the user's model
(`preflight`), and its per-module summary without a model (`read_edit_file`, used by `inspect_edit` and the model
card).

The checksum is an integrity check against corrupted files (a flipped bit, a truncated download), not a signature:
whoever writes a file can compute it. What keeps a hostile file harmless is the validation, which every file passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft.config import PeftConfig
from safetensors import SafetensorError, safe_open

from . import codec
from .checkpoint import is_regular_file, open_regular, read_json_object
from .sparse import SparseDelta

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Tensors a saved edit holds per edited module (after PEFT strips the adapter name from the key), with their dtypes.
FILE_PARTS = {
    "dft_values": (torch.float32, torch.bfloat16, torch.float16),
    "dft_code": (torch.uint8,),
    "dft_meta": (torch.int64,),
    "dft_fingerprint": (torch.float32,),
}
# SHA-256 over a module's name and its FILE_PARTS; files written before it was added lack it and load with a warning.
CHECKSUM_PART = "dft_checksum"
PART_DTYPES = {**FILE_PARTS, CHECKSUM_PART: (torch.uint8,)}
# The edit's config as UTF-8 JSON bytes, written in the same file as the cores so the two cannot come apart.
CONFIG_PART = "dft_edit_config"
CONFIG_KEY = PEFT_PREFIX + CONFIG_PART
MODULES_TO_SAVE = ".modules_to_save."
# What a save killed mid-way leaves: safetensors' temporary weights (tempfile's `.tmp` + 6 characters) and DFT's config
# staging directory. Removed by a later save once older than STALE_SECONDS: a save still running is younger.
SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[0-9A-Za-z]{6}")
STAGING_PREFIX = ".dft-config-"
STALE_SECONDS = 600
UNCHECKED_WARNING = ("{path} was written before edit files carried checksums: it loads without a check for corruption "
                     "(save it again to add them)")


def preflight(directory: str, modules_to_save: Any = None, require_weights: bool = False) -> dict[str, Any] | None:
    """Refuse a local edit that PEFT would fail on after changing the user's model; return its stored config.

    Refused, with a ValueError naming the file: a pickled weights file, a weights file that is not a regular file (a
    FIFO would block the load) or not valid safetensors, parts of the wrong dtype, raw `dft_indices` and any other key
    that is neither a DFT part nor the weight of a module listed in `modules_to_save` (default: as the directory's
    adapter_config.json lists them), and a listed module without weights. Returns the config stored with the cores
    (`decode_config`), or None when the directory holds no weights (refused with `require_weights`: PEFT would fail
    to find them after injecting the adapter) or they predate stored configs. The full validation (indices, shapes,
    fingerprints, checksums) needs the model and runs when the weights are loaded.
    """
    path = os.path.join(directory, WEIGHTS_NAME)
    if not is_regular_file(path):
        if is_regular_file(os.path.join(directory, PICKLE_NAME)):
            raise ValueError(f"{directory} holds a pickled {PICKLE_NAME}; DFT edits load only from safetensors "
                             "(a pickle can run code when loaded)")
        if require_weights:
            raise ValueError(f"{directory} holds no {WEIGHTS_NAME}: not a saved DFT edit (or an incomplete one)")
        return None
    stored = None
    try:
        with safe_open(path, framework="pt") as f:
            groups, others = group_parts((key, key) for key in f.keys())  # noqa: SIM118 - not mappings
            for parts in groups.values():
                for part, key in parts.items():
                    dtype = f.get_slice(key).get_dtype()
                    allowed = [str(d).removeprefix("torch.") for d in PART_DTYPES[part]]
                    if _safetensors_dtype_name(dtype) not in allowed:
                        raise ValueError(f"{path}: tensor {key} has dtype {dtype}, expected one of {allowed}")
            config_key = next((k for k in others if is_config_key(k)), None)
            if config_key is not None:
                stored = decode_config(f.get_tensor(others.pop(config_key)), path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from err
    listed = _listed_modules_to_save(directory) if modules_to_save is None else modules_to_save
    if not (isinstance(listed, (list, tuple, set)) and all(isinstance(m, str) for m in listed)):
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: modules_to_save must be a list of module names, "
                         f"got {listed!r}")
    check_foreign_keys(others, path, lambda key: any(_names_module(key, m) for m in listed))
    if missing := [m for m in listed if not any(_names_module(key, m) for key in others)]:
        raise ValueError(f"{path}: the config lists {missing} in modules_to_save but the file holds no weights "
                         "for them")
    return stored


def _listed_modules_to_save(directory: str) -> Any:
    """`modules_to_save` as the directory's adapter_config.json lists them (none without a config)."""
    path = os.path.join(directory, CONFIG_NAME)
    return (read_json_object(path).get("modules_to_save") if is_regular_file(path) else None) or []


def check_foreign_keys(keys: Iterable[str], source: str, accepted: Callable[[str], bool]) -> None:
    """Refuse, naming it, any key of an edit file that is not a DFT part and not `accepted`.

    An edit file adds one adapter's sparse cores and nothing else: a base weight, a norm, raw indices or another
    adapter's tensors would be written into the model by PEFT's non-strict state-dict load.
    """
    for key in keys:
        if accepted(key):
            continue
        if ".dft_indices" in key:
            raise ValueError(f"{source} holds raw indices {key!r}: edit files store indices only Elias–Fano coded "
                             "(dft_code), checked before they enter the model; refusing the file")
        raise ValueError(f"{source} holds {key!r}, which is not a DFT part of this adapter nor a weight of a module "
                         "its config lists in modules_to_save: an edit file may change nothing else; refusing it")


def check_extra_tensors(others: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse every tensor of an edit file that is not a DFT part, except those `expected` (the model's tensors of
    this adapter's `modules_to_save` copies, as PEFT has renamed the file's keys), which must match them in shape and
    in being floating point."""
    check_foreign_keys(others, source, lambda key: key in expected)
    for key, tensor in others.items():
        model = expected[key]
        if tensor.shape != model.shape or tensor.dtype.is_floating_point != model.dtype.is_floating_point:
            raise ValueError(f"{source}: {key!r} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, the "
                             f"model's a {model.dtype} one of shape {tuple(model.shape)}")


def _names_module(key: str, module: str) -> bool:
    """Whether a state-dict key lies in a module PEFT would match to the `modules_to_save` entry `module`."""
    return re.search(rf"(^|\.){re.escape(module)}\.[^.]", key) is not None


def is_config_key(key: str) -> bool:
    """Whether `key` holds the stored config (with or without PEFT's prefix)."""
    return key.removeprefix(PEFT_PREFIX) == CONFIG_PART


def replace_config(directory: str, write_config: Callable[[str], None]) -> None:
    """Replace `directory/adapter_config.json` by the one `write_config(staging)` writes, atomically.

    PEFT has renamed the new weights into place before the config is saved. They are flushed to disk first; the
    config is written in a fresh staging directory beside the target, flushed, renamed over the old one and the
    rename flushed, so a crash at any point leaves a whole config, the old or the new (and the weights' stored config
    covers the moment between the two renames). What an earlier save killed mid-way left is then removed
    (`remove_stale_temporaries`).
    """
    os.makedirs(directory, exist_ok=True)
    if os.path.isfile(weights := os.path.join(directory, WEIGHTS_NAME)):
        _fsync(weights)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    try:
        write_config(staging)
        _fsync(os.path.join(staging, CONFIG_NAME))
        os.replace(os.path.join(staging, CONFIG_NAME), os.path.join(directory, CONFIG_NAME))
        _fsync(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_stale_temporaries(directory)


def _fsync(path: str) -> None:
    """Flush a file's data, or a directory's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def edit_config_fields(config: PeftConfig) -> dict[str, Any]:
    """A DFT config's own fields (not PEFT's), JSON-ready with sets as sorted lists: what is stored with the cores."""
    own = [f.name for f in fields(config) if f.name not in {g.name for g in fields(PeftConfig)}]
    return {name: sorted(v) if isinstance(v := getattr(config, name), set) else v for name in own}


def remove_stale_temporaries(directory: str) -> None:
    """Remove what a save killed mid-way left in an edit directory, once older than STALE_SECONDS: safetensors'
    temporary copy of an edit's weights (only when its header holds an edit's stored config) and config staging
    directories. Anything else, or anything younger, stays."""
    now = time.time()
    for entry in os.scandir(directory):
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_SECONDS:
                continue
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif SAFETENSORS_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with open_regular(entry.path) as f:
                    header = f.read(8 + min(int.from_bytes(f.read(8), "little"), 1 << 20))
                if CONFIG_PART.encode() in header:
                    os.remove(entry.path)
        except (OSError, ValueError):  # gone meanwhile, or not a file we may read
            continue


def _safetensors_dtype_name(dtype: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "U8": "uint8", "I64": "int64"}.get(dtype, dtype)


LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")
T = TypeVar("T")


def encode_module(name: str, delta: SparseDelta, value_dtype: torch.dtype,
                  fingerprint: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module `name`'s file parts: values in `value_dtype`, Elias–Fano coded indices, their metadata, the base-weight
    fingerprint and the checksum over them all."""
    code, meta = codec.encode_indices(delta.indices.cpu(), delta.numel)
    parts = {"dft_values": delta.values.detach().to("cpu", value_dtype), "dft_code": code, "dft_meta": meta,
             "dft_fingerprint": fingerprint.clone()}
    return {**parts, CHECKSUM_PART: module_checksum(name, parts)}


def module_checksum(name: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 (32 uint8) over the module name (PEFT's prefix removed) and each FILE_PARTS tensor's dtype, shape and
    bytes: a changed bit anywhere, or parts moved to another module, gives another checksum."""
    digest = hashlib.sha256(name.removeprefix(PEFT_PREFIX).encode())
    for part in FILE_PARTS:
        tensor = parts[part].detach().cpu().contiguous().reshape(-1)
        digest.update(f"\0{part}\0{parts[part].dtype}\0{tuple(parts[part].shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def group_parts(items: Iterable[tuple[str, T]]) -> tuple[dict[str, dict[str, T]], dict[str, T]]:
    """(module prefix → part name → item, items that are no module part) from (key, item) pairs keyed
    `<module prefix>.<part>`: the grouping every reader of an edit file shares."""
    groups: dict[str, dict[str, T]] = {}
    others: dict[str, T] = {}
    for key, item in items:
        prefix, _, part = key.rpartition(".")
        if part in PART_DTYPES and prefix:
            groups.setdefault(prefix, {})[part] = item
        else:
            others[key] = item
    return groups, others


def verify_checksum(name: str, parts: Mapping[str, torch.Tensor], source: str) -> bool:
    """Check module `name`'s stored checksum; False when the file has none (written before checksums), ValueError
    when it does not match."""
    stored = parts.get(CHECKSUM_PART)
    if stored is None:
        return False
    if stored.dtype != torch.uint8 or tuple(stored.shape) != (32,):
        raise ValueError(f"{source}: module {name!r} has a malformed {CHECKSUM_PART} ({stored.dtype} of shape "
                         f"{tuple(stored.shape)}, expected 32 uint8)")
    if not torch.equal(stored.cpu(), module_checksum(name, parts)):
        raise ValueError(f"{source}: module {name!r} fails its checksum: the file is corrupt (a changed bit or a "
                         "damaged download); refusing it")
    return True


def decode_module(name: str, parts: Mapping[str, torch.Tensor], numel: int, shape: tuple[int, ...],
                  fingerprint: torch.Tensor | None, source: str = "the edit file") -> tuple[SparseDelta, bool]:
    """Validate one module's file parts against the module it is loaded into and decode them.

    `fingerprint` is the module's own base-weight fingerprint, or None to skip that check. Any malformed, corrupt
    (checksum) or mismatched part raises ValueError naming the module. Returns the delta and whether the file carried
    a checksum for it.
    """
    missing = [p for p in FILE_PARTS if p not in parts]
    if missing:
        raise ValueError(f"module {name!r}: the edit file lacks {missing} (it holds {sorted(parts)})")
    for part, allowed in PART_DTYPES.items():
        if part in parts and parts[part].dtype not in allowed:
            raise ValueError(f"module {name!r}: {part} has dtype {parts[part].dtype}, expected one of {allowed}")
    checked = verify_checksum(name, parts, source)
    meta, code, values = parts["dft_meta"], parts["dft_code"], parts["dft_values"]
    if meta.dim() == 1 and meta.numel() >= 2 and int(meta[1]) != numel:
        raise ValueError(f"module {name!r}: the edit was made for a weight of {int(meta[1])} elements but this "
                         f"model's has {numel} (shape {shape}): wrong base model")
    indices = codec.decode_indices(code, meta, numel, name)  # strictly increasing and in range, or ValueError
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
    return SparseDelta(indices, values.float(), shape), checked


def encode_config(fields: Mapping[str, Any]) -> torch.Tensor:
    """The edit's config fields as a uint8 tensor of UTF-8 JSON, stored with the cores (key `CONFIG_KEY`)."""
    return torch.frombuffer(bytearray(json.dumps(dict(fields), sort_keys=True).encode()), dtype=torch.uint8)


def decode_config(tensor: torch.Tensor, source: str) -> dict[str, Any]:
    """Inverse of `encode_config`; ValueError naming `source` when the tensor is not a JSON object's bytes."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"{source}: {CONFIG_PART} must be 1-D uint8 JSON bytes, got {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)}")
    try:
        fields = json.loads(tensor.numpy().tobytes())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{source}: the stored config ({CONFIG_PART}) is not valid JSON: {err}") from err
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: the stored config ({CONFIG_PART}) is not a JSON object")
    return fields


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
    if not is_regular_file(path):
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME}: not a saved DFT edit (save one with "
                         "`dft-peft edit` or peft_model.save_pretrained(dir))")
    preflight(str(directory))
    modules, unchecked = [], False
    with safe_open(path, framework="pt") as f:
        groups, _ = group_parts((key, key) for key in f.keys())  # noqa: SIM118 - safe_open handles are not mappings
        if not groups:
            raise ValueError(f"{path} holds no DFT cores (no *.dft_values tensors): not a DFT edit")
        for prefix, parts in groups.items():
            name = prefix.removeprefix(PEFT_PREFIX)
            if missing := [p for p in FILE_PARTS if p not in parts]:
                raise ValueError(f"{path}: module {name!r} lacks {missing}: the edit file is incomplete")
            tensors = {part: f.get_tensor(key) for part, key in parts.items()}
            unchecked |= not verify_checksum(name, tensors, str(path))
            meta = tensors["dft_meta"]
            if meta.shape != (len(codec.META_FIELDS),):
                raise ValueError(f"{path}: module {name!r} has a malformed dft_meta of shape {tuple(meta.shape)}, "
                                 f"expected {len(codec.META_FIELDS)} values {codec.META_FIELDS}")
            _, numel, count, _ = meta.tolist()
            if count != tensors["dft_values"].numel() or not 0 <= count <= numel:
                raise ValueError(f"{path}: module {name!r} claims {count} edited entries of {numel} but holds "
                                 f"{tensors['dft_values'].numel()} values: the edit file is corrupt")
            modules.append(ModuleCore(name, count, numel, sum(t.nbytes for t in tensors.values())))
    if unchecked:
        warnings.warn(UNCHECKED_WARNING.format(path=path), stacklevel=2)
    return sorted(modules, key=lambda m: (m.layer is None, m.layer or 0, m.name))
