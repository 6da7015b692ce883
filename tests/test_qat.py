"""QuantizationAwareTraining, the fake-quantized layers and the int8 ONNX export."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

import lightning_compress as lc
from lightning_compress.demos import DigitsDataModule, LeNet5, SmallVGG
from lightning_compress.export.onnx import INTEGER_OPS, optimized_ops
from lightning_compress.quantization import QuantizationAwareTraining, calibrate, fuse, quantize_model
from lightning_compress.quantization.fake_quant import (
    ActivationQuantizer,
    QuantConv2d,
    QuantizedLayer,
    commit_observations,
    quantized_layers,
)


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)


def _ort(path: Path, x: Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# ------------------------------------------------------------------------------ layers


def test_swap_keeps_parameters_state_dict_keys_and_plain_loading() -> None:
    model = LeNet5()
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    layers = quantize_model(model, learn_scales=True)
    assert set(layers) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert isinstance(model.conv1, QuantConv2d)
    assert isinstance(model.conv1, nn.Conv2d)  # cost model, graph tracer and fusion still see a Conv2d
    for name, p in params.items():
        assert model.get_parameter(name) is p
    assert list(model.state_dict()) == keys  # no quantizer keys: loads into the plain module
    LeNet5().load_state_dict(model.state_dict())
    model.load_state_dict(LeNet5().state_dict())  # and the other way round


def test_weight_grid_is_symmetric_per_channel_and_keeps_zeros() -> None:
    layer = quantize_model(nn.Sequential(nn.Linear(16, 8)), weight_bits=4)["0"]
    with torch.no_grad():
        layer.weight[:, :4] = 0
    qw = layer.quantized_weight()
    scale = layer.weight.detach().abs().amax(1) / 7
    levels = qw / scale[:, None]
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.abs().max() <= 7 + 1e-4
    assert torch.equal(qw[:, :4], torch.zeros(8, 4))
    # straight-through: the gradient reaches the float weight
    layer.quantized_weight().sum().backward()
    assert layer.weight.grad is not None
    assert torch.equal(layer.weight.grad, torch.ones_like(layer.weight))


def test_observer_ema_and_affine_range() -> None:
    q = ActivationQuantizer(bits=8, averaging_constant=0.5)
    q.enabled = True
    q.train()
    q(torch.tensor([0.5, 2.0]))  # first forward: uses the batch's own range, nothing committed yet
    assert not bool(q.initialized)
    commit_observations_single(q)
    assert q.min_val.item() == 0.5
    assert q.max_val.item() == 2.0
    q(torch.tensor([-1.0, 4.0]))
    commit_observations_single(q)
    assert q.min_val.item() == pytest.approx(-0.25)
    assert q.max_val.item() == pytest.approx(3.0)
    scale, zero = q.qparams()
    assert scale.item() == pytest.approx(3.25 / 255)
    assert zero.item() == round(0.25 / (3.25 / 255))
    q.eval()
    before = q.min_val.clone()
    q(torch.tensor([-100.0, 100.0]))  # eval forwards never observe
    commit_observations_single(q)
    assert torch.equal(q.min_val, before)


def commit_observations_single(q: ActivationQuantizer) -> None:
    q.commit(q.pending_min.clone(), q.pending_max.clone())


def test_commit_reduces_in_one_fixed_order_and_skips_unseen_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    layers = quantize_model(model)
    model.train()
    model[0](torch.randn(8, 4))  # only the first layer runs
    commit_observations(list(layers.values()))
    assert bool(layers["0"].input_quant.initialized)
    assert not bool(layers["2"].input_quant.initialized)


def test_bn_folding_while_training_equals_the_folded_deployed_layer() -> None:
    model = SmallVGG(width=8)
    _randomize_bn(model)
    from lightning_compress.quantization.fusion import find_fusion_pairs

    pairs = find_fusion_pairs(model, model.example_input_array)
    modules = dict(model.named_modules())
    quantize_model(model, bn_pairs={layer: modules[bn] for layer, bn in pairs})
    calibrate(model, [torch.rand(16, 1, 28, 28)])
    model.eval()
    deployed = fuse(copy.deepcopy(model))  # BatchNorm folded into the float weight, then quantized
    from lightning_compress.quantization.fake_quant import unbind_stale_bns

    assert len(unbind_stale_bns(deployed)) == len(pairs)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)


def test_quantize_model_refuses_a_named_layer_it_cannot_quantize() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"target layer '0' is a Conv3d, which cannot be quantized"):
        quantize_model(model, targets=["0"])
    assert isinstance(model[2], nn.Linear)
    assert not quantized_layers(model)  # nothing half-applied
    assert set(quantize_model(model)) == {"2"}  # a wildcard quietly skips the Conv3d


def test_quantize_model_refuses_bad_bits() -> None:
    with pytest.raises(ValueError, match=r"`weight_bits`=9 is not supported; expected an int from 2 to 8"):
        quantize_model(nn.Linear(2, 2), weight_bits=9)


# ------------------------------------------------------------------------------ callback


class TwoInputNet(pl.LightningModule):
    """A user module whose forward takes two inputs and a keyword: QAT never wraps it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor, y: Tensor, *, scale: float = 1.0) -> Tensor:
        return self.head(torch.relu(self.a(x) + self.b(y)) * scale)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, target = batch
        x = x.flatten(1)
        return nn.functional.cross_entropy(self(x, x.flip(1), scale=0.5), target)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_multi_input_forward_trains_and_optimizer_holds_the_same_parameters(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TwoInputNet()
    params = list(model.parameters())
    cb = QuantizationAwareTraining(start=3)
    trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=10, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert isinstance(model.a, QuantizedLayer)
    assert all(layer.input_quant.ready for layer in cb.layers.values())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in params} <= optimized
    assert "forward" not in model.__dict__  # the user's forward is not wrapped


