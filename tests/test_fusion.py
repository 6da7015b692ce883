"""BatchNorm folding: the fold_bn kernel, fuse() and the LayerFusion callback."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.surgery import load_checkpoint
from lightning_compress.demos import LeNet5, LeNet300100BN, SmallMobileNet, SmallResNet, SmallVGG
from lightning_compress.demos.models import _DemoClassifier
from lightning_compress.functional.fusion import fold_bn
from lightning_compress.quantization import LayerFusion, fuse
from lightning_compress.quantization.fusion import find_fusion_pairs

BN_TYPES = nn.modules.batchnorm._BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                n = m.num_features
                if not m.track_running_stats:
                    continue
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


# ------------------------------------------------------------------------------------------- fold_bn


@pytest.mark.parametrize(
    ("layer", "bn", "shape"),
    [
        (nn.Conv1d(3, 6, 3, bias=False), nn.BatchNorm1d(6), (4, 3, 9)),
        (nn.Conv2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), (4, 3, 9, 9)),
        (nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.BatchNorm2d(6), (4, 6, 7, 7)),
        (nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), (2, 2, 5, 5, 5)),
        (nn.Linear(5, 7), nn.BatchNorm1d(7), (8, 5)),
        (nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7, affine=False), (8, 5)),
        (nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6, eps=0.1, affine=False), (2, 3, 4, 4)),
    ],
)
def test_fold_bn_matches_layer_then_bn(layer, bn, shape):
    torch.manual_seed(0)
    layer, bn = layer.double(), randomize_bn(bn.double()).eval()
    w, b = fold_bn(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert w.shape == layer.weight.shape
    assert b.shape == (w.shape[0],)
    assert not w.requires_grad
    assert not b.requires_grad
    folded = type(layer)(*_ctor_args(layer), bias=True).double()
    with torch.no_grad():
        folded.weight.copy_(w)
        folded.bias.copy_(b)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        assert (folded(x) - bn(layer(x))).abs().max().item() < 1e-6


def _ctor_args(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features)
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
    )


def test_fold_bn_float32_and_inputs_untouched():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(4, 8, 3), randomize_bn(nn.BatchNorm2d(8)).eval()
    before = conv.weight.detach().clone()
    w, b = fold_bn(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    assert w.dtype == torch.float32
    assert b.dtype == torch.float32
    torch.testing.assert_close(conv.weight.detach(), before, rtol=0, atol=0)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = bn(nn.functional.conv2d(x, conv.weight))
        assert (nn.functional.conv2d(x, w, b) - ref).abs().max().item() < 1e-5


def test_fold_bn_formula_and_transposed():
    weight = (
        torch.arange(2 * 3 * 1 * 1, dtype=torch.float64).reshape(3, 2, 1, 1) + 1.0
    )  # ConvT: (in, out, k, k)
    mean, var = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    gamma, beta = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64)
    bias = torch.tensor([1.0, 1.0], dtype=torch.float64)
    w, b = fold_bn(weight, bias, mean, var, 1.0, gamma, beta, transposed=True)
    scale = torch.tensor([2.0 / 2.0, 1.0 / 1.0], dtype=torch.float64)  # gamma / sqrt(var + eps)
    torch.testing.assert_close(w, weight * scale.reshape(1, 2, 1, 1))
    torch.testing.assert_close(b, (bias - mean) * scale + beta)


def test_fold_bn_bad_shapes():
    w = torch.randn(4, 3, 3, 3)
    ones = torch.ones(4)
    with pytest.raises(ValueError, match=r"`running_mean` has shape \(5,\); expected \(4,\)"):
        fold_bn(w, None, torch.zeros(5), ones, 1e-5)
    with pytest.raises(ValueError, match=r"`bias` has shape \(3,\)"):
        fold_bn(w, torch.zeros(3), torch.zeros(4), ones, 1e-5)
    with pytest.raises(ValueError, match="groups=1"):
        fold_bn(w, None, torch.zeros(4), ones, 1e-5, transposed=True)
    with pytest.raises(ValueError, match=r"`eps`=-1\.0 is not supported"):
        fold_bn(w, None, torch.zeros(4), ones, -1.0)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fold_bn(torch.randn(4), None, torch.zeros(4), ones, 1e-5)


# ---------------------------------------------------------------------------------------------- fuse


@pytest.mark.parametrize(
    ("cls", "kwargs", "n_pairs"),
    [
        (SmallVGG, {"width": 8}, 6),
        (SmallResNet, {"width": 8}, 15),
        (SmallMobileNet, {"width": 8}, 17),
        (LeNet300100BN, {"hidden": (64, 32)}, 2),
    ],
)
def test_fuse_demo_nets_equal_outputs(cls, kwargs, n_pairs):
    torch.manual_seed(0)
    model = randomize_bn(cls(**kwargs)).train()
    fused = fuse(model)
    assert fused is not model
    assert model.training
    assert fused.training
    assert count(model, BN_TYPES) == n_pairs  # the original is untouched
    assert len(fused.fused_pairs) == n_pairs
    assert count(fused, BN_TYPES) == 0
    for layer_name, bn_name in fused.fused_pairs:
        assert isinstance(fused.get_submodule(bn_name), nn.Identity)
        assert fused.get_submodule(layer_name).bias is not None
    replaced = [op["module"] for op in fused.fusion_ops if op["op"] == "replace"]
    assert replaced == [bn for _, bn in fused.fused_pairs]
    added = [op["module"] for op in fused.fusion_ops if op["op"] == "add_bias"]
    assert added == [c for c, _ in fused.fused_pairs if model.get_submodule(c).bias is None]
    x = torch.randn(4, 1, 28, 28)
    assert max_diff(model, fused, x) < 1e-5
    # ReLU modules stay where the model's forward applies them.
    assert count(fused, (nn.ReLU, nn.ReLU6)) == count(model, (nn.ReLU, nn.ReLU6))


def test_fuse_after_training_steps():
    torch.manual_seed(0)
    model = SmallResNet(width=8, blocks=(1, 1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    fused = fuse(model)
    assert len(fused.fused_pairs) == 9
    assert max_diff(model, fused, torch.randn(4, 1, 28, 28)) < 1e-5


class _ResidualBeforeBN(nn.Module):
    """``conv1``'s output feeds ``bn1`` and a residual add: folding bn1 would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.example_input_array = torch.zeros(1, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.relu1(self.bn1(y)) + y
        return self.bn2(self.conv2(z))


