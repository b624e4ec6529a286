"""Edit-request loading: each format, auto-detection, sampling, every bad-input case, and the real benchmark files."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest

from dft_peft.evaluation.requests import (
    EditRequest,
    as_dataset,
    as_requests,
    demo_requests,
    load_requests,
    requests_from_dicts,
    save_requests,
    to_requests,
)

DATA_DIR = Path(os.environ.get("DFT_PEFT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

ZSRE = [
    {"subject": "Glimworth", "src": "Which river flows through Glimworth?", "pred": "Tamber", "alt": "Orrin",
     "rephrase": "Glimworth lies on which river?", "loc": "nq question: how many moons has mars", "loc_ans": "two"},
    {"subject": "Pella Noor", "src": "What instrument did Pella Noor play?", "pred": "cello", "alt": " oboe",
     "rephrase": "Pella Noor played which instrument?", "loc": "nq question: who wrote hamlet",
     "loc_ans": "Shakespeare"},
]
COUNTERFACT = [
    {"case_id": 7, "prompt": "The capital of Vardenia is", "target_new": "Lisk", "subject": "Vardenia",
     "ground_truth": "Oberan", "rephrase_prompt": "Vardenia's seat of government is",
     "locality_prompt": "The capital of Norway is", "locality_ground_truth": "Oslo"},
    {"case_id": 8, "prompt": "Tomas Ekdal speaks", "target_new": "Basque", "subject": "Tomas Ekdal",
     "ground_truth": "Swedish", "rephrase_prompt": "The native language of Tomas Ekdal is",
     "locality_prompt": "Greta Lind speaks", "locality_ground_truth": "Swedish"},
]
EXPECTED_ZSRE = [
    EditRequest("Which river flows through Glimworth?", "Orrin", "Tamber", "Glimworth lies on which river?",
                "nq question: how many moons has mars", "two", "Glimworth"),
    EditRequest("What instrument did Pella Noor play?", "oboe", "cello", "Pella Noor played which instrument?",
                "nq question: who wrote hamlet", "Shakespeare", "Pella Noor"),
]
EXPECTED_COUNTERFACT = [
    EditRequest("The capital of Vardenia is", "Lisk", "Oberan", "Vardenia's seat of government is",
                "The capital of Norway is", "Oslo", "Vardenia"),
    EditRequest("Tomas Ekdal speaks", "Basque", "Swedish", "The native language of Tomas Ekdal is",
                "Greta Lind speaks", "Swedish", "Tomas Ekdal"),
]
def loaded(*args, **kwargs) -> list[EditRequest]:
    """`load_requests`' Dataset checked against its schema and turned into requests, for comparisons."""
    dataset = load_requests(*args, **kwargs)
    assert list(dataset.column_names) == [f.name for f in dataclasses.fields(EditRequest)]
    return to_requests(dataset)


MANY = [{"prompt": f"Question {i}?", "target_new": f"answer {i}"} for i in range(20)]


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["zsre", "auto"])
def test_zsre(tmp_path, fmt):
    assert loaded(write_json(tmp_path / "z.json", ZSRE), format=fmt) == EXPECTED_ZSRE


@pytest.mark.parametrize("fmt", ["counterfact", "auto"])
def test_counterfact(tmp_path, fmt):
    assert loaded(write_json(tmp_path / "c.json", COUNTERFACT), format=fmt) == EXPECTED_COUNTERFACT


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
@pytest.mark.parametrize("fmt", ["json", "auto"])
def test_request_schema_json_and_jsonl(tmp_path, writer, fmt):
    records = [dataclasses.asdict(r) for r in EXPECTED_ZSRE] + [{"prompt": "Only a prompt?", "target_new": "yes"}]
    expected = [*EXPECTED_ZSRE, EditRequest("Only a prompt?", "yes")]
    assert loaded(writer(tmp_path / "r.json", records), format=fmt) == expected


def test_zsre_and_counterfact_as_jsonl(tmp_path):
    assert loaded(write_jsonl(tmp_path / "z.jsonl", ZSRE)) == EXPECTED_ZSRE
    assert loaded(write_jsonl(tmp_path / "c.jsonl", COUNTERFACT)) == EXPECTED_COUNTERFACT


def test_save_then_load_round_trips(tmp_path):
    requests = [*EXPECTED_COUNTERFACT, EditRequest("Is this ünïcode?", "ja")]
    save_requests(requests, tmp_path / "out.jsonl")
    assert loaded(tmp_path / "out.jsonl") == requests
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 3


