"""`build_edit`: DFT's core from two fine-tuned checkpoints made with any trainer, read tensor by tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from peft import PeftModel
from torch import nn

from ..format.checkpoint import CheckpointReader
from ..format.edit_file import PEFT_PREFIX, WEIGHTS_NAME
from ..selection import LazyDeltas, Terms, flat_range, select_core
from ..tuner.config import DFTConfig
from ..tuner.layer import DFTLayer
from ..tuner.model import DFTModel
from .adapter import adapter_to_edit


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

    def base_and_key(name: str) -> tuple[torch.Tensor, str]:
        weight, key = layers[name].get_base_layer().weight.detach(), f"{name}.weight"
        if reader.tensor(key).shape != tuple(weight.shape):
            raise ValueError(f"{path}: {key} has shape {reader.tensor(key).shape}, the base model "
                             f"{tuple(weight.shape)}: a checkpoint of another model?")
        return weight, key

    def delta_rows(name: str, rows: slice = slice(None)) -> torch.Tensor:
        weight, key = base_and_key(name)
        return reader.get(key, rows).to(weight.device, torch.float32).sub_(weight[rows])

    def terms_range(name: str, start: int, length: int) -> Terms:
        weight, key = base_and_key(name)
        if weight.is_contiguous():
            base = weight.reshape(-1)[start : start + length]
        else:
            base = flat_range(lambda rows: weight[rows], shapes[name], start, length)
        return Terms(reader.read(key, start, length, stream=True), base)

    return LazyDeltas(shapes, delta_rows, read_terms=terms_range)


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
