"""The BatchNorm demo networks: SmallVGG, SmallResNet, SmallMobileNet, LeNet300100BN."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.demos import (
    LeNet300100BN,
    MNIST5kDataModule,
    SmallMobileNet,
    SmallResNet,
    SmallVGG,
)

MODELS = [SmallVGG, SmallResNet, SmallMobileNet, LeNet300100BN]


def trainer(**kwargs):
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def macs(model: nn.Module) -> int:
    """Multiply-accumulates of the Conv / Linear layers for one 28x28 image."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        else:
            total += module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    for h in handles:
        h.remove()
    return total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls", MODELS)
def test_forward_shapes_and_example_input(cls):
    model = cls()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model(model.example_input_array).shape[1] == 10
    small = cls(num_classes=3)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    assert small.hparams["num_classes"] == 3


def test_parameter_counts_and_cost():
    assert n_params(SmallVGG()) == 288_170
    assert macs(SmallVGG()) == 29_128_448
    assert n_params(SmallResNet()) == 174_970
    assert macs(SmallResNet()) == 20_183_936
    assert n_params(SmallMobileNet()) == 77_018
    assert macs(SmallMobileNet()) == 8_700_544
    # 784-500-300-10 with a BatchNorm (gamma, beta) per hidden neuron.
    assert n_params(LeNet300100BN()) == 784 * 500 + 500 + 300 * 500 + 300 + 300 * 10 + 10 + 2 * (500 + 300)


def test_vgg_layout():
    model = SmallVGG(width=8)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:7] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 32, 3, 3)
    assert all(c.out_channels % 8 == 0 for c in SmallVGG().modules() if isinstance(c, nn.Conv2d))


def test_resnet_layout():
    model = SmallResNet(width=8, blocks=(1, 2, 1))
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [1, 2, 1]
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    projection = model.layer2[0].shortcut
    assert isinstance(projection[0], nn.Conv2d)
    assert projection[0].stride == (2, 2)
    assert isinstance(projection[1], nn.BatchNorm2d)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)
    x = model.relu(model.bn1(model.conv1(torch.zeros(2, 1, 28, 28))))
    assert model.layer1(x).shape == (2, 8, 28, 28)
    assert model.layer2(model.layer1(x)).shape == (2, 16, 14, 14)
    assert model.fc.in_features == 32


def test_resnet_block_adds_before_relu():
    block = SmallResNet(width=8).layer1[0].eval()
    x = torch.randn(2, 8, 6, 6)
    expected = torch.relu(block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x))))) + x)
    torch.testing.assert_close(block(x), expected)


def test_mobilenet_layout():
    model = SmallMobileNet(width=8, expansion=6)
    block = model.blocks[0]
    assert block.expand.out_channels == 48
    assert block.depthwise.groups == 48
    assert block.use_residual
    assert isinstance(block.relu1, nn.ReLU6)
    assert isinstance(block.relu2, nn.ReLU6)
    assert [b.use_residual for b in model.blocks] == [True, False, True, False, True]
    assert [b.project.out_channels for b in model.blocks] == [8, 16, 16, 32, 32]
    assert model.conv_last.out_channels == 64
    assert model.fc.in_features == 64


def test_lenet300100bn_layout():
    model = LeNet300100BN()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
    assert names == ["fc1", "bn1", "fc2", "bn2", "fc3"]
    assert (model.fc1.in_features, model.fc1.out_features, model.fc3.out_features) == (784, 500, 10)
    assert model.example_input_array.shape == (2, 784)
    deep = LeNet300100BN(in_features=64, hidden=[32, 16, 8], num_classes=4)
    assert deep(torch.randn(5, 1, 8, 8)).shape == (5, 4)
    assert deep.fc4.in_features == 8


@pytest.mark.parametrize("cls", MODELS)
def test_dependency_graph_traceable(cls):
    model = cls()
    graph = tp.DependencyGraph().build_dependency(model, model.example_input_array, verbose=False)
    layers = [
        m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
    ]
    assert all(m in graph.module2node for m in layers)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (SmallVGG, {"width": 0}, "`width`=0 is not supported"),
        (SmallVGG, {"in_channels": 0}, "`in_channels`=0"),
        (SmallResNet, {"blocks": (2, 2)}, "expected three ints"),
        (SmallResNet, {"blocks": (2, 0, 2)}, "`blocks[1]`=0"),
        (SmallMobileNet, {"expansion": 0}, "`expansion`=0"),
        (LeNet300100BN, {"hidden": ()}, "non-empty sequence"),
        (LeNet300100BN, {"hidden": (500, -1)}, "`hidden[1]`=-1"),
        (SmallVGG, {"optimizer": "rmsprop"}, "`optimizer`='rmsprop'"),
        (SmallVGG, {"lr": 0.0}, "`lr`=0.0"),
    ],
)
def test_bad_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SmallVGG, {"width": 8}),
        (SmallResNet, {"width": 8, "blocks": (1, 1, 1)}),
        (SmallMobileNet, {"width": 8}),
        (LeNet300100BN, {"hidden": (32, 16)}),
    ],
)
def test_short_fit_reduces_loss(cls, kwargs):
    pl.seed_everything(0)
    x = torch.randn(64, 1, 28, 28)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, :, :14].mean(dim=(1, 2, 3)) > 0).long()
    model = cls(num_classes=4, lr=3e-3, **kwargs)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model.eval()
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x), y).item()
    trainer(max_epochs=8).fit(model, loader)
    model.eval()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), y).item()
    assert after < before


@pytest.mark.slow
def test_small_vgg_mnist5k_accuracy():
    pl.seed_everything(0)
    dm = MNIST5kDataModule(batch_size=64, seed=0)
    model = SmallVGG(width=16)
    t = trainer(max_epochs=2, num_sanity_val_steps=0)
    t.fit(model, datamodule=dm)
    (result,) = t.test(model, datamodule=dm, verbose=False)
    assert result["test_acc"] >= 0.95
