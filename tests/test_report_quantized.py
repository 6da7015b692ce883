"""``compression_summary`` reports quantized bytes per layer: weight bits x params, scales, biases."""

import json
import math

import torch
from torch import nn

from lightning_compress.core.cost import low_bit_codebook, model_costs
from lightning_compress.demos import LeNet5
from lightning_compress.functional.lowbit import binarize, ternarize_twn
from lightning_compress.quantization.fake_quant import calibrate, quantize_model
from lightning_compress.report import compression_summary


def _header(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("┃"))


def _flat(text: str) -> str:
    return " ".join(text.split())


def _quantized_lenet(**kwargs) -> LeNet5:
    torch.manual_seed(0)
    model = LeNet5()
    quantize_model(model, **kwargs)
    calibrate(model, [torch.rand(8, 1, 28, 28)])
    return model


def test_fake_quantized_lenet_4_bit_per_channel():
    model = _quantized_lenet(weight_bits=4)
    summary = compression_summary(model, torch.rand(2, 1, 28, 28))
    rows = {layer.name: layer for layer in summary.layers}
    assert {name for name, row in rows.items() if row.weight_bits is not None} == {
        "conv1",
        "conv2",
        "fc1",
        "fc2",
        "fc3",
    }
    assert all(row.weight_bits == 4 for row in rows.values())
    # conv1: 6 x 1 x 5 x 5 weights at 4 bits, 6 fp32 scales, 6 fp32 biases, input scale + zero point.
    assert rows["conv1"].quantized_bytes == 150 * 4 // 8 + 6 * 4 + 6 * 4 + 8 == 131
    # fc1: 120 x 400 weights at 4 bits, 120 scales, 120 biases, input qparams.
    assert rows["fc1"].quantized_bytes == 48_000 // 2 + 120 * 4 + 120 * 4 + 8
    expected = {
        name: math.ceil(model.get_submodule(name).weight.numel() * 4 / 8)
        + model.get_submodule(name).weight.shape[0] * 4
        + model.get_submodule(name).bias.numel() * 4
        + 8
        for name in rows
    }
    assert {name: row.quantized_bytes for name, row in rows.items()} == expected
    assert summary.quantized_bytes == sum(expected.values())
    assert summary.quantized_bytes < summary.dense_bytes / 7

    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    assert data["totals"]["quantized_bytes"] == summary.quantized_bytes
    layer = next(row for row in data["layers"] if row["name"] == "conv1")
    assert (layer["weight_bits"], layer["quantized_bytes"]) == (4, 131)

    text = str(summary)
    assert "Quant." in _header(text)
    assert "131 B (4b)" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    ratio = summary.dense_bytes / summary.quantized_bytes
    assert f"quantized: {summary.quantized_bytes / 1000:.2f} kB" in _flat(text)
    assert f"({ratio:.2f}x smaller than fp32)" in _flat(text)


def test_fake_quantized_8_bit_per_tensor_and_unquantized_rows_count_fp32():
    model = _quantized_lenet(weight_bits=8, per_channel=False)
    summary = compression_summary(model, torch.rand(1, 1, 28, 28))
    rows = {layer.name: layer for layer in summary.layers}
    assert rows["conv2"].weight_bits == 8
    assert rows["conv2"].quantized_bytes == 2400 + 4 + 16 * 4 + 8  # one scale for the tensor
    assert rows["fc3"].quantized_bytes == 840 + 4 + 10 * 4 + 8

    # A layer whose quantizer is off is stored in fp32 and counted with its dense bytes.
    model.fc3.weight_quant.enabled = False
    summary = compression_summary(model, torch.rand(1, 1, 28, 28))
    fc3 = summary.layers[-1]
    assert (fc3.name, fc3.weight_bits, fc3.quantized_bytes) == ("fc3", None, None)
    assert summary.quantized_bytes == sum(
        layer.dense_bytes if layer.quantized_bytes is None else layer.quantized_bytes
        for layer in summary.layers
    )
    assert fc3.dense_bytes == 850 * 4


def test_layer_without_input_quantization_has_no_activation_qparams():
    model = _quantized_lenet(weight_bits=8)
    model.conv1.quantize_input = False  # first layer reads raw pixels
    row = compression_summary(model, torch.rand(1, 1, 28, 28)).layers[0]
    assert row.quantized_bytes == 150 + 6 * 4 + 6 * 4


def _low_bit_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),  # binary, one scale per output channel
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),  # ternary TWN
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),  # float
        nn.ReLU(),
        nn.Linear(32, 16, bias=False),  # fully pruned
        nn.Linear(16, 10),  # TTQ {-wn, 0, wp}
    )
    with torch.no_grad():
        model[0].weight.copy_(binarize(model[0].weight))
        model[2].weight.copy_(ternarize_twn(model[2].weight))
        model[6].weight.zero_()
        w = model[7].weight
        w.copy_(torch.where(w > 0.05, 0.3, torch.where(w < -0.05, -0.2, 0.0)))
    return model


