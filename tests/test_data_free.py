"""Data-free quantization: cross-layer equalization, bias absorption / correction, ZeroQ, the callback."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.surgery import applied_recipe, load_checkpoint
from lightning_compress.demos import DigitsDataModule, LeNet5, SmallMobileNet, SmallVGG
from lightning_compress.functional.equalization import (
    _grouped,
    absorb_high_bias,
    channel_ranges,
    clipped_normal_mean,
    correct_bias,
    cross_layer_equalize,
    expected_input_means,
    find_equalization_pairs,
    measure_input_means,
)
from lightning_compress.quantization import fuse
from lightning_compress.quantization.data_free import (
    DataFreeQuantization,
    bn_statistics_loss,
    data_free_quantize,
    distill_data,
)
from lightning_compress.quantization.fake_quant import QuantConv2d, QuantLinear, quantize_model

DIGITS = (1, 8, 8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.8 + 0.2)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model


def unbalance(model: nn.Module, factor: float = 100.0, example=None) -> nn.Module:
    """Scale 1/8 of the channels of every BN->ReLU->layer pair by `factor` and undo it in the next layer.

    Function-preserving (the inverse of equalization); it creates the per-tensor quantization
    pathology of MobileNetV2 (Nagel et al., 2019, Figure 2).
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pair in find_equalization_pairs(model, example):
            if pair.batchnorm is None:
                continue
            bn, consumer = model.get_submodule(pair.batchnorm), model.get_submodule(pair.consumer)
            c = bn.num_features
            f = torch.ones(c)
            f[torch.randperm(c, generator=g)[: max(1, c // 8)]] = factor
            bn.weight.mul_(f)
            bn.bias.mul_(f)
            w = _grouped(consumer.weight.detach().clone(), consumer, c)
            w /= f.reshape(w.shape[0], 1, w.shape[2], 1)
            consumer.weight.copy_(w.reshape(consumer.weight.shape))
    return model


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def trained_vgg(digits):
    """SmallVGG(width=8) trained 5 epochs on the 8x8 digits (about 98 % test accuracy, 3 s)."""
    pl.seed_everything(0, verbose=False)
    model = SmallVGG(width=8)
    model.example_input_array = torch.zeros(1, *DIGITS)
    trainer(max_epochs=5, limit_val_batches=0).fit(model, digits)
    return model.eval()


# ---------------------------------------------------------------------------------------- pairs / CLE
def test_cle_mlp_preserves_outputs_and_equalizes_chain():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        net[0].weight[:4] *= 50
        net[0].bias[:4] *= 50
        net[2].weight[:, 5] *= 0.01
    x = torch.randn(64, 6)
    ref = net(x)
    pairs = cross_layer_equalize(net, example_input=x[:1])
    assert [(p.producer, p.consumer, p.batchnorm, p.path) for p in pairs] == [
        ("0", "2", None, ("relu",)),
        ("2", "4", None, ("relu",)),
    ]
    assert rel_err(net(x), ref) < 1e-4
    for pair in pairs:  # converged over the whole chain: r1_i == r2_i for every pair (eq. 9)
        r1, r2 = channel_ranges(net, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    # A single pair is equal after one sweep: sqrt(r1 r2) on both sides.
    single = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    r1, r2 = (
        t.double() for t in channel_ranges(single, find_equalization_pairs(single, torch.zeros(1, 4))[0])
    )
    cross_layer_equalize(single, iterations=1, example_input=torch.zeros(1, 4))
    e1, e2 = channel_ranges(single, find_equalization_pairs(single, torch.zeros(1, 4))[0])
    torch.testing.assert_close(e1.double(), (r1 * r2).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(e2.double(), (r1 * r2).sqrt(), rtol=1e-5, atol=0)


class ConvBN(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("groups", [1, 2])
def test_cle_conv_bn_relu_conv_scales_the_batchnorm(groups):
    torch.manual_seed(0)
    model = randomize_bn(ConvBN(groups)).eval()
    with torch.no_grad():
        model.bn1.weight[:3] *= 60
        model.bn1.bias[:3] *= 60
    x = torch.randn(8, 3, 10, 10)
    ref_eval = model(x)
    ref_train = copy.deepcopy(model).train()(x)
    # Equalizing after folding (the deployment view) is the reference for the folded weights.
    fused_first = fuse(model, x[:1])
    assert len(cross_layer_equalize(fused_first, example_input=x[:1])) == 1
    conv1_before = model.conv1.weight.detach().clone()
    spread_before = channel_ranges(model, find_equalization_pairs(model, x[:1])[0])[0]
    params_before = [id(p) for p in model.parameters()]
    pairs = cross_layer_equalize(model, example_input=x[:1])
    assert [(p.producer, p.batchnorm, p.consumer, p.consumer_batchnorm) for p in pairs] == [
        ("conv1", "bn1", "conv2", "bn2")
    ]
    assert torch.equal(model.conv1.weight, conv1_before)  # W1 untouched: gamma and beta scaled
    assert [id(p) for p in model.parameters()] == params_before
    assert rel_err(model(x), ref_eval) < 1e-4
    assert rel_err(copy.deepcopy(model).train()(x), ref_train) < 1e-4  # batch statistics: relu(BN(z) / s)
    r1, r2 = channel_ranges(model, pairs[0])
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    # Each channel lands at sqrt(r1 r2): the 60x outliers shrink to about sqrt(60)x.
    assert r1.max() / r1.min() < (spread_before.max() / spread_before.min()) / 5
    fused_after = fuse(model, x[:1])
    for name in ("conv1", "conv2"):
        torch.testing.assert_close(
            fused_after.get_submodule(name).weight,
            fused_first.get_submodule(name).weight,
            rtol=1e-4,
            atol=1e-6,
        )
        torch.testing.assert_close(
            fused_after.get_submodule(name).bias, fused_first.get_submodule(name).bias, rtol=1e-4, atol=1e-6
        )


class DepthwiseChain(nn.Module):
    """MobileNetV2's 1x1 -> depthwise 3x3 -> 1x1 with BatchNorm + ReLU in between."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.relu1 = nn.ReLU()
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.relu2 = nn.ReLU()
        self.project = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        x = self.relu1(self.bn1(self.expand(x)))
        return self.project(self.relu2(self.bn2(self.depthwise(x))))


def test_cle_depthwise_chain():
    torch.manual_seed(0)
    model = randomize_bn(DepthwiseChain()).eval()
    with torch.no_grad():
        model.depthwise.weight[:4] *= 80  # the pathology of Nagel et al.'s Figure 2
    x = torch.randn(4, 4, 9, 9)
    ref = model(x)
    pairs = cross_layer_equalize(model, example_input=x[:1])
    assert [(p.producer, p.consumer) for p in pairs] == [("expand", "depthwise"), ("depthwise", "project")]
    assert rel_err(model(x), ref) < 1e-4
    for pair in pairs:
        r1, r2 = channel_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    # The depthwise channel's folded range is shared by both pairs: the chain is equalized end to end.
    dw_range = channel_ranges(model, pairs[1])[0]
    assert dw_range.max() / dw_range.min() < 20


def test_find_pairs_on_demo_nets_and_stops():
    assert len(find_equalization_pairs(SmallVGG(width=8))) == 6
    lenet = find_equalization_pairs(LeNet5())
    assert [(p.producer, p.consumer, p.path) for p in lenet] == [
        ("conv1", "conv2", ("relu", "maxpool")),
        ("conv2", "fc1", ("relu", "maxpool", "reshape")),  # channel i -> features [25 i, 25 i + 25)
        ("fc1", "fc2", ("relu",)),
        ("fc2", "fc3", ("relu",)),
    ]
    mobile = SmallMobileNet(width=4)
    assert find_equalization_pairs(mobile) == []  # every chain crosses a ReLU6 or a residual add
    pairs = find_equalization_pairs(mobile, relu6="relu")
    assert len(pairs) == 11
    assert pairs[0].producer == "blocks.0.expand"
    assert pairs[0].relu6 == ("blocks.0.relu1",)
    assert "conv1" not in {p.producer for p in pairs}  # the stem's output also feeds a residual add

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b2 = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)
            self.d = nn.Linear(4, 4)
            self.e = nn.Linear(4, 4)
            self.act = nn.Hardtanh(0.0, 2.0)

        def forward(self, x):
            h = torch.relu(self.a(x))
            y = self.b(h) + h  # h is read twice: no pair a -> b
            z = self.c(torch.nn.functional.leaky_relu(self.b2(y)))  # LeakyReLU is homogeneous
            return self.e(self.act(self.d(z)))  # clipping ends the chain: no pair d -> e

    found = [(p.producer, p.consumer, p.path) for p in find_equalization_pairs(Branchy(), torch.zeros(1, 4))]
    assert found == [("b2", "c", ("leaky_relu",)), ("c", "d", ())]

    class Returns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), h, self.shared(self.shared(x))  # h returned; shared runs twice

    assert find_equalization_pairs(Returns(), torch.zeros(1, 4)) == []


def test_relu6_replacement_on_mobilenet():
    torch.manual_seed(0)
    model = randomize_bn(SmallMobileNet(width=4)).eval()
    reference = copy.deepcopy(model)
    for block in reference.blocks:  # what relu6="relu" does: ReLU in every equalized chain
        block.relu1, block.relu2 = nn.ReLU(), nn.ReLU()
    reference.relu_last = nn.ReLU()
    x = torch.randn(4, 1, 28, 28)
    pairs = cross_layer_equalize(model, relu6="relu")
    assert len(pairs) == 11
    assert isinstance(model.blocks[0].relu1, nn.ReLU)
    assert not isinstance(model.blocks[0].relu1, nn.ReLU6)
    assert isinstance(model.relu, nn.ReLU6)  # the stem is in no chain
    assert rel_err(model(x), reference(x)) < 1e-4


# ---------------------------------------------------------------------------------------- absorption
class HighBias(nn.Module):
    def __init__(self, tail: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 6, 3, bias=tail == "bias")  # no padding: absorption is exact
        self.bn2 = nn.BatchNorm2d(6) if tail == "bn" else nn.Identity()

    def forward(self, x):
        return self.bn2(self.conv2(self.pool(self.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("tail", ["bias", "bn", "none"])
def test_absorb_high_bias(tail):
    torch.manual_seed(0)
    model = HighBias(tail)
    x = torch.randn(256, 3, 12, 12)
    model.bn1.momentum = None  # running statistics = the data's statistics
    with torch.no_grad():
        model.train()(x)
        model.bn1.bias.copy_(torch.linspace(-1, 6, 8))
        model.bn1.weight.fill_(0.5)
    model.eval()
    ref = model(x)
    act_before = model.relu(model.bn1(model.conv1(x))).amax()
    absorbed = absorb_high_bias(model, example_input=x[:1])
    c = absorbed["bn1"]
    torch.testing.assert_close(c, torch.clamp(torch.linspace(-1, 6, 8) - 1.5, min=0))
    assert (c > 0).sum() == 5
    if tail == "bias":
        assert model.conv2.bias is not None
    elif tail == "none":
        assert isinstance(model.conv2.bias, nn.Parameter)  # added
    act_after = model.relu(model.bn1(model.conv1(x))).amax()
    assert act_after < act_before - 2  # the activation range shrank by c
    # Exact wherever the pre-activation stays above c (beyond 3 sigma: almost everywhere).
    out = model(x)
    close = torch.isclose(out, ref, rtol=1e-4, atol=1e-4).float().mean()
    assert close > 0.97
    assert rel_err(out, ref) < 0.2


def test_absorb_skips_leaky_relu_and_missing_bias():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LeakyReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[1].bias.fill_(5.0)
    assert absorb_high_bias(net.eval(), example_input=torch.zeros(2, 4)) == {}
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        net[1].bias.fill_(5.0)
    assert absorb_high_bias(net.eval(), add_bias=False, example_input=torch.zeros(2, 4)) == {}
    assert net[3].bias is None


# ---------------------------------------------------------------------------------------- bias correction
def test_clipped_normal_mean_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([-1.0, 0.0, 0.5, 3.0, 7.0])
    std = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.0])
    z = mean + std * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    for low, high in [(0.0, math.inf), (0.0, 6.0), (-math.inf, 1.0)]:
        expected = z.clamp(low, high).mean(0)
        torch.testing.assert_close(clipped_normal_mean(mean, std, low, high), expected, atol=1e-2, rtol=0)
    # Brief's formula for ReLU: gamma phi(-beta / gamma) + beta (1 - Phi(-beta / gamma)).
    b, s = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    phi = torch.exp(-0.5 * (b / s) ** 2) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(clipped_normal_mean(b, s), s * phi + b * (1 - torch.special.ndtr(-b / s)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.bn = nn.BatchNorm1d(64, momentum=None)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(self.relu(self.bn(self.fc1(x))))


def test_expected_input_means_match_data():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(20_000, 16) * 2 + 0.5
    with torch.no_grad():
        model.bn.bias.uniform_(-1, 1)
        model.bn.weight.uniform_(0.5, 1.5)
        model.train()(x)  # running statistics of this data
    model.eval()
    analytic = expected_input_means(model, x[:2])
    measured = measure_input_means(model, [x])
    assert set(analytic) == {"fc2"}
    torch.testing.assert_close(analytic["fc2"], measured["fc2"], atol=2e-2, rtol=0)
    # Through average pooling and a flatten into a Linear: channel means repeated per feature.
    conv = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 3)
    )
    means = expected_input_means(conv.eval(), torch.zeros(1, 2, 10, 10))
    assert set(means) == {"5"}
    assert means["5"].shape == (64,)
    torch.testing.assert_close(
        means["5"], clipped_normal_mean(torch.zeros(4), torch.ones(4), 0, 6).repeat_interleave(16)
    )


def test_correct_bias_reduces_the_expected_output_error():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(20_000, 16)
    with torch.no_grad():
        model.bn.bias.uniform_(0, 2)  # positive means: a biased weight error is visible
        model.train()(x)
    model.eval()
    reference = copy.deepcopy(model)

    def mean_error(quant):
        with torch.no_grad():
            return float((quant(x) - reference(x)).mean(0).abs().mean())

    quant = copy.deepcopy(model)
    quantize_model(quant, weight_bits=3, per_channel=False)  # weights only: inputs not calibrated
    before = mean_error(quant)
    corrections = correct_bias(reference, quant, example_input=x[:2])  # analytic E[x] of fc2 from the BN
    assert set(corrections) == {"fc2"}
    after = mean_error(quant)
    assert after < before / 3
    # Empirical variant: every layer's E[x] measured on data (the first layer's too).
    quant = copy.deepcopy(model)
    quantize_model(quant, weight_bits=3, per_channel=False)
    assert set(correct_bias(reference, quant, data=[x[:4096]])) == {"fc1", "fc2"}
    assert mean_error(quant) < before / 3


def test_correct_bias_errors():
    with pytest.raises(ValueError, match="`quant_model` has no quantized layer"):
        correct_bias(MLP(), MLP())
    quant = MLP()
    quantize_model(quant)
    with pytest.raises(ValueError, match="E\\[x\\] of 'fc2' has 3 entries; expected 64"):
        correct_bias(MLP(), quant, input_means={"fc1": torch.zeros(16), "fc2": torch.zeros(3)})
    with pytest.raises(ValueError, match="no float layer of the same name"):
        correct_bias(nn.Sequential(), quant, input_means={"fc1": torch.zeros(16), "fc2": torch.zeros(64)})


# ---------------------------------------------------------------------------------------- ZeroQ
def test_distill_data_matches_batchnorm_statistics(trained_vgg):
    state = copy.deepcopy(trained_vgg.state_dict())
    trained_vgg.train()
    noise = torch.randn(32, *DIGITS, generator=torch.Generator().manual_seed(0))
    start = bn_statistics_loss(trained_vgg, noise).item()
    batches = distill_data(trained_vgg, DIGITS, num_batches=2, batch_size=32, iterations=150)
    assert len(batches) == 2
    assert batches[0].shape == (32, *DIGITS)
    assert not batches[0].requires_grad
    final = bn_statistics_loss(trained_vgg, batches[1]).item()
    assert final < start / 100  # measured: 51.5 -> 0.009 at 200 iterations
    assert trained_vgg.training  # flags restored, weights and statistics untouched
    assert all(torch.equal(v, state[k]) for k, v in trained_vgg.state_dict().items())
    trained_vgg.eval()
    again = distill_data(trained_vgg, DIGITS, num_batches=1, batch_size=32, iterations=3, seed=5)
    assert torch.equal(again[0], distill_data(trained_vgg, DIGITS, batch_size=32, iterations=3, seed=5)[0])
    assert distill_data(SmallVGG(width=8), batch_size=2, iterations=0)[0].shape == (2, 1, 28, 28)


# ---------------------------------------------------------------------------------------- pipeline
def test_data_free_quantize_recovers_unbalanced_network(trained_vgg, digits):
    test = digits.test_dataloader()
    model = unbalance(copy.deepcopy(trained_vgg))
    float_acc = accuracy(trained_vgg, test)
    assert float_acc > 0.95
    assert abs(accuracy(model, test) - float_acc) < 1e-9  # the unbalancing kept the function
    state = copy.deepcopy(model.state_dict())
    data = distill_data(model, DIGITS, num_batches=2, batch_size=32, iterations=150)

    naive = data_free_quantize(
        model, equalize=False, absorb_bias=False, correct_bias=False, calibration_data=data
    )
    dfq = data_free_quantize(model, calibration_data=data)
    naive_acc, dfq_acc = accuracy(naive, test), accuracy(dfq, test)
    print(f"float {float_acc:.4f} naive {naive_acc:.4f} dfq {dfq_acc:.4f}")
    # Measured (seed 0): float 98.1 %, per-tensor int8 without CLE 15.6 %, with CLE + absorption +
    # correction 98.3 %.
    assert naive_acc < 0.5
    assert dfq_acc > float_acc - 0.03
    assert len(dfq.equalization_pairs) == 6
    assert set(dfq.absorbed_bias) <= {f"features.{i}" for i in range(21)}
    assert not dfq.training
    assert isinstance(dfq.features[0], QuantConv2d)
    assert isinstance(dfq.fc, QuantLinear)
    assert isinstance(dfq.features[1], nn.Identity)  # BatchNorm folded
    assert dfq.features[3].input_quant.ready
    assert not dfq.features[0].weight_quant.per_channel
    assert set(dfq.bias_corrections) == {
        "features.0",
        "features.3",
        "features.7",
        "features.10",
        "features.14",
        "features.17",
        "fc",
    }
    # The argument is never modified.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert type(model.features[0]) is nn.Conv2d

    # End to end from the network alone (ZeroQ inside), on the original balanced network.
    auto = data_free_quantize(trained_vgg, num_batches=1, iterations=100, input_shape=DIGITS)
    assert accuracy(auto, test) > float_acc - 0.03


def test_data_free_quantize_mobilenet_depthwise_relu6(digits):
    pl.seed_everything(0, verbose=False)
    model = SmallMobileNet(width=8)
    model.example_input_array = torch.zeros(1, *DIGITS)
    trainer(max_epochs=4, limit_val_batches=0).fit(model, digits)
    test = digits.test_dataloader()
    float_acc = accuracy(model, test)
    with pytest.warns(
        UserWarning, match="no equalizable layer pair was found in SmallMobileNet \\(ReLU6 ends"
    ):
        data_free_quantize(model, calibration_data=[torch.zeros(2, *DIGITS)], correct_bias=False)
    quant = data_free_quantize(model, relu6="relu", num_batches=1, iterations=100)
    # Measured (seed 0): float 96.1 %, per-tensor int8 DFQ with ReLU6 -> ReLU 96.4 %.
    assert accuracy(quant, test) > float_acc - 0.03
    assert len(quant.equalization_pairs) == 11
    assert isinstance(quant.blocks[0].depthwise, QuantConv2d)
    assert quant.blocks[0].depthwise.groups == 32
    assert not isinstance(quant.blocks[0].relu1, nn.ReLU6)
    assert isinstance(quant.relu, nn.ReLU6)
    assert isinstance(model.blocks[0].relu1, nn.ReLU6)  # the argument keeps its ReLU6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 9}, "`weight_bits`=9 is not supported; expected an int from 2 to 8"),
        ({"activation_bits": 1}, "`activation_bits`=1 is not supported; expected an int from 2 to 8"),
        ({"weight_bits": True}, "`weight_bits`=True is not supported"),
        ({"per_channel": "yes"}, "`per_channel`='yes' is not supported; expected true or false"),
        ({"equalize": 1}, "`equalize`=1 is not supported; expected true or false"),
        ({"correct_bias": None}, "`correct_bias`=None is not supported; expected true or false"),
        ({"num_batches": 0}, "`num_batches`=0 is not supported; expected an int >= 1"),
        ({"batch_size": 1}, "`batch_size`=1 is not supported; expected an int >= 2"),
        ({"iterations": -1}, "`iterations`=-1 is not supported; expected an int >= 0"),
        ({"relu6": "clip"}, "`relu6`='clip' is not supported; expected one of \\['stop', 'relu'\\]"),
        ({"num_std": 0}, "`num_std`=0 is not supported; expected a number > 0"),
        ({"input_shape": (0, 8)}, "`input_shape`=\\(0, 8\\) is not supported"),
        ({"calibration_data": torch.zeros(2, 1, 8, 8)}, "`calibration_data` must be an iterable of batches"),
        ({"calibration_data": []}, "`calibration_data` is empty"),
    ],
)
def test_data_free_quantize_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data_free_quantize(SmallVGG(width=8), **kwargs)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="LeNet5 has no BatchNorm layer with running statistics; ZeroQ"):
        data_free_quantize(LeNet5())
    with pytest.raises(ValueError, match="needs the input shape of Sequential: pass `input_shape`"):
        distill_data(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match="`lr`=0 is not supported; expected a number > 0"):
        distill_data(SmallVGG(width=8), lr=0)
    with pytest.raises(ValueError, match=r"`input_stats`=\(0.0, -1.0\) is not supported"):
        distill_data(SmallVGG(width=8), input_stats=(0.0, -1.0))
    with pytest.raises(ValueError, match="`iterations`=0 is not supported; expected an int >= 1"):
        cross_layer_equalize(SmallVGG(width=8), iterations=0)
    with pytest.raises(ValueError, match="`tolerance`=-1 is not supported"):
        cross_layer_equalize(SmallVGG(width=8), tolerance=-1)
    with pytest.raises(ValueError, match="`relu6`='x' is not supported"):
        find_equalization_pairs(SmallVGG(width=8), relu6="x")
    with pytest.raises(ValueError, match="`num_std`=-1 is not supported"):
        absorb_high_bias(SmallVGG(width=8), num_std=-1)
    with pytest.raises(ValueError, match="needs an example input to trace Sequential"):
        find_equalization_pairs(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="`on`='epoch_end' is not supported; expected one of"):
        DataFreeQuantization(on="epoch_end")
    with pytest.raises(ValueError, match="`calibration`='test' is not supported"):
        DataFreeQuantization(calibration="test")
    with pytest.raises(ValueError, match="`weight_bits`=16 is not supported"):
        DataFreeQuantization(weight_bits=16)
    with pytest.raises(ValueError, match="`quantize`='no' is not supported; expected true or false"):
        DataFreeQuantization(quantize="no")


# ---------------------------------------------------------------------------------------- callback
class Snapshot(pl.Callback):
    """Eval-mode outputs on fixed inputs when training ends (before DataFreeQuantization runs)."""

    def __init__(self, x) -> None:
        self.x = x
        self.out = None

    def on_train_end(self, trainer, pl_module):
        training = pl_module.training
        with torch.no_grad():
            self.out = pl_module.eval()(self.x)
        pl_module.train(training)


def test_callback_fit_end_equalizes_and_quantizes(digits):
    pl.seed_everything(0, verbose=False)
    model = SmallVGG(width=8)
    model.example_input_array = torch.zeros(1, *DIGITS)
    x = torch.stack([digits.test_dataset[i][0] for i in range(64)])
    snapshot = Snapshot(x)
    callback = DataFreeQuantization(absorb_bias=False, num_batches=1, iterations=100, input_shape=DIGITS)
    t = trainer(max_epochs=3, limit_val_batches=0, callbacks=[snapshot, callback])
    t.fit(model, digits)
    optimizer_params = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}  # same Parameter objects
    assert type(model.features[0]) is nn.Conv2d
    assert isinstance(model.features[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert rel_err(model.eval()(x), snapshot.out) < 1e-4  # float function kept
    assert len(callback.pairs) == 6
    for pair in callback.pairs:
        r1, r2 = channel_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    float_acc = accuracy(model, digits.test_dataloader())
    assert callback.quantized_model is not None
    assert isinstance(callback.quantized_model.features[0], QuantConv2d)
    assert accuracy(callback.quantized_model, digits.test_dataloader()) > float_acc - 0.03


def test_callback_fit_start_relu6_checkpoint(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = SmallMobileNet(width=4)
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    callback = DataFreeQuantization(on="fit_start", relu6="relu", quantize=False)
    t = trainer(max_steps=3, callbacks=[callback], default_root_dir=tmp_path)
    t.fit(model, DataLoader(data, batch_size=8))
    assert len(callback.pairs) == 11
    assert isinstance(model.blocks[1].relu2, nn.ReLU)
    assert not isinstance(model.blocks[1].relu2, nn.ReLU6)
    replaced = [op["module"] for op in applied_recipe(model) if op["op"] == "replace"]
    assert len(replaced) == 11
    assert "blocks.0.relu1" in replaced
    path = tmp_path / "dfq.ckpt"
    t.save_checkpoint(path)
    loaded = load_checkpoint(SmallMobileNet, path)
    assert not isinstance(loaded.blocks[0].relu1, nn.ReLU6)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=1e-6)


def test_callback_train_batches_and_nothing_to_equalize():
    pl.seed_everything(0, verbose=False)
    model = SmallVGG(width=8)
    data = TensorDataset(torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,)))
    callback = DataFreeQuantization(calibration="train", num_batches=2, per_channel=True)
    trainer(max_steps=2, callbacks=[callback]).fit(model, DataLoader(data, batch_size=8))
    batches = callback.quantized_model.calibration_data
    assert [b.shape for b in batches] == [(8, 1, 28, 28)] * 2  # the inputs of the first training batches
    assert callback.quantized_model.features[0].weight_quant.per_channel
    assert len(callback.absorbed) > 0  # every consumer is followed by a BatchNorm: absorbed there

    class Plain(pl.LightningModule):  # a residual add after the only ReLU: no pair
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)
            self.example_input_array = torch.zeros(1, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h + x)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = DataFreeQuantization(quantize=False)
    with pytest.warns(UserWarning, match="no equalizable layer pair was found in Plain"):
        trainer(max_steps=1, callbacks=[callback]).fit(
            Plain(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
        )
    assert callback.pairs == []


def test_train_calibration_refuses_dict_batches(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_compress.demos import LeNet5

    class DictModel(LeNet5):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    data = [{"x": torch.rand(1, 28, 28), "y": torch.tensor(i % 10)} for i in range(16)]
    cb = DataFreeQuantization(calibration="train", iterations=0, num_batches=1)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.callbacks.append(cb)
    with pytest.raises(ValueError, match=r"calibration='train'\): the training batches are dicts"):
        trainer.fit(DictModel(), DataLoader(data, batch_size=8))
