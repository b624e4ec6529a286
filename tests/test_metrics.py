"""Edit metrics: batched evaluation equals a plain per-request loop, and exact values on a model we fully control."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_llama, tiny_tokenizer
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from dft_peft.evaluation.metrics import EditMetrics, evaluate, locality_reference, target_token_accuracy
from dft_peft.evaluation.requests import EditRequest

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = [
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "from", "city", "who", "wrote", "this", "book",
    "is", "by", "what", "capital", "of", "france", "paris", "rome", "river", "saton", "?", ",",
]
VOCAB_SIZE = 96  # tiny_llama's: every id the model can predict decodes to a token of the tokenizer
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIALS) - len(WORDS))]

REQUESTS = [
    EditRequest("who wrote this book ?", "a dog", rephrase="this book is by who ?",
                locality_prompt="what is the capital of france ?", locality_answer="paris"),
    EditRequest("the cat sat on", "the mat", locality_prompt="a dog ran", locality_answer="far away from the city"),
    EditRequest("what is the capital of rome ?", "the river city , w5 w9", rephrase="capital of rome is ?"),
    EditRequest("a cat", "ran", rephrase="the cat", locality_prompt="w1 w2 w3 w4 w5 w6 w7", locality_answer="w8"),
]


def make_tokenizer(*, eos: bool = False, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer that adds a BOS (and with `eos`, an EOS), built in memory.

    Its normalizer fuses "sat on" into one token and deletes "~", to produce a prompt whose tokens are not a prefix of
    prompt + target's, and a target that tokenizes to nothing.
    """
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("sat on", "saton"), normalizers.Replace("~", "")])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]" if eos else "[BOS] $A", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        padding_side=padding_side,
    )


def ids(text: str) -> list[int]:
    return [VOCAB.index(word) for word in text.split()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU their synchronization can cost ten
    times the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def pre_edit():
    return tiny_llama(torch.float64)


@pytest.fixture(scope="module")
def edited(pre_edit):
    """`pre_edit` with one MLP weight perturbed: some locality predictions change, not all."""
    model = copy.deepcopy(pre_edit)
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype) * 0.3)
    return model


# The obviously correct reference: one request at a time, unpadded, no batching.
def reference_predictions(model, tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + " " + target)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0]
    predicted = [int(logits[position - 1].argmax()) for position in range(len(prompt_ids), len(full_ids))]
    return predicted, full_ids[len(prompt_ids) :]


def reference_accuracy(model, tokenizer, prompt: str, target: str) -> float:
    predicted, target_ids = reference_predictions(model, tokenizer, prompt, target)
    return sum(p == t for p, t in zip(predicted, target_ids)) / len(target_ids)


def reference_metrics(edited, pre_edit, tokenizer, requests) -> list[dict[str, float | None]]:
    rows = []
    for r in requests:
        row = {"reliability": reference_accuracy(edited, tokenizer, r.prompt, r.target_new), "generality": None,
               "locality": None}
        if r.rephrase is not None:
            row["generality"] = reference_accuracy(edited, tokenizer, r.rephrase, r.target_new)
        if r.locality_prompt is not None:
            after, _ = reference_predictions(edited, tokenizer, r.locality_prompt, r.locality_answer)
            before, _ = reference_predictions(pre_edit, tokenizer, r.locality_prompt, r.locality_answer)
            row["locality"] = sum(a == b for a, b in zip(after, before)) / len(after)
        rows.append(row)
    return rows


