"""LowBitWeights (BinaryConnect / XNOR-Net, TWN, TTQ) and its functional kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_compress import GradualPruning
from lightning_compress.demos import DigitsDataModule, LeNet5
from lightning_compress.functional.lowbit import (
    binarize,
    binary_activation,
    ternarize_ttq,
    ternarize_twn,
    ttq_gradients,
    ttq_init_scales,
    twn_scale,
)
from lightning_compress.quantization.lowbit import LowBitWeights, add_binary_activations

TARGETS = ["conv2", "fc1", "fc2"]  # LeNet5 without its first (conv1) and last (fc3) layer
STEPS_PER_EPOCH = 23  # 1,438 training images / batch 64


def _trainer(callbacks: list[pl.Callback], tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 10,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "limit_val_batches": 0,
    }
    if tmp_path is not None:
        opts["default_root_dir"] = str(tmp_path)
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def _lenet(seed: int = 0) -> LeNet5:
    pl.seed_everything(seed, verbose=False)
    return LeNet5(image_size=8, lr=5e-3)


def _digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, seed=0)


def _fixed_loader() -> DataLoader:
    """The digits training split in a fixed order, so a resumed fit sees the same batches."""
    dm = _digits()
    dm.setup("fit")
    return DataLoader(dm.train_dataset, batch_size=64, shuffle=False)


def _weight(model: nn.Module, layer: str) -> Tensor:
    return model.get_parameter(f"{layer}.weight").detach()


def _fit(mode: str, **kwargs: Any) -> tuple[LeNet5, LowBitWeights, pl.Trainer, DigitsDataModule]:
    model, dm = _lenet(), _digits()
    cb = LowBitWeights(mode=mode, **kwargs)
    trainer = _trainer([cb])
    trainer.fit(model, datamodule=dm)
    return model, cb, trainer, dm


# ---------------------------------------------------------------------------- functional
def test_binarize_is_plus_minus_the_channel_mean_magnitude() -> None:
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    b = binarize(w)
    for c in range(6):
        alpha = w[c].abs().mean()
        assert torch.equal(b[c].abs().unique(), alpha.reshape(1))
        assert torch.equal(torch.sign(b[c]), torch.sign(w[c]))
    whole = binarize(w, per_channel=False)
    assert torch.equal(whole.abs().unique(), w.abs().mean().reshape(1))
    # An exact zero (a pruned weight) stays zero.
    w[0, 0, 0, 0] = 0.0
    assert binarize(w)[0, 0, 0, 0] == 0.0


def test_twn_threshold_and_scale_match_a_hand_computation() -> None:
    w = torch.tensor([0.1, -0.5, 0.9, -0.05, 0.3, -1.2], dtype=torch.float64)
    # mean|w| = 3.05 / 6; delta = 0.7 * that = 0.3558...; |w| > delta: 0.5, 0.9, 1.2 -> alpha = 2.6 / 3.
    delta, alpha = twn_scale(w)
    assert delta.item() == pytest.approx(0.7 * 3.05 / 6)
    assert alpha.item() == pytest.approx(2.6 / 3)
    a = 2.6 / 3
    torch.testing.assert_close(ternarize_twn(w), torch.tensor([0, -a, a, 0, 0, -a], dtype=torch.float64))
    # A larger factor moves 0.5 below the threshold: delta = 0.5083, alpha = 2.1 / 2.
    torch.testing.assert_close(
        ternarize_twn(w, delta_factor=1.0), torch.tensor([0, 0, 1.05, 0, 0, -1.05], dtype=torch.float64)
    )


def test_ttq_values_and_gradients_match_autograd() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=gen)
    t = 0.2
    wp, wn = ttq_init_scales(w, t)
    delta = t * w.abs().max()
    assert wp.item() == pytest.approx(w[w > delta].mean().item(), rel=1e-6)
    assert wn.item() == pytest.approx(-w[w < -delta].mean().item(), rel=1e-6)

    q = ternarize_ttq(w, wp, wn, t)
    assert set(q.unique().tolist()) == {-wn.item(), 0.0, wp.item()}
    assert torch.equal(q == 0, w.abs() <= delta)

    # Autograd through the ternary weights as a function of the two scales.
    wp_, wn_ = wp.clone().requires_grad_(), wn.clone().requires_grad_()
    upstream = torch.randn(32, 16, generator=gen)
    ((w > delta) * wp_ - (w < -delta) * wn_).mul(upstream).sum().backward()
    latent, g_p, g_n = ttq_gradients(w, upstream, wp, wn, t)
    torch.testing.assert_close(g_p, wp_.grad)
    torch.testing.assert_close(g_n, wn_.grad)
    scale = torch.where(w > delta, wp, torch.where(w < -delta, wn, torch.ones(())))
    torch.testing.assert_close(latent, upstream * scale)


def test_binary_activation_is_sign_with_hardtanh_straight_through() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    y = binary_activation(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    y.backward(torch.full_like(x, 3.0))
    assert x.grad.tolist() == [0.0, 3.0, 3.0, 3.0, 3.0, 0.0]


# ---------------------------------------------------------------------------- training on digits
def test_ternary_weights_on_digits_are_low_bit_and_accurate() -> None:
    model, cb, trainer, dm = _fit("ternary")
    assert cb.module_names == TARGETS
    assert cb.first_last == ["conv1", "fc3"]
    for layer in TARGETS:
        w = _weight(model, layer)
        values = w.unique()
        assert values.numel() <= 3
        alpha = values.abs().max()
        assert set(values.tolist()) <= {-alpha.item(), 0.0, alpha.item()}
        assert torch.equal(w, ternarize_twn(cb.shadow[f"{layer}.weight"]))  # deployed = Q(shadow)
    for layer in ("conv1", "fc3"):  # the first and last layer stay in floating point
        assert _weight(model, layer).unique().numel() == _weight(model, layer).numel()
    zeros = sum(int((_weight(model, n) == 0).sum()) for n in TARGETS)
    assert cb.zero_fraction == pytest.approx(zeros / sum(_weight(model, n).numel() for n in TARGETS))
    assert 0.2 < cb.zero_fraction < 0.7
    assert trainer.callback_metrics["lowbit/zero_fraction"].item() == pytest.approx(cb.zero_fraction)
    # Seeds 0-5 reach 0.91-0.97 test accuracy after 10 epochs (dense: 0.95-0.97); seed 0: 0.94.
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    assert acc > 0.85


def test_binary_weights_have_two_values_per_output_channel() -> None:
    model, cb, trainer, dm = _fit("binary")
    for layer in TARGETS:
        w = _weight(model, layer)
        shadow = cb.shadow[f"{layer}.weight"]
        assert shadow.abs().max() <= 1.0  # BinaryConnect clips the real-valued weights
        for c in range(w.shape[0]):
            assert w[c].unique().numel() <= 2
            assert torch.equal(w[c].abs().unique(), shadow[c].abs().mean().reshape(1))
    assert _weight(model, "fc3").unique().numel() == _weight(model, "fc3").numel()
    # Seeds 0-3: 0.93-0.94.
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"] > 0.8


def test_ttq_learns_its_scales() -> None:
    model, cb, trainer, dm = _fit("ttq")
    for layer in TARGETS:
        name = f"{layer}.weight"
        w, (wp, wn) = _weight(model, layer), cb.scales[name].tolist()
        assert set(w.unique().tolist()) <= {-wn, 0.0, wp}
        assert w.unique().numel() == 3
        start = ttq_init_scales(_weight(_lenet(), layer), cb.ttq_threshold)
        assert (wp, wn) != pytest.approx([s.item() for s in start], rel=1e-3)  # learned
        assert cb.scale_steps[name] == 10 * STEPS_PER_EPOCH
    # Seeds 0-3: 0.95-0.96.
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"] > 0.85


def test_the_optimizer_steps_the_shadow_with_the_gradient_at_the_low_bit_weights(tmp_path: Path) -> None:
    seen: dict[str, Tensor] = {}

    class Spy(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            seen["forward"] = pl_module.fc1.weight.detach().clone()
            seen["shadow"] = cb.shadow["fc1.weight"].clone()

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            seen["grad"] = pl_module.fc1.weight.grad.clone()

    class PlainSGD(LeNet5):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pl.seed_everything(0, verbose=False)
    model, cb = PlainSGD(image_size=8), LowBitWeights(mode="ternary")
    _trainer([cb, Spy()], tmp_path, max_steps=1).fit(model, _fixed_loader())
    # The first forward already used ternary weights; the gradient was taken there.
    assert seen["forward"].unique().numel() == 3
    assert torch.equal(seen["forward"], ternarize_twn(seen["shadow"]))
    torch.testing.assert_close(cb.shadow["fc1.weight"], seen["shadow"] - 0.1 * seen["grad"])
    assert torch.equal(model.fc1.weight.detach(), ternarize_twn(cb.shadow["fc1.weight"]))


def test_weights_stay_float_until_start(tmp_path: Path) -> None:
    counts: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            counts.append(int(pl_module.fc1.weight.unique().numel()))

    cb = LowBitWeights(mode="ternary", start=5)
    _trainer([cb, Spy()], tmp_path, max_steps=8).fit(_lenet(), _fixed_loader())
    assert all(c > 7000 for c in counts[:5])  # float (7,680 weights)
    assert counts[5:] == [3, 3, 3]
    assert cb.step_schedule.start_step == 5


def test_first_and_last_layers_follow_execution_order_not_registration() -> None:
    class Reversed(pl.LightningModule):
        def __init__(self, example: bool = True) -> None:
            super().__init__()
            self.head = nn.Linear(8, 2)  # registered first, called last
            self.mid = nn.Linear(8, 8)
            self.stem = nn.Linear(4, 8)  # registered last, called first
            self.example_input_array = torch.zeros(1, 4) if example else None

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))

    for example, first_last in ((True, ["stem", "head"]), (False, ["head", "stem"])):
        model = Reversed(example)
        model.train()
        cb = LowBitWeights()
        trainer = _trainer([cb])
        cb.setup(trainer, model, "fit")
        assert cb.first_last == first_last
        assert cb.module_names == ["mid"]
        assert all(m.training for m in model.modules())  # the trace restored train mode


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mode", ["binary", "ternary", "ttq"])
def test_resume_equals_an_uninterrupted_fit(tmp_path: Path, mode: str) -> None:
    reference = LowBitWeights(mode=mode)
    ref_model = _lenet()
    _trainer([reference], tmp_path / "ref", max_epochs=4).fit(ref_model, _fixed_loader())

    first = LowBitWeights(mode=mode)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer([first, ckpt], tmp_path / "a", max_epochs=2, enable_checkpointing=True).fit(
        _lenet(), _fixed_loader()
    )
    resumed, model = LowBitWeights(mode=mode), _lenet(seed=1)  # a fresh, differently initialised model
    _trainer([resumed], tmp_path / "b", max_epochs=4).fit(
        model, _fixed_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), p, rtol=0, atol=1e-6)
    assert resumed.shadow.keys() == reference.shadow.keys()
    for name, shadow in reference.shadow.items():
        torch.testing.assert_close(resumed.shadow[name], shadow, rtol=0, atol=1e-6)
    for name, scales in reference.scales.items():
        torch.testing.assert_close(resumed.scales[name], scales, rtol=0, atol=1e-6)
    assert resumed.scale_steps == reference.scale_steps


def test_checkpoint_loads_low_bit_weights_into_the_plain_module(tmp_path: Path) -> None:
    model, cb = _lenet(), LowBitWeights(mode="ttq")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer([cb, ckpt], tmp_path, max_epochs=2, enable_checkpointing=True).fit(model, _fixed_loader())
    path = tmp_path / "last.ckpt"
    raw = torch.load(path, weights_only=True)  # callback state is plain tensors and numbers
    assert set(raw["state_dict"]) == set(model.state_dict())
    loaded = LeNet5.load_from_checkpoint(path)
    for layer in TARGETS:
        w = _weight(loaded, layer)
        assert w.unique().numel() == 3
        assert torch.equal(w, _weight(model, layer))


# ---------------------------------------------------------------------------- composition
def test_ternary_with_gradual_pruning_keeps_pruned_weights_zero() -> None:
    model, dm = _lenet(), _digits()
    low = LowBitWeights(mode="ternary")
    prune = GradualPruning(
        target_sparsity=0.7, end=0.5, frequency=10, scope="local", exclude=["conv1", "fc3"]
    )
    trainer = _trainer([low, prune])
    trainer.fit(model, datamodule=dm)
    assert prune.masks.names == [f"{n}.weight" for n in TARGETS]
    for name in prune.masks.names:
        w, keep = model.get_parameter(name).detach(), prune.masks[name]
        assert torch.all(w[~keep] == 0)
        assert torch.all(low.shadow[name][~keep] == 0)  # the shadow is masked too
        assert w.unique().numel() <= 3
        assert (w == 0).float().mean() >= 0.7 - 1e-3
    # Seeds 0-2: 0.81-0.92.
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"] > 0.7


def test_binary_activations_binarise_layer_inputs_and_still_train() -> None:
    model, cb, trainer, dm = _fit("binary", binary_activations=True)
    assert cb.activation_layers == TARGETS
    inputs: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: inputs.__setitem__(name, args[0])
        )
        for name in ["conv1", *TARGETS]
    ]
    x = dm.test_dataset.tensors[0][:32]
    model.eval()
    with torch.no_grad():
        binarised = model(x)
    for name in TARGETS:
        assert set(inputs[name].unique().tolist()) == {-1.0, 1.0}, name
    assert inputs["conv1"].unique().numel() > 2  # the network input is left alone
    for handle in handles:
        handle.remove()
    cb.remove_activation_hooks()
    with torch.no_grad():
        assert not torch.allclose(model(x), binarised)
        add_binary_activations(model, cb.activation_layers)
        torch.testing.assert_close(model(x), binarised)
    # Seeds 0-1 reach 0.77-0.85 (binary weights and activations); chance is 0.1.
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"] > 0.5


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "int8"}, r"`mode`='int8' is not supported; expected one of \['binary', 'ternary', 'ttq'\]"),
        (
            {"mode": "ttq", "ttq_threshold": 0.0},
            r"`ttq_threshold`=0\.0 is not supported; expected a number in \(0, 1\)",
        ),
        (
            {"mode": "ttq", "ttq_threshold": 1.0},
            r"`ttq_threshold`=1\.0 is not supported; expected a number in \(0, 1\)",
        ),
        (
            {"mode": "ttq", "scale_lr": -1e-3},
            r"`scale_lr`=-0\.001 is not supported; expected a number in \(0, inf\)",
        ),
        ({"delta_factor": 0}, r"`delta_factor`=0 is not supported; expected a number in \(0, inf\)"),
        ({"start": -1}, r"`start`=-1 is a negative step; expected an int >= 0"),
        ({"start": 1.5}, r"`start`=1\.5 is a float outside \[0, 1\]"),
        (
            {"exclude_first_last": "yes"},
            r"`exclude_first_last`='yes' is not supported; expected true or false",
        ),
        ({"binary_activations": 1}, r"`binary_activations`=1 is not supported; expected true or false"),
        (
            {"mode": "binary", "per_channel": None},
            r"`per_channel`=None is not supported; expected true or false",
        ),
        ({"targets": "fc1"}, r"`targets`='fc1' is not supported; expected a list of fnmatch patterns"),
        (
            {"mode": "ternary", "ttq_threshold": 0.1},
            r"`ttq_threshold`=0\.1 only applies with mode='ttq', but `mode`='ternary'",
        ),
        (
            {"mode": "binary", "delta_factor": 0.5},
            r"`delta_factor`=0\.5 only applies with mode='ternary', but `mode`='binary'",
        ),
        (
            {"mode": "ttq", "per_channel": False},
            r"`per_channel`=False only applies with mode='binary', but `mode`='ttq'",
        ),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LowBitWeights(**kwargs)


def test_nothing_left_after_excluding_first_and_last_is_refused() -> None:
    class TwoLayers(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.fc1(x))

    with pytest.raises(
        ValueError, match=r"every targeted layer \(\['fc1', 'fc2'\]\) is the network's first or last"
    ):
        LowBitWeights().setup(_trainer([]), TwoLayers(), "fit")
    cb = LowBitWeights(exclude_first_last=False)
    cb.setup(_trainer([cb]), TwoLayers(), "fit")
    assert cb.module_names == ["fc1", "fc2"]


def test_resuming_with_another_mode_is_refused() -> None:
    state = LowBitWeights(mode="binary").state_dict()
    with pytest.raises(ValueError, match=r"trained with mode='binary', but `mode`='ternary'"):
        LowBitWeights(mode="ternary").load_state_dict(state)


def test_a_structure_change_requantizes_the_sliced_shadow_at_once(tmp_path: Path) -> None:
    """After channels are removed, the weights are the ternarized sliced shadow before the next step."""
    from battery import MLP, ShrinkHidden, tiny_data
    from battery import trainer as battery_trainer

    from lightning_compress.functional.lowbit import ternarize_twn

    seen: list[bool] = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if shrink.done and not seen:
                w = pl_module.fc2.weight.detach()
                seen.append(torch.equal(w, ternarize_twn(lowbit.shadow["fc2.weight"])))

    pl.seed_everything(0)
    shrink = ShrinkHidden(at=6)
    lowbit = LowBitWeights(mode="ternary", targets=["fc2"], exclude_first_last=False)
    battery_trainer(tmp_path, [shrink, lowbit, Check()], max_epochs=2).fit(MLP(), tiny_data())
    assert seen == [True]
