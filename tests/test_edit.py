"""The edit loop on tiny random models: one round against a hand-computed reference, stopping, old answers, both
delta sources, build_edit from checkpoints, and bad input that must leave the model as it was."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

import dft_peft
from dft_peft import EditArguments, edit
from dft_peft.editing import old_answers
from dft_peft.editing.training import EpochBatches
from dft_peft.evaluation.metrics import target_token_accuracy
from dft_peft.selection import select_core_naive
from dft_peft.tuner.layer import DFTLayer

TARGETS = ["q_proj", "up_proj", "down_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def manual_fine_tune(model, tokenizer, prompts, answers, args, gen):
    """Plain training of a copy of the targeted weights: what any trainer would do."""
    tuned = copy.deepcopy(model)
    params = [p for n, p in tuned.named_parameters() if any(t in n for t in TARGETS)]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=args.learning_rate)
    tuned.train()
    batches = EpochBatches(tokenizer, prompts, answers, args.batch_size, gen)
    for _ in range(args.epochs):
        for batch in batches():
            tuned(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    return tuned.eval()


def weight_deltas(tuned, base):
    """fp32(tuned) − fp32(base), as deltas are read from checkpoints whatever their dtype."""
    modules = dict(base.named_modules())
    return {n: (m.weight.detach().float() - modules[n].weight.detach().float()) for n, m in tuned.named_modules()
            if any(n.endswith(t) for t in TARGETS)}


def test_one_round_equals_hand_computed_reference():
    tokenizer, base = tiny_tokenizer(), tiny_llama()
    args = EditArguments(max_rounds=1, epochs=3, learning_rate=0.5, optimizer="sgd", batch_size=2, seed=7)
    config = dft_peft.DFTConfig(top_t=0.1, lam=1.5, target_modules=TARGETS)
    edited, report = edit(copy.deepcopy(base), tokenizer, TOY_FACTS, config, args, progress=False)

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed + 1)
    prompts = [f["prompt"] for f in TOY_FACTS]
    old = manual_fine_tune(base, tokenizer, prompts, [f["target_old"] for f in TOY_FACTS], args, gen)
    new = manual_fine_tune(base, tokenizer, prompts, [f["target_new"] for f in TOY_FACTS], args, gen)
    core = select_core_naive(weight_deltas(new, base), weight_deltas(old, base), config.top_t)
    reference = copy.deepcopy(base)
    modules = dict(reference.named_modules())
    for name, delta in core.items():
        flat = modules[name].weight.data.view(-1)
        flat[delta.indices.long()] += config.lam * delta.values

    assert len(report.rounds) == 1 and report.rounds[0].core_size == sum(d.nnz for d in core.values())
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    torch.testing.assert_close(logits(edited, ids), logits(reference, ids), rtol=0, atol=1e-4)
    ours = edited.base_model.get_core()
    overlap = sum(int(torch.isin(ours[n].indices.long(), d.indices.long()).sum()) for n, d in core.items())
    assert overlap >= 0.99 * sum(d.nnz for d in core.values())


def test_rounds_stop_at_the_target_reliability():
    tokenizer = tiny_tokenizer()
    args = EditArguments(strategy="paper", max_rounds=10, epochs=4, learning_rate=1e-2, target_reliability=1.0)
    edited, report = edit(tiny_llama(), tokenizer, TOY_FACTS, dft_peft.DFTConfig(top_t=0.2), args, progress=False)
    assert report.initial_reliability < 1.0
    assert report.rounds[-1].reliability >= 1.0 and len(report.rounds) < args.max_rounds
    assert all(r.reliability < 1.0 for r in report.rounds[:-1])
    assert [r.adapter_size for r in report.rounds] == sorted(r.adapter_size for r in report.rounds)
    prompts, targets = [f["prompt"] for f in TOY_FACTS], [f["target_new"] for f in TOY_FACTS]
    assert target_token_accuracy(edited, tokenizer, prompts, targets).accuracies == [1.0] * len(TOY_FACTS)


def test_deterministic_under_a_seed():
    tokenizer = tiny_tokenizer()
    args = EditArguments(max_rounds=1, epochs=2, learning_rate=1e-2)
    cores = [edit(tiny_llama(), tokenizer, TOY_FACTS, dft_peft.DFTConfig(), args, progress=False)[0]
             .base_model.get_core() for _ in range(2)]
    for name, delta in cores[0].items():
        assert torch.equal(delta.indices, cores[1][name].indices)
        assert torch.equal(delta.values, cores[1][name].values)


def test_old_answers_are_generated_when_missing():
    tokenizer = tiny_tokenizer()
    facts = [{k: v for k, v in f.items() if k != "target_old"} for f in TOY_FACTS]
    args = EditArguments(max_rounds=1, epochs=2, learning_rate=1e-2, generate_max_new_tokens=3)
    _, report = edit(tiny_llama(), tokenizer, facts, dft_peft.DFTConfig(), args, progress=False)
    assert len(report.old_answers) == len(facts) and all(report.old_answers)
    vocabulary = set(tokenizer.get_vocab())
    assert all(set(a.split()) <= vocabulary for a in report.old_answers)


def test_old_answers_with_shots_follow_the_example_facts(monkeypatch):
    seen = []

    def greedy(model, tokenizer, inputs, max_new_tokens):
        seen.append(inputs["input_ids"][0].tolist())
        return "answer"

    monkeypatch.setattr(old_answers, "_greedy", greedy)
    tokenizer, prompts = tiny_tokenizer(), [f["prompt"] for f in TOY_FACTS[:2]]
    assert old_answers.generate_old_answers(tiny_llama(), tokenizer, prompts, shots=True) == ["answer", "answer"]
    old_answers.generate_old_answers(tiny_llama(), tokenizer, prompts)  # without shots: the prompt alone
    assert seen[2:] == [tokenizer(p)["input_ids"] for p in prompts]
    first = tokenizer(" ".join(old_answers.EXAMPLE_FACTS[0]))["input_ids"]  # "The capital of France is Paris"
    for with_shots, alone in zip(seen[:2], seen[2:]):
        assert with_shots[: len(first)] == first and with_shots[-len(alone):] == alone
        assert len(with_shots) > len(alone) + len(first)


@pytest.mark.parametrize("source", ["full", "lora"])
def test_delta_sources_and_strategies(source):
    tokenizer = tiny_tokenizer()
    for strategy in ("paper", "locate_once"):
        # Steps too small to reach the target in one round: the second round always runs.
        args = EditArguments(delta_source=source, strategy=strategy, max_rounds=2, epochs=3, learning_rate=1e-5,
                             core_learning_rate=1e-5, target_reliability=1.0)
        edited, report = edit(tiny_llama(), tokenizer, TOY_FACTS, dft_peft.DFTConfig(top_t=0.1), args,
                              progress=False)
        first = report.rounds[0]
        assert first.kind == "locate" and 0 < first.core_size <= 0.1 * sum(
            m.base_numel for m in edited.base_model.dft_layers().values()) + 1
        assert 0.0 < first.opposite_sign_fraction < 1.0
        assert len(report.rounds) == 2
        if strategy == "locate_once":
            assert report.rounds[1].kind == "train_core"
            assert report.rounds[1].adapter_size == first.adapter_size  # the support stays the located core
        else:
            assert report.rounds[1].kind == "locate" and report.rounds[1].adapter_size >= first.adapter_size


@pytest.fixture(scope="module")
def fine_tuned_pair():
    """(base, old fine-tune, new fine-tune) of a tiny Llama, trained once for the build_edit tests."""
    tokenizer, base = tiny_tokenizer(), tiny_llama()
    args = EditArguments(epochs=2, learning_rate=0.5, optimizer="sgd", batch_size=2)
    gen = torch.Generator().manual_seed(0)
    prompts = [f["prompt"] for f in TOY_FACTS]
    old = manual_fine_tune(base, tokenizer, prompts, [f["target_old"] for f in TOY_FACTS], args, gen)
    new = manual_fine_tune(base, tokenizer, prompts, [f["target_new"] for f in TOY_FACTS], args, gen)
    return base, old, new


@pytest.mark.parametrize(("kernel", "overlap"), [("c", False), ("c", True), ("torch", False)])
@pytest.mark.parametrize(("base_dtype", "checkpoint_dtype"), [(torch.float32, torch.float32),
                                                               (torch.bfloat16, torch.bfloat16),
                                                               (torch.bfloat16, torch.float32),
                                                               (torch.float16, torch.float64)])
def test_build_edit_from_checkpoints_equals_in_process(tmp_path, monkeypatch, fine_tuned_pair, kernel, overlap,
                                                       base_dtype, checkpoint_dtype):
    # The C loop subtracts the base as it scores (the torch path reads the deltas first): same bits, any dtypes;
    # `overlap`: chunks split across threads, each scored while the last one's entries are stored and the next read.
    monkeypatch.setenv("DFT_PEFT_CPU_KERNEL", kernel)
    monkeypatch.setattr(importlib.import_module("dft_peft.kernels.select_core_torch"), "CHUNK", 512)
    window_cpu, with_base = importlib.import_module("dft_peft.kernels.window_cpu"), []
    start = window_cpu.start_window

    def started(*args, **kw):
        with_base.append(args[9] is not None)
        if overlap:  # scored only when collected: the latest a chunk's inputs (reader rooms in turn) may be read
            return lambda: start(*args, **{**kw, "background": False})()
        return start(*args, **kw)

    if overlap:
        monkeypatch.setattr(window_cpu, "MIN_PART", 64)
    monkeypatch.setattr(window_cpu, "start_window", started)
    base, old, new = (copy.deepcopy(m) for m in fine_tuned_pair)
    base, old, new = base.to(base_dtype), old.to(checkpoint_dtype), new.to(checkpoint_dtype)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new", max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "new" / "model.safetensors.index.json").exists()
    config = dft_peft.DFTConfig(top_t=0.05, lam=2.0, target_modules=TARGETS)

    built = dft_peft.build_edit(copy.deepcopy(base), str(tmp_path / "old"), str(tmp_path / "new"), config)
    terms_loop = kernel == "c" and checkpoint_dtype != torch.float64  # fp64 checkpoints are subtracted first
    assert (all(with_base) and any(with_base)) == terms_loop and (not with_base) == (kernel == "torch")
    in_process = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    in_process.add_core(dft_peft.select_core(weight_deltas(new, base), weight_deltas(old, base), config.top_t))
    expected = in_process.base_model.get_core()
    for name, delta in built.base_model.get_core().items():
        assert torch.equal(delta.indices, expected[name].indices)
        assert torch.equal(delta.values, expected[name].values)
    assert sum(d.nnz for d in expected.values()) > 0


def corrupt_checkpoint(tmp_path, mutate=None, header: bytes | None = None, cut: int = 0) -> str:
    """A copy of a real checkpoint whose header entries went through `mutate`, or whose header is `header`, or
    without its last `cut` bytes (negative: only the first -cut bytes kept)."""
    tiny_llama().save_pretrained(tmp_path / "good")
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    if mutate is not None:
        entries = json.loads(data[8 : 8 + length])
        for name, entry in entries.items():
            if name != "__metadata__":
                mutate(entry)
        header = json.dumps(entries).encode()
    if header is not None:
        data = len(header).to_bytes(8, "little") + header + data[8 + length :]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) - cut if cut >= 0 else -cut])
    return str(tmp_path / "bad")


@pytest.mark.parametrize(("corruption", "message"), [
    ({"header": b"[1, 2]"}, "not a JSON object"),
    ({"header": b"{not json"}, "not a safetensors file"),
    ({"header": b"[" * 100_000}, "not a safetensors file"),
    ({"mutate": lambda e: e.update(shape="")}, "malformed"),
    ({"cut": -100}, "header length"),
    ({"mutate": lambda e: e.update(data_offsets=[0, 1 << 40])}, "points outside the file"),
    ({"mutate": lambda e: e.update(shape="x")}, "malformed"),
    ({"mutate": lambda e: e.update(dtype="I8")}, "not a float weight"),
    ({"mutate": lambda e: e.update(shape=[1, 1])}, "does not match its shape"),
    ({"cut": 64}, "points outside the file"),
])
def test_build_edit_refuses_a_corrupt_checkpoint(tmp_path, corruption, message):
    path = corrupt_checkpoint(tmp_path, **corruption)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        dft_peft.build_edit(model, path, path, dft_peft.DFTConfig(target_modules=TARGETS))
    assert_unchanged(model, before)


def test_checkpoint_reader_reads_rows_and_ranges(tmp_path):
    """Rows and flat ranges as safetensors stores them; a stepped slice is refused rather than read as contiguous."""
    from dft_peft.format.checkpoint import CheckpointReader

    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    reader, name = CheckpointReader(str(tmp_path / "m")), "model.layers.1.mlp.up_proj.weight"
    weight = model.get_parameter(name).detach()
    assert torch.equal(reader.get(name), weight) and torch.equal(reader.get(name, slice(3, 7)), weight[3:7])
    assert torch.equal(reader.read(name, 5, 70, stream=True), weight.reshape(-1)[5:75])
    with pytest.raises(ValueError, match="step 1"):
        reader.get(name, slice(0, 8, 2))
    with pytest.raises(ValueError, match="outside"):
        reader.read(name, weight.numel() - 3, 4)


def test_checkpoint_index_cannot_name_files_outside_its_directory(tmp_path):
    from dft_peft.format.checkpoint import CheckpointReader

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.layers.0.mlp.up_proj.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        CheckpointReader(str(tmp_path / "ckpt"))


def test_build_edit_from_lora_adapters(tmp_path):
    from peft import LoraConfig

    base = tiny_llama()
    deltas = {}
    for tag in ("old", "new"):
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                init_lora_weights=False))
        lora.save_pretrained(tmp_path / tag)
        deltas[tag] = {n.removeprefix("base_model.model."): m.get_delta_weight("default")
                       for n, m in lora.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    config = dft_peft.DFTConfig(top_t=0.05, target_modules=TARGETS)
    built = dft_peft.build_edit(copy.deepcopy(base), str(tmp_path / "old"), str(tmp_path / "new"), config)
    expected = dft_peft.select_core(deltas["new"], deltas["old"], config.top_t)
    for name, delta in built.base_model.get_core().items():
        assert torch.equal(delta.indices, expected[name].indices)
        torch.testing.assert_close(delta.values, expected[name].values)


# --- bad input: a clear error and the model as it was --------------------------------------------------------------


def assert_unchanged(model, before):
    assert not any(isinstance(m, DFTLayer) for m in model.modules())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("requests", "config", "args", "message"),
    [
        ([], None, None, "at least one request"),
        ([{"prompt": "the sky is"}], None, None, "target_new"),
        ([{"prompt": "the sky is", "target_new": "~~"}], None, None, "tokenizes to no"),
        (TOY_FACTS, dft_peft.DFTConfig(target_modules=["no_such_module"]), None, "target_modules"),
        (TOY_FACTS, None, EditArguments(max_rounds=1, epochs=2, learning_rate=1e30), "NaN"),
        ([{**f, "target_old": f["target_new"]} for f in TOY_FACTS], None,
         EditArguments(max_rounds=1, epochs=1, optimizer="sgd", learning_rate=1e-2), "opposite signs"),
        (TOY_FACTS, dft_peft.DFTConfig(top_t=1e-9), EditArguments(max_rounds=1, epochs=1), "raise top_t"),
        (TOY_FACTS, dft_peft.DFTConfig(target_modules=["embed_tokens", "q_proj"]),
         EditArguments(delta_source="lora"), "embedding"),
    ],
    ids=["empty", "no-target", "empty-tokens", "no-modules", "nan", "no-opposite-signs", "k=0", "lora-embedding"],
)
def test_bad_input_changes_nothing(requests, config, args, message):
    from tokenizers import normalizers

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        edit(model, tokenizer, requests, config, args, progress=False)
    assert_unchanged(model, before)


def copy_core(model):
    return {n: (d.indices.clone(), d.values.detach().clone()) for n, d in model.base_model.get_core().items()}


def test_failure_keeps_an_existing_edit():
    tokenizer = tiny_tokenizer()
    args = EditArguments(max_rounds=1, epochs=2, learning_rate=1e-2)
    edited, _ = edit(tiny_llama(), tokenizer, TOY_FACTS[:1], dft_peft.DFTConfig(), args, progress=False)
    before = copy_core(edited)
    # The failure comes in a core-training round of other facts, after their core was added and its new entries
    # (earlier edits' entries stay frozen) trained in place.
    failing = EditArguments(max_rounds=3, epochs=1, learning_rate=1e-5, core_learning_rate=1e30)
    with pytest.raises(ValueError, match="NaN"):
        edit(edited, tokenizer, TOY_FACTS[1:], None, failing, progress=False)
    after = copy_core(edited)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n][0], i) and torch.equal(after[n][1], v) for n, (i, v) in before.items())


def test_failure_removes_a_new_adapter_and_restores_the_active_one():
    tokenizer = tiny_tokenizer()
    args = EditArguments(max_rounds=1, epochs=2, learning_rate=1e-2)
    edited, _ = edit(tiny_llama(), tokenizer, TOY_FACTS, dft_peft.DFTConfig(), args, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        edit(edited, tokenizer, TOY_FACTS, None, EditArguments(max_rounds=1, learning_rate=1e30),
             adapter_name="second", progress=False)
    assert list(edited.peft_config) == ["default"] and edited.active_adapters == ["default"]


def test_build_edit_failure_leaves_the_model_unwrapped(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, OSError)):
        dft_peft.build_edit(model, str(tmp_path / "missing-old"), str(tmp_path / "missing-new"),
                            dft_peft.DFTConfig(target_modules=TARGETS))
    assert_unchanged(model, before)
