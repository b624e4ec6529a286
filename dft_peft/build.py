"""`build_edit`: DFT's core from two fine-tuned checkpoints made with any trainer, read tensor by tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from .config import DFTConfig
from .core import select_core
from .edit_file import WEIGHTS_NAME
from .finetune import LazyDeltas, flat_range
from .layer import DFTLayer
from .model import PEFT_PREFIX, DFTModel, adapter_to_edit

MAPPED_BYTES = 16 << 20  # bytes read through the open handle before it is reopened


class CheckpointReader:
    """Lazy tensor access to a safetensors checkpoint: one file, a directory with `model.safetensors`, or a sharded
    directory with `model.safetensors.index.json`. Only the tensors asked for are read, one at a time.

    One file stays open across reads (selection reads thousands of row blocks), but only for `MAPPED_BYTES` and until
    another file is read: the pages read through its memory map stay resident, and count in the process's memory,
    until the map is closed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, str] = {}
        self.handle: tuple[str, Any] | None = None  # (file, open safe_open handle)
        self.mapped = 0
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path}: checkpoints are read from safetensors files only")
            self._add_file(path)
        elif os.path.isfile(index := os.path.join(path, "model.safetensors.index.json")):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map")
            for name, file in weight_map.items():
                self.files[name] = os.path.join(path, file)
        elif os.path.isfile(single := os.path.join(path, "model.safetensors")):
            self._add_file(single)
        else:
            raise ValueError(f"{path}: no safetensors checkpoint (model.safetensors or model.safetensors.index.json)")

    def _add_file(self, file: str) -> None:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                self.files[name] = file

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor, or only its `rows` (a slice of the first dimension)."""
        if name not in self.files:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {name!r}")
        file = self.files[name]
        if self.handle is None or self.handle[0] != file:
            self.handle, self.mapped = (file, safe_open(file, framework="pt")), 0  # the previous map is closed
        handle = self.handle[1]
        tensor = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        self.mapped += tensor.numel() * tensor.element_size()
        if self.mapped >= MAPPED_BYTES:
            self.handle = None  # unmaps: the next read reopens the file
        return tensor


def _is_lora_adapter(path: str) -> bool:
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("peft_type") == "LORA"


def checkpoint_deltas(path: str, layers: dict[str, DFTLayer]) -> LazyDeltas:
    """Module name → (checkpoint weight − current base weight), or scale·B·A for a LoRA adapter, read on access."""
    shapes = {name: layer.base_shape for name, layer in layers.items()}
    if _is_lora_adapter(path):
        return LazyDeltas(shapes, _lora_delta_fn(path, layers))
    reader = CheckpointReader(path)

    def delta_rows(name: str, rows: slice = slice(None)) -> torch.Tensor:
        weight = layers[name].get_base_layer().weight.detach()
        tuned = reader.get(f"{name}.weight", rows)
        expected = weight[rows].shape
        if tuned.shape != expected:
            raise ValueError(f"{path}: {name}.weight has shape {tuple(tuned.shape)}, the base model "
                             f"{tuple(weight.shape)}: a checkpoint of another model?")
        return tuned.to(weight.device, torch.float32).sub_(weight[rows])

    def delta_range(name: str, start: int, length: int) -> torch.Tensor:
        return flat_range(lambda rows: delta_rows(name, rows), shapes[name], start, length)

    return LazyDeltas(shapes, delta_rows, delta_range)


def _lora_delta_fn(path: str, layers: dict[str, DFTLayer]) -> Callable[[str], torch.Tensor]:
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
    reader = CheckpointReader(os.path.join(path, WEIGHTS_NAME))

    def delta(name: str) -> torch.Tensor:
        weight = layers[name].get_base_layer().weight
        key = f"{PEFT_PREFIX}{name}.lora_"
        if f"{key}A.weight" not in reader.files:  # a module the adapter does not train: no change
            return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        a = reader.get(f"{key}A.weight").float()
        b = reader.get(f"{key}B.weight").float()
        product = scale * (b @ a)
        product = product.T if config.get("fan_in_fan_out") else product
        if tuple(product.shape) != tuple(weight.shape):
            raise ValueError(f"{path}: LoRA delta of {name} has shape {tuple(product.shape)}, the base weight "
                             f"{tuple(weight.shape)}")
        return product.to(weight.device).contiguous()

    return delta


def build_edit(
    base: nn.Module, old_checkpoint: str, new_checkpoint: str, config: DFTConfig | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """One DFT round from checkpoints fine-tuned elsewhere: Δold = old − base, Δnew = new − base, then the core.

    Each checkpoint is a directory of safetensors shards (a full fine-tune of the base model, e.g. from the
    Trainer, accelerate/FSDP or DeepSpeed after consolidation) or a PEFT LoRA adapter directory. Tensors are read
    one module at a time, so the pair of checkpoints never sits in memory.

    Args:
        base: The model both fine-tunes started from (a transformers model, or a DFT `PeftModel` to extend).
        old_checkpoint / new_checkpoint: Fine-tuned on the old / the new facts.
        config: The DFT config (top_t, selection, λ, target modules); default `DFTConfig()`.

    Returns:
        A `PeftModel` whose adapter holds λ·core (the same as `select_core` + `add_core` on in-memory deltas).
    """
    with adapter_to_edit(base, config, adapter_name, "build_edit") as peft_model:
        tuner: DFTModel = peft_model.base_model
        config = peft_model.peft_config[adapter_name]
        layers = tuner._layers_with(adapter_name)
        old = checkpoint_deltas(old_checkpoint, layers)
        new = checkpoint_deltas(new_checkpoint, layers)
        # The fine-tunes started from θ = base + the edits already active: read the deltas against it.
        active = [a for a in tuner.active_adapters if a in peft_model.peft_config]
        peft_model.merge_adapter(active)
        try:
            core = select_core(new, old, config.top_t, config.selection)
        finally:
            peft_model.unmerge_adapter()
        if not any(d.nnz for d in core.values()):
            raise ValueError("the two checkpoints' deltas have no element of opposite signs (or top_t keeps none), so "
                             "there is no core; the model is left as it was")
        tuner.add_core(core, adapter_name=adapter_name, lam=config.lam, consume=True)
    return peft_model
