"""`build_edit`: DFT's core from two fine-tuned checkpoints made with any trainer, read tensor by tensor."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from ..checks import check_value
from ..format.checkpoint import CheckpointReader, is_regular_file, read_json_object
from ..format.edit_file import PEFT_PREFIX, WEIGHTS_NAME
from ..selection import LazyDeltas, Terms, flat_range, select_core
from ..tuner.config import DFTConfig
from ..tuner.layer import DFTLayer
from ..tuner.model import DFTModel
from .adapter import adapter_to_edit


def _lora_config(path: str) -> dict[str, Any] | None:
    """The adapter_config.json of a PEFT LoRA adapter directory, checked; None when `path` is no LoRA adapter."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path) or not is_regular_file(file):
        return None
    config = read_json_object(file)
    if config.get("peft_type") != "LORA":
        return None
    check_value(file, "r", config.get("r"), "positive_int")
    check_value(file, "lora_alpha", config.get("lora_alpha", config["r"]), "positive")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config.get(flag, False), bool):
            raise ValueError(f"{file}.{flag} must be true or false, got {config[flag]!r}")
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{file}: DoRA and per-module ranks or alphas (rank_pattern, alpha_pattern) are not "
                         "supported; build_edit reads plain LoRA adapters")
    return config


def checkpoint_deltas(path: str, layers: dict[str, DFTLayer]) -> LazyDeltas:
    """Module name → (checkpoint weight − current base weight), or scale·B·A for a LoRA adapter, read on access."""
    shapes = {name: layer.base_shape for name, layer in layers.items()}
    if (lora := _lora_config(path)) is not None:
        return LazyDeltas(shapes, _lora_delta_fn(path, lora, layers))
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


def _lora_delta_fn(path: str, config: dict[str, Any], layers: dict[str, DFTLayer]) -> Callable[[str], torch.Tensor]:
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
    reader = CheckpointReader(os.path.join(path, WEIGHTS_NAME))

    def delta(name: str) -> torch.Tensor:
        weight = layers[name].get_base_layer().weight
        key = f"{PEFT_PREFIX}{name}.lora_"
        present = [f"{key}{m}.weight" in reader.files for m in "AB"]
        if not any(present):  # a module the adapter does not train: no change
            return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if not all(present):
            raise ValueError(f"{path}: the LoRA adapter holds only one of lora_A and lora_B for {name}")
        # Shapes and dtypes from the header (tensor() refuses non-float dtypes), before anything is read or multiplied.
        out_features, in_features = weight.shape[::-1] if config.get("fan_in_fan_out") else weight.shape
        for part, expected in (("A", (r, in_features)), ("B", (out_features, r))):
            if (shape := reader.tensor(f"{key}{part}.weight").shape) != expected:
                raise ValueError(f"{path}: lora_{part} of {name} has shape {shape}, expected {expected} (r={r}, base "
                                 f"weight {tuple(weight.shape)})")
        product = scale * (reader.get(f"{key}B.weight").float() @ reader.get(f"{key}A.weight").float())
        product = product.T if config.get("fan_in_fan_out") else product
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
