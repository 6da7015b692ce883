import json
import math

import pytest
import torch
from torch import nn

from lightning_compress.core.cost import (
    HOROWITZ_45NM,
    EnergyTable,
    LayerEnergy,
    energy_profile,
    resolve_energy_table,
)
from lightning_compress.demos.models import LeNet5, LeNet300100
from lightning_compress.report import compression_summary

FULL = {
    "fp32_mult": 3.7,
    "fp32_add": 0.9,
    "int8_mult": 0.2,
    "int8_add": 0.03,
    "sram_read": 5.0,
    "dram_read": 640.0,
}


def _linear_10_20() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20))


# ---------------------------------------------------------------- the formula, by hand


def test_single_linear_energy_by_hand_at_density_1_and_0_1():
    (layer,) = energy_profile(_linear_10_20(), torch.randn(1, 10))
    assert layer == LayerEnergy(
        name="0", kind="Linear", macs=200, weights=200, nonzero_weights=200, input_elems=10, output_elems=20
    )
    # 200 MACs x (3.7 + 0.9) + 200 MACs x 2 SRAM x 5 + 200 weights x 640 + (10 + 20) activations x 640
    dense = 200 * 4.6 + 200 * 2 * 5.0 + 200 * 640.0 + 30 * 640.0
    assert dense == pytest.approx(150120.0)
    assert layer.energy_pj(1.0) == pytest.approx(dense)
    assert layer.energy_pj() == pytest.approx(dense)  # the model as it is: dense
    # density 0.1: 20 effective MACs and 20 weights fetched; activations unchanged
    sparse = 20 * 4.6 + 20 * 2 * 5.0 + 20 * 640.0 + 30 * 640.0
    assert layer.energy_pj(0.1) == pytest.approx(sparse) == pytest.approx(32292.0)
    assert layer.fixed_pj() == pytest.approx(30 * 640.0)
    assert layer.per_weight_pj() == pytest.approx(640.0 + 1 * (4.6 + 2 * 5.0))


def test_density_none_reads_the_current_non_zeros():
    model = _linear_10_20()
    with torch.no_grad():
        model[0].weight.view(-1)[20:] = 0.0  # keep 20 of 200
    (layer,) = energy_profile(model, torch.randn(3, 10))
    assert (layer.nonzero_weights, layer.density) == (20, 0.1)
    assert layer.energy_pj() == pytest.approx(layer.energy_pj(0.1)) == pytest.approx(32292.0)


def test_bits_scale_memory_and_switch_arithmetic():
    (layer,) = energy_profile(_linear_10_20(), torch.randn(1, 10))
    # int8: 0.2 + 0.03 per MAC, every memory access a quarter of a 32-bit one
    int8 = 200 * 0.23 + 200 * 2 * 5.0 / 4 + 200 * 640.0 / 4 + 30 * 640.0 / 4
    assert layer.energy_pj(1.0, bits=8) == pytest.approx(int8) == pytest.approx(37346.0)
    assert layer.energy_pj(1.0, bits=4) == pytest.approx(200 * 0.23 + (2000 + 128000 + 19200) / 8)
    # 16 bits: fp32 arithmetic (> 8), half-size accesses
    assert layer.energy_pj(1.0, bits=16) == pytest.approx(200 * 4.6 + (2000 + 128000 + 19200) / 2)
    assert HOROWITZ_45NM.mac_pj(8) == pytest.approx(0.23)
    assert HOROWITZ_45NM.mac_pj(9) == pytest.approx(4.6)


def test_conv_layer_macs_and_activation_sizes_per_sample():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    one = energy_profile(model, torch.randn(1, 2, 5, 5))
    four = energy_profile(model, torch.randn(4, 2, 5, 5))
    assert one == four  # per sample
    conv, fc = one
    assert (conv.name, conv.kind, conv.macs, conv.weights) == ("0", "Conv2d", 27 * 2 * 9, 54)
    assert (conv.input_elems, conv.output_elems) == (2 * 5 * 5, 3 * 3 * 3)
    assert (fc.name, fc.macs, fc.input_elems, fc.output_elems) == ("3", 108, 27, 4)
    expected = 486 * 4.6 + 486 * 10.0 + 54 * 640.0 + (50 + 27) * 640.0
    assert conv.energy_pj(1.0) == pytest.approx(expected)
    assert conv.per_weight_pj() == pytest.approx(640.0 + 9 * 14.6)  # 9 output positions per weight


