import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.core.cost import (
    LayerCost,
    count_nonzero_params,
    dense_macs,
    layer_costs,
    sparse_storage_bytes,
)


def _single(module: nn.Module, example=None) -> LayerCost:
    (cost,) = layer_costs(nn.Sequential(module), example)
    return cost


# ---------------------------------------------------------------- dense MACs / params, by hand


def test_linear_2d_input():
    layer = nn.Linear(10, 20)
    cost = _single(layer, torch.randn(4, 10))
    assert cost.kind == "Linear"
    assert cost.params == 10 * 20 + 20
    assert cost.dense_macs == 10 * 20  # one sample, batch of 4 excluded
    assert dense_macs(layer) == 200
    assert dense_macs(layer, (4, 10), (4, 20)) == 200
    assert dense_macs(layer, (10,), None) == 200  # unbatched


def test_linear_3d_and_4d_input_counts_every_position():
    layer = nn.Linear(10, 20)
    assert _single(layer, torch.randn(2, 7, 10)).dense_macs == 7 * 10 * 20
    assert _single(layer, torch.randn(2, 3, 5, 10)).dense_macs == 3 * 5 * 10 * 20
    assert dense_macs(layer, (2, 7, 10)) == 1400
    assert dense_macs(layer, None, (2, 7, 20)) == 1400


def test_linear_without_bias():
    cost = _single(nn.Linear(6, 3, bias=False), torch.randn(1, 6))
    assert (cost.params, cost.nonzeros, cost.dense_macs) == (18, 18, 18)


def test_conv1d_stride_padding():
    layer = nn.Conv1d(4, 8, kernel_size=3, stride=2, padding=1)
    cost = _single(layer, torch.randn(2, 4, 16))
    # L_out = floor((16 + 2*1 - 1*(3-1) - 1) / 2) + 1 = 8; MACs = 8 ch * 8 pos * 4 in * 3 taps
    assert cost.params == 8 * 4 * 3 + 8
    assert cost.dense_macs == 8 * 8 * 4 * 3 == 768
    # From the input shape alone, and unbatched.
    assert dense_macs(layer, (2, 4, 16)) == 768
    assert dense_macs(layer, (4, 16)) == 768
    assert dense_macs(layer, None, (8, 8)) == 768


