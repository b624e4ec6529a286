"""Training loops of an edit: right-padded batches with the loss on the answer tokens, and `train`, which runs any
fine-tune module (forward(batch) → loss) alone or through `accelerate` (DDP, FSDP2, DeepSpeed ZeRO-1/2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..evaluation.metrics import encode_pairs, padded

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
            input_ids, attention_mask = padded([ids for ids, _ in rows], self.pad_id)
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            for r, (ids, n_prompt) in enumerate(rows):
                labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        return batches


class ModelLoss(nn.Module):
    """Train the model's own trainable parameters (the benchmarks' Full-FT and LoRA baselines): forward(batch) → the
    model's loss. DFT's own rounds train stand-ins instead (`DenseDeltas`, `LoRADeltas`, `CoreValues`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).loss


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
