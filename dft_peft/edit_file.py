"""Edit-file layout and the checks a file passes before PEFT touches the user's model."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open

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
