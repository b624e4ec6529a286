"""Edit requests: the facts to change, loaded from zsRE (MEND), CounterFact (EasyEdit) or our own JSON schema."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any, Literal, get_args

import datasets

from ..checks import check_value

logger = logging.getLogger(__name__)

Format = Literal["auto", "zsre", "counterfact", "json"]
FORMATS: tuple[str, ...] = get_args(Format)
REQUIRED_FIELDS = ("prompt", "target_new")


def _field_error(value: Any, required: bool) -> str | None:
    """Why `value` cannot fill a request field, or None if it can."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        return f"must be {'a' if required else 'None or a'} non-empty string, got {value!r}"
    return None


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, plus the probes the metrics evaluate it on.

    Surrounding whitespace is stripped from every field: the metrics and the edit loop join a prompt and its answer
    with exactly one space (as EasyEdit does), and the benchmark files contain answers like `" Dickens"` that would
    otherwise be scored after a doubled space.

    Args:
        prompt: The question or sentence prefix whose answer is edited (Reliability).
        target_new: The answer to learn.
        target_old: The answer the model gave before the edit, if known.
        rephrase: A paraphrase of `prompt` that should also get `target_new` (Generality).
        locality_prompt / locality_answer: An unrelated prompt and its answer whose prediction must not change
            (Locality). Given together or not at all.
        subject: The entity the fact is about, as it appears in `prompt` (locate-then-edit methods such as ROME
            need it; DFT does not).
    """

    prompt: str
    target_new: str
    target_old: str | None = None
    rephrase: str | None = None
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if why := _field_error(value, f.name in REQUIRED_FIELDS):
                raise ValueError(f"EditRequest.{f.name} {why}")
            if value is not None:
                object.__setattr__(self, f.name, value.strip())
        if (self.locality_prompt is None) != (self.locality_answer is None):
            raise ValueError("EditRequest.locality_prompt and .locality_answer must be given together")
        if self.subject is not None and self.subject not in self.prompt:
            raise ValueError(f"EditRequest.subject {self.subject!r} does not occur in the prompt {self.prompt!r}")


REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(EditRequest))
# Source key -> EditRequest field, per benchmark format. Keys not listed (case_id, ...) are ignored.
FIELD_MAPS: dict[str, dict[str, str]] = {
    "zsre": {
        "src": "prompt",
        "alt": "target_new",
        "pred": "target_old",
        "rephrase": "rephrase",
        "loc": "locality_prompt",
        "loc_ans": "locality_answer",
        "subject": "subject",
    },
    "counterfact": {
        "prompt": "prompt",
        "target_new": "target_new",
        "ground_truth": "target_old",
        "rephrase_prompt": "rephrase",
        "locality_prompt": "locality_prompt",
        "locality_ground_truth": "locality_answer",
        "subject": "subject",
    },
    "json": {name: name for name in REQUEST_FIELDS},
}


def detect_format(keys: Iterable[str]) -> Literal["zsre", "counterfact", "json"] | None:
    """The format whose keys a record has, or None. The request schema wins when every key belongs to it."""
    keys = set(keys)
    if set(REQUIRED_FIELDS) <= keys <= set(REQUEST_FIELDS):
        return "json"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys:
        return "counterfact"
    return None


def _to_request(record: Any, fmt: str, where: str) -> EditRequest:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    field_map = FIELD_MAPS[fmt]
    # Our own schema is strict: an unknown key is most likely a misspelt field whose value would be lost.
    if fmt == "json" and (unknown := sorted(set(record) - set(REQUEST_FIELDS))):
        raise ValueError(f"{where}: unknown key(s) {unknown}; the request schema has {list(REQUEST_FIELDS)}")
    for key, name in field_map.items():
        required = name in REQUIRED_FIELDS
        if required and key not in record:
            raise ValueError(f"{where}: required key {key!r} is missing ({fmt} format)")
        if why := _field_error(record.get(key), required):
            raise ValueError(f"{where}: {key!r} {why}")
    try:
        return EditRequest(**{name: record.get(key) for key, name in field_map.items()})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _convert(records: Sequence[Any], fmt: str, source: str | None, skip_invalid: bool = False) -> list[EditRequest]:
    """Validate and convert `records` of format `fmt`; errors name `source` (the file, if any) and the record."""
    requests, skipped = [], []
    for i, record in enumerate(records):
        try:
            requests.append(_to_request(record, fmt, f"{source}, record[{i}]" if source else f"record[{i}]"))
        except ValueError:
            if not skip_invalid:
                raise
            skipped.append(i)
    if skipped:
        logger.warning("%s: skipped %d invalid record(s): %s", source, len(skipped), skipped)
    return requests


def requests_from_dicts(records: Iterable[Mapping[str, Any]]) -> list[EditRequest]:
    """Build requests from in-memory dicts in the request schema (`prompt`, `target_new`, ... as in `EditRequest`)."""
    return _convert(list(records), "json", None)


def as_requests(requests: datasets.Dataset | Iterable[EditRequest | Mapping[str, Any]],
                caller: str) -> list[EditRequest]:
    """`EditRequest`s as given, dicts in the request schema (a `Dataset`'s rows) converted; none is an error."""
    requests = list(requests)
    if not requests:
        raise ValueError(f"{caller} needs at least one request")
    return [r if isinstance(r, EditRequest) else _to_request(r, "json", f"record[{i}]")
            for i, r in enumerate(requests)]


def _read_records(path: Path) -> list[Any]:
    """The records of a JSON-list or JSON Lines file.

    Read with the stdlib rather than `datasets.load_dataset("json", ...)`, which misbehaves on exactly this job:
    every call sends a download-count HEAD request to s3.amazonaws.com (`increase_load_count`, 3 s timeout, unless
    HF_HUB_OFFLINE is set); it treats the path as a glob, so a file named like `run[1].json` is not found (a bare
    StopIteration, as for an empty file); it gives every record every key of the file, so a missing key reads as
    null; Arrow rejects a field mixing types with a message naming no record; and it copies each file into its cache.
    Edit sets are at most a few thousand short records, so nothing is lost by parsing them in memory.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"{path}, line {number}: invalid JSON Lines record: {err}") from None
    return records


def load_requests(
    path: str | PathLike[str],
    format: Format = "auto",
    n: int | None = None,
    seed: int | None = None,
    *,
    skip_invalid: bool = False,
) -> datasets.Dataset:
    """Load edit requests from a JSON-list or JSONL file into a `datasets.Dataset` whose columns are the request
    schema (`EditRequest`'s fields, strings or None): what `edit` and `evaluate` take, and `to_requests` turns into
    `EditRequest`s.

    Args:
        path: The file.
        format: `"zsre"` (MEND zsRE: src, alt, pred, rephrase, loc, loc_ans), `"counterfact"` (EasyEdit:
            prompt, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth), `"json"`
            (the request schema, as written by `save_requests`) or `"auto"` to detect it from the keys.
        n: Keep only the first `n` requests, or `n` random ones if `seed` is given.
        seed: Sample `n` requests at random with this seed (with `n=None`: all of them, in seeded random order).
        skip_invalid: Drop records that fail validation (with a logged warning) instead of raising. The MEND zsRE
            file has two records with an empty `alt`. Sampling draws from the valid records only.

    Every record is validated before `n`/`seed` select from them, so the same file fails the same way whatever the
    sample. Errors are ValueErrors naming the file and the record index (from 0).
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; expected one of {FORMATS}")
    check_value("load_requests", "n", n, "positive_int", optional=True)
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: the file holds no records")
    if format == "auto":
        if not isinstance(records[0], Mapping):
            raise ValueError(f"{path}, record[0]: expected a JSON object, got {type(records[0]).__name__}")
        keys = sorted(records[0])
        if (detected := detect_format(keys)) is None:
            raise ValueError(
                f"{path}: cannot detect the format from the keys of record[0] {keys}; expected zsRE "
                f"({list(FIELD_MAPS['zsre'])}), CounterFact ({list(FIELD_MAPS['counterfact'])}) or the request "
                f"schema ({list(REQUEST_FIELDS)})"
            )
        format = detected
    try:
        requests = _convert(records, format, str(path), skip_invalid)
    except ValueError as err:
        raise ValueError(f"{err} (skip_invalid=True drops invalid records)") from None
    if not requests:
        raise ValueError(f"{path}: no valid records")
    if n is not None and n > len(requests):
        raise ValueError(f"{path}: asked for n={n} requests but it holds only {len(requests)} valid ones")
    if seed is not None:
        requests = random.Random(seed).sample(requests, len(requests) if n is None else n)
    elif n is not None:
        requests = requests[:n]
    return as_dataset(requests)


def as_dataset(requests: Iterable[EditRequest]) -> datasets.Dataset:
    """The requests as a `datasets.Dataset` with one string column per request field (None where absent)."""
    features = datasets.Features({name: datasets.Value("string") for name in REQUEST_FIELDS})
    return datasets.Dataset.from_list([dataclasses.asdict(r) for r in requests], features=features)


def to_requests(data: datasets.Dataset | Iterable[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
    """`EditRequest`s from a `Dataset` with the request columns, a list of requests or a list of dicts."""
    return as_requests(data, "to_requests")


def save_requests(requests: datasets.Dataset | Iterable[EditRequest], path: str | PathLike[str]) -> None:
    """Write requests as JSON Lines in the request schema (readable by `load_requests`, format "json" or "auto")."""
    with open(path, "w", encoding="utf-8") as f:
        for request in to_requests(requests):
            f.write(json.dumps(dataclasses.asdict(request), ensure_ascii=False) + "\n")


def demo_requests() -> list[EditRequest]:
    """The handful of counterfactual edits shipped with the package, for demos and smoke tests."""
    text = (resources.files("dft_peft") / "data" / "demo_facts.json").read_text(encoding="utf-8")
    return requests_from_dicts(json.loads(text))