def greedy_request(model, tokenizer, prompt: str) -> EditRequest:
    """A request whose target is the model's own greedy two-token continuation: its reliability must be 1."""
    words = []
    for _ in range(2):
        with torch.no_grad():
            words.append(VOCAB[int(model(torch.tensor([tokenizer(f"{prompt} {' '.join(words)}")["input_ids"]]))
                                   .logits[0, -1].argmax())])
    assert not set(words) & set(SPECIALS)
    return EditRequest(prompt, " ".join(words))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_target_token_accuracy_matches_reference(pre_edit, batch_size, padding_side):
    tokenizer = make_tokenizer(padding_side=padding_side)
    requests = [*REQUESTS, greedy_request(pre_edit, tokenizer, "the cat sat on the mat ,")]
    prompts, targets = [r.prompt for r in requests], [r.target_new for r in requests]
    result = target_token_accuracy(pre_edit, tokenizer, prompts, targets, batch_size=batch_size)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        assert result.predictions[i] == reference_predictions(pre_edit, tokenizer, prompt, target)[0]
        assert result.accuracies[i] == reference_accuracy(pre_edit, tokenizer, prompt, target)
    assert result.accuracies[-1] == 1.0


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_evaluate_matches_reference(edited, pre_edit, tokenizer, batch_size):
    metrics = evaluate(edited, tokenizer, REQUESTS, pre_edit, batch_size=batch_size)
    assert metrics.per_request == reference_metrics(edited, pre_edit, tokenizer, REQUESTS)
    for name in ("reliability", "generality", "locality"):
        values = [row[name] for row in metrics.per_request if row[name] is not None]
        assert getattr(metrics, name) == pytest.approx(sum(values) / len(values))
    localities = [row["locality"] for row in metrics.per_request if row["locality"] is not None]
    assert min(localities) < 1.0 and max(localities) > 0.0  # the perturbation changed some predictions, not all


def test_evaluate_accepts_dicts_in_the_request_schema(edited, pre_edit, tokenizer):
    dicts = [dataclasses.asdict(r) for r in REQUESTS]
    reference = locality_reference(pre_edit, tokenizer, dicts)
    assert evaluate(edited, tokenizer, dicts, reference=reference) == evaluate(edited, tokenizer, REQUESTS, pre_edit)


def test_locality_reference_before_in_place_edit(pre_edit, edited, tokenizer):
    model = copy.deepcopy(pre_edit)
    reference = locality_reference(model, tokenizer, REQUESTS)
    model.load_state_dict(edited.state_dict())  # the edit, in place
    metrics = evaluate(model, tokenizer, REQUESTS, reference=reference)
    assert metrics.per_request == reference_metrics(edited, pre_edit, tokenizer, REQUESTS)


def test_locality_three_ways_on_a_peft_model(tokenizer):
    base = tiny_llama(torch.float64)
    pre_edit = copy.deepcopy(base)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    expected = reference_metrics(peft_model, pre_edit, tokenizer, REQUESTS)
    assert min(row["locality"] for row in expected if row["locality"] is not None) < 1.0

    via_disable_adapter = evaluate(peft_model, tokenizer, REQUESTS, batch_size=3)
    via_reference_model = evaluate(peft_model, tokenizer, REQUESTS, pre_edit, batch_size=3)
    via_reference = evaluate(peft_model, tokenizer, REQUESTS, reference=locality_reference(pre_edit, tokenizer,
                                                                                            REQUESTS))
    assert via_disable_adapter.per_request == via_reference_model.per_request == via_reference.per_request == expected
    assert via_disable_adapter == via_reference_model == via_reference


def test_eos_appending_tokenizer_scores_no_eos(edited, pre_edit, tokenizer):
    with_eos = evaluate(edited, make_tokenizer(eos=True), REQUESTS, pre_edit)
    assert with_eos == evaluate(edited, tokenizer, REQUESTS, pre_edit)


def test_missing_probes_give_none(edited, tokenizer):
    requests = [EditRequest("who wrote this book ?", "a dog"), EditRequest("a cat", "ran")]
    metrics = evaluate(edited, tokenizer, requests)  # no locality probe: no pre-edit model needed
    assert metrics.generality is None and metrics.locality is None
    assert [row["generality"] for row in metrics.per_request] == [None, None]
    assert metrics.as_percent()["generality"] is None


def test_locality_without_pre_edit_predictions(edited, tokenizer):
    with pytest.raises(ValueError, match="pass reference_model, or reference="):
        evaluate(edited, tokenizer, REQUESTS)


def test_reference_for_other_requests(edited, pre_edit, tokenizer):
    reference = locality_reference(pre_edit, tokenizer, REQUESTS[:2])
    with pytest.raises(ValueError, match="computed on other requests"):
        evaluate(edited, tokenizer, REQUESTS, reference=reference)
    with pytest.raises(ValueError, match="not both"):
        evaluate(edited, tokenizer, REQUESTS[:2], pre_edit, reference=reference)