def test_path_with_glob_characters(tmp_path):
    # `datasets.load_dataset` would read `[1]` as a glob pattern; the loader takes paths literally.
    assert loaded(write_json(tmp_path / "run[1].json", COUNTERFACT)) == EXPECTED_COUNTERFACT


def test_requests_from_dicts():
    assert requests_from_dicts(dataclasses.asdict(r) for r in EXPECTED_ZSRE) == EXPECTED_ZSRE
    with pytest.raises(ValueError, match=r"record\[1\]: required key 'target_new' is missing"):
        requests_from_dicts([{"prompt": "a?", "target_new": "b"}, {"prompt": "c?"}])


def test_first_n(tmp_path):
    path = write_json(tmp_path / "many.json", MANY)
    assert [r.prompt for r in loaded(path, n=3)] == ["Question 0?", "Question 1?", "Question 2?"]


def test_seeded_sample(tmp_path):
    path = write_json(tmp_path / "many.json", MANY)
    sample = loaded(path, n=5, seed=3)
    assert sample == loaded(path, n=5, seed=3)
    assert sample != loaded(path, n=5, seed=4)
    assert len(set(sample)) == 5 and set(sample) <= set(requests_from_dicts(MANY))
    everything = requests_from_dicts(MANY)
    shuffled = loaded(path, seed=3)  # no n: all requests, in seeded order
    assert shuffled != everything and sorted(shuffled, key=everything.index) == everything


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_n(tmp_path, n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        loaded(write_json(tmp_path / "many.json", MANY), n=n)


def test_n_larger_than_file(tmp_path):
    with pytest.raises(ValueError, match=r"n=21 .* only 20"):
        loaded(write_json(tmp_path / "many.json", MANY), n=21)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        ("[]", "the file holds no records"),
        ('[{"prompt": "a?", "target_new": "b"},', "invalid JSON"),
        ('{"prompt": "a?", "target_new": "b"}\n{"prompt": \n', r"line 2: invalid JSON Lines record"),
        ('["just a string"]', r"record\[0\]: expected a JSON object, got str"),
        ('[{"question": "a?", "answer": "b"}]', r"cannot detect the format from the keys of record\[0\]"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        loaded(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("fmt", "records", "message"),
    [
        ("zsre", [ZSRE[0], {k: v for k, v in ZSRE[1].items() if k != "alt"}], r"record\[1\]: required key 'alt'"),
        ("counterfact", [{"target_new": "x"}], r"record\[0\]: required key 'prompt' is missing"),
        ("zsre", [ZSRE[0], {**ZSRE[1], "alt": "  "}], r"record\[1\]: 'alt' must be a non-empty string"),
        ("zsre", [{**ZSRE[0], "loc_ans": None}], r"record\[0\]: EditRequest.locality_prompt and .locality_answer"),
        ("counterfact", [{**COUNTERFACT[0], "target_new": 3}], r"record\[0\]: 'target_new' must be .* got 3"),
        ("counterfact", [COUNTERFACT[0], {**COUNTERFACT[1], "rephrase_prompt": ""}], r"record\[1\]: 'rephrase_"),
        ("json", [{"prompt": "a?", "target_new": "b", "rephrased": "c?"}], r"unknown key\(s\) \['rephrased'\]"),
        ("json", [{"prompt": "a?", "target_new": None}], r"'target_new' must be a non-empty string, got None"),
    ],
)
def test_bad_records(tmp_path, fmt, records, message):
    path = write_json(tmp_path / "bad.json", records)
    with pytest.raises(ValueError, match=message) as info:
        loaded(path, format=fmt)
    assert str(path) in str(info.value) and "skip_invalid=True" in str(info.value)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="Unknown format 'mend'"):
        loaded(write_json(tmp_path / "z.json", ZSRE), format="mend")


def test_skip_invalid(tmp_path, caplog):
    records = [ZSRE[0], {**ZSRE[1], "alt": ""}, "not a record", ZSRE[1]]
    path = write_json(tmp_path / "z.json", records)
    with caplog.at_level(logging.WARNING, logger="dft_peft.evaluation.requests"):
        assert loaded(path, format="zsre", skip_invalid=True) == EXPECTED_ZSRE
    assert "skipped 2 invalid record(s): [1, 2]" in caplog.text
    with pytest.raises(ValueError, match="no valid records"):
        loaded(write_json(tmp_path / "none.json", [{"src": "a?", "alt": ""}]), skip_invalid=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": " ", "target_new": "x"}, "EditRequest.prompt must be a non-empty string"),
        ({"prompt": "q?", "target_new": ""}, "EditRequest.target_new must be a non-empty string"),
        ({"prompt": "q?", "target_new": 1}, "EditRequest.target_new must be a non-empty string, got 1"),
        ({"prompt": "q?", "target_new": "x", "target_old": ""}, "EditRequest.target_old must be None or a non-empty"),
        ({"prompt": "q?", "target_new": "x", "rephrase": "\t"}, "EditRequest.rephrase must be None or a non-empty"),
        ({"prompt": "q?", "target_new": "x", "locality_prompt": "l?"}, "must be given together"),
        ({"prompt": "q?", "target_new": "x", "locality_answer": "a"}, "must be given together"),
    ],
)
def test_edit_request_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EditRequest(**kwargs)


