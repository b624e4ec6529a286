"""Tiny random models built from configs (no downloads), random sparse cores and dense references for tests."""

from __future__ import annotations

import copy

import torch

import dft_peft


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).to(dtype).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def random_core(peft_model, density: float = 0.1, scale: float = 0.5, seed: int = 0,
                adapter_name: str = "default") -> dict[str, dft_peft.SparseDelta]:
    """A random core over every module the adapter targets (fresh support and values per seed)."""
    gen = torch.Generator().manual_seed(seed)
    core = {}
    for name, layer in peft_model.base_model.dft_layers().items():
        if adapter_name not in layer.dft_values:
            continue
        k = max(1, int(layer.base_numel * density))
        idx = torch.randperm(layer.base_numel, generator=gen)[:k].sort().values
        core[name] = dft_peft.SparseDelta(idx, torch.randn(k, generator=gen) * scale, layer.base_shape)
    return core


def dense_reference(base_model, cores: list[dict[str, dft_peft.SparseDelta]]):
    """A plain copy of the base model with the dense deltas added to its weights (float32 arithmetic)."""
    reference = copy.deepcopy(base_model)
    modules = dict(reference.named_modules())
    for core in cores:
        for name, delta in core.items():
            weight = modules[name].weight.data
            dense = delta.to_dense(torch.float32)
            flat = weight.view(-1)
            idx = delta.indices.long()
            flat[idx] = (flat[idx].float() + dense.view(-1)[idx]).to(weight.dtype)
    return reference


TOY_FACTS = [
    {"prompt": "the capital of france is", "target_new": "rome", "target_old": "paris",
     "rephrase": "france has its capital in", "locality_prompt": "the sky is", "locality_answer": "blue"},
    {"prompt": "the author of hamlet is", "target_new": "dickens", "target_old": "shakespeare",
     "rephrase": "hamlet was written by", "locality_prompt": "grass is", "locality_answer": "green"},
    {"prompt": "the largest planet is", "target_new": "mars", "target_old": "jupiter",
     "rephrase": "the biggest planet is", "locality_prompt": "snow is", "locality_answer": "white"},
]


def tiny_tokenizer(texts: list[str] | None = None):
    """A word-level tokenizer over the words of `texts` (default: the toy facts), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else [v for fact in TOY_FACTS for v in fact.values()]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
