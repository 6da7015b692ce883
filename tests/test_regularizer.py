"""SparsityRegularizer: penalty gradients, schedule, optimizers, AMP, composition, resume, logging."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import MLP, ShrinkHidden, tiny_data, trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from lightning_compress.pruning.gradual import GradualPruning
from lightning_compress.pruning.regularizer import SparsityRegularizer

WEIGHTS = ["conv.weight", "fc1.weight", "fc2.weight"]
GROUP_DIMS = {"output": (0,), "input": (1,), "both": (0, 1)}


def explicit_penalty(
    model: nn.Module,
    l1: float = 0.0,
    group_lasso: float = 0.0,
    groups: str = "output",
    scale_by_size: bool = True,
    names: list[str] = WEIGHTS,
) -> Tensor:
    """The penalty written out by hand (its autograd gradient is the reference)."""
    total = torch.zeros((), device=model.get_parameter(names[0]).device)
    for name in names:
        w = model.get_parameter(name).float()
        if l1:
            total = total + l1 * w.abs().sum()
        if group_lasso:
            for dim in GROUP_DIMS[groups]:
                rows = w.transpose(0, dim).reshape(w.shape[dim], -1)  # one row per group
                c = math.sqrt(rows.shape[1]) if scale_by_size else 1.0
                total = total + group_lasso * c * rows.norm(dim=1).sum()
    return total


class Net(pl.LightningModule):
    """Conv + two Linear layers; ``penalty(model)`` (if given) is added to the loss."""

    def __init__(
        self, penalty: Callable[[nn.Module], Tensor] | None = None, optimizer: str = "sgd", lr: float = 0.1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 4)
        self.penalty, self.optimizer, self.lr = penalty, optimizer, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.penalty is not None:
            with torch.autocast("cpu", enabled=False):  # the reference penalty in fp32, as the callback's
                loss = loss + self.penalty(self)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TwoOptimizerNet(Net):
    """Manual optimization: the convolution has one optimizer, the Linear layers another."""

    def __init__(self, penalty: Callable[[nn.Module], Tensor] | None = None) -> None:
        super().__init__(penalty)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(self.loss(batch))
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> Any:
        linear = [*self.fc1.parameters(), *self.fc2.parameters()]
        return torch.optim.SGD(self.conv.parameters(), lr=0.1), torch.optim.Adam(linear, lr=0.01)


def _pair(cls: type[Net] = Net, penalty: Callable[[nn.Module], Tensor] | None = None, **kwargs: Any):
    """Two identically initialised models: the second adds ``penalty`` to its loss."""
    torch.manual_seed(0)
    a = cls(**kwargs)
    b = cls(penalty, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def _assert_same_weights(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for name, p in a.named_parameters():
        torch.testing.assert_close(p, b.get_parameter(name), msg=name, **tol)


CASES = [
    pytest.param({"l1": 0.02}, id="l1"),
    pytest.param({"group_lasso": 0.02, "groups": "output"}, id="gl-output"),
    pytest.param({"group_lasso": 0.02, "groups": "input"}, id="gl-input"),
    pytest.param({"group_lasso": 0.02, "groups": "both"}, id="gl-both"),
    pytest.param({"l1": 0.01, "group_lasso": 0.02, "groups": "both", "scale_by_size": False}, id="sparse-gl"),
]


@pytest.mark.parametrize("args", CASES)
def test_penalty_gradient_equals_autograd_of_the_penalty(tmp_path: Path, args: dict[str, Any]) -> None:
    reg_model, ref_model = _pair(penalty=lambda m: explicit_penalty(m, **args))
    trainer(tmp_path / "a", [SparsityRegularizer(**args)], max_steps=1).fit(reg_model, tiny_data())
    trainer(tmp_path / "b", [], max_steps=1).fit(ref_model, tiny_data())
    _assert_same_weights(reg_model, ref_model)
    plain, _ = _pair()
    trainer(tmp_path / "c", [], max_steps=1).fit(plain, tiny_data())
    for name in WEIGHTS:  # the penalty mattered: a visible difference from the plain step
        assert (plain.get_parameter(name) - reg_model.get_parameter(name)).abs().max() > 1e-3, name
    for name in ("conv.bias", "fc1.bias", "fc2.bias"):  # biases are never regularized
        assert torch.equal(plain.get_parameter(name), reg_model.get_parameter(name)), name


def test_adamw_and_targets_several_steps_match_the_explicit_penalty(tmp_path: Path) -> None:
    args = {"l1": 0.01, "group_lasso": 0.01, "groups": "output"}
    reg_model, ref_model = _pair(
        penalty=lambda m: explicit_penalty(m, **args, names=["conv.weight", "fc1.weight"]),
        optimizer="adamw",
        lr=0.01,
    )
    cb = SparsityRegularizer(**args, exclude=["fc2"])
    trainer(tmp_path / "a", [cb], max_steps=6).fit(reg_model, tiny_data())
    trainer(tmp_path / "b", [], max_steps=6).fit(ref_model, tiny_data())
    assert cb.param_names == ["conv.weight", "fc1.weight"]
    _assert_same_weights(reg_model, ref_model, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_adds_the_penalty_once_per_optimizer_step(tmp_path: Path) -> None:
    args = {"l1": 0.01, "group_lasso": 0.02, "groups": "both"}
    reg_model, ref_model = _pair(penalty=lambda m: explicit_penalty(m, **args))
    kw = {"max_steps": 3, "accumulate_grad_batches": 2}  # Lightning averages the accumulated losses
    trainer(tmp_path / "a", [SparsityRegularizer(**args)], **kw).fit(reg_model, tiny_data())
    trainer(tmp_path / "b", [], **kw).fit(ref_model, tiny_data())
    _assert_same_weights(reg_model, ref_model)


def test_two_optimizers_in_manual_optimization(tmp_path: Path) -> None:
    args = {"l1": 0.01, "group_lasso": 0.02, "groups": "input"}
    reg_model, ref_model = _pair(TwoOptimizerNet, penalty=lambda m: explicit_penalty(m, **args))
    trainer(tmp_path / "a", [SparsityRegularizer(**args)], max_steps=6).fit(reg_model, tiny_data())
    trainer(tmp_path / "b", [], max_steps=6).fit(ref_model, tiny_data())
    # Each optimizer's parameters got their penalty exactly once per step.
    _assert_same_weights(reg_model, ref_model, rtol=1e-4, atol=1e-5)


def test_bf16_mixed_on_cpu(tmp_path: Path) -> None:
    args = {"l1": 0.01, "group_lasso": 0.02, "groups": "output"}
    reg_model, ref_model = _pair(penalty=lambda m: explicit_penalty(m, **args))
    kw = {"max_steps": 3, "precision": "bf16-mixed"}
    trainer(tmp_path / "a", [SparsityRegularizer(**args)], **kw).fit(reg_model, tiny_data())
    trainer(tmp_path / "b", [], **kw).fit(ref_model, tiny_data())
    _assert_same_weights(reg_model, ref_model, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-bit AMP with a GradScaler needs CUDA")
def test_fp16_amp_gradients_are_unscaled_first(tmp_path: Path) -> None:
    args = {"l1": 0.01, "group_lasso": 0.02, "groups": "both"}
    reg_model, ref_model = _pair(penalty=lambda m: explicit_penalty(m, **args))
    kw = {"max_steps": 3, "precision": "16-mixed", "accelerator": "cuda", "deterministic": False}
    trainer(tmp_path / "a", [SparsityRegularizer(**args)], **kw).fit(reg_model, tiny_data())
    trainer(tmp_path / "b", [], **kw).fit(ref_model, tiny_data())
    _assert_same_weights(reg_model, ref_model, rtol=1e-3, atol=1e-4)


def _fit_mlp(tmp_path: Path, callbacks: list[pl.Callback], epochs: int = 8) -> MLP:
    pl.seed_everything(0)
    model = MLP(lr=0.05)
    trainer(tmp_path, callbacks, max_epochs=epochs).fit(model, tiny_data())
    return model


def test_l1_drives_many_weights_to_zero(tmp_path: Path) -> None:
    plain = _fit_mlp(tmp_path / "plain", [])
    model = _fit_mlp(tmp_path / "l1", [SparsityRegularizer(l1=1e-2)])
    for name in ("fc1.weight", "fc2.weight"):
        near_zero = (model.get_parameter(name).abs() < 1e-3).float().mean().item()
        plain_near_zero = (plain.get_parameter(name).abs() < 1e-3).float().mean().item()
        assert near_zero > 0.35, (name, near_zero)
        assert plain_near_zero < 0.05, (name, plain_near_zero)


def test_group_lasso_drives_whole_rows_to_zero(tmp_path: Path) -> None:
    plain = _fit_mlp(tmp_path / "plain", [])
    model = _fit_mlp(tmp_path / "gl", [SparsityRegularizer(group_lasso=3e-3, groups="output")])
    rows = model.fc1.weight.detach().norm(dim=1)
    plain_rows = plain.fc1.weight.detach().norm(dim=1)
    assert plain_rows.min() > 0.5
    assert int((rows < 0.1).sum()) >= 8, rows  # of 32 neurons, at least a quarter nearly removed
    # Input groups: whole columns of fc1 (input features) instead.
    model = _fit_mlp(tmp_path / "gl-in", [SparsityRegularizer(group_lasso=3e-3, groups="input")])
    cols = model.fc1.weight.detach().norm(dim=0)
    assert plain.fc1.weight.detach().norm(dim=0).min() > 0.2
    assert int((cols < 0.1).sum()) >= 30, cols  # of 144 input features


def _resolved(cb: SparsityRegularizer, total: int = 100) -> SparsityRegularizer:
    for sched in cb.schedules():
        sched.resolve(total, cb.name)
    return cb


def test_schedule_ramps_from_zero_at_start_to_one_at_end() -> None:
    const = _resolved(SparsityRegularizer(l1=1.0, start=10))
    assert [const.multiplier(t) for t in (0, 9, 10, 11, 99)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    lin = _resolved(SparsityRegularizer(l1=1.0, schedule="linear", start=10, end=30))
    assert [lin.multiplier(t) for t in (0, 9, 10, 15, 20, 29, 30, 80)] == [0, 0, 0, 0.25, 0.5, 0.95, 1, 1]
    held = _resolved(SparsityRegularizer(l1=1.0, schedule="linear", start=10, end=30, frequency=4))
    assert [held.multiplier(t) for t in (10, 13, 14, 17, 18, 29, 30)] == [0, 0, 0.2, 0.2, 0.4, 0.8, 1]
    for name in ("cubic", "exponential", "polynomial"):
        cb = _resolved(SparsityRegularizer(l1=1.0, schedule=name, start=0.1, end=0.5))
        values = [cb.multiplier(t) for t in range(100)]
        assert values[:11] == [0.0] * 11, name
        assert values[50:] == [1.0] * 50, name
        assert values == sorted(values), name
        assert values[30] > 0.8, name  # halfway: above the linear ramp's 0.5


def test_schedule_in_training_before_start_changes_nothing(tmp_path: Path) -> None:
    seen: list[tuple[int, float]] = []

    class Spy(SparsityRegularizer):
        def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
            super().begin_step(trainer, pl_module, step)
            seen.append((step, self._strength.l1))

    late, plain = _pair()
    trainer(tmp_path / "a", [Spy(l1=0.5, schedule="linear", start=4, end=8)], max_steps=4).fit(
        late, tiny_data()
    )
    trainer(tmp_path / "b", [], max_steps=4).fit(plain, tiny_data())
    for name, p in plain.named_parameters():  # multiplier 0 before start: bit-identical
        assert torch.equal(p, late.get_parameter(name)), name
    seen.clear()
    model, _ = _pair()
    trainer(tmp_path / "c", [Spy(l1=0.5, schedule="linear", start=4, end=8)], max_steps=12).fit(
        model, tiny_data()
    )
    assert seen == [(t, 0.5 * min(max((t - 4) / 4, 0.0), 1.0)) for t in range(12)]


def test_composes_with_gradual_pruning(tmp_path: Path) -> None:
    def fit(callbacks: list[pl.Callback]) -> MLP:
        return _fit_mlp(tmp_path / str(len(os.listdir(tmp_path))), callbacks, epochs=6)

    prune_args = {"target_sparsity": 0.6, "end": 24, "frequency": 4}
    alone = fit([GradualPruning(**prune_args)])
    gp = GradualPruning(**prune_args)
    both = fit([SparsityRegularizer(l1=3e-3), gp])
    gp2 = GradualPruning(**prune_args)
    swapped = fit([gp2, SparsityRegularizer(l1=3e-3)])
    for name, p in both.named_parameters():  # phases, not callback order, decide
        assert torch.equal(p, swapped.get_parameter(name)), name
    assert gp.sparsity == pytest.approx(0.6, abs=1e-3)
    kept_l1, alone_l1 = 0.0, 0.0
    for name in gp.masks.names:
        mask, w = gp.masks[name], both.get_parameter(name).detach()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), name  # pruned stay exactly zero
        kept_l1 += w[mask].abs().sum().item()
        alone_l1 += alone.get_parameter(name).detach().abs().sum().item()
    assert kept_l1 < 0.8 * alone_l1  # the regularizer shrank the kept weights


class _Crash(pl.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch and args[-1] == self.batch:
            raise RuntimeError("simulated crash")


def test_crash_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    def make() -> SparsityRegularizer:  # the ramp spans the resume point (step 16)
        return SparsityRegularizer(
            l1=2e-3, group_lasso=2e-3, schedule="linear", start=0.1, end=0.8, frequency=3
        )

    ref_cb = make()
    ref = _fit_mlp(tmp_path / "ref", [ref_cb], epochs=4)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1, save_on_train_epoch_end=True
    )
    pl.seed_everything(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", [make(), ckpt, _Crash(2, 3)], enable_checkpointing=True).fit(
            MLP(lr=0.05), tiny_data()
        )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["callbacks"][ref_cb.state_key] == {
        "schedule": {"start_step": 3, "end_step": 26, "total": 32.0}
    }
    pl.seed_everything(0)
    resumed_cb, model = make(), MLP(lr=0.05)
    trainer(tmp_path / "b", [resumed_cb]).fit(
        model, tiny_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed_cb.state_dict() == ref_cb.state_dict()
    for name, p in ref.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name


def test_penalty_is_logged_on_logging_steps(tmp_path: Path) -> None:
    cb = SparsityRegularizer(l1=1e-3, group_lasso=2e-3, groups="both", schedule="linear", start=0, end=16)
    logger = CSVLogger(tmp_path, name="run")
    pl.seed_everything(0)
    model = MLP(lr=0.05)
    tr = trainer(tmp_path, [cb], logger=logger, log_every_n_steps=4)
    tr.fit(model, tiny_data())  # 32 steps: the last step (global_step 32) is a logging step
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    expected = {
        "regularizer/l1": explicit_penalty(model, l1=1e-3, names=names),
        "regularizer/group_lasso": explicit_penalty(model, group_lasso=2e-3, groups="both", names=names),
        "regularizer/multiplier": torch.tensor(1.0),
    }
    expected["regularizer/penalty"] = expected["regularizer/l1"] + expected["regularizer/group_lasso"]
    for key, value in expected.items():
        torch.testing.assert_close(tr.callback_metrics[key], value.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(tr.logged_metrics[key], value.detach(), rtol=1e-5, atol=0)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("regularizer/multiplier")]
    assert [int(r["step"]) for r in rows] == [3, 7, 11, 15, 19, 23, 27, 31]
    # The multiplier of training step t on the linear ramp from step 0 to 16 is t / 16.
    assert [float(r["regularizer/multiplier"]) for r in rows] == [min(t / 16, 1.0) for t in range(3, 32, 4)]


def test_only_the_l1_term_is_logged_without_group_lasso(tmp_path: Path) -> None:
    tr = trainer(tmp_path, [SparsityRegularizer(l1=1e-3)], max_steps=4, log_every_n_steps=2)
    tr.fit(MLP(), tiny_data())
    keys = {k for k in tr.callback_metrics if k.startswith("regularizer/")}
    assert keys == {"regularizer/l1", "regularizer/penalty", "regularizer/multiplier"}


def test_follows_structure_changes(tmp_path: Path) -> None:
    cb = SparsityRegularizer(group_lasso=1e-3)
    pl.seed_everything(0)
    model = MLP()
    trainer(tmp_path, [ShrinkHidden(at=10), cb], max_epochs=3).fit(model, tiny_data())
    assert model.fc1.weight.shape == (16, 144)
    assert model.fc2.weight.shape == (16, 16)
    assert cb.param_names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(p is model.get_parameter(n) for p, n in zip(cb._params, cb.param_names))


def test_replaced_parameter_is_refused(tmp_path: Path) -> None:
    class Swap(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 2:
                pl_module.fc1.weight = nn.Parameter(pl_module.fc1.weight.detach().clone())

    with pytest.raises(RuntimeError, match=r"SparsityRegularizer: parameter 'fc1.weight' was replaced"):
        trainer(tmp_path, [SparsityRegularizer(l1=1e-3), Swap()], max_steps=4).fit(MLP(), tiny_data())


def test_two_instances_keep_separate_checkpoint_state() -> None:
    a, b = SparsityRegularizer(l1=1e-3), SparsityRegularizer(group_lasso=1e-3)
    assert a.state_key != b.state_key


def test_no_matching_layer_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"SparsityRegularizer: no layer matches targets=\['encoder\.\*'\]"):
        trainer(tmp_path, [SparsityRegularizer(l1=1.0, targets=["encoder.*"])]).fit(MLP(), tiny_data())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"l1": -1.0}, "`l1`=-1.0 is not supported; expected a number in [0, inf)."),
        ({"l1": float("inf")}, "`l1`=inf is not supported; expected a number in [0, inf)."),
        ({"l1": True}, "`l1`=True is not supported; expected a number in [0, inf)."),
        ({"group_lasso": "0.1"}, "`group_lasso`='0.1' is not supported; expected a number in [0, inf)."),
        (
            {},
            "`l1`=0.0 and `group_lasso`=0.0 are both 0, so there is no penalty; expected at least one of "
            "them > 0 (l1 for unstructured sparsity, group_lasso for whole rows / channels).",
        ),
        (
            {"l1": 0, "group_lasso": 0.0},
            "`l1`=0 and `group_lasso`=0.0 are both 0, so there is no penalty; expected at least one of "
            "them > 0 (l1 for unstructured sparsity, group_lasso for whole rows / channels).",
        ),
        (
            {"l1": 1.0, "groups": "rows"},
            "`groups`='rows' is not supported; expected one of ['output', 'input', 'both'].",
        ),
        (
            {"l1": 1.0, "schedule": "step"},
            "`schedule`='step' is not supported; expected one of "
            "['constant', 'linear', 'cubic', 'exponential', 'polynomial'].",
        ),
        (
            {"l1": 1.0, "schedule": "linear"},
            "`end`=None is not supported with `schedule`='linear'; expected an int step or a float fraction "
            "of training at which the full strength is reached (or schedule='constant').",
        ),
        ({"l1": 1.0, "start": -1}, "`start`=-1 is a negative step; expected an int >= 0."),
        (
            {"l1": 1.0, "schedule": "linear", "start": 10, "end": 5},
            "`end`=5 is before `start`=10; expected end >= start.",
        ),
        (
            {"l1": 1.0, "end": 1.5},
            "`end`=1.5 is a float outside [0, 1]; floats are fractions of training, use an int for an "
            "absolute optimizer step.",
        ),
        ({"l1": 1.0, "frequency": 0}, "`frequency`=0 is not supported; expected an int >= 1."),
        ({"l1": 1.0, "eps": 0.0}, "`eps`=0.0 is not supported; expected a number > 0."),
        ({"l1": 1.0, "power": -2}, "`power`=-2 is not supported; expected a number > 0."),
        ({"l1": 1.0, "scale_by_size": 1}, "`scale_by_size`=1 is not supported; expected true or false."),
        (
            {"l1": 1.0, "include_embeddings": "no"},
            "`include_embeddings`='no' is not supported; expected true or false.",
        ),
        (
            {"l1": 1.0, "targets": "fc1"},
            "`targets`='fc1' is not supported; expected a list of fnmatch patterns over module names",
        ),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SparsityRegularizer(**kwargs)
