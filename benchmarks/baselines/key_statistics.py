"""The second moment of the MLP keys, C_l = E[k kᵀ] at the input of layer l's down-projection, cached on disk.

MEMIT and AlphaEdit weigh an update against the keys the layer already stores (MEMIT Eq. 14: `λ C_l`; AlphaEdit
projects onto the null space of `C_l`), and ROME whitens its rank-one update with `C_l⁻¹`. The papers estimate C_l
from Wikipedia text; here it comes from text that exists offline and that the benchmarks never edit or score: the
CounterFact records at file positions 6000–8999 of `counterfact-edit-10k.json` (positions 6000–9999 are reserved for
text, 9000–9999 belong to the capability probe), three texts per record — `prompt + " " + ground_truth`,
`rephrase_prompt + " " + ground_truth` and `locality_prompt + " " + locality_ground_truth` — about 100k tokens for
SmolLM2's tokenizer. Every token position of every text contributes one key.

The cache holds one file per layer, keyed by a SHA-256 of the model's weights, the layer and the texts, so another
model, another layer or other text never reads a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from harness import encode_text as encode
from harness import padded
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .locate_edit import Capture, StopForward, down_proj, pad_id

DEFAULT_CACHE = Path.home() / ".cache" / "dft_peft" / "baselines"
COUNTERFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact-edit-10k.json"
TEXT_RECORDS = range(6000, 9000)


def counterfact_texts(path: str | os.PathLike[str] = COUNTERFACT, records: range = TEXT_RECORDS) -> list[str]:
    """The statistics' text: per CounterFact record in `records` (file positions), its prompt, rephrase and
    locality prompt each followed by one space and its true answer."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if records.stop > len(data):
        raise ValueError(f"{path} has {len(data)} records; the statistics need positions {records.start}–"
                         f"{records.stop - 1}")
    texts = []
    for record in (data[i] for i in records):
        for prompt, answer in ((record["prompt"], record["ground_truth"]),
                               (record["rephrase_prompt"], record["ground_truth"]),
                               (record["locality_prompt"], record["locality_ground_truth"])):
            texts.append(f"{prompt.strip()} {answer.strip()}")
    return texts


def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 over the names, shapes, dtypes and bytes of the model's parameters."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        tensor = param.detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()


class MomentAccumulator:
    """A forward pre-hook on a down-projection that adds Σ k kᵀ over the unmasked positions of each batch."""

    def __init__(self, width: int) -> None:
        self.sum = torch.zeros(width, width, dtype=torch.float64)
        self.count = 0
        self.mask: torch.Tensor | None = None

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        keys = args[0][self.mask].float()  # (tokens, d_ff)
        # One batch's sum in float32, the running sum in float64.
        self.sum += (keys.T @ keys).double()
        self.count += keys.shape[0]


class KeyStatistics:
    """C_l = E[k kᵀ] (mean over tokens) of the down-projection keys of `layers`, computed once and cached.

    Args:
        model, tokenizer: The unedited model (the statistics describe what it stores) and its tokenizer.
        layers: The decoder layers whose keys are needed.
        texts: The text; default `counterfact_texts()`.
        cache_dir: Where the per-layer files go; default `~/.cache/dft_peft/baselines/`.
        batch_size, max_length: Texts per forward pass and tokens kept per text.

    After construction, `second_moment(l)` is C_l (float32, d_ff × d_ff), `tokens` the number of keys behind each,
    `seconds` the time this construction spent computing (0 when every layer came from the cache) and
    `precompute_seconds` the time of the pass(es) that computed the layers, as recorded in the cache files (a pass
    that computed several layers counts once).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int],
                 texts: Sequence[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 batch_size: int = 32, max_length: int = 64) -> None:
        self.texts = list(counterfact_texts() if texts is None else texts)
        if not self.texts:
            raise ValueError("KeyStatistics needs at least one text")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        self.max_length = max_length
        text_hash = hashlib.sha256(json.dumps([self.texts, max_length]).encode()).hexdigest()
        fingerprint = weights_fingerprint(model)
        self.paths = {layer: self.cache_dir / hashlib.sha256(f"{fingerprint}:{layer}:{text_hash}".encode())
                      .hexdigest()[:32] for layer in sorted(set(layers))}
        self.seconds = 0.0
        missing = [layer for layer, path in self.paths.items() if not path.with_suffix(".safetensors").is_file()]
        if missing:
            tick = time.perf_counter()
            self._compute(model, tokenizer, missing, batch_size)
            self.seconds = time.perf_counter() - tick
        self.moments: dict[int, torch.Tensor] = {}
        counts, passes = set(), {}
        for layer, path in self.paths.items():
            with safe_open(str(path.with_suffix(".safetensors")), "pt") as stored:
                self.moments[layer] = stored.get_tensor("second_moment")
                counts.add(int(stored.get_tensor("tokens")))
                metadata = stored.metadata()
            passes[metadata["pass"]] = float(metadata["seconds"])
        self.tokens = counts.pop()
        self.precompute_seconds = sum(passes.values())

    def second_moment(self, layer: int) -> torch.Tensor:
        """C_l = E[k kᵀ] over the text's tokens: (d_ff, d_ff), float32."""
        if layer not in self.moments:
            raise ValueError(f"no statistics for layer {layer}; computed for {sorted(self.moments)}")
        return self.moments[layer]

    def _compute(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, layers: list[int],
                 batch_size: int) -> None:
        """Run the texts through the model up to the last layer needed and write one file per layer."""
        tick = time.perf_counter()
        accumulators = {layer: MomentAccumulator(down_proj(model, layer).in_features) for layer in layers}
        hooks = [down_proj(model, layer).register_forward_pre_hook(acc) for layer, acc in accumulators.items()]
        hooks.append(down_proj(model, max(layers)).register_forward_hook(Capture(stop=True)))
        sequences = [encode(tokenizer, text)[: self.max_length] for text in self.texts]
        try:
            with torch.no_grad():
                for start in tqdm(range(0, len(sequences), batch_size), desc=f"key statistics, layers {layers}"):
                    input_ids, attention = padded(sequences[start : start + batch_size], pad_id(tokenizer))
                    for acc in accumulators.values():
                        acc.mask = attention.bool()
                    with contextlib.suppress(StopForward):
                        model(input_ids=input_ids, attention_mask=attention)
        finally:
            for hook in hooks:
                hook.remove()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # The pass's identity and duration, so that a later load can report what precomputing took.
        metadata = {"pass": f"{time.time_ns()}:{layers}", "seconds": f"{time.perf_counter() - tick:.3f}"}
        for layer, acc in accumulators.items():
            moment = (acc.sum / acc.count).float()
            save_file({"second_moment": moment.contiguous(), "tokens": torch.tensor(acc.count)},
                      str(self.paths[layer].with_suffix(".safetensors")), metadata=metadata)