def test_conv2d_groups_dilation_stride_padding():
    layer = nn.Conv2d(6, 12, kernel_size=(3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=3)
    x = torch.randn(2, 6, 10, 11)
    # H_out = (10 + 2 - 2*2 - 1) // 1 + 1 = 8; W_out = (11 + 4 - 4 - 1) // 2 + 1 = 6
    assert layer(x).shape == (2, 12, 8, 6)
    cost = _single(layer, x)
    assert cost.params == 12 * (6 // 3) * 3 * 5 + 12 == 372
    assert cost.dense_macs == (12 * 8 * 6) * (6 // 3) * (3 * 5) == 17280
    assert dense_macs(layer, (2, 6, 10, 11)) == 17280


def test_conv2d_depthwise_and_padding_strings():
    depthwise = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
    assert _single(depthwise, torch.randn(1, 8, 5, 7)).dense_macs == 8 * 5 * 7 * 1 * 9
    valid = nn.Conv2d(3, 4, 3, padding="valid")
    assert dense_macs(valid, (1, 3, 5, 7)) == 4 * 3 * 5 * 3 * 9
    assert _single(valid, torch.randn(1, 3, 5, 7)).dense_macs == 4 * 3 * 5 * 3 * 9


def test_conv3d():
    layer = nn.Conv3d(2, 4, kernel_size=3, stride=(1, 2, 2), padding=1)
    x = torch.randn(1, 2, 5, 6, 7)
    out = layer(x)
    assert out.shape == (1, 4, 5, 3, 4)
    cost = _single(layer, x)
    assert cost.params == 4 * 2 * 27 + 4
    assert cost.dense_macs == out.numel() * 2 * 27 == 60 * 4 * 54


def test_conv_macs_unknown_without_shapes():
    layer = nn.Conv2d(3, 4, 3)
    assert dense_macs(layer) is None
    cost = _single(layer)
    assert cost.dense_macs is None
    assert cost.effective_macs is None
    assert cost.params == 4 * 3 * 9 + 4


def test_conv_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"must have 4 dims"):
        dense_macs(nn.Conv2d(3, 4, 3), (3, 8))


def test_embedding_params_only():
    layer = nn.Embedding(100, 16)
    cost = _single(layer, torch.tensor([[1, 2, 3]]))
    assert cost.kind == "Embedding"
    assert cost.params == 1600
    assert cost.dense_macs == 0
    assert cost.effective_macs == 0
    assert dense_macs(layer) == 0


def test_unsupported_module_is_named():
    with pytest.raises(TypeError, match=r"does not support ConvTranspose2d; supported layers: Linear"):
        dense_macs(nn.ConvTranspose2d(2, 2, 3))


def test_layer_costs_rows_in_module_order_and_parameter_free_modules_skipped():
    # Changed deliberately: BatchNorm2d owns parameters, so it is a row now (0 MACs, 4 params).
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
    )
    costs = layer_costs(model, torch.randn(1, 1, 8, 8))
    assert [(c.name, c.kind) for c in costs] == [("0", "Conv2d"), ("1", "BatchNorm2d"), ("4", "Linear")]
    assert costs[0].dense_macs == 2 * 6 * 6 * 9
    assert (costs[1].params, costs[1].dense_macs, costs[1].calls, costs[1].macs_note) == (4, 0, 1, None)
    assert costs[2].dense_macs == 72 * 3


def test_shared_layer_sums_calls_and_unused_layer_costs_nothing():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.shared(x))

    costs = {c.name: c for c in layer_costs(Model(), torch.randn(1, 4))}
    assert costs["shared"].dense_macs == 2 * 16
    assert costs["unused"].dense_macs == 0


