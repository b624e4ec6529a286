"""The output anchor: KL to the model's own outputs on text it sampled, held while a core's values train."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

import dft_peft
from dft_peft import EditArguments, edit
from dft_peft.editing.anchor import OutputAnchor

TARGETS = ["q_proj", "up_proj", "down_proj"]


def tokenizer_with_bos():
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = "[UNK]"
    return tokenizer


def test_anchor_is_near_zero_for_its_own_model_and_grows_with_change():
    model, tokenizer = tiny_llama(), tokenizer_with_bos()
    anchor = OutputAnchor(model, tokenizer, count=4, length=8, seed=0)
    assert anchor.input_ids.shape == (4, 9) and anchor.log_probs.shape == (4, 8, 96)
    with torch.no_grad():
        same = float(anchor.kl(model(input_ids=anchor.input_ids).logits))
        model.lm_head.weight.mul_(3.0)
        moved = float(anchor.kl(model(input_ids=anchor.input_ids).logits))
    assert 0 <= same < 1e-2 < moved  # bfloat16 storage leaves a rounding-sized KL for the model itself


def test_next_rows_cycle_through_every_text_and_score_only_those():
    model, tokenizer = tiny_llama(), tokenizer_with_bos()
    anchor = OutputAnchor(model, tokenizer, count=5, length=6, seed=0, per_step=2)
    assert [anchor.next_rows().tolist() for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
        logits = model(input_ids=anchor.input_ids).logits
        rows = torch.tensor([1, 3])
        assert float(anchor.kl(logits[rows], rows)) == pytest.approx(
            float((anchor.kl(logits[1:2], torch.tensor([1])) + anchor.kl(logits[3:4], torch.tensor([3]))) / 2))
        assert float(anchor.kl(logits[rows], rows)) != pytest.approx(float(anchor.kl(logits[rows], rows.flip(0))))
    assert OutputAnchor(model, tokenizer, count=3, length=4, seed=0, per_step=8).next_rows().tolist() == [0, 1, 2]


def test_texts_from_prompts_start_with_their_first_tokens():
    model, tokenizer = tiny_llama(), tokenizer_with_bos()
    prompts = [fact["prompt"] for fact in TOY_FACTS]
    anchor = OutputAnchor(model, tokenizer, count=5, length=6, seed=0, prefixes=prompts)
    assert anchor.input_ids.shape == (5, 1 + 2 + 6) and anchor.log_probs.shape == (5, 8, 96)
    for i, row in enumerate(anchor.input_ids.tolist()):
        assert row[1:3] == tokenizer(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"][:2]
    with torch.no_grad():
        assert float(anchor.kl(model(input_ids=anchor.input_ids).logits)) < 1e-2


def anchor_kl_after(weight: float, per_step: int | None = None, start: str = "start") -> float:
    tokenizer = tokenizer_with_bos()
    args = EditArguments(max_rounds=3, epochs=2, learning_rate=0.2, optimizer="sgd", batch_size=2, core_epochs=3,
                         core_learning_rate=1.0, seed=1, preserve_weight=weight, target_reliability=1.0,
                         preserve_batch=per_step, preserve_from=start)
    base = tiny_llama()
    anchor = OutputAnchor(base, tokenizer, args.preserve_texts, args.preserve_length, args.seed)
    edited, report = edit(base, tokenizer, TOY_FACTS, dft_peft.DFTConfig(top_t=0.2, target_modules=TARGETS), args,
                          progress=False)
    assert [r.kind for r in report.rounds].count("train_core") >= 1
    with torch.no_grad():
        return float(anchor.kl(edited(input_ids=anchor.input_ids).logits))


@pytest.mark.parametrize(("per_step", "start"), [(None, "start"), (4, "prompts")])
def test_preserve_weight_holds_the_outputs_on_sampled_text(per_step, start):
    assert anchor_kl_after(20.0, per_step, start) < anchor_kl_after(0.0, per_step, start)


def test_a_tokenizer_without_start_tokens_is_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no BOS, EOS or pad token"):
        OutputAnchor(tiny_llama(), tokenizer, 2, 4, 0)
