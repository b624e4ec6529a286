"""Reading safetensors checkpoints tensor by tensor, and flat ranges of them, for `build_edit`: headers checked
against the files before anything is read, plain reads into reused buffers (no memory map). Also the two guards every
reader of a downloaded file goes through: `open_regular` (never a FIFO or device, which could block or never end)
and `read_json_object` (a ValueError naming the file for anything but a JSON object)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

HEADER_LIMIT = 100 << 20  # safetensors' own bound on the JSON header
PREFETCH_MIN = 1 << 16  # bytes a streamed read must have for the next as many to be requested ahead
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in a safetensors file: its dtype name, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def is_regular_file(path: str | os.PathLike[str]) -> bool:
    """True for a regular file, False when nothing is there; ValueError naming `path` for anything else.

    Checked with `os.stat` before a path is handed to a reader that opens it itself (safetensors, PEFT): opening a FIFO
    blocks until a writer comes, and a device or directory never reads as a file.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, device or directory): refusing to read it")
    return True


def open_regular(path: str | os.PathLike[str], buffering: int = -1) -> BinaryIO:
    """Open `path` for binary reading, refusing (ValueError naming it) anything but a regular file.

    Opened non-blocking and checked with `fstat` on the open descriptor, so a FIFO neither blocks the open nor can be
    swapped in after the check; the flag has no effect on reads of a regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file (a FIFO, device or directory): refusing to read it")
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file when it is not a regular file of UTF-8 JSON holding an
    object (deep nesting included)."""
    with open_regular(path) as f:
        data = f.read(HEADER_LIMIT + 1)
    if len(data) > HEADER_LIMIT:
        raise ValueError(f"{path}: over {HEADER_LIMIT} bytes, too large for a JSON configuration")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, absurd numbers or nesting
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _read_header(file: str) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, their byte ranges checked against the file (a corrupt or hostile header
    gives a ValueError naming the file, never a read outside it)."""
    with open_regular(file) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(HEADER_LIMIT, size - 8):
            raise ValueError(f"{file}: not a safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, absurd numbers or nesting
            raise ValueError(f"{file}: not a safetensors file (header: {err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (the header is not a JSON object)")
    data, data_size = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(type(n) is int and n >= 0 for n in (*shape, begin, end))
                  and begin <= end <= data_size)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{file}: the header entry of {name!r} is malformed or points outside the file")
        tensors[name] = StoredTensor(file, dtype, tuple(shape), data + begin, data + end)
    return tensors


class CheckpointReader:
    """Tensor access to a safetensors checkpoint: one file, a directory with `model.safetensors`, or a sharded
    directory with `model.safetensors.index.json`. Only the tensors (or the flat ranges of them) asked for are read.

    Reads are plain `read`s into tensors, not a memory map: mapped pages would count in the process's memory until
    unmapped, and faulting them in costs more than the kernel's copy.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, str] = {}
        self.stored: dict[str, StoredTensor] = {}
        self.rooms = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]  # for `stream` reads
        self.turn = 0
        if not os.path.isdir(path) and is_regular_file(path):
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path}: checkpoints are read from safetensors files only")
            self._add_file(path)
        elif is_regular_file(index := os.path.join(path, "model.safetensors.index.json")):
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index}: weight_map must be a JSON object of tensor name → shard file name")
            root = os.path.abspath(path)
            for name, file in weight_map.items():
                full = os.path.abspath(os.path.join(root, file))
                if os.path.commonpath([root, full]) != root:
                    raise ValueError(f"{index}: {name!r} is mapped to {file!r}, outside the checkpoint directory")
                self.files[name] = full
        elif is_regular_file(single := os.path.join(path, "model.safetensors")):
            self._add_file(single)
        else:
            raise ValueError(f"{path}: no safetensors checkpoint (model.safetensors or model.safetensors.index.json)")

    def _add_file(self, file: str) -> None:
        for name, stored in _read_header(file).items():
            self.files[name], self.stored[name] = file, stored

    def tensor(self, name: str) -> StoredTensor:
        """Where `name` lies, its dtype a float one and its byte range matching its shape."""
        if name not in self.stored:
            if name not in self.files:
                raise ValueError(f"{self.path}: the checkpoint has no tensor {name!r}")
            self._add_file(self.files[name])
            if name not in self.stored:
                raise ValueError(f"{self.files[name]}: the index names {name!r} but the file does not hold it")
        stored = self.stored[name]
        if stored.dtype not in DTYPES:
            raise ValueError(f"{stored.file}: {name!r} has dtype {stored.dtype}, not a float weight that DFT reads "
                             f"({', '.join(DTYPES)})")
        if stored.end - stored.begin != math.prod(stored.shape) * DTYPES[stored.dtype].itemsize:
            raise ValueError(f"{stored.file}: {name!r}'s byte range does not match its shape {stored.shape}")
        return stored

    def read(self, name: str, start: int, length: int, stream: bool = False) -> torch.Tensor:
        """Flat elements [start, start + length) of a tensor, as a fresh tensor; or, with `stream` (reading a file
        front to back), in one of the reader's two rooms, used in turn — valid until the second streamed read after
        it (selection reads a chunk ahead), no fresh pages per chunk — with as many following bytes requested from
        the disk meanwhile (the page cache's readahead restarts with every open and is too short to hide a cold disk
        behind the selection's work)."""
        stored = self.tensor(name)
        dtype = DTYPES[stored.dtype]
        if not 0 <= start <= start + length <= math.prod(stored.shape):
            raise ValueError(f"{self.path}: elements [{start}, {start + length}) are outside {name!r}")
        nbytes = length * dtype.itemsize
        if not stream:
            target = torch.empty(nbytes, dtype=torch.uint8)
        else:
            self.turn ^= 1
            if self.rooms[self.turn].numel() < nbytes:
                self.rooms[self.turn] = torch.empty(nbytes, dtype=torch.uint8)
            target = self.rooms[self.turn][:nbytes]
        offset, view, done = stored.begin + start * dtype.itemsize, memoryview(target.numpy()), 0
        with open_regular(stored.file, buffering=0) as f:  # unbuffered: the kernel copies straight into `target`
            f.seek(offset)
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{stored.file}: the file ends inside {name!r} (truncated?)")
                done += got
            if stream and nbytes >= PREFETCH_MIN and hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):  # a hint: some filesystems refuse it
                    os.posix_fadvise(f.fileno(), offset + nbytes, nbytes, os.POSIX_FADV_WILLNEED)
        return target.view(dtype)

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor, or only its `rows` (a slice of the first dimension with step 1), as a fresh tensor."""
        shape = self.tensor(name).shape
        row = math.prod(shape[1:])
        first, last, step = (rows or slice(None)).indices(shape[0] if shape else 1)
        if step != 1:
            raise ValueError(f"reading rows {rows} of {name!r}: only contiguous rows (step 1) are read")
        last = max(first, last)
        tensor = self.read(name, first * row, (last - first) * row)
        return tensor.view(last - first, *shape[1:]) if shape else tensor.view(())
