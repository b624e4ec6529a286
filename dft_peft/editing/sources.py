"""The fine-tunes DFT is built from: Δold and Δnew from the current weights, and training a core's values.

A fine-tune leaves the model's weights untouched: full fine-tuning (DFT_FT) trains a copy W′ that stands in for W
through `torch.func.functional_call`, LoRA (DFT_LoRA) adds its factors' output through forward hooks. Δ is read off
at the end (W′ − W, in place; scale·B·A, per module on access), so the weights the round started from never need a
copy: Δold is the one extra copy of the targeted weights DFT holds, Δnew is the fine-tune's own trainable tensor.

Each fine-tune is an `nn.Module` whose forward returns the loss and whose only parameters are the trainable ones, so
`accelerate` can wrap it (DDP, FSDP2, DeepSpeed ZeRO-1/2) and every rank trains on its share of the batches. Under
FSDP2 the trainable tensors end sharded by rows: each rank then reads off only its rows of Δ (`ShardedDeltas`), and
the core is selected across the ranks (`dft_peft.selection.sharded`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..format.edit_file import PEFT_PREFIX
from ..selection import LazyDeltas, Shard, ShardedDeltas, flat_range
from ..tuner.layer import DFTLayer
from .anchor import OutputAnchor
from .arguments import EditArguments

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing is ever sharded
    DTensor = ()


class FineTune(nn.Module):
    """The interface of every delta source: a fine-tune of `model` as a module, forward(batch) → loss, whose only
    parameters are its trainable stand-ins, and `result()`, what the fine-tune produced (its deltas; `CoreValues`
    stores the trained values in the adapter and returns None).

    The model is held outside the module tree so that wrapping the fine-tune (DDP, FSDP) touches only the deltas.
    `create` builds a source from the edit's arguments, so the edit loop picks one by name (`DELTA_SOURCES`).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, DFTLayer]) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.names = list(layers)
        self.layers = dict(layers)

    @classmethod
    def create(cls, model: nn.Module, layers: Mapping[str, DFTLayer], args: EditArguments,
               generator: torch.Generator, adapter_name: str) -> FineTune:
        raise NotImplementedError

    def result(self) -> Mapping[str, torch.Tensor] | None:
        raise NotImplementedError

    def overrides(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.overrides(), args=(), kwargs=batch, strict=False).loss


class DenseDeltas(FineTune):
    """Full fine-tuning (DFT_FT): a float32 trainable copy W′ of each targeted weight stands in for it.

    W′ is the fine-tune's own trainable tensor (what any trainer holds), so the forward allocates nothing extra and
    Δ = W′ − W is computed in place at the end — the same arithmetic as diffing checkpoints (`build_edit`).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, DFTLayer], param_prefix: str) -> None:
        super().__init__(model, layers)
        self.weights = {name: layer.get_base_layer().weight for name, layer in self.layers.items()}
        self.param_names = [f"{param_prefix}{name}.base_layer.weight" for name in self.names]
        self.trained = nn.ParameterList(
            [nn.Parameter(self.weights[name].detach().to(torch.float32, copy=True)) for name in self.names]
        )

    def overrides(self) -> dict[str, torch.Tensor]:
        return {
            key: t if t.dtype == self.weights[name].dtype else t.to(self.weights[name].dtype)
            for key, name, t in zip(self.param_names, self.names, self.trained)
        }

    @classmethod
    def create(cls, model: nn.Module, layers: Mapping[str, DFTLayer], args: EditArguments,
               generator: torch.Generator, adapter_name: str) -> DenseDeltas:
        return cls(model, layers, PEFT_PREFIX)

    def result(self) -> dict[str, torch.Tensor]:
        """Δ = W′ − W per module, in place; under FSDP2 this rank's rows of it (`ShardedDeltas`)."""
        with torch.no_grad():
            if not any(isinstance(t, DTensor) for t in self.trained):
                return {name: t.data.sub_(self.weights[name].float()) for name, t in zip(self.names, self.trained)}
            shards = {}
            for name, t in zip(self.names, self.trained):
                local, first_row = row_shard(name, t)
                local.sub_(self.weights[name][first_row : first_row + local.shape[0]].float())
                shards[name] = Shard(local, first_row * math.prod(local.shape[1:]))
            group = self.trained[0].device_mesh.get_group()
            return ShardedDeltas(shards, group, {name: self.layers[name].base_shape for name in self.names})


def row_shard(name: str, param: Any) -> tuple[torch.Tensor, int]:
    """(this rank's block of rows, its first row) of a parameter that FSDP2 sharded along dim 0 (its default)."""
    chunks = param.__create_chunk_list__()
    if (len(chunks) != 1 or any(chunks[0].offsets[1:]) or tuple(chunks[0].sizes[1:]) != tuple(param.shape[1:])):
        raise ValueError(f"{name!r}: FSDP sharded the fine-tune's copy of this weight other than by rows "
                         f"({param.placements}); DFT reads sharded deltas by rows (FSDP2's default placement)")
    return param.to_local(), int(chunks[0].offsets[0])


def whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value on this rank (all-gathered if FSDP2 sharded it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class LoRADeltas(FineTune):
    """LoRA fine-tuning (DFT_LoRA): Δ = scale · B·A per module, added to each layer's output by a forward hook
    while the fine-tune runs, and computed one module at a time when read."""

    def __init__(self, model: nn.Module, layers: Mapping[str, DFTLayer], r: int, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__(model, layers)
        self.scale = alpha / r
        self.a, self.b = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            w = self.layers[name].get_base_layer().weight
            out_features, in_features = w.shape[::-1] if self._transposed(name) else w.shape
            a = torch.empty(r, in_features, dtype=torch.float32)
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)), as PEFT initialises lora_A
            a.uniform_(-bound, bound, generator=generator)
            self.a.append(nn.Parameter(a.to(w.device)))
            self.b.append(nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=w.device)))

    def _transposed(self, name: str) -> bool:
        return bool(getattr(self.layers[name], "fan_in_fan_out", False))

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        handles = []
        for name, a, b in zip(self.names, self.a, self.b):

            def hook(module: nn.Module, args: tuple, output: torch.Tensor, a=a, b=b) -> torch.Tensor:
                return output + (self.scale * (args[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)

            handles.append(self.layers[name].register_forward_hook(hook))
        try:
            return self.model(**batch).loss
        finally:
            for handle in handles:
                handle.remove()

    @classmethod
    def create(cls, model: nn.Module, layers: Mapping[str, DFTLayer], args: EditArguments,
               generator: torch.Generator, adapter_name: str) -> LoRADeltas:
        return cls(model, layers, args.lora_r, args.lora_alpha, generator)

    def result(self) -> LazyDeltas:
        """Δ = scale·B·A per module, computed on access (the factors are small: FSDP2 shards are gathered first)."""
        with torch.no_grad():
            self.factors = {name: (whole(a), whole(b)) for name, a, b in zip(self.names, self.a, self.b)}
        return LazyDeltas({n: self.layers[n].base_shape for n in self.names}, self._delta, self._delta_range)

    def _delta_rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows of the delta as the weight stores it ((in, out) for fan_in_fan_out)."""
        a, b = self.factors[name]
        with torch.no_grad():
            if self._transposed(name):
                return (self.scale * (b @ a[:, rows])).T.contiguous()
            return self.scale * (b[rows] @ a)

    def _delta(self, name: str) -> torch.Tensor:
        return self._delta_rows(name, slice(None))

    def _delta_range(self, name: str, start: int, length: int) -> torch.Tensor:
        return flat_range(lambda rows: self._delta_rows(name, rows), self.layers[name].base_shape, start, length)


class CoreValues(FineTune):
    """Training a located core's values (later rounds of `strategy="locate_once"`): a float32 copy of each layer's
    values stands in for them, so wrapping (DDP, FSDP) touches only the values, never the model's weights; `result`
    stores the trained values in the adapter.

    `freeze(indices)` keeps the entries at those indices as they are (the edits of earlier `edit` calls): the
    forward uses their stored values and their gradient is zero, so training on new facts never moves old edits.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, DFTLayer], adapter_name: str,
                 param_prefix: str) -> None:
        super().__init__(model, {n: layer for n, layer in layers.items() if layer.dft_values[adapter_name].numel()})
        self.adapter_name = adapter_name
        self.param_names = [f"{param_prefix}{name}.dft_values.{adapter_name}" for name in self.names]
        self.trained = nn.ParameterList(
            [nn.Parameter(self.layers[n].dft_values[adapter_name].detach().to(torch.float32, copy=True))
             for n in self.names]
        )
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name → (mask of frozen entries, values)
        self.anchor: OutputAnchor | None = None
        self.anchor_weight = 0.0

    @classmethod
    def create(cls, model: nn.Module, layers: Mapping[str, DFTLayer], args: EditArguments,
               generator: torch.Generator, adapter_name: str) -> CoreValues:
        return cls(model, layers, adapter_name, PEFT_PREFIX)

    def freeze(self, indices: Mapping[str, torch.Tensor]) -> None:
        """Keep the entries at `indices` (module name → flat indices) at their current values."""
        for name, t in zip(self.names, self.trained):
            if name in indices and indices[name].numel():
                current = self.layers[name].dft_indices[self.adapter_name]
                mask = torch.isin(current, indices[name].to(current.device))  # (nnz,) entries of earlier edits
                self.frozen[name] = mask, t.detach().clone()

    def hold(self, anchor: OutputAnchor, weight: float) -> None:
        """Add `weight` · the anchor's KL on its next rows (`OutputAnchor.next_rows`) to every step's loss."""
        self.anchor, self.anchor_weight = anchor, weight

    def overrides(self) -> dict[str, torch.Tensor]:
        return {key: torch.where(*self.frozen[name], t) if name in self.frozen else t
                for key, name, t in zip(self.param_names, self.names, self.trained)}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        overrides = self.overrides()
        loss = functional_call(self.model, overrides, args=(), kwargs=batch, strict=False).loss
        if self.anchor is None:
            return loss
        rows = self.anchor.next_rows()
        ids = self.anchor.input_ids[rows.to(self.anchor.input_ids.device)].to(batch["input_ids"].device)
        logits = functional_call(self.model, overrides, args=(), kwargs={"input_ids": ids}, strict=False).logits
        return loss + self.anchor_weight * self.anchor.kl(logits, rows)

    def result(self) -> None:
        """Store the trained values in the adapter (frozen entries as they were)."""
        with torch.no_grad():
            for name, t in zip(self.names, self.trained):
                values = whole(t)
                if name in self.frozen:
                    values = torch.where(*self.frozen[name], values)
                self.layers[name].dft_values[self.adapter_name].copy_(values)


# delta_source → how the fine-tunes of a locate round read Δ
DELTA_SOURCES: dict[str, type[FineTune]] = {"full": DenseDeltas, "lora": LoRADeltas}
