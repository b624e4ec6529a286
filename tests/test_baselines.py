"""ROME, MEMIT and AlphaEdit (benchmarks/baselines) on a tiny random Llama.

The model is `tiny_llama`'s architecture with four layers, a wider MLP (more keys to tell apart) and a larger weight
scale, so that one MLP write can move the next-token distribution; the key statistics come from random sentences over
the toy vocabulary. The edited prompts end with their subject, so the value written at the subject's last token reaches
the prediction without going through the random attention of the layers above.
"""

from __future__ import annotations

import random

import baselines
import pytest
import torch
from baselines.locate_edit import down_proj
from tiny_models import TOY_FACTS, tiny_tokenizer

from dft_peft import EditRequest

FACT = EditRequest(prompt="the capital of france", target_new="rome", subject="france")
OTHER = EditRequest(prompt="the author of hamlet", target_new="dickens", subject="hamlet")
# Relative change allowed in another prompt's hidden states at the edited layers (the edited prompt's move ≈ 0.4).
LOCALITY_TOLERANCE = 0.12


def edit_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def sentences(count: int, length: int, seed: int = 0) -> list[str]:
    """`count` random sentences of `length` toy words."""
    words = sorted({w for fact in TOY_FACTS for v in fact.values() for w in v.split()})
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(count)]


def target_probability(model, tokenizer, request: EditRequest) -> tuple[float, bool]:
    """P(first target token | prompt) and whether it is the argmax."""
    ids = tokenizer(f"{request.prompt} {request.target_new}", return_tensors="pt").input_ids
    n_prompt = len(tokenizer(request.prompt).input_ids)
    with torch.no_grad():
        probs = model(ids).logits[0, n_prompt - 1].softmax(-1)  # (vocab,)
    return probs[ids[0, n_prompt]].item(), bool(probs.argmax() == ids[0, n_prompt])


def hidden_states(model, tokenizer, prompt: str) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(tokenizer(prompt, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize(("name", "options"), [("ROME", {"layer": 1}),
                                               ("MEMIT", {"layers": [0, 1], "covariance_weight": 10.0})])
def test_edit_changes_the_fact_and_spares_another_prompt(tokenizer, tmp_path, name, options):
    model = edit_llama()
    editor = baselines.make_editor(name, model, tokenizer, tmp_path, statistics_texts=sentences(300, 12),
                                   templates=1, template_length=3, **options)
    p_before, top_before = target_probability(model, tokenizer, FACT)
    other_before = hidden_states(model, tokenizer, OTHER.prompt)
    editor.apply([FACT])
    p_after, top_after = target_probability(model, tokenizer, FACT)
    other_after = hidden_states(model, tokenizer, OTHER.prompt)

    assert not top_before and top_after
    assert p_after > 50 * p_before
    for layer in editor.layers:
        # hidden_states[l + 1] is layer l's output.
        before, after = other_before[layer + 1], other_after[layer + 1]
        assert (after - before).norm() / before.norm() < LOCALITY_TOLERANCE, f"layer {layer}"
    assert editor.file_bytes() > 4 * sum(down_proj(model, layer).weight.numel() for layer in editor.layers)


def test_alphaedit_update_leaves_preserved_keys_alone(tokenizer, tmp_path):
    model = edit_llama()
    # Few short sentences: their keys span part of the 256-dim key space, so a null space is left to write into.
    editor = baselines.AlphaEdit(model, tokenizer, layers=[0, 1], cache_dir=tmp_path,
                                 statistics_texts=sentences(30, 4), templates=1, template_length=3)
    originals = {layer: down_proj(model, layer).weight.detach().clone() for layer in editor.layers}
    p_before, _ = target_probability(model, tokenizer, FACT)
    editor.apply([FACT])
    p_after, _ = target_probability(model, tokenizer, FACT)
    assert p_after > 10 * p_before

    generator = torch.Generator().manual_seed(0)
    for layer in editor.layers:
        update = down_proj(model, layer).weight.detach() - originals[layer]  # (d_model, d_ff)
        projection = editor.projections[layer]
        assert 0 < editor.null_dimensions[layer] < len(projection)
        # Keys in the preserved subspace: random keys with their null-space component removed.
        keys = torch.randn(len(projection), 64, generator=generator, dtype=torch.float64)
        preserved = (keys - projection @ keys).float()  # (d_ff, 64)
        change = (update @ preserved).norm(dim=0)  # (64,)
        noise = 1e-5 * update.norm() * preserved.norm(dim=0)
        assert (change <= noise).all(), f"layer {layer}: {(change / preserved.norm(dim=0)).max():.2e}"
        # The same keys moved into the null space do change: the update is not zero there.
        null_keys = (projection @ keys).float()
        assert (update @ null_keys).norm() > 1e3 * change.norm()


@pytest.mark.parametrize("name", ["ROME", "MEMIT", "AlphaEdit"])
def test_request_without_subject_is_refused(tokenizer, tmp_path, name):
    model = edit_llama()
    editor = baselines.make_editor(name, model, tokenizer, tmp_path, statistics_texts=sentences(20, 12),
                                   templates=0, **({"layer": 1} if name == "ROME" else {"layers": [0, 1]}))
    weights = [down_proj(model, layer).weight.detach().clone() for layer in editor.layers]
    request = EditRequest(prompt="the largest planet is", target_new="mars")
    with pytest.raises(ValueError, match=r"request 1 \('the largest planet is' -> 'mars'\) has no subject"):
        editor.apply([FACT, request])
    # Refused before anything is written.
    for layer, weight in zip(editor.layers, weights):
        assert torch.equal(down_proj(model, layer).weight, weight)


def test_unknown_editor_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown editor 'KN'"):
        baselines.make_editor("KN", edit_llama(), tokenizer)


def test_alphaedit_keeps_earlier_keys_across_calls(tokenizer, tmp_path):
    model = edit_llama()
    editor = baselines.AlphaEdit(model, tokenizer, layers=[0, 1], cache_dir=tmp_path,
                                 statistics_texts=sentences(30, 4), templates=0)
    editor.apply([FACT])
    first = {layer: moment.clone() for layer, moment in editor.edited_moments.items()}
    editor.apply([OTHER])
    for layer in editor.layers:
        # K_p K_pᵀ holds one key after the first call (rank one), both after the second.
        assert torch.linalg.matrix_rank(first[layer]) == 1
        assert torch.linalg.matrix_rank(editor.edited_moments[layer]) == 2
    editor.restore()
    assert all(not moment.any() for moment in editor.edited_moments.values())