def test_layer_called_twice_sums_calls_and_unused_layers_are_left_out():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.fc(self.fc(x)))

    (layer,) = energy_profile(Twice(), torch.randn(2, 4))
    assert (layer.name, layer.macs, layer.input_elems, layer.output_elems) == ("fc", 32, 8, 8)


def test_attention_out_proj_is_left_out_and_only_linear_conv_rows():
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    names = [layer.name for layer in energy_profile(model, torch.randn(2, 3, 8))]
    assert names == ["linear1", "linear2"]  # out_proj runs inside self_attn's forward


def test_training_mode_restored_and_no_grad():
    model = LeNet300100()
    model.train()
    seen = []
    model.fc1.register_forward_hook(lambda m, a, o: seen.append(torch.is_grad_enabled()))
    profile = energy_profile(model, torch.zeros(2, 1, 28, 28))
    assert [layer.name for layer in profile] == ["fc1", "fc2", "fc3"]
    assert seen == [False]
    assert model.training
    assert all(module.training for module in model.modules())


def test_user_table_changes_the_numbers():
    (layer,) = energy_profile(_linear_10_20(), torch.randn(1, 10))
    doubled = EnergyTable.from_mapping({key: 2 * value for key, value in FULL.items()})
    assert layer.energy_pj(1.0, doubled) == pytest.approx(2 * layer.energy_pj(1.0))
    cheap_dram = EnergyTable(dram_read=0.0)
    assert layer.energy_pj(1.0, cheap_dram) == pytest.approx(200 * 4.6 + 200 * 10.0)


def test_resolve_energy_table():
    assert resolve_energy_table(None) is HOROWITZ_45NM
    assert resolve_energy_table(FULL) == HOROWITZ_45NM
    table = EnergyTable(dram_read=100.0)
    assert resolve_energy_table(table) is table
    assert resolve_energy_table({**FULL, "sram_read": 1}).sram_read == 1.0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (
            {k: v for k, v in FULL.items() if k != "dram_read"},
            r"`energy_table` is missing 'dram_read'; expected all of \['fp32_mult', .*'dram_read'\]",
        ),
        ({**FULL, "fp16_mult": 1.1}, r"`energy_table` has unknown entry 'fp16_mult'; expected exactly"),
        (
            {**FULL, "sram_read": -1.0},
            r"`energy_table\['sram_read'\]` must be a finite number >= 0 .*got -1.0",
        ),
        (
            {**FULL, "int8_add": "0.03"},
            r"`energy_table\['int8_add'\]` must be a finite number >= 0 .*got '0.03'",
        ),
        ({**FULL, "fp32_add": True}, r"`energy_table\['fp32_add'\]` must be a finite number >= 0 .*got True"),
        (
            {**FULL, "fp32_mult": math.nan},
            r"`energy_table\['fp32_mult'\]` must be a finite number >= 0 .*got nan",
        ),
        ([1.0, 2.0], r"`energy_table` must be None, an EnergyTable or a mapping .* got \[1.0, 2.0\]"),
    ],
)
def test_bad_energy_table_names_the_entry(table, match):
    with pytest.raises(ValueError, match=match):
        resolve_energy_table(table)


def test_energy_table_constructor_validates():
    with pytest.raises(ValueError, match=r"`EnergyTable.dram_read` must be a finite number >= 0 .*got -640"):
        EnergyTable(dram_read=-640)


@pytest.mark.parametrize("bits", [1, 33, 8.0, True])
def test_bad_bits(bits):
    (layer,) = energy_profile(_linear_10_20(), torch.randn(1, 10))
    with pytest.raises(ValueError, match=r"`bits` must be an int in \[2, 32\], got "):
        layer.energy_pj(1.0, bits=bits)
    with pytest.raises(ValueError, match=r"`bits` must be an int in \[2, 32\]"):
        layer.fixed_pj(bits=bits)


@pytest.mark.parametrize("density", [1.5, -0.1, math.nan, "half"])
def test_bad_density(density):
    (layer,) = energy_profile(_linear_10_20(), torch.randn(1, 10))
    with pytest.raises(ValueError, match=r"`density` must be None or a number in \[0, 1\], got "):
        layer.energy_pj(density)


class _Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        raise RuntimeError("forward ran")


