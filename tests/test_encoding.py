import json
import math

import pytest
import torch
from torch import nn

from lightning_compress.functional.encoding import (
    ENCODINGS,
    best_encoding,
    bitmask_bits,
    csr_bits,
    dense_bits,
    encoding_sizes,
    relative_index_bits,
    relative_index_fillers,
)
from lightning_compress.report import compression_summary


def _reference_relative(weight: torch.Tensor, index_bits: int) -> tuple[int, int]:
    """Plain-Python Deep Compression relative indexing: returns (stored entries, fillers).

    Walks the flattened tensor; each stored entry keeps the number of zeros skipped since the
    previous stored entry, at most 2**index_bits - 1, so a longer run gets a filler zero.
    """
    limit = 2**index_bits - 1
    stored = fillers = 0
    skipped = 0
    for value in weight.reshape(-1).tolist():
        if value != 0:
            stored += 1
            skipped = 0
        elif skipped == limit:
            stored += 1  # a filler zero takes the place of this zero
            fillers += 1
            skipped = 0
        else:
            skipped += 1
    # trailing zeros are not stored; a filler placed inside them would be useless
    return stored, fillers


def _reference_relative_no_trailing(weight: torch.Tensor, index_bits: int) -> int:
    flat = weight.reshape(-1).tolist()
    last = max((i for i, v in enumerate(flat) if v != 0), default=-1)
    stored, fillers = _reference_relative(torch.tensor(flat[: last + 1]), index_bits)
    assert stored == sum(v != 0 for v in flat) + fillers
    return fillers


def test_figure_2_of_deep_compression():
    # Fig. 2: non-zeros at 1, 4 and 15 of 16 entries, 3-bit differences: one filler zero.
    weight = torch.zeros(16)
    weight[[1, 4, 15]] = torch.tensor([3.4, 0.9, 1.7])
    assert relative_index_fillers(weight, 3) == 1
    assert relative_index_bits(weight, 3) == (3 + 1) * (32 + 3)