def test_fuse_skips_conv_whose_output_is_used_twice():
    model = randomize_bn(_ResidualBeforeBN())
    fused = fuse(model)
    assert fused.fused_pairs == [("conv2", "bn2")]
    assert isinstance(fused.bn1, nn.BatchNorm2d)
    assert isinstance(fused.bn2, nn.Identity)
    assert max_diff(model, fused, torch.randn(2, 3, 8, 8)) < 1e-5


class _Shared(nn.Module):
    """``conv`` runs twice (weight sharing); ``bn_a`` follows it once, ``bn_b`` follows ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_shared = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_a(self.conv(x))
        x = self.bn_shared(self.conv(x))
        # bn_shared normalizes a second tensor too: it is shared as well.
        return self.bn_b(self.head(x)) + self.bn_shared(x)


def test_fuse_skips_shared_modules():
    model = randomize_bn(_Shared())
    x = torch.randn(2, 4, 6, 6)
    fused = fuse(model, example_input=x)
    assert fused.fused_pairs == [("head", "bn_b")]
    assert max_diff(model, fused, x) < 1e-5


def test_fuse_skips_linear_on_sequences_and_untracked_bn():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)  # acts on the last dimension of (N, 6, 6)
            self.bn = nn.BatchNorm1d(6)  # normalizes dimension 1
            self.conv = nn.Conv1d(6, 6, 1)
            self.bn_batch_stats = nn.BatchNorm1d(6, track_running_stats=False)

        def forward(self, x):
            return self.bn_batch_stats(self.conv(self.bn(self.fc(x))))

    model = randomize_bn(Seq())
    with pytest.warns(UserWarning, match="no Conv/Linear-BatchNorm pair was found in Seq"):
        fused = fuse(model, example_input=torch.randn(3, 6, 6))
    assert fused.fused_pairs == []
    assert fused.fusion_ops == []


def test_fuse_inplace_frozen_and_stats_untouched():
    model = randomize_bn(SmallVGG(width=8))
    for p in model.features[0].parameters():
        p.requires_grad_(False)
    model.features[1].eval()  # mixed training flags are restored one by one
    reference = fuse(model)
    stats = model.features[4].running_mean.clone()
    pairs = find_fusion_pairs(model)
    torch.testing.assert_close(model.features[4].running_mean, stats, rtol=0, atol=0)  # traced in eval mode
    assert model.training
    assert not model.features[1].training
    assert len(pairs) == 6
    out = fuse(model, inplace=True)
    assert out is model
    assert isinstance(model.features[1], nn.Identity)
    assert not model.features[0].weight.requires_grad
    assert model.features[3].weight.requires_grad
    assert max_diff(reference, model, torch.randn(2, 1, 28, 28)) == 0.0


def test_fuse_nothing_to_fold_warns():
    model = LeNet5()
    with pytest.warns(UserWarning, match="no Conv/Linear-BatchNorm pair was found in LeNet5"):
        fused = fuse(model)
    assert fused.fusion_ops == []
    assert fused.fused_pairs == []
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in model.named_modules()]


def test_fuse_needs_example_input():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(
        ValueError, match=r"fuse\(\) needs an example input to trace Sequential: pass `example_input`"
    ):
        fuse(model)
    fused = fuse(model, example_input=torch.zeros(1, 1, 5, 5))
    assert fused.fused_pairs == [("0", "1")]


def test_fuse_untraceable_model():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            self.bn(self.conv(x))
            return "not a tensor"

    with pytest.raises(ValueError, match=r"could not trace Untraceable.*`example_input`"):
        fuse(Untraceable(), example_input=torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="could not trace SmallVGG"):
        fuse(SmallVGG(width=8), example_input=torch.zeros(1, 3, 28, 28))  # wrong channel count


# --------------------------------------------------------------------------------------- LayerFusion


def _fit(model: pl.LightningModule, callbacks: list, tmp_path=None) -> pl.Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,)))
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        callbacks=callbacks,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


def test_layer_fusion_callback_and_checkpoint_roundtrip(tmp_path, caplog):
    pl.seed_everything(0)
    model = SmallMobileNet(width=8)
    callback = LayerFusion()
    with caplog.at_level("INFO"):
        trainer = _fit(model, [callback], tmp_path)
    assert "fusion/pairs=17" in caplog.text
    assert len(callback.fused_pairs) == 17
    assert count(model, BN_TYPES) == 0
    assert model.conv1.bias is not None
    assert isinstance(model.bn1, nn.Identity)
    path = tmp_path / "fused.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["lightning_compress"]["recipe"] == callback.ops
    loaded = load_checkpoint(SmallMobileNet, path)
    assert count(loaded, BN_TYPES) == 0
    assert isinstance(loaded.blocks[0].bn2, nn.Identity)
    assert loaded.blocks[0].depthwise.bias is not None
    assert max_diff(model, loaded, torch.randn(4, 1, 28, 28)) == 0.0


def test_layer_fusion_matches_unfused_eval_outputs():
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    snapshots = []

    class Snapshot(pl.Callback):
        # Runs before LayerFusion's on_train_end (listed first): the trained, unfused model.
        def on_train_end(self, trainer, pl_module):
            import copy

            snapshots.append(copy.deepcopy(pl_module))

    _fit(model, [Snapshot(), LayerFusion()])
    (unfused,) = snapshots
    assert count(unfused, BN_TYPES) == 6
    assert count(model, BN_TYPES) == 0
    assert max_diff(unfused, model, torch.randn(4, 1, 28, 28)) < 1e-5


class _Distill(_DemoClassifier):
    """A wrapper whose compression root is the student: the teacher must stay unfused."""

    def __init__(self) -> None:
        super().__init__(num_classes=10, lr=1e-3, weight_decay=0.0, optimizer="adam")
        self.student = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 10),
        )
        self.teacher = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
        )

    @property
    def compression_root(self) -> nn.Module:
        return self.student

    def forward(self, x):
        return self.student(x)


def test_layer_fusion_compression_root():
    model = _Distill()
    with pytest.raises(ValueError, match="LayerFusion needs an example input to trace Sequential"):
        _fit(model, [LayerFusion()])
    model = _Distill()
    callback = LayerFusion(example_input=torch.zeros(1, 1, 28, 28))
    _fit(model, [callback])
    assert callback.fused_pairs == [("student.0", "student.1")]
    assert [op["module"] for op in callback.ops] == ["student.1"]  # the conv has a bias already
    assert isinstance(model.student[1], nn.Identity)
    assert isinstance(model.teacher[1], nn.BatchNorm2d)


def test_layer_fusion_nothing_to_fold_warns():
    model = LeNet5()
    with pytest.warns(UserWarning, match="LayerFusion: no Conv/Linear-BatchNorm pair was found in LeNet5"):
        _fit(model, [LayerFusion()])


def test_layer_fusion_bad_on():
    with pytest.raises(ValueError, match=r"`on`='epoch' is not supported; expected one of \['fit_end'\]"):
        LayerFusion(on="epoch")