def test_tuple_and_dict_inputs():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(5, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    expected = [6, 10]
    by_tuple = layer_costs(TwoIn(), (torch.randn(1, 3), torch.randn(1, 5)))
    by_dict = layer_costs(TwoIn(), {"x": torch.randn(1, 3), "y": torch.randn(1, 5)})
    assert [c.dense_macs for c in by_tuple] == expected
    assert [c.dense_macs for c in by_dict] == expected


def test_layer_costs_rejects_non_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        layer_costs("not a model")


# ---------------------------------------------------------------- non-zeros and effective MACs


def test_nonzeros_after_zeroing_known_weights():
    layer = nn.Linear(10, 20)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
        layer.weight[:5] = 0.0  # 5 output rows * 10 inputs = 50 zeros
        layer.bias[:3] = 0.0
    cost = _single(layer, torch.randn(1, 2, 10))
    assert cost.params == 220
    assert cost.nonzeros == 220 - 53
    assert cost.sparsity == pytest.approx(53 / 220)
    assert cost.dense_macs == 2 * 200
    # Only weight zeros reduce MACs: 150 of 200 weights survive.
    assert cost.effective_macs == 2 * 150
    assert count_nonzero_params(nn.Sequential(layer, nn.ReLU(), nn.Linear(20, 1, bias=False))) == (
        150 + 20,
        200 + 20,
    )


def test_conv_effective_macs_follow_weight_density():
    layer = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.weight[:2] = 0.0  # half of the output channels pruned
    cost = _single(layer, torch.randn(1, 2, 6, 6))
    assert cost.dense_macs == 4 * 36 * 2 * 9
    assert cost.effective_macs == cost.dense_macs // 2
    assert cost.nonzeros == 36


def test_empty_model():
    assert layer_costs(nn.Sequential(nn.ReLU()), torch.randn(1, 3)) == []
    assert count_nonzero_params(nn.ReLU()) == (0, 0)


# ---------------------------------------------------------------- storage bytes


def _linear_with_nonzeros(nnz: int) -> nn.Linear:
    layer = nn.Linear(100, 100, bias=False)  # 10_000 params; bitmap = 1250 bytes
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.view(-1)[:nnz] = 1.0
    return layer


def test_sparse_bytes_bitmap_branch():
    cost = _single(_linear_with_nonzeros(5000))
    assert cost.dense_bytes == 40_000
    # 5000 fp32 values + bitmap (1250) which is cheaper than COO (20_000)
    assert cost.sparse_bytes == 5000 * 4 + 1250


def test_sparse_bytes_coo_branch():
    cost = _single(_linear_with_nonzeros(10))
    # 10 values + 10 int32 indices (40 bytes) which is cheaper than the bitmap (1250)
    assert cost.sparse_bytes == 10 * 4 + 10 * 4


def test_sparse_bytes_capped_at_dense():
    cost = _single(_linear_with_nonzeros(10_000))
    assert cost.sparse_bytes == cost.dense_bytes == 40_000
    assert sparse_storage_bytes(8, 8) == 32  # 32 + 1 bitmap byte would exceed dense
    assert sparse_storage_bytes(9, 0) == 0


def test_sparse_storage_bytes_formula_and_validation():
    assert sparse_storage_bytes(100, 50) == 50 * 4 + math.ceil(100 / 8)
    assert sparse_storage_bytes(100, 2) == 2 * 4 + 2 * 4
    with pytest.raises(ValueError, match=r"0 <= nonzeros <= numel, got numel=3, nonzeros=4"):
        sparse_storage_bytes(3, 4)


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    bias=st.booleans(),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_masks_never_exceed_dense(out_features, in_features, bias, keep, seed):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.rand(param.shape, generator=generator) + 0.1)
            param.mul_(torch.rand(param.shape, generator=generator) < keep)
    cost = _single(layer, torch.randn(1, in_features))
    expected_nnz = sum(int((p != 0).sum()) for p in layer.parameters())
    assert cost.nonzeros == expected_nnz <= cost.params
    assert 0 <= cost.sparse_bytes <= cost.dense_bytes == 4 * cost.params
    assert 0 <= cost.effective_macs <= cost.dense_macs
    assert 0.0 <= cost.sparsity <= 1.0


@given(numel=st.integers(0, 10**9), frac=st.floats(0.0, 1.0))
def test_sparse_storage_bytes_property(numel, frac):
    nnz = int(numel * frac)
    size = sparse_storage_bytes(numel, nnz)
    assert 4 * nnz <= size <= 4 * numel


# ---------------------------------------------------------------- the forward pass leaves no trace


class _Model(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
        self.frozen = nn.Linear(2, 2)
        self.fail = fail
        self.seen_training: list[bool] = []

    def forward(self, x):
        self.seen_training.append(self.body[1].training)
        out = self.frozen(self.body(x))
        if self.fail:
            raise RuntimeError("boom in forward")
        return out


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("fail", [False, True])
def test_hooks_removed_and_modes_restored(fail):
    model = _Model(fail=fail)
    model.train()
    model.frozen.eval()  # a deliberately frozen part must stay in eval
    if fail:
        with pytest.raises(RuntimeError, match="boom in forward"):
            layer_costs(model, torch.randn(3, 4))
    else:
        costs = layer_costs(model, torch.randn(3, 4))
        assert [c.dense_macs for c in costs] == [32, 16, 4]
    assert model.seen_training == [False]  # the measurement ran in eval mode
    assert _hook_count(model) == 0
    assert model.training is True
    assert model.body.training is True
    assert model.body[1].training is True
    assert model.frozen.training is False


def test_no_grad_during_measurement():
    model = nn.Sequential(nn.Linear(3, 3))
    grads = []
    model.register_forward_hook(lambda m, a, o: grads.append(o.requires_grad))
    layer_costs(model, torch.randn(1, 3))
    assert grads == [False]
    assert model[0].weight.grad is None