def test_qat_on_digits_reaches_float_accuracy_and_exports_integer_onnx(tmp_path: Path) -> None:
    """A real fit: LeNet-5 on the sklearn digits, int8 QAT with BatchNorm-free conv layers."""
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=64, seed=0)
    accs = {}
    models = {}
    for qat in (False, True):
        pl.seed_everything(0)
        model = LeNet5(in_channels=1, num_classes=10, image_size=8, lr=5e-3, optimizer="adam")
        cbs = [QuantizationAwareTraining(start=0.3, freeze_observers_at=0.9)] if qat else []
        trainer = _trainer(tmp_path / str(qat), cbs, max_epochs=12)
        trainer.fit(model, dm)
        accs[qat] = trainer.test(model, dm, verbose=False)[0]["test_acc"]
        models[qat] = model
    assert accs[False] > 0.93
    assert accs[True] > accs[False] - 0.03, accs
    model = models[True]
    path = lc.export_onnx(model, model.example_input_array, tmp_path / "lenet5.onnx")
    ops = optimized_ops(path)
    assert "QLinearConv" in ops
    assert {"QGemm", "QLinearMatMul", "MatMulInteger"} & set(ops)
    # predictions agree with the fake-quantized model on the test set
    xs = torch.cat([x for x, _ in dm.test_dataloader()])
    model.eval()
    with torch.no_grad():
        expected = model(xs).numpy()
    got = _ort(path, xs)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_four_bit_weights_export_exactly_on_the_int8_grid(tmp_path: Path) -> None:
    model = SmallVGG(width=8)
    _randomize_bn(model)
    from lightning_compress.quantization.fusion import find_fusion_pairs

    pairs = find_fusion_pairs(model, model.example_input_array)
    modules = dict(model.named_modules())
    quantize_model(model, weight_bits=4, activation_bits=6, bn_pairs={a: modules[b] for a, b in pairs})
    calibrate(model, [torch.rand(32, 1, 28, 28)])
    path = lc.export_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "vgg4.onnx")
    assert set(optimized_ops(path)) & INTEGER_OPS
    x = torch.rand(5, 1, 28, 28)  # dynamic batch: exported with 2, run with 5
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    got = _ort(path, x)
    # 6-bit inputs run on the uint8 grid (values above the 6-bit clipping point are not clipped)
    np.testing.assert_allclose(got, expected, atol=0.1 * np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert model.training is False  # export left the model alone (a copy was exported)
    assert not any(layer.weight_quant.export_int8 for layer in quantized_layers(model).values())


def test_float_model_exports_a_plain_graph(tmp_path: Path) -> None:
    model = LeNet5().eval()
    path = lc.export_onnx(model, model.example_input_array, tmp_path / "float.onnx")
    assert not set(optimized_ops(path)) & INTEGER_OPS
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, x), model(x).numpy(), atol=1e-4)


