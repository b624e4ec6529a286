"""Elias-Fano coding of the sorted flat indices of a sparse delta.

A core at density p needs about H(p)/p bits per index (the entropy bound, log2 C(numel, count) in total), far below
the 32 or 64 bits of a raw index. Elias-Fano comes within a few percent of that bound with no entropy coder: each
index is split into `low_bits` low bits, stored verbatim, and a high part, stored in unary as one set bit per index.

Layout of `code` (one uint8 tensor, bit order LSB-first within each byte):

- low stream, `ceil(count * low_bits / 8)` bytes: bit `i * low_bits + b` is bit `b` of index `i`;
- high stream, `ceil((count + ((numel - 1) >> low_bits)) / 8)` bytes: bit `(index_i >> low_bits) + i` is set.

Padding bits are zero, and the decoder rejects codes whose padding is not.
`meta` is int64 `[FORMAT_VERSION, numel, count, low_bits]`.

`decode_indices` reads files downloaded from the Hub: it validates every field against the others and the code length
against what they imply before allocating anything, so what it allocates is bounded by a small multiple of the code
the file actually holds, whatever `meta` claims.
"""

from __future__ import annotations

import math

import torch

from .sparse import check_indices

FORMAT_VERSION = 1
META_FIELDS = ("format_version", "numel", "count", "low_bits")


def _max_low_bits(numel: int) -> int:
    """Beyond the bit width of the largest index, extra low bits only add size."""
    return max(numel - 1, 0).bit_length()


def _stream_bits(count: int, numel: int, low_bits: int) -> tuple[int, int]:
    """Bit lengths of the low and the high stream."""
    if count == 0:
        return 0, 0
    return count * low_bits, count + ((numel - 1) >> low_bits)


def _code_bytes(count: int, numel: int, low_bits: int) -> tuple[int, int]:
    low, high = _stream_bits(count, numel, low_bits)
    return (low + 7) // 8, (high + 7) // 8


def _best_low_bits(count: int, numel: int) -> int:
    """The `low_bits` giving the smallest code, the smallest such one on ties.

    Bit count `count * (l + 1) + ((numel - 1) >> l)` is minimal near log2(numel / count), but rounding each stream
    up to whole bytes can move the byte optimum further away (one index in 331776 elements: l=16 saves a byte over
    l=17..19), and there are at most 64 candidates, so try them all.
    """
    if count == 0:
        return 0
    return min(range(_max_low_bits(numel) + 1), key=lambda lb: (sum(_code_bytes(count, numel, lb)), lb))


def encoded_size_bytes(count: int, numel: int) -> int:
    """Length of the `code` that `encode_indices` produces for `count` indices in `[0, numel)`."""
    return sum(_code_bytes(count, numel, _best_low_bits(count, numel)))


def entropy_bound_bits(count: int, numel: int) -> float:
    """log2 C(numel, count): the fewest bits any lossless code needs for an arbitrary `count`-subset of `numel`."""
    if not 0 <= count <= numel:
        raise ValueError(f"entropy_bound_bits needs 0 <= count <= numel, got count={count}, numel={numel}")
    nats = math.lgamma(numel + 1) - math.lgamma(count + 1) - math.lgamma(numel - count + 1)
    return max(nats, 0.0) / math.log(2)