def test_bad_arguments(edited, tokenizer):
    with pytest.raises(ValueError, match="at least one request"):
        evaluate(edited, tokenizer, [])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        target_token_accuracy(edited, tokenizer, ["a cat"], ["ran"], batch_size=0)
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        target_token_accuracy(edited, tokenizer, ["a cat", "a dog"], ["ran"])


def test_target_that_tokenizes_to_nothing(edited, tokenizer):
    with pytest.raises(ValueError, match=r"The target '~' of the prompt 'a cat' tokenizes to no tokens"):
        evaluate(edited, tokenizer, [EditRequest("a dog", "ran"), EditRequest("a cat", "~")])


class BigramLM(nn.Module):
    """A causal LM whose logits we control: the argmax after token `t` is `table[t]` ([UNK] if absent)."""

    def __init__(self, table: dict[str, str]):
        super().__init__()
        next_token = torch.full((VOCAB_SIZE,), VOCAB.index("[UNK]"))
        for current, following in table.items():
            next_token[VOCAB.index(current)] = VOCAB.index(following)
        self.register_buffer("next_token", next_token)
        self.head = nn.Identity()  # a submodule, to check each module's training mode is restored
        self.calls: list[tuple[bool, bool, bool]] = []  # (training, head training, grad enabled) per forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, self.head.training, torch.is_grad_enabled()))
        return self.head(F.one_hot(self.next_token[input_ids], VOCAB_SIZE).float())


def test_exact_values_on_a_controlled_model(tokenizer):
    edited = BigramLM({"ran": "far", "far": "the", "away": "from", "this": "book", "book": "by"})
    pre_edit = BigramLM({"ran": "city", "this": "book", "book": "is"})
    # Reliability "a dog ran | far away from": ran->far right, far->the wrong (away), away->from right: 2/3.
    # Generality "the dog | far away from": dog->[UNK] wrong, far->the wrong, away->from right: 1/3.
    # Locality "who wrote this | book is": this->book, book->by; before the edit this->book, book->is: 1/2 unchanged.
    request = EditRequest("a dog ran", "far away from", rephrase="the dog", locality_prompt="who wrote this",
                          locality_answer="book is")
    edited.train()
    edited.head.eval()
    metrics = evaluate(edited, tokenizer, [request], pre_edit)
    values = {"reliability": 2 / 3, "generality": 1 / 3, "locality": 1 / 2}
    assert metrics == EditMetrics(**values, per_request=[values])
    assert metrics.to_dict() == {**values, "per_request": [values]}
    assert metrics.as_percent() == pytest.approx({"reliability": 200 / 3, "generality": 100 / 3, "locality": 50.0})
    assert edited.calls and all(call == (False, False, False) for call in edited.calls)  # eval mode, no grad
    assert edited.training and not edited.head.training  # each module's own mode restored

    result = target_token_accuracy(edited, tokenizer, ["a dog ran", "the dog"], ["far away from", "far away from"])
    assert result.predictions == [ids("far the from"), ids("[UNK] the from")]
    assert result.accuracies == [2 / 3, 1 / 3]


def test_prompt_not_a_token_prefix_falls_back_to_easyedit_count(tokenizer):
    # "the cat sat" + " on the mat" normalizes to "the cat saton the mat": the prompt's 4 tokens ([BOS] the cat sat)
    # are not a prefix of [BOS] the cat saton the mat, so the target is taken as tokens 4 onward: "the mat",
    # predicted after "saton" ([UNK], wrong) and "the" (mat, right).
    model = BigramLM({"the": "mat"})
    with pytest.warns(UserWarning, match="For 1 of 1 pairs the prompt's tokens are not a prefix"):
        result = target_token_accuracy(model, tokenizer, ["the cat sat"], ["on the mat"])
    assert result.predictions == [ids("[UNK] mat")] and result.accuracies == [0.5]


def test_pairs_longer_than_the_model_are_refused_by_name():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    prompt = " ".join(["the"] * (model.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        target_token_accuracy(model, tokenizer, [prompt], ["rome"])