def test_export_refuses_layers_whose_observers_never_saw_data(tmp_path: Path) -> None:
    model = LeNet5()
    quantize_model(model)
    with pytest.raises(ValueError, match=r"activation observers of layers \['conv1', .*never saw data"):
        lc.export_onnx(model, model.example_input_array, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    model = LeNet5()
    quantize_model(model, enabled=False)
    with pytest.raises(ValueError, match=r"quantization of layers \['conv1', .* has not started"):
        lc.export_onnx(model, model.example_input_array, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=r"`example_input` is None"):
        lc.export_onnx(model, None, tmp_path / "x.onnx")


def test_freeze_point_resolving_before_start_is_refused_and_model_left_float(tmp_path: Path) -> None:
    model = LeNet5(in_channels=1, num_classes=10, image_size=8)
    cb = QuantizationAwareTraining(start=30, freeze_bn_at=0.1)  # 0.1 of ~46 steps = step 5 < 30
    with pytest.raises(
        ValueError, match=r"`freeze_bn_at`=0.1 resolves to training step \d+, before `start`=30"
    ):
        _trainer(tmp_path, [cb], max_epochs=2).fit(model, DigitsDataModule(batch_size=64))
    assert not quantized_layers(model)
    assert type(model.conv1) is nn.Conv2d


def test_setup_refuses_an_unquantizable_target_before_changing_anything(tmp_path: Path) -> None:
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.rnn(x.reshape(x.shape[0], 8, 8))[0][:, -1])

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters())

    model = Net()
    with pytest.raises(ValueError, match=r"target layer 'rnn' is a GRU, which cannot be quantized"):
        _trainer(tmp_path, [QuantizationAwareTraining(targets=["rnn", "fc"])]).fit(
            model, DigitsDataModule(batch_size=64)
        )
    assert type(model.fc) is nn.Linear


