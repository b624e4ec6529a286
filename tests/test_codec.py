"""Elias-Fano index codec: lossless round trips, size against the entropy bound, and hostile edit files."""

import math
import re

import pytest
import torch

from dft_peft.format import sparse
from dft_peft.format.codec import decode_indices, encode_indices, encoded_size_bytes, entropy_bound_bits
from dft_peft.format.sparse import check_indices

NAME = "model.layers.3.mlp.down_proj"


def random_support(numel: int, count: int, seed: int = 0, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:count].sort().values.to(dtype)


def pack_bits(bits: list[int]) -> list[int]:
    return [sum(bit << k for k, bit in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8)]


def reference_code(indices: list[int], numel: int, low_bits: int) -> torch.Tensor:
    """The documented layout, written bit by bit and without validation, to craft well-formed hostile codes."""
    if not indices:
        return torch.empty(0, dtype=torch.uint8)
    low = [(idx >> b) & 1 for idx in indices for b in range(low_bits)]
    high = [0] * (len(indices) + ((numel - 1) >> low_bits))
    for i, idx in enumerate(indices):
        high[(idx >> low_bits) + i] = 1
    return torch.tensor(pack_bits(low) + pack_bits(high), dtype=torch.uint8)


def meta_for(numel: int, count: int, low_bits: int) -> torch.Tensor:
    return torch.tensor([1, numel, count, low_bits], dtype=torch.int64)