def test_bad_table_fails_before_the_forward():
    with pytest.raises(ValueError, match=r"`energy_table` is missing 'fp32_add'"):
        energy_profile(_Exploding(), torch.randn(1, 2), {"fp32_mult": 1.0})
    with pytest.raises(ValueError, match=r"`energy_table` is missing 'fp32_add'"):
        compression_summary(_Exploding(), torch.randn(1, 2), energy_table={"fp32_mult": 1.0})
    with pytest.raises(RuntimeError, match="forward ran"):
        energy_profile(_Exploding(), torch.randn(1, 2))


def test_energy_profile_needs_an_example_input():
    with pytest.raises(ValueError, match=r"`example_input` must be a tensor, .* got None"):
        energy_profile(_linear_10_20(), None)


# ---------------------------------------------------------------- in the summary


def test_summary_energy_of_single_linear_matches_the_formula():
    model = _linear_10_20()
    with torch.no_grad():
        model[0].weight.view(-1)[20:] = 0.0
    summary = compression_summary(model, torch.randn(2, 10))
    (row,) = summary.layers
    assert row.energy_pj == pytest.approx(150120.0)
    assert row.compressed_energy_pj == pytest.approx(32292.0)
    totals = summary.totals()
    assert totals["energy_pj"] == pytest.approx(150120.0)
    assert totals["compressed_energy_pj"] == pytest.approx(32292.0)
    assert totals["energy_ratio"] == pytest.approx(150120.0 / 32292.0)


def test_pruning_half_of_lenet_300_100_reduces_compressed_energy():
    model = LeNet300100()
    x = torch.zeros(1, 1, 28, 28)
    before = compression_summary(model, x)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            flat = layer.weight.view(-1)
            flat[
                torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: flat.numel() // 2]
            ] = 0
    after = compression_summary(model, x)
    assert after.energy_pj == pytest.approx(before.energy_pj)  # dense energy does not move
    assert before.compressed_energy_pj == pytest.approx(before.energy_pj)
    assert after.compressed_energy_pj < 0.6 * before.compressed_energy_pj
    assert after.energy_ratio > 1.6
    expected = sum(layer.energy_pj(0.5) for layer in energy_profile(model, x))
    assert after.compressed_energy_pj == pytest.approx(expected, rel=1e-3)


def test_summary_user_table_and_none_rows():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    x = torch.randn(1, 4)
    default = compression_summary(model, x)
    table = {**FULL, "dram_read": 64.0}
    cheaper = compression_summary(model, x, energy_table=table)
    assert cheaper.energy_pj < default.energy_pj
    assert cheaper.layers[0].energy_pj == pytest.approx(16 * 4.6 + 16 * 10 + 16 * 64 + 8 * 64)
    assert cheaper.layers[1].energy_pj is None  # not a Linear / Conv
    assert cheaper.layers[1].compressed_energy_pj is None
    data = json.loads(json.dumps(cheaper.to_dict(), allow_nan=False))
    assert data["totals"]["energy_pj"] == pytest.approx(cheaper.layers[0].energy_pj)
    assert data["layers"][1]["energy_pj"] is None


def test_summary_without_example_input_has_no_energy():
    summary = compression_summary(nn.Sequential(nn.Linear(4, 4)))
    assert summary.layers[0].energy_pj is None
    totals = summary.to_dict()["totals"]
    assert (totals["energy_pj"], totals["compressed_energy_pj"], totals["energy_ratio"]) == (
        None,
        None,
        None,
    )


def test_summary_energy_column_and_caption():
    summary = compression_summary(LeNet5(), torch.zeros(1, 1, 28, 28))
    text = str(summary)
    assert max(len(line) for line in text.splitlines()) <= 100
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert "Energy" in header
    assert "Yang et al. 2017" in " ".join(text.split())
    wide = summary.to_rich_table(width=260)
    assert "Energy" in [column.header for column in wide.columns]


def test_infinite_energy_ratio_is_none_in_to_dict():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    nn.init.zeros_(model[0].weight)
    summary = compression_summary(model, torch.randn(1, 4), energy_table={**FULL, "dram_read": 0.0})
    assert summary.compressed_energy_pj == 0.0
    assert summary.energy_ratio == math.inf
    assert summary.to_dict()["totals"]["energy_ratio"] is None
    assert summary.to_dict()["energy_table"]["dram_read"] == 0.0
    assert "user energy table" in " ".join(str(summary).split())