def test_freeze_bn_keeps_batchnorm_in_eval_mode_across_epochs(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    cb = QuantizationAwareTraining(start=0, freeze_bn_at=5)
    seen: list[bool] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            seen.append(pl_module.features[1].training)

    stats: list[Tensor] = []

    class Stats(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            stats.append(pl_module.features[1].running_mean.clone())

    trainer = _trainer(
        tmp_path, [cb, Spy(), Stats()], max_epochs=2, limit_train_batches=6, limit_val_batches=1
    )
    trainer.fit(model, lc.demos.MNIST5kDataModule(batch_size=32))
    assert seen[:5] == [True] * 5
    assert not any(seen[5:])  # frozen for the rest of training, also after validation / epoch start
    for a, b in itertools.pairwise(stats[5:]):
        assert torch.equal(a, b)  # running statistics no longer move
    assert model.features[0].folded_bn is model.features[1]


def test_data_free_init_equalizes_and_starts_from_distilled_ranges(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    before = copy.deepcopy(model).eval()
    cb = QuantizationAwareTraining(init="data_free", start=2)
    seen: dict[str, float] = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            # before any training step: ranges exist already (from the synthetic data)
            for name, layer in quantized_layers(pl_module).items():
                seen[name] = float(layer.input_quant.max_val)
            x = torch.rand(4, 1, 28, 28)
            from lightning_compress.quantization.fake_quant import dequantize_model

            plain = dequantize_model(copy.deepcopy(pl_module)).eval()
            with torch.no_grad():  # equalization preserved the float function
                torch.testing.assert_close(plain(x), before(x), rtol=1e-4, atol=1e-4)

    trainer = _trainer(tmp_path, [cb, Spy()], max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model, lc.demos.MNIST5kDataModule(batch_size=32))
    assert seen
    assert all(v > 0 for v in seen.values())


def test_pruning_and_qat_give_identical_models_in_both_callback_orders(tmp_path: Path) -> None:
    from battery import TinyNet, tiny_data
    from battery import trainer as battery_trainer

    results = []
    for order in ("gradual-first", "qat-first"):
        pl.seed_everything(0)
        model = TinyNet()
        cbs = [
            lc.GradualPruning(target_sparsity=0.75, start=2, end=20, frequency=3),
            QuantizationAwareTraining(start=2, freeze_observers_at=24),
        ]
        if order == "qat-first":
            cbs.reverse()
        battery_trainer(tmp_path / order, cbs).fit(model, tiny_data())
        results.append(model)
    a, b = results
    for name, p in a.named_parameters():
        torch.testing.assert_close(b.get_parameter(name), p, rtol=0, atol=0)
    for name, layer in quantized_layers(a).items():
        other = b.get_submodule(name)
        assert torch.equal(layer.input_quant.min_val, other.input_quant.min_val)
        assert torch.equal(layer.input_quant.max_val, other.input_quant.max_val)
        qw = layer.quantized_weight()
        assert torch.equal(qw[layer.weight == 0], torch.zeros_like(qw[layer.weight == 0]))


def test_exported_file_stores_int8_weights(tmp_path: Path) -> None:
    import onnx

    model = SmallVGG(width=16)
    quantize_model(model, per_channel=False)  # per-tensor weights export too
    calibrate(model, [torch.rand(8, 1, 28, 28)])
    quantized = lc.export_onnx(model, model.example_input_array, tmp_path / "q.onnx")
    plain = lc.export_onnx(SmallVGG(width=16), model.example_input_array, tmp_path / "f.onnx")
    initializers = {init.name: init for init in onnx.load(quantized).graph.initializer}
    weights = [init for name, init in initializers.items() if name.endswith("export_q")]
    assert len(weights) == len(quantized_layers(model))
    assert all(init.data_type == onnx.TensorProto.INT8 for init in weights)
    assert quantized.stat().st_size < 0.4 * plain.stat().st_size


def test_output_quantizers_only_where_no_quantized_input_follows() -> None:
    from lightning_compress.demos import SmallResNet
    from lightning_compress.quantization.fake_quant import layers_needing_output_quant, select_quantizable

    vgg = SmallVGG(width=8)
    names = select_quantizable(vgg, ["*"], [], "test")
    # the last conv feeds global pooling, the classifier the output; the rest feed ReLU -> (pool) -> conv
    assert layers_needing_output_quant(vgg, vgg.example_input_array, names) == {"features.17", "fc"}
    resnet = SmallResNet()
    need = layers_needing_output_quant(
        resnet, resnet.example_input_array, select_quantizable(resnet, ["*"], [], "t")
    )
    assert "layer1.0.conv2" in need  # feeds the residual add
    assert "layer1.0.conv1" not in need  # ReLU -> next conv


def test_qat_resnet_exports_every_conv_as_an_integer_kernel(tmp_path: Path) -> None:
    from lightning_compress.demos import SmallResNet

    pl.seed_everything(0)
    model = SmallResNet()
    cb = QuantizationAwareTraining(start=2)
    _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=6, limit_val_batches=0).fit(
        model, lc.demos.MNIST5kDataModule(batch_size=32)
    )
    assert cb.layers["layer1.0.conv2"].quantize_output
    assert not cb.layers["layer1.0.conv1"].quantize_output
    path = lc.export_onnx(model, model.example_input_array, tmp_path / "resnet.onnx")
    ops = optimized_ops(path)
    assert ops.count("QLinearConv") == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert not {"Conv", "FusedConv"} & set(ops)
    assert "QGemm" in ops
    x = torch.rand(6, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    # integer requantization in onnxruntime rounds a few values differently; 16 layers compound it
    np.testing.assert_allclose(_ort(path, x), expected, atol=0.05 * np.abs(expected).max())


def test_folded_batchnorms_are_rebound_by_name_when_the_strategy_replaces_them(tmp_path: Path) -> None:
    """sync_batchnorm=True swaps every BatchNorm for a SyncBatchNorm after the callbacks' setup."""

    class SwapBN(pl.Callback):
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            fresh = nn.BatchNorm2d(pl_module.features[1].num_features)
            fresh.load_state_dict(pl_module.features[1].state_dict())
            pl_module.features[1] = fresh  # what convert_sync_batchnorm does to each BatchNorm

    pl.seed_everything(0)
    model = SmallVGG(width=8)
    cb = QuantizationAwareTraining(start=0, freeze_bn_at=2)
    trainer = _trainer(tmp_path, [cb, SwapBN()], max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    trainer.fit(model, lc.demos.MNIST5kDataModule(batch_size=32))
    assert model.features[0].folded_bn is model.features[1]  # the live module, not the replaced one
    assert not model.features[1].training  # freeze_bn_at reached the live BatchNorm