def test_edit_request_strips_whitespace():
    request = EditRequest(" Who? ", " Dickens", rephrase="Which author? \n")
    assert (request.prompt, request.target_new, request.rephrase) == ("Who?", "Dickens", "Which author?")


def test_demo_requests():
    requests = demo_requests()
    assert 5 <= len(requests) <= 8
    # Only the new facts: the edit generates the old answers from the model itself, as DFT begins.
    assert all(r.target_old is None for r in requests)
    assert all(None not in (r.rephrase, r.locality_prompt, r.locality_answer) for r in requests)
    assert all(r.rephrase != r.prompt for r in requests)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR} (set DFT_PEFT_DATA)")
def test_real_benchmark_files():
    zsre_path, counterfact_path = DATA_DIR / "zsre_mend-800.json", DATA_DIR / "counterfact-edit-10k.json"
    raw_zsre = json.loads(zsre_path.read_text(encoding="utf-8"))
    # Two MEND zsRE records have an empty `alt`: strict loading names the first, skip_invalid drops both.
    bad = [i for i, r in enumerate(raw_zsre) if not r["alt"].strip()]
    with pytest.raises(ValueError, match=rf"record\[{bad[0]}\]: 'alt' must be a non-empty string"):
        loaded(zsre_path)
    zsre = loaded(zsre_path, skip_invalid=True)
    assert len(zsre) == len(raw_zsre) - len(bad)
    assert all(None not in dataclasses.astuple(r) for r in zsre)
    first = raw_zsre[0]
    assert zsre[0] == EditRequest(first["src"], first["alt"], first["pred"], first["rephrase"], first["loc"],
                                  first["loc_ans"], first["subject"])

    counterfact = loaded(counterfact_path)
    raw = json.loads(counterfact_path.read_text(encoding="utf-8"))
    assert len(counterfact) == len(raw)
    assert all(None not in dataclasses.astuple(r) for r in counterfact)
    assert [r.prompt for r in counterfact[:3]] == [r["prompt"].strip() for r in raw[:3]]
    assert counterfact[0].target_old == raw[0]["ground_truth"] and counterfact[0].rephrase == raw[0]["rephrase_prompt"]
    assert loaded(counterfact_path, n=50, seed=0) == loaded(counterfact_path, format="counterfact",
                                                                          n=50, seed=0)


def test_as_requests_names_the_position_in_the_given_list():
    first = EditRequest(prompt="The sky is", target_new="green")
    assert as_requests([first, {"prompt": "Grass is", "target_new": "blue"}], "edit")[0] is first
    with pytest.raises(ValueError, match=r"record\[1\]"):
        as_requests([first, {"prompt": "Grass is"}], "edit")


def test_subject_must_occur_in_the_prompt():
    assert EditRequest("Tomas Ekdal speaks", "Basque", subject="Tomas Ekdal").subject == "Tomas Ekdal"
    with pytest.raises(ValueError, match="subject 'Greta Lind' does not occur in the prompt"):
        EditRequest("Tomas Ekdal speaks", "Basque", subject="Greta Lind")


@pytest.mark.parametrize(("content", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    (b"\xff\xfe\x00[", "not UTF-8 text"),
    (b'{"prompt": "a?", "target_new": "b"}\n' + b"[" * 100_000, r"line 2: invalid JSON Lines record"),
])
def test_unreadable_files_raise_value_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        loaded(path)
    assert str(path) in str(caught.value)


def test_edit_and_evaluate_take_a_dataset():
    requests = [EditRequest("The capital of Vardenia is", "Lisk", subject="Vardenia")]
    dataset = as_dataset(requests)
    assert as_requests(dataset, "edit") == requests == to_requests(dataset)
    assert to_requests(dataset.to_list()) == requests
