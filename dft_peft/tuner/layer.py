"""DFT tuner layers: a frozen base layer plus, per adapter, one sparse delta (sorted flat indices + values)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from ..format.sparse import SparseDelta, check_indices, coalesce, index_dtype
from .config import DFTConfig
from .merge import compose_weight, merged_values, scatter_merge, scatter_restore

FINGERPRINT_SIZE = 16


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """16 evenly spaced weight entries as float32: identifies a base weight across dtypes and devices."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    count = min(FINGERPRINT_SIZE, n)
    positions = ((torch.arange(count, dtype=torch.float64) + 0.5) * (n / max(count, 1))).long().clamp_(max=n - 1)
    return flat[positions.to(flat.device)].float().cpu()


class DFTLayer(BaseTunerLayer):
    """Holds one sparse delta per adapter on top of a frozen base layer.

    `dft_indices[adapter]` (persistent buffer): sorted flat indices into the base weight as stored, int32 when the
    weight has fewer than 2^31 elements. `dft_values[adapter]` (parameter): the delta at those indices, trainable so
    the core can be refined further. An adapter without indices is the identity.
    """

    adapter_layer_names = ("dft_values",)
    other_param_names = ("dft_indices",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.dft_values = nn.ParameterDict({})
        self.dft_indices = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Original weight entries at the indices of each merged adapter: unmerge writes them back bit-exactly.
        self._merge_backup: dict[str, torch.Tensor] = {}
        self.kwargs = kwargs
        weight = self.get_base_layer().weight
        self.base_numel = weight.numel()
        self.base_shape = tuple(weight.shape)
        self.base_fingerprint = weight_fingerprint(weight)
        self.register_load_state_dict_pre_hook(_check_loaded_indices)

    def update_layer(self, adapter_name: str, config: DFTConfig, **kwargs: Any) -> None:
        """Create an empty (identity) sparse delta for `adapter_name`."""
        weight = self.get_base_layer().weight
        self.dft_indices[adapter_name] = torch.empty(0, dtype=index_dtype(self.base_numel), device=weight.device)
        self.dft_values[adapter_name] = nn.Parameter(torch.empty(0, dtype=torch.float32, device=weight.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- the sparse delta -------------------------------------------------------------------------------------

    def sparse_delta(self, adapter_name: str) -> SparseDelta:
        return SparseDelta(self.dft_indices[adapter_name], self.dft_values[adapter_name].detach(), self.base_shape)

    def set_sparse_delta(self, adapter_name: str, delta: SparseDelta) -> None:
        """Replace the adapter's delta.

        One of the two ways indices enter the layer (the other is a state-dict load, see `_check_loaded_indices`):
        they are checked here to be strictly increasing and within the weight, since the scatter-merge kernels trust
        them (the Triton kernel has no bounds checks).
        """
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before changing it")
        if delta.shape != self.base_shape:
            raise ValueError(f"a delta of shape {delta.shape} cannot be set on a weight of shape {self.base_shape}")
        check_indices(delta.indices, self.base_numel, f"adapter {adapter_name!r}")
        weight = self.get_base_layer().weight
        requires_grad = self.dft_values[adapter_name].requires_grad
        self.dft_indices[adapter_name] = delta.indices.to(index_dtype(self.base_numel)).to(weight.device)
        values = delta.values.detach().to(device=weight.device, dtype=self.dft_values[adapter_name].dtype)
        self.dft_values[adapter_name] = nn.Parameter(values.clone(), requires_grad=requires_grad)

    def add_sparse_delta(self, adapter_name: str, delta: SparseDelta) -> None:
        """Accumulate: union of indices, values summed where they coincide."""
        current = self.sparse_delta(adapter_name)
        self.set_sparse_delta(adapter_name, coalesce([current, delta], self.base_shape))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta (PEFT's introspection API; the forward never builds it)."""
        weight = self.get_base_layer().weight
        return self.sparse_delta(adapter_name).to_dense(torch.float32).to(weight.device)

    # --- merge / unmerge ------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas into the base weight in place, keeping the replaced entries for `unmerge`."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight.data
        for name in adapter_names:
            if name not in self.dft_values:
                continue
            indices, values = self.dft_indices[name], self.dft_values[name].detach()
            if safe_merge and not torch.isfinite(merged_values(weight, indices, values)).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._merge_backup[name] = scatter_merge(weight, indices, values)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo `merge` exactly: write the original entries back, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight.data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            scatter_restore(weight, self.dft_indices[name], self._merge_backup.pop(name))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        super().delete_adapter(adapter_name)

    # --- forward --------------------------------------------------------------------------------------------

    def _effective_weight(self) -> torch.Tensor | None:
        """Base weight with the active unmerged deltas applied, or None when the base layer can run as is."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        if self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.dft_values and self.dft_indices[a].numel()]
        if not active:
            return None
        weight = self.get_base_layer().weight
        for name in active:
            weight = compose_weight(weight, self.dft_indices[name], self.dft_values[name])
        return weight


class _DFTModule(nn.Module, DFTLayer):
    """A base module with DFT adapters: it runs as the base layer unless an active adapter has entries, and then
    with `_forward_with(x, weight)` on the composed weight."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DFTConfig, **kwargs: Any) -> None:
        super().__init__()
        DFTLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = self._effective_weight()
        if weight is None:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_with(x, weight)

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "dft." + super().__repr__()


class Linear(_DFTModule):
    """DFT on `nn.Linear`, and on transformers' `Conv1D` (GPT-2) whose weight is stored as (in, out)."""

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.T if self.fan_in_fan_out else weight
        return F.linear(x, weight, self.get_base_layer().bias)


class Embedding(_DFTModule):
    """DFT on `nn.Embedding` (indices address the (num_embeddings, dim) table)."""

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                          base.sparse)
        embed_scale = self._get_embed_scale()
        return out * embed_scale.to(out.dtype) if embed_scale is not None else out


def _check_loaded_indices(layer: DFTLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: indices loaded into a layer are checked as `set_sparse_delta` checks them, except the
    layer's own buffer handed back (PEFT's load of an edit file, already set through `set_sparse_delta`)."""
    for key, indices in state_dict.items():
        adapter = key.removeprefix(f"{prefix}dft_indices.")
        if adapter == key or not isinstance(indices, torch.Tensor):
            continue
        if adapter not in layer.dft_indices or indices is not layer.dft_indices[adapter]:
            check_indices(indices, layer.base_numel, f"state dict entry {key!r}")


def dft_layer_class(target: nn.Module) -> type[DFTLayer]:
    """The DFT layer class for a base module, or a TypeError naming the supported types."""
    if isinstance(target, nn.Embedding):
        return Embedding
    if isinstance(target, (nn.Linear, HFConv1D)):
        return Linear
    raise TypeError(
        f"DFT cannot edit a {type(target).__name__}: supported modules are torch.nn.Linear, torch.nn.Embedding and "
        "transformers' Conv1D"
    )
