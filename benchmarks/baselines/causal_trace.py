"""Causal tracing of the MLPs at the subject's last token (ROME §2), to choose the layers the editors write to.

For each prompt, the subject's token embeddings are corrupted with Gaussian noise (`noise` times the standard
deviation of the embedding matrix's entries, `samples` draws), which lowers the probability of the model's own clean
next-token prediction. Then, for each layer l, the MLP outputs of a window of layers centred on l are restored to their
clean values at the subject's last token; the indirect effect of l is how much probability that gives back,
p(restored) - p(corrupted), averaged over prompts. ROME edits the layer where this peaks, MEMIT the range of layers
leading to it.`sanity.py --trace` runs it on zsRE prompts of the tuning split.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from harness import encode_text as encode
from torch import nn
from transformers import PreTrainedTokenizerBase

from dft_peft import EditRequest

from .locate_edit import Capture, check_subjects, decoder_layers, down_proj


class NoiseAt:
    """A forward hook on the token embedding that adds fixed noise (samples, tokens, d_model) at positions
    [start, stop) of every row but the first (row 0 stays clean)."""

    def __init__(self, noise: torch.Tensor, start: int) -> None:
        self.noise = noise
        self.start = start

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[1:, self.start : self.start + self.noise.shape[1]] += self.noise
        return output


class RestoreAt:
    """A forward hook on a down-projection that sets its output at `position` of every row to `clean` (d_model,)."""

    def __init__(self, clean: torch.Tensor, position: int) -> None:
        self.clean = clean
        self.position = position

    def __call__(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, self.position] = self.clean
        return output


def trace_request(model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: EditRequest, noise: float,
                  samples: int, window: int, generator: torch.Generator) -> tuple[list[float], float, float]:
    """Per layer, the mean probability of the clean prediction with the window's MLPs restored; and the clean and
    corrupted probabilities."""
    ids = encode(tokenizer, request.prompt)
    start = request.prompt.rindex(request.subject)
    first = len(encode(tokenizer, request.prompt[:start])) if start else 0
    last = len(encode(tokenizer, request.prompt[: start + len(request.subject)])) - 1
    embedding = model.get_input_embeddings()
    scale = noise * embedding.weight.std().item()
    width = embedding.weight.shape[1]
    input_ids = torch.tensor([ids] * (samples + 1))  # row 0 clean, rows 1.. corrupted
    n_layers = len(decoder_layers(model))
    clean_outputs = [Capture() for _ in range(n_layers)]
    hooks = [down_proj(model, layer).register_forward_hook(c) for layer, c in enumerate(clean_outputs)]
    hooks.append(embedding.register_forward_hook(
        NoiseAt(torch.randn(samples, last + 1 - first, width, generator=generator) * scale, first)))
    try:
        with torch.no_grad():
            probs = model(input_ids=input_ids).logits[:, -1].softmax(-1)  # (samples + 1, vocab)
        answer = int(probs[0].argmax())
        for hook in hooks[:-1]:
            hook.remove()
        p_clean, p_corrupt = probs[0, answer].item(), probs[1:, answer].mean().item()
        restored = []
        for layer in range(n_layers):
            window_layers = range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window))
            restores = [down_proj(model, w).register_forward_hook(RestoreAt(clean_outputs[w].value[0, last], last))
                        for w in window_layers]
            try:
                with torch.no_grad():
                    probs = model(input_ids=input_ids).logits[1:, -1].softmax(-1)  # (samples, vocab)
            finally:
                for hook in restores:
                    hook.remove()
            restored.append(probs[:, answer].mean().item())
    finally:
        for hook in hooks:
            hook.remove()
    return restored, p_clean, p_corrupt


def trace_mlps(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
               noise: float = 3.0, samples: int = 5, window: int = 5, seed: int = 0) -> dict:
    """The mean indirect effect of each layer's MLP at the subject's last token over `requests` (see the module
    docstring), with the mean clean and corrupted probabilities."""
    check_subjects(requests)
    generator = torch.Generator().manual_seed(seed)
    effects, cleans, corrupts = [], [], []
    for request in requests:
        restored, p_clean, p_corrupt = trace_request(model, tokenizer, request, noise, samples, window, generator)
        effects.append([p - p_corrupt for p in restored])
        cleans.append(p_clean)
        corrupts.append(p_corrupt)
    per_layer = [statistics.mean(column) for column in zip(*effects)]
    return {"indirect_effect": per_layer, "peak_layer": max(range(len(per_layer)), key=per_layer.__getitem__),
            "p_clean": statistics.mean(cleans), "p_corrupted": statistics.mean(corrupts), "prompts": len(requests),
            "noise": noise, "samples": samples, "window": window}