def test_binary_ternary_and_ttq_weights_are_inferred_float_and_zero_are_not():
    model = _low_bit_model()
    summary = compression_summary(model, torch.randn(1, 3, 8, 8))
    binary, ternary, fp, pruned, ttq = summary.layers
    assert model[0].weight.unique().numel() > 2  # one alpha per channel
    # binary: 216 weights at 1 bit, 8 channel scales (sign-symmetric: magnitudes only), 8 biases
    assert binary.weight_bits == 1
    assert binary.quantized_bytes == 216 // 8 + 8 * 4 + 8 * 4
    # ternary TWN {-a, 0, a}: 576 weights at 2 bits, one scale for the layer, 8 biases
    assert ternary.weight_bits == 2
    assert ternary.quantized_bytes == 576 * 2 // 8 + 4 + 8 * 4
    # TTQ {-wn, 0, wp}: 160 weights at 2 bits, two scales, 10 biases
    assert ttq.weight_bits == 2
    assert ttq.quantized_bytes == 160 * 2 // 8 + 2 * 4 + 10 * 4
    assert (fp.weight_bits, fp.quantized_bytes) == (None, None)
    assert (pruned.weight_bits, pruned.quantized_bytes) == (None, None)
    low_bit = binary.quantized_bytes + ternary.quantized_bytes + ttq.quantized_bytes
    assert summary.quantized_bytes == low_bit + fp.dense_bytes + pruned.dense_bytes

    text = str(summary)
    assert "Quant." in _header(text)
    assert "(1b)" in text
    assert "(2b)" in text
    assert "3 rows as (N-bit) integer weights" in _flat(text)


def test_low_bit_codebook_edge_cases():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    assert low_bit_codebook(w) is None  # float
    assert low_bit_codebook(torch.zeros(4, 16)) is None  # fully pruned
    assert low_bit_codebook(torch.full((4, 16), 0.5)) is None  # one value per channel
    assert low_bit_codebook(torch.eye(8)) is None  # identity init: {0, 1}, no sign
    assert low_bit_codebook(torch.randn(3, 2)) is None  # tiny float layer: no codebook saving
    assert low_bit_codebook(0.1 * torch.randint(-2, 3, (4, 16)).float()) is None  # 5 levels
    assert low_bit_codebook(0.5 * w.sign()) == (1, 1)  # binary per tensor
    assert low_bit_codebook(0.1 * torch.randint(-1, 3, (4, 16)).float()) == (2, 3)  # 4 levels, no symmetry
    pruned_binary = binarize(w) * (w.abs() > 0.3)
    assert low_bit_codebook(pruned_binary) == (2, 4)  # {-a_c, 0, a_c}: zero needs a code, not a scale


def test_unquantized_model_has_no_quant_column():
    summary = compression_summary(LeNet5(), torch.rand(1, 1, 28, 28))
    assert summary.quantized_bytes is None
    assert all(layer.weight_bits is None and layer.quantized_bytes is None for layer in summary.layers)
    data = summary.to_dict()
    assert data["totals"]["quantized_bytes"] is None
    assert data["layers"][0]["weight_bits"] is None
    assert data["layers"][0]["quantized_bytes"] is None
    text = str(summary)
    assert "Quant." not in text
    assert "smaller than fp32" not in text


def test_model_costs_leaves_the_quantization_fields_empty():
    model = _quantized_lenet(weight_bits=4)
    cost = model_costs(model, torch.rand(1, 1, 28, 28))
    assert all(layer.weight_bits is None and layer.quantized_bytes is None for layer in cost.layers)


def test_quant_column_is_hidden_on_a_narrow_table_and_named_in_the_caption():
    summary = compression_summary(_quantized_lenet(weight_bits=4), torch.rand(1, 1, 28, 28))
    narrow = summary.to_rich_table(width=60)
    headers = [column.header for column in narrow.columns]
    assert {"Layer", "Params", "Sparsity"} <= set(headers)
    assert "Quant." not in headers
    assert "Quant." in _flat(str(narrow.caption)).split("hidden:")[1]
    # Kept longer than Type, Enc., Ratio and Energy: it is the storage figure of a quantized model.
    medium = [column.header for column in summary.to_rich_table(width=70).columns]
    assert "Quant." in medium
    assert "Type" not in medium
    wide = [column.header for column in summary.to_rich_table(width=200).columns]
    assert "Quant." in wide
    assert "Type" in wide


def test_pruned_and_quantized_layer_is_stored_sparse_with_int8_values() -> None:
    """Deep Compression's storage: a 90 % sparse int8 layer is counted in its smallest encoding."""
    import math

    from lightning_compress.functional.encoding import best_encoding
    from lightning_compress.quantization.fake_quant import calibrate, quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128))
    with torch.no_grad():
        mask = torch.rand(128, 256) < 0.1
        model[0].weight.mul_(mask)
    quantize_model(model)
    calibrate(model, [torch.randn(4, 256)])
    summary = compression_summary(model, torch.zeros(1, 256))
    row = summary.layers[0]
    _, bits = best_encoding(model[0].quantized_weight().detach(), 5, 8)
    assert row.quantized_bytes == math.ceil(bits / 8) + 128 * 4 + 128 * 4 + 8
    assert row.quantized_bytes < 128 * 256 + 128 * 4 + 128 * 4 + 8  # smaller than dense int8
    assert row.weight_bits == 8
