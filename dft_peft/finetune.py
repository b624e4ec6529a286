"""The fine-tunes DFT is built from: Δold and Δnew from the current weights, and training a core's values.

A fine-tune never copies the weights it starts from. It trains a delta D on top of them — a dense D for full
fine-tuning (DFT_FT), LoRA factors for DFT_LoRA — through `torch.func.functional_call` with W + D in place of W, so
the delta is D itself: the weights stay untouched and Δold costs the one extra copy of the targeted weights that DFT
needs, while Δnew is the fine-tune's own trainable tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .layer import DFTLayer
from .metrics import encode_pairs

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


class DeltaParametrization(Protocol):
    """Trainable deltas for a set of modules: what the fine-tune optimises and what it yields."""

    def parameters(self) -> list[torch.Tensor]: ...

    def overrides(self) -> dict[str, torch.Tensor]:
        """Parameter name → W + D, for `functional_call`."""
        ...

    def deltas(self) -> Mapping[str, torch.Tensor]:
        """Module name → the delta (may be computed on access)."""
        ...


class DenseDeltas:
    """Full fine-tuning: one dense float32 D per module (DFT_FT)."""

    def __init__(self, layers: Mapping[str, DFTLayer], param_prefix: str) -> None:
        self.weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
        self.prefix = param_prefix
        self.d = {
            name: torch.zeros(w.shape, dtype=torch.float32, device=w.device, requires_grad=True)
            for name, w in self.weights.items()
        }

    def parameters(self) -> list[torch.Tensor]:
        return list(self.d.values())

    def overrides(self) -> dict[str, torch.Tensor]:
        return {
            f"{self.prefix}{name}.base_layer.weight": (w.float() + self.d[name]).to(w.dtype)
            for name, w in self.weights.items()
        }

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: d.detach() for name, d in self.d.items()}


class LoRADeltas:
    """LoRA fine-tuning: Δ = scale · B·A per module (DFT_LoRA), computed one module at a time when read."""

    def __init__(
        self, layers: Mapping[str, DFTLayer], param_prefix: str, r: int, alpha: float, generator: torch.Generator
    ) -> None:
        self.weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
        self.transposed = {name: bool(getattr(layer, "fan_in_fan_out", False)) for name, layer in layers.items()}
        self.prefix = param_prefix
        self.scale = alpha / r
        self.a, self.b = {}, {}
        for name, w in self.weights.items():
            out_features, in_features = w.shape[::-1] if self.transposed[name] else w.shape
            a = torch.empty(r, in_features, dtype=torch.float32)
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)), as PEFT initialises lora_A
            a.uniform_(-bound, bound, generator=generator)
            self.a[name] = a.to(w.device).requires_grad_()
            self.b[name] = torch.zeros(out_features, r, dtype=torch.float32, device=w.device, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [*self.a.values(), *self.b.values()]

    def delta(self, name: str) -> torch.Tensor:
        delta = self.scale * (self.b[name] @ self.a[name])
        return delta.T if self.transposed[name] else delta

    def overrides(self) -> dict[str, torch.Tensor]:
        return {
            f"{self.prefix}{name}.base_layer.weight": (w.float() + self.delta(name)).to(w.dtype)
            for name, w in self.weights.items()
        }

    def deltas(self) -> LazyDeltas:
        return LazyDeltas({n: tuple(w.shape) for n, w in self.weights.items()}, self._detached_delta)

    def _detached_delta(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.delta(name).contiguous()


class LazyDeltas(Mapping[str, torch.Tensor]):
    """A read-only mapping that computes each module's delta when it is read, so only one is in memory at a time."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], compute: Callable[[str], torch.Tensor]) -> None:
        self.shapes = dict(shapes)
        self.compute = compute

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


def train(
    loss_fn: Callable[[Batch], torch.Tensor],
    parameters: list[torch.Tensor],
    batches: Callable[[], list[Batch]],
    epochs: int,
    lr: float,
    optimizer: str,
    progress: tqdm | None = None,
) -> float:
    """A plain training loop over `epochs` calls of `batches`; returns the mean loss of the last epoch."""
    if optimizer == "adamw":
        opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(parameters, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    last = math.nan
    for _ in range(epochs):
        losses = []
        for batch in batches():
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise ValueError("the fine-tuning loss is NaN or inf: lower the learning rate")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        last = sum(losses) / len(losses)
    return last


def fine_tune_deltas(
    model: nn.Module,
    parametrization: DeltaParametrization,
    batches: Callable[[], list[Batch]],
    epochs: int,
    lr: float,
    optimizer: str,
    progress: tqdm | None = None,
) -> tuple[Mapping[str, torch.Tensor], float]:
    """Fine-tune W + D from the model's current weights; return (module name → D, last epoch's loss)."""
    device = next(model.parameters()).device

    def loss_fn(batch: Batch) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in batch.items()}
        return functional_call(model, parametrization.overrides(), args=(), kwargs=batch, strict=False).loss

    loss = train(loss_fn, parametrization.parameters(), batches, epochs, lr, optimizer, progress)
    return parametrization.deltas(), loss


def train_model(
    model: nn.Module,
    parameters: list[torch.Tensor],
    batches: Callable[[], list[Batch]],
    epochs: int,
    lr: float,
    optimizer: str,
    progress: tqdm | None = None,
) -> float:
    """Train `parameters` of `model` itself (e.g. a DFT adapter's core values) on the batches."""
    device = next(model.parameters()).device
    return train(
        lambda batch: model(**{k: v.to(device) for k, v in batch.items()}).loss,
        parameters, batches, epochs, lr, optimizer, progress,
    )