@pytest.mark.parametrize("index_bits", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_vectorized_fillers_match_the_reference_loop_on_random_masks(index_bits, density, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(17, 23, generator=generator)
    weight[torch.rand(17, 23, generator=generator) >= density] = 0.0
    fillers = _reference_relative_no_trailing(weight, index_bits)
    assert relative_index_fillers(weight, index_bits) == fillers
    nnz = int((weight != 0).sum())
    assert relative_index_bits(weight, index_bits, value_bits=8) == (nnz + fillers) * (8 + index_bits)


@pytest.mark.parametrize(
    ("positions", "size", "index_bits", "fillers"),
    [
        ([], 100, 4, 0),  # all zero: nothing stored
        (list(range(50)), 50, 4, 0),  # all dense: no gaps
        ([99], 100, 4, 6),  # first entry far from 0: 99 zeros skipped, 99 // 16 = 6 fillers
        ([15], 40, 4, 0),  # 15 zeros skipped: the limit, no filler
        ([16], 40, 4, 1),  # 16 zeros skipped: one over the limit
        ([0, 16], 40, 4, 0),  # gap of 15 zeros between entries: at the limit
        ([0, 17], 40, 4, 1),  # 16 zeros between entries
        ([0, 33], 40, 4, 2),  # 32 zeros between entries: fillers at 16 and 32
        ([0, 5], 100, 2, 1),  # trailing zeros after the last non-zero cost nothing
        ([3], 4, 1, 1),  # 1-bit indices: at most 1 zero per entry
    ],
)
def test_relative_index_edge_cases(positions, size, index_bits, fillers):
    weight = torch.zeros(size)
    weight[positions] = 1.0
    expected = _reference_relative_no_trailing(weight, index_bits)
    assert relative_index_fillers(weight, index_bits) == expected == fillers
    assert relative_index_bits(weight, index_bits) == (len(positions) + fillers) * (32 + index_bits)


def test_reference_loop_with_trailing_zeros_matches():
    weight = torch.zeros(64)
    weight[[2, 40]] = 1.0
    assert _reference_relative(weight[:41], 3) == (2 + 4, 4)  # 2 // 8 = 0, 37 // 8 = 4
    assert relative_index_fillers(weight, 3) == 4


def test_dense_bitmask_csr_by_hand_on_a_conv_weight():
    weight = torch.zeros(8, 3, 3, 3)  # 8 filters = 8 CSR rows of 27 columns
    weight[0, 0, 0, 0] = 1.0
    weight[5, 2, 1, 1] = -2.0
    weight[7, 2, 2, 2] = 3.0
    n, nnz = 216, 3
    assert dense_bits(weight) == n * 32
    assert dense_bits(weight, value_bits=8) == n * 8
    assert bitmask_bits(weight) == n + nnz * 32
    assert csr_bits(weight) == nnz * (32 + 32) + (8 + 1) * 32
    assert csr_bits(weight, value_bits=4) == nnz * 36 + 9 * 32
    # positions 0, 5*27 + 2*9 + 4 = 157, 215: runs 0, 156, 57 -> 156 // 16 + 57 // 16 = 9 + 3
    assert relative_index_fillers(weight, 4) == 12
    assert relative_index_bits(weight, 4) == (3 + 12) * 36
    assert encoding_sizes(weight, 4) == {
        "dense": 6912,
        "bitmask": 312,
        "csr": 480,
        "relative": 540,
    }
    assert best_encoding(weight, 4) == ("bitmask", 312)
    assert list(encoding_sizes(weight, 4)) == list(ENCODINGS)


def test_best_encoding_picks_each_format():
    dense = torch.randn(10, 10)
    assert best_encoding(dense, 5) == ("dense", 3200)
    very_sparse = torch.zeros(1, 10000)
    very_sparse[0, [3, 17, 40]] = 1.0
    name, bits = best_encoding(very_sparse, 5)
    assert (name, bits) == ("relative", 3 * 37)  # runs 3, 13, 22 zeros: all under 32, no filler
    rows = torch.zeros(4, 10000)
    rows[:, 9999] = 1.0  # far apart: relative needs 312 fillers per row gap
    assert best_encoding(rows, 5) == ("csr", 4 * 64 + 5 * 32)
    assert best_encoding(torch.zeros(3, 3), 4) == ("relative", 0)  # nothing to store


def test_best_encoding_ties_go_to_the_simpler_format():
    half = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    # dense 8 x 2 = 16, bitmask 8 + 4 x 2 = 16
    assert best_encoding(half, 32, value_bits=2) == ("dense", 16)
    one = torch.zeros(1, 96)
    one[0, 95] = 1.0
    # bitmask 96 + 32 = 128, CSR 1 x 64 + 2 x 32 = 128, relative (1 + 47) x 33
    assert encoding_sizes(one, 1)["relative"] > 128
    assert best_encoding(one, 1) == ("bitmask", 128)
    far = torch.zeros(1, 12300)
    far[0, 12288] = 1.0
    # CSR 1 x 48 + 2 x 32 = 112; relative (1 + 12288 // 4096) x (16 + 12) = 112
    assert encoding_sizes(far, 12, value_bits=16)["csr"] == 112
    assert encoding_sizes(far, 12, value_bits=16)["relative"] == 112
    assert best_encoding(far, 12, value_bits=16) == ("csr", 112)


def test_scalar_and_empty_tensors():
    assert encoding_sizes(torch.tensor(2.0), 5) == {
        "dense": 32,
        "bitmask": 33,
        "csr": 64 + 64,
        "relative": 37,
    }
    assert encoding_sizes(torch.zeros(0, 4), 5) == {"dense": 0, "bitmask": 0, "csr": 32, "relative": 0}


def test_exact_integers_on_a_large_tensor():
    weight = torch.zeros(3000, 3000)
    weight[::7, ::11] = 1.0
    sizes = encoding_sizes(weight, 5)
    assert all(isinstance(value, int) for value in sizes.values())
    nnz = math.ceil(3000 / 7) * math.ceil(3000 / 11)
    assert sizes["bitmask"] == 9_000_000 + nnz * 32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value_bits": 0}, r"`value_bits` must be an int in \[1, 64\], got 0\."),
        ({"value_bits": 65}, r"`value_bits` must be an int in \[1, 64\], got 65\."),
        ({"value_bits": 8.0}, r"`value_bits` must be an int in \[1, 64\], got 8.0\."),
        ({"index_bits": 0}, r"`index_bits` must be an int in \[1, 32\], got 0\."),
        ({"index_bits": 33}, r"`index_bits` must be an int in \[1, 32\], got 33\."),
        ({"index_bits": True}, r"`index_bits` must be an int in \[1, 32\], got True\."),
    ],
)
def test_bad_bits_are_named(kwargs, match):
    args = {"index_bits": 4, "value_bits": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        best_encoding(torch.ones(3), **args)


def test_weight_must_be_a_tensor():
    with pytest.raises(TypeError, match=r"`weight` must be a torch.Tensor, got list\."):
        dense_bits([1.0, 2.0])
    with pytest.raises(TypeError, match=r"`weight` must be a torch.Tensor, got list\."):
        relative_index_bits([1.0], 4)


# ---------------------------------------------------------------- in the compression summary


def test_summary_encoding_per_row_conv_4_bit_linear_5_bit_bias_dense():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 64), nn.LayerNorm(64))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0, 0, 0] = 1.0  # conv: 18 entries, 1 non-zero
        model[2].weight.zero_()
        model[2].weight[:, 0] = 1.0  # linear 64 x 32: one non-zero per row, 31 zeros between
    summary = compression_summary(model, torch.randn(1, 1, 6, 6))
    conv, linear, norm = summary.layers
    # conv weight: dense 576, bitmask 18 + 32, CSR 64 + 3 x 32, relative (4-bit) 1 x 36 -> relative; bias 2 x 32
    assert encoding_sizes(model[0].weight, 4)["relative"] == 36
    assert (conv.encoding, conv.encoded_bytes) == ("relative", math.ceil((36 + 64) / 8))
    # linear: relative 5-bit: runs of 31 zeros fit (31 < 32): 64 x 37; bitmask 2048 + 64 x 32 = 4096
    assert best_encoding(model[2].weight, 5) == ("relative", 64 * 37)
    assert best_encoding(model[2].weight, 4)[0] == "bitmask"  # with 4-bit indices it would not win
    assert (linear.encoding, linear.encoded_bytes) == ("relative", (64 * 37 + 64 * 32) // 8)
    assert (norm.encoding, norm.encoded_bytes) == ("dense", 128 * 4)  # LayerNorm weight dense, bias dense
    assert summary.encoded_bytes == conv.encoded_bytes + linear.encoded_bytes + norm.encoded_bytes
    assert summary.sparse_bytes == sum(layer.sparse_bytes for layer in summary.layers)  # unchanged meaning
    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    assert data["totals"]["encoded_bytes"] == summary.encoded_bytes
    assert [row["encoding"] for row in data["layers"]] == ["relative", "relative", "dense"]
    text = str(summary)
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert "Enc." in header
    assert "relative" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_summary_row_with_several_weight_tensors_reports_mixed():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(4, 4))
            self.b = nn.Parameter(torch.zeros(4, 4))

        def forward(self, x):
            return x @ self.a + x @ self.b

    (row,) = compression_summary(Two(), torch.randn(1, 4)).layers
    # a dense: 512 bits; b all zero: relative 0 bits
    assert (row.encoding, row.encoded_bytes) == ("mixed", 64)
    assert row.energy_pj is None
