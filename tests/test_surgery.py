"""core/surgery.py: shape changes mid-training, optimizer / scheduler carry-over, recipes, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import MLP, ShrinkHidden, tiny_data, trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

import lightning_compress as lc
from lightning_compress.core.surgery import apply_ops, register_module_class, validate_ops


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


class ChangeAt(pl.Callback):
    """Applies ``ops`` through the engine at the end of the batch of training step ``at``."""

    def __init__(self, at: int, ops: list[dict[str, Any]]) -> None:
        self.at, self.ops = at, ops
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.changes: list[lc.StructureChange] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.at:
            return
        self.before = _training_state(trainer, pl_module)
        engine = lc.get_engine(trainer)
        self.changes = engine.change_structure(trainer, pl_module, self.ops, "test")
        self.after = _training_state(trainer, pl_module)


def _training_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    opt = trainer.optimizers[0]
    return {
        "state": {n: _copy(opt.state[p]) for n, p in pl_module.named_parameters() if p in opt.state},
        "lr": [g["lr"] for g in opt.param_groups],
        "sched": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
        "opt": opt,
    }


KEEP = [1, 3, 4, 8, 9, 20, 31]


def _shrink_ops(prefix: str = "") -> list[dict[str, Any]]:
    return [
        {"op": "slice", "tensor": f"{prefix}fc1.weight", "dim": 0, "index": KEEP},
        {"op": "slice", "tensor": f"{prefix}fc1.bias", "dim": 0, "index": KEEP},
        {"op": "slice", "tensor": f"{prefix}fc2.weight", "dim": 1, "index": KEEP},
    ]


@pytest.mark.parametrize("optimizer", ["sgd-steplr", "adam"])
def test_optimizer_state_follows_the_surviving_entries(tmp_path: Path, optimizer: str) -> None:
    # A compression callback is needed for the engine to exist: a pruning pass on fc3 only.
    probe = ChangeAt(at=10, ops=_shrink_ops())
    model = MLP(optimizer=optimizer)
    tr = trainer(tmp_path, [lc.GradualPruning(target_sparsity=0.5, targets=["fc3"], start=0, end=4), probe])
    tr.fit(model, tiny_data())
    assert model.fc1.weight.shape == (7, 144)
    assert model.fc1.out_features == 7
    assert model.fc2.weight.shape == (16, 7)
    assert model.fc2.in_features == 7
    before, after = probe.before["state"], probe.after["state"]
    assert probe.after["opt"] is not probe.before["opt"]
    keep = torch.tensor(KEEP)
    for key, value in before["fc1.weight"].items():
        if isinstance(value, Tensor) and value.shape == (32, 144):
            torch.testing.assert_close(after["fc1.weight"][key], value[keep], rtol=0, atol=0)
        else:  # Adam's step count and other scalars are carried as they are
            torch.testing.assert_close(torch.as_tensor(after["fc1.weight"][key]), torch.as_tensor(value))
    for key, value in before["fc2.weight"].items():
        if isinstance(value, Tensor) and value.shape == (16, 32):
            torch.testing.assert_close(after["fc2.weight"][key], value[:, keep], rtol=0, atol=0)
    for key, value in before["fc3.weight"].items():  # untouched parameters keep their state as is
        torch.testing.assert_close(torch.as_tensor(after["fc3.weight"][key]), torch.as_tensor(value))
    assert probe.after["lr"] == probe.before["lr"]
    assert probe.after["sched"] == probe.before["sched"]
    if optimizer == "sgd-steplr":  # StepLR(8, 0.5): halved at step 8, 16, 24 -> position was kept
        assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)
    kinds = {(c.old_name, c.new_name): c.kept for c in probe.changes}
    assert kinds[("fc1.weight", "fc1.weight")] == {0: KEEP}
    assert kinds[("fc2.weight", "fc2.weight")] == {1: KEEP}


def test_masks_follow_a_structure_change(tmp_path: Path) -> None:
    gp = lc.GradualPruning(target_sparsity=0.6, targets=["fc1", "fc2"], start=0, end=6, frequency=2)
    probe = ChangeAt(at=10, ops=_shrink_ops())
    model = MLP()
    trainer(tmp_path, [gp, probe], max_epochs=2).fit(model, tiny_data())
    assert gp.masks["fc1.weight"].shape == (7, 144)
    assert gp.masks["fc2.weight"].shape == (16, 7)
    for name in ("fc1.weight", "fc2.weight"):
        assert not model.get_parameter(name)[~gp.masks[name]].any()


def test_invalid_ops_change_nothing() -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ops = [
        {"op": "slice", "tensor": "fc1.weight", "dim": 0, "index": [0, 1]},
        {"op": "slice", "tensor": "fc2.weight", "dim": 1, "index": [0, 40]},  # 40 is out of range
    ]
    with pytest.raises(
        ValueError, match=r"'index' for 'fc2.weight' dim 1 must be a non-empty list of ints in \[0, 32\)"
    ):
        apply_ops(model, ops)
    assert model.fc1.weight.shape == (32, 144)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    bad = [
        ({"op": "grow"}, r"expected a dict with 'op' in \['slice', 'replace', 'add_bias'\]"),
        ({"op": "add_bias", "module": "relu"}, r"'add_bias' needs the name of a Linear or Conv layer"),
        ({"op": "slice", "tensor": "fc9.weight", "dim": 0, "index": [0]}, r"no module 'fc9'"),
        (
            {"op": "slice", "tensor": "fc1.scale", "dim": 0, "index": [0]},
            r"'fc1.scale' is neither a parameter",
        ),
        ({"op": "slice", "tensor": "fc1.weight", "dim": 2, "index": [0]}, r"dim 2 is out of range"),
        ({"op": "slice", "tensor": "fc1.weight", "dim": 0, "index": [3, 1]}, r"must be strictly increasing"),
        (
            {"op": "replace", "module": "fc1", "class_path": "os.system"},
            r"class 'os.system' is not registered",
        ),
    ]
    for op, match in bad:
        with pytest.raises(ValueError, match=match):
            validate_ops(model, [op])


@register_module_class
class ScaledLinear(nn.Module):
    """A module swap that keeps the old Linear's Parameter objects (so the optimizer stays valid)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.register_buffer("scale", torch.tensor(scale))

    @classmethod
    def from_module(cls, old: nn.Linear, scale: float = 1.0) -> ScaledLinear:
        new = cls(old.in_features, old.out_features, scale)
        new.weight, new.bias = old.weight, old.bias  # the same Parameter objects
        return new

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias) * self.scale