def reject(code: torch.Tensor, meta: torch.Tensor, numel: int, problem: str) -> None:
    """Decoding must raise ValueError naming the module and the problem."""
    with pytest.raises(ValueError, match=re.escape(NAME) + ".*" + problem):
        decode_indices(code, meta, numel, NAME)


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 13, 1000, 4099])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_round_trip_random(numel, density, dtype):
    indices = random_support(numel, round(density * numel), seed=numel, dtype=dtype)
    code, meta = encode_indices(indices, numel)
    assert code.dtype == torch.uint8 and code.dim() == 1 and code.numel() == encoded_size_bytes(indices.numel(), numel)
    assert meta.dtype == torch.int64 and meta.dim() == 1
    decoded = decode_indices(code, meta, numel, NAME)
    assert decoded.dtype == torch.int64
    torch.testing.assert_close(decoded, indices.long(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("indices", "numel"),
    [
        ([0], 9),
        ([8], 9),
        ([0, 8], 9),
        ([0, 1, 2, 3, 4, 5, 6], 7),
        ([5], 1 << 40),
        ([0, 12345, (1 << 40) - 1], 1 << 40),
        ([*range(0, 2000, 3), 2998, 2999], 3000),
    ],
)
def test_round_trip_edges(indices, numel):
    indices = torch.tensor(indices, dtype=torch.int64)
    code, meta = encode_indices(indices, numel)
    torch.testing.assert_close(decode_indices(code, meta, numel, NAME), indices, rtol=0, atol=0)


def test_empty_support_is_tiny():
    code, meta = encode_indices(torch.empty(0, dtype=torch.int32), 576 * 576)
    assert code.numel() == 0 and meta.numel() <= 4
    assert decode_indices(code, meta, 576 * 576, NAME).numel() == 0


@pytest.mark.parametrize(("indices", "numel"), [([3, 40, 41, 99], 100), ([0, 1, 2, 3, 4, 5, 6, 7, 8], 10)])
def test_code_follows_documented_layout(indices, numel):
    code, meta = encode_indices(torch.tensor(indices), numel)
    assert meta.tolist()[:3] == [1, numel, len(indices)]
    torch.testing.assert_close(code, reference_code(indices, numel, int(meta[3])), rtol=0, atol=0)


def test_encode_rejects_invalid_indices():
    with pytest.raises(ValueError, match="duplicated"):
        encode_indices(torch.tensor([1, 1]), 10)
    with pytest.raises(ValueError, match="outside"):
        encode_indices(torch.tensor([1, 10]), 10)


# --- size ----------------------------------------------------------------------------------------------------------


def test_low_bits_choice_is_optimal():
    """Byte rounding makes size non-convex in low_bits: the encoder must still find the smallest code."""
    for numel in (9, 100, 1000, 576 * 576, 1536 * 576, 1 << 40):
        for count in {1, 2, 7, numel // 1000, numel // 100, numel // 20, numel // 10, numel // 3, numel} - {0}:
            sizes = [
                math.ceil(count * lb / 8) + math.ceil((count + ((numel - 1) >> lb)) / 8)
                for lb in range((numel - 1).bit_length() + 1)
            ]
            assert encoded_size_bytes(count, numel) == min(sizes), (count, numel)


def test_entropy_bound_matches_binomial():
    for count, numel in [(0, 10), (1, 10), (3, 10), (10, 10), (37, 1000), (500, 1000)]:
        assert entropy_bound_bits(count, numel) == pytest.approx(math.log2(math.comb(numel, count)), abs=1e-9)


@pytest.mark.parametrize("density", [0.1, 0.05, 0.01, 0.001])
def test_size_within_1_2x_of_entropy_bound(density):
    numel = 1536 * 576
    indices = random_support(numel, round(density * numel), seed=1)
    code, _ = encode_indices(indices, numel)
    ratio = code.numel() * 8 / entropy_bound_bits(indices.numel(), numel)
    # Every support of this size gets a code of this length, so it cannot beat the bound.
    assert 1.0 <= ratio <= 1.2


# --- hostile files ---------------------------------------------------------------------------------------------


@pytest.fixture
def edit():
    """A valid (code, meta, numel) whose streams both end in padding bits."""
    numel = 1000
    indices = random_support(numel, 37, seed=2)
    code, meta = encode_indices(indices, numel)
    count, low_bits = int(meta[2]), int(meta[3])
    assert (count * low_bits) % 8 and (count + ((numel - 1) >> low_bits)) % 8
    return code, meta, numel


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda m: m.int(), "1-D int64"),
        (lambda m: m.view(1, -1), "1-D int64"),
        (lambda m: torch.cat([m, m[:1]]), "4 fields"),
        (lambda m: m[:3], "4 fields"),
        (lambda m: m.index_fill(0, torch.tensor([0]), 2), "format version 2"),
        (lambda m: m.index_fill(0, torch.tensor([2]), -1), "count -1"),
        (lambda m: m.index_fill(0, torch.tensor([2]), 1001), "count 1001"),
        (lambda m: m.index_fill(0, torch.tensor([3]), -1), "low_bits -1"),
        (lambda m: m.index_fill(0, torch.tensor([3]), 11), "low_bits 11"),
    ],
)
def test_rejects_bad_meta(edit, mutate, problem):
    code, meta, numel = edit
    reject(code, mutate(meta), numel, problem)


def test_rejects_edit_for_other_base_model(edit):
    code, meta, _ = edit
    reject(code, meta, 1200, re.escape("different base model (module has 1200 elements, the edit expects 1000)"))


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda c: c.to(torch.int8), "1-D uint8"),
        (lambda c: c.view(1, -1), "1-D uint8"),
        (lambda c: c[:-1], "take exactly"),
        (lambda c: torch.cat([c, c[:1]]), "take exactly"),
        (lambda c: torch.empty(0, dtype=torch.uint8), "take exactly"),
    ],
)
def test_rejects_bad_code(edit, mutate, problem):
    code, meta, numel = edit
    reject(mutate(code), meta, numel, problem)


def test_rejects_huge_count_before_allocating():
    numel = 1 << 62
    reject(torch.zeros(16, dtype=torch.uint8), meta_for(numel, 1 << 60, 2), numel, "take exactly")


def high_stream_bits(code: torch.Tensor, meta: torch.Tensor) -> tuple[int, int]:
    """(first byte of the unary stream, its length in bits)."""
    numel, count, low_bits = meta.tolist()[1:]
    return math.ceil(count * low_bits / 8), count + ((numel - 1) >> low_bits)


