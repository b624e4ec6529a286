"""The fine-tunes DFT is built from: Δold and Δnew from the current weights, and training a core's values.

A fine-tune leaves the model's weights untouched: full fine-tuning (DFT_FT) trains a copy W′ that stands in for W
through `torch.func.functional_call`, LoRA (DFT_LoRA) adds its factors' output through forward hooks. Δ is read off
at the end (W′ − W, in place; scale·B·A, per module on access), so the weights the round started from never need a
copy: Δold is the one extra copy of the targeted weights DFT holds, Δnew is the fine-tune's own trainable tensor.

Each fine-tune is an `nn.Module` whose forward returns the loss and whose only parameters are the trainable ones, so
`accelerate` can wrap it (DDP, FSDP2, DeepSpeed ZeRO-1/2) and every rank trains on its share of the batches. Under
FSDP2 the trainable tensors end sharded by rows: each rank then reads off only its rows of Δ (`ShardedDeltas`), and
the core is selected across the ranks (`dft_peft.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .distributed import Shard
from .layer import DFTLayer
from .metrics import encode_pairs

if TYPE_CHECKING:
    from .kernels.select_core_torch import Terms

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing is ever sharded
    DTensor = ()

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


class EpochBatches:
    """Right-padded batches of `prompt + " " + answer` with the loss on the answer tokens only, in a fresh order
    drawn from `generator` at every call (one call per epoch)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str],
                 batch_size: int, generator: torch.Generator) -> None:
        self.encoded = encode_pairs(tokenizer, prompts, answers)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.encoded) // self.batch_size)

    def __call__(self) -> list[Batch]:
        order = torch.randperm(len(self.encoded), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.batch_size):
            rows = [self.encoded[i] for i in order[start : start + self.batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            for r, (ids, n_prompt) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention_mask[r, : len(ids)] = 1
                labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        return batches


class _FineTune(nn.Module):
    """A fine-tune of `model` as a module: forward(batch) → loss; parameters: only the trainable deltas.

    The model is held outside the module tree so that wrapping the fine-tune (DDP, FSDP) touches only the deltas.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, DFTLayer]) -> None:
        super().__init__()
        self.__dict__["model"] = model
        self.names = list(layers)
        self.layers = dict(layers)

    def overrides(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.overrides(), args=(), kwargs=batch, strict=False).loss


class DenseDeltas(_FineTune):
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

    def deltas(self) -> dict[str, torch.Tensor]:
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


class ShardedDeltas(dict):
    """This rank's rows of each module's delta (`Shard`s) after an FSDP2 fine-tune; the core is selected across
    `process_group` (`select_core(..., process_group=, numels=shapes)`), no rank holding a whole delta."""

    def __init__(self, shards: dict[str, Shard], process_group: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__(shards)
        self.process_group = process_group
        self.shapes = shapes


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


class LoRADeltas(_FineTune):
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

    def deltas(self) -> LazyDeltas:
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


class CoreValues(_FineTune):
    """Training a located core's values (later rounds of `strategy="locate_once"`): a float32 copy of each layer's
    values stands in for them, so wrapping (DDP, FSDP) touches only the values, never the model's weights;
    `write_back` stores the trained values in the adapter."""

    def __init__(self, model: nn.Module, layers: Mapping[str, DFTLayer], adapter_name: str,
                 param_prefix: str) -> None:
        super().__init__(model, {n: layer for n, layer in layers.items() if layer.dft_values[adapter_name].numel()})
        self.adapter_name = adapter_name
        self.param_names = [f"{param_prefix}{name}.dft_values.{adapter_name}" for name in self.names]
        self.trained = nn.ParameterList(
            [nn.Parameter(self.layers[n].dft_values[adapter_name].detach().to(torch.float32, copy=True))
             for n in self.names]
        )

    def overrides(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.param_names, self.trained))

    def write_back(self) -> None:
        with torch.no_grad():
            for name, t in zip(self.names, self.trained):
                self.layers[name].dft_values[self.adapter_name].copy_(whole(t))


class ModelLoss(nn.Module):
    """Train the model's own trainable parameters (the benchmarks' Full-FT and LoRA baselines): forward(batch) → the
    model's loss. DFT's own rounds train stand-ins instead (`DenseDeltas`, `LoRADeltas`, `CoreValues`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).loss


class LazyDeltas(Mapping[str, torch.Tensor]):
    """A read-only mapping that computes each module's delta when it is read, so only one is in memory at a time.

    `read_range(name, start, length)`, when given, returns flat elements [start, start + length) of a delta without
    computing the whole module: core selection then samples its threshold cheaply and streams each module a block
    of rows at a time. `read_terms`, when given, returns the same range as `Terms` (fine-tuned weights and base), which
    the CPU selection loop subtracts as it scores; its `tuned` tensor may be a buffer that a later `read_terms` call
    overwrites (a streaming reader's two, used in turn: selection reads one chunk ahead).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], compute: Callable[[str], torch.Tensor],
                 read_range: Callable[[str, int, int], torch.Tensor] | None = None,
                 read_terms: Callable[[str, int, int], Terms] | None = None) -> None:
        self.shapes = dict(shapes)
        self.compute = compute
        self.read_range = read_range
        self.read_terms = read_terms

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self.compute(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]


def flat_range(read_rows: Callable[[slice], torch.Tensor], shape: tuple[int, ...], start: int,
               length: int) -> torch.Tensor:
    """Flat elements [start, start + length) of a tensor of `shape`, reading only the rows that hold them."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = start // row, (start + length - 1) // row + 1
    offset = start - first * row
    return read_rows(slice(first, last)).reshape(-1)[offset : offset + length]


def _rank_share(batches: list[Batch], accelerator: Any) -> list[Batch]:
    """This rank's batches: every rank draws the same shuffled list and takes every world_size-th one, wrapping
    around so that all ranks step equally often (a DDP requirement)."""
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        return batches
    steps = -(-len(batches) // world)
    return [batches[(accelerator.process_index + i * world) % len(batches)] for i in range(steps)]


def check_engine(accelerator: Any) -> None:
    """Refuse the engines whose sharding the fine-tunes cannot read Δ from, before anything runs."""
    if accelerator is None:
        return
    kind = accelerator.distributed_type  # a str enum: compares with its name
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("DFT edits under FSDP need FSDP2 (fsdp_version: 2 in the accelerate config, or "
                         "--fsdp_version 2): FSDP1's flat parameters do not keep the weights' shapes")
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError("DFT edits run with DeepSpeed ZeRO-1/2 or FSDP2, not ZeRO-3 (its partitioned parameters "
                         "cannot be read as whole rows); fine-tune with ZeRO-3 yourself and call build_edit on the "
                         "two checkpoints")


def prepare(accelerator: Any, module: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
    """`accelerator.prepare(module, opt)`, with an FSDP2 fine-tune sharded as one unit.

    The fine-tune's parameters are plain tensors used by one `functional_call` of the model, so the user's
    auto-wrap policy (transformer blocks, size) has nothing to wrap and activation checkpointing nothing to
    checkpoint; both are switched off for this call and restored after it.
    """
    if getattr(accelerator, "is_fsdp2", False):
        plugin = accelerator.state.fsdp_plugin
        saved = plugin.auto_wrap_policy, plugin.activation_checkpointing
        plugin.auto_wrap_policy, plugin.activation_checkpointing = None, False
        try:
            return accelerator.prepare(module, opt)
        finally:
            plugin.auto_wrap_policy, plugin.activation_checkpointing = saved
    return accelerator.prepare(module, opt)


def train(
    module: nn.Module,
    batches: Callable[[], list[Batch]],
    epochs: int,
    lr: float,
    optimizer: str,
    progress: tqdm | None = None,
    step_hook: Callable[[], None] | None = None,
    accelerator: Any = None,
    on_epoch: Callable[[int], None] | None = None,
) -> float:
    """Train `module`'s trainable parameters on `epochs` calls of `batches`; forward(batch) must return the loss.

    With an `accelerate.Accelerator`, the module and optimiser go through `accelerator.prepare` (DDP, FSDP, ...)
    and each rank trains on its share of every epoch's batches. `step_hook` runs after every optimiser step (e.g.
    a projection that keeps weights within a constraint), `on_epoch(epoch)` after every epoch (e.g. to trace
    metrics). Returns the mean loss of the last epoch on this rank.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(parameters, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if accelerator is not None:
        module, opt = prepare(accelerator, module, opt)
    device = next(module.parameters()).device  # after prepare: FSDP2 may have replaced (and moved) the parameters
    last = math.nan
    for epoch in range(1, epochs + 1):
        losses = []
        for batch in _rank_share(batches(), accelerator):
            loss = module(**{k: v.to(device) for k, v in batch.items()})
            finite = torch.isfinite(loss.detach()).float()
            if accelerator is not None and accelerator.num_processes > 1:  # every rank must stop together
                finite = accelerator.reduce(finite.to(accelerator.device), reduction="mean")
            if finite.item() < 1:
                raise ValueError("the fine-tuning loss is NaN or inf: lower the learning rate")
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step_hook is not None:
                step_hook()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        last = sum(losses) / len(losses)
        if on_epoch is not None:
            on_epoch(epoch)
    if accelerator is not None:
        accelerator.free_memory()
    return last