def _pack_low(low: torch.Tensor, low_bits: int, nbytes: int) -> torch.Tensor:
    """Bit-pack `low` (int64, each < 2**low_bits) into `nbytes` bytes.

    Eight indices fill exactly `low_bits` bytes, so the stream is built one (byte column, bit) pair at a time over
    groups of eight: 8 * low_bits vectorised steps and no count * low_bits temporary.
    """
    count = low.numel()
    groups = (count + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=low.device)
    padded[:count] = low
    padded = padded.view(groups, 8)
    out = torch.zeros(groups, low_bits, dtype=torch.uint8, device=low.device)
    for k in range(8 * low_bits):
        element, bit = divmod(k, low_bits)
        out[:, k // 8] |= (((padded[:, element] >> bit) & 1) << (k % 8)).to(torch.uint8)
    return out.view(-1)[:nbytes]


def _unpack_low(stream: torch.Tensor, count: int, low_bits: int) -> torch.Tensor:
    """Inverse of `_pack_low`: int64 low parts of `count` indices."""
    groups = (count + 7) // 8
    padded = torch.zeros(groups * low_bits, dtype=torch.uint8, device=stream.device)
    padded[: stream.numel()] = stream
    padded = padded.view(groups, low_bits)
    low = torch.zeros(groups, 8, dtype=torch.int64, device=stream.device)
    for k in range(8 * low_bits):
        element, bit = divmod(k, low_bits)
        low[:, element] |= ((padded[:, k // 8] >> (k % 8)) & 1).to(torch.int64) << bit
    return low.view(-1)[:count]


def encode_indices(indices: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode strictly increasing indices in `[0, numel)` as `(code, meta)`: a 1-D uint8 and a 1-D int64 tensor."""
    check_indices(indices, numel, "encode_indices")
    count = indices.numel()
    low_bits = _best_low_bits(count, numel)
    low_nbytes, high_nbytes = _code_bytes(count, numel, low_bits)
    device = indices.device
    meta = torch.tensor([FORMAT_VERSION, numel, count, low_bits], dtype=torch.int64)
    if count == 0:
        return torch.empty(0, dtype=torch.uint8, device=device), meta

    idx = indices.to(torch.int64)
    low = _pack_low(idx & ((1 << low_bits) - 1), low_bits, low_nbytes)
    positions = (idx >> low_bits) + torch.arange(count, dtype=torch.int64, device=device)
    # Positions are distinct, so adding the bit values of one byte is OR-ing them.
    high = torch.zeros(high_nbytes, dtype=torch.uint8, device=device).index_add_(
        0, positions >> 3, (1 << (positions & 7)).to(torch.uint8)
    )
    return torch.cat([low, high]), meta


def _read_meta(meta: torch.Tensor, numel: int, name: str) -> tuple[int, int]:
    """Validate `meta` against the module the edit is loaded into; return (count, low_bits)."""
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or meta.dim() != 1:
        got = f"{meta.dtype} of shape {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise ValueError(f"{name}: index metadata must be a 1-D int64 tensor, got {got}")
    if meta.numel() != len(META_FIELDS):
        raise ValueError(
            f"{name}: index metadata must have {len(META_FIELDS)} fields {META_FIELDS}, got {meta.numel()}"
        )
    version, edit_numel, count, low_bits = meta.tolist()
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{name}: index format version {version} is not supported (this dft-peft reads version {FORMAT_VERSION})"
        )
    if edit_numel != numel:
        raise ValueError(
            f"{name}: the edit was made for a different base model (module has {numel} elements, the edit expects "
            f"{edit_numel})"
        )
    if not 0 <= count <= numel:
        raise ValueError(f"{name}: index count {count} is outside [0, {numel}] for a module of {numel} elements")
    if not 0 <= low_bits <= _max_low_bits(numel):
        raise ValueError(f"{name}: low_bits {low_bits} is outside [0, {_max_low_bits(numel)}] for {numel} elements")
    return count, low_bits


def _popcount(stream: torch.Tensor) -> int:
    """Total set bits of a uint8 tensor (SWAR within each byte, so no wider copy of the stream)."""
    x = stream - ((stream >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return int(((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64))


def _check_padding(stream: torch.Tensor, nbits: int, what: str, name: str) -> None:
    """The bits after the last `nbits` of a stream are padding and must be zero."""
    used = nbits % 8
    if used and int(stream[-1]) >> used:
        raise ValueError(f"{name}: the {what} stream has set bits past its end (bit {nbits} onwards)")


def decode_indices(code: torch.Tensor, meta: torch.Tensor, numel: int, name: str) -> torch.Tensor:
    """Decode `(code, meta)` to a 1-D int64 tensor of strictly increasing indices in `[0, numel)`.

    `numel` is the size of the module the edit is loaded into and `name` its name, used in every error. Any
    malformed input raises ValueError.
    """
    count, low_bits = _read_meta(meta, numel, name)
    if not isinstance(code, torch.Tensor) or code.dtype != torch.uint8 or code.dim() != 1:
        got = f"{code.dtype} of shape {tuple(code.shape)}" if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"{name}: index code must be a 1-D uint8 tensor, got {got}")
    low_nbytes, high_nbytes = _code_bytes(count, numel, low_bits)
    if code.numel() != low_nbytes + high_nbytes:
        raise ValueError(
            f"{name}: index code has {code.numel()} bytes, but {count} indices with low_bits={low_bits} in "
            f"{numel} elements take exactly {low_nbytes + high_nbytes}"
        )
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=code.device)

    low_nbits, high_nbits = _stream_bits(count, numel, low_bits)
    low_stream, high_stream = code[:low_nbytes], code[low_nbytes:]
    if low_nbytes:
        _check_padding(low_stream, low_nbits, "low-bit", name)
    _check_padding(high_stream, high_nbits, "unary", name)
    set_bits = _popcount(high_stream)
    if set_bits != count:
        raise ValueError(f"{name}: the unary stream has {set_bits} set bits for {count} indices")

    # Set bits in stream order: nonzero bytes, then their set bits in ascending bit order.
    nonzero_bytes = high_stream.nonzero().squeeze(1)
    bit_values = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=code.device)
    byte_pos, bit_pos = ((high_stream[nonzero_bytes].unsqueeze(1) & bit_values) != 0).nonzero().unbind(1)
    positions = nonzero_bytes[byte_pos] * 8 + bit_pos
    high = positions - torch.arange(count, dtype=torch.int64, device=code.device)
    low = _unpack_low(low_stream, count, low_bits) if low_bits else 0
    indices = (high << low_bits) | low
    check_indices(indices, numel, name)
    return indices