def flip(code: torch.Tensor, bit: int) -> torch.Tensor:
    code = code.clone()
    code[bit // 8] ^= 1 << (bit % 8)
    return code


def test_rejects_extra_or_missing_unary_bits(edit):
    code, meta, numel = edit
    start, nbits = high_stream_bits(code, meta)
    bits = [(int(code[start + k // 8]) >> (k % 8)) & 1 for k in range(nbits)]
    reject(flip(code, start * 8 + bits.index(0)), meta, numel, "38 set bits for 37 indices")
    reject(flip(code, start * 8 + bits.index(1)), meta, numel, "36 set bits for 37 indices")


def test_rejects_set_bits_past_stream_end(edit):
    code, meta, numel = edit
    start, nbits = high_stream_bits(code, meta)
    last_set = max(k for k in range(nbits) if (int(code[start + k // 8]) >> (k % 8)) & 1)
    moved = flip(flip(code, start * 8 + last_set), start * 8 + nbits)  # same number of set bits
    reject(moved, meta, numel, "unary stream has set bits past its end")
    reject(flip(code, int(meta[2]) * int(meta[3])), meta, numel, "low-bit stream has set bits past its end")


@pytest.mark.parametrize(
    ("indices", "numel", "low_bits", "problem"),
    [
        ([5, 5], 64, 3, "duplicated at position 1"),
        ([6, 5], 64, 3, "unsorted at position 1"),
        ([1, 7, 6], 64, 3, "unsorted at position 2"),
        ([127], 100, 5, "index 127 is outside the module's 100 elements"),
    ],
)
def test_rejects_invalid_decoded_indices(indices, numel, low_bits, problem):
    """Well-formed streams whose indices are duplicated, unsorted or out of range."""
    reject(reference_code(indices, numel, low_bits), meta_for(numel, len(indices), low_bits), numel, problem)


@pytest.mark.parametrize(("position", "value", "problem"), [
    (4, 6, "duplicated at position 4"),  # indices 0, 2, 4, …: the last pair of the first block
    (5, 3, "unsorted at position 5"),  # the first pair of the second block
    (11, 20, "duplicated at position 11"),
])
def test_check_indices_across_blocks(monkeypatch, position, value, problem):
    """Indices are checked a block at a time: a bad pair is found, at its position, wherever the blocks split."""
    monkeypatch.setattr(sparse, "CHECK_BLOCK", 4)
    indices = torch.arange(0, 40, 2, dtype=torch.int32)
    indices[position] = value
    with pytest.raises(ValueError, match=problem):
        check_indices(indices, 64, "m")
    values = torch.ones(20)
    values[13] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        sparse.SparseDelta(torch.arange(20, dtype=torch.int32), values, (20,)).validate()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_check_indices_narrow_dtypes_do_not_wrap(dtype):
    """5 then 3 is unsorted in every index dtype (a subtraction would wrap to 254 in uint8)."""
    with pytest.raises(ValueError, match="unsorted at position 1"):
        check_indices(torch.tensor([5, 3], dtype=dtype), 64, "m")


def test_corrupted_codes_decode_validly_or_raise_value_error():
    """Random corruption of code or meta never escapes as another exception or an invalid support."""
    numel = 300
    code, meta = encode_indices(random_support(numel, 40, seed=3), numel)
    gen = torch.Generator().manual_seed(4)
    for trial in range(300):
        bad_code, bad_meta = code.clone(), meta.clone()
        if trial % 3:
            positions = torch.randint(0, code.numel() * 8, (1 + trial % 4,), generator=gen).tolist()
            for bit in positions:
                bad_code = flip(bad_code, bit)
        else:
            bad_meta[2 + trial % 2] += int(torch.randint(-3, 4, (1,), generator=gen))
        try:
            decoded = decode_indices(bad_code, bad_meta, numel, NAME)
        except ValueError as err:
            assert NAME in str(err)
            continue
        assert decoded.numel() == int(bad_meta[2])
        check_indices(decoded, numel, NAME)