def test_replace_keeps_parameters_and_the_optimizer_and_reloads(tmp_path: Path) -> None:
    op = {
        "op": "replace",
        "module": "fc2",
        "class_path": f"{__name__}.ScaledLinear",
        "init_args": {"scale": 1.0},
    }
    probe = ChangeAt(at=5, ops=[op])
    gp = lc.GradualPruning(target_sparsity=0.5, targets=["fc2"], start=0, end=4)
    model = MLP()
    weight = model.fc2.weight
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tr = trainer(tmp_path, [gp, probe, ckpt], max_epochs=2, enable_checkpointing=True)
    tr.fit(model, tiny_data())
    assert isinstance(model.fc2, ScaledLinear)
    assert model.fc2.weight is weight  # the same Parameter object all along
    assert probe.changes
    assert all(c.kept == {} for c in probe.changes)
    assert gp.masks.parameter("fc2.weight") is weight
    loaded = lc.load_checkpoint(MLP, tmp_path / "last.ckpt")
    assert isinstance(loaded.fc2, ScaledLinear)
    x = torch.randn(3, 4, 6, 6)
    model.eval()
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def test_parameter_replaced_behind_the_masks_back_fails_clearly(tmp_path: Path) -> None:
    class Swap(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:
                pl_module.fc1.weight = nn.Parameter(pl_module.fc1.weight.detach().clone())

    gp = lc.GradualPruning(target_sparsity=0.5, start=0, end=8, frequency=2)
    with pytest.raises(
        RuntimeError, match=r"GradualPruning: parameter 'fc1.weight' was replaced by a new object"
    ):
        trainer(tmp_path, [gp, Swap()]).fit(MLP(), tiny_data())


def test_load_checkpoint_without_recipe_equals_load_from_checkpoint(tmp_path: Path) -> None:
    model = MLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(
        tmp_path, [lc.GradualPruning(target_sparsity=0.5, start=0, end=4), ckpt], enable_checkpointing=True
    ).fit(model, tiny_data())
    a = lc.load_checkpoint(MLP, tmp_path / "last.ckpt")
    b = MLP.load_from_checkpoint(tmp_path / "last.ckpt")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["lightning_compress"]["recipe"] == []


def test_structure_recipe_is_in_the_checkpoint_and_replays(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = MLP()
    trainer(tmp_path, [ShrinkHidden(at=3), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        model, tiny_data()
    )
    recipe = torch.load(tmp_path / "last.ckpt", weights_only=True)["lightning_compress"]["recipe"]
    assert [op["op"] for op in recipe] == ["slice", "slice", "slice"]
    fresh = MLP()
    apply_ops(fresh, recipe)
    assert fresh.fc1.weight.shape == model.fc1.weight.shape == (16, 144)


def test_change_requested_inside_the_optimizer_step_is_applied_at_batch_end(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class RequestAt(lc.CompressionCallback):
        """Asks for a shape change from begin_step, i.e. inside optimizer.step()."""

        def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
            if step == 5:
                opt = trainer.optimizers[0]
                self.engine.request_structure_change(_shrink_ops(), self.name)
                seen["during"] = pl_module.fc1.weight.shape  # not yet: the step in progress is safe
                seen["opt"] = opt

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 6 and "after" not in seen:
                seen["after"] = pl_module.fc1.weight.shape
                seen["new_opt"] = trainer.optimizers[0]

    model = MLP()
    trainer(tmp_path, [RequestAt()], max_epochs=2).fit(model, tiny_data())
    assert seen["during"] == (32, 144)
    assert seen["after"] == (7, 144)
    assert seen["new_opt"] is not seen["opt"]
    assert model.fc1.weight.shape == (7, 144)
    with pytest.raises(RuntimeError, match=r"request_structure_change\(\) needs a running fit"):
        lc.get_engine(trainer(tmp_path, [])).request_structure_change(_shrink_ops(), "x")
