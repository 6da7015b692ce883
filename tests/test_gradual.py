"""GradualPruning behaviour beyond the shared battery."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import STEPS_PER_EPOCH, TinyNet, tiny_data, trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from lightning_compress import GradualPruning
from lightning_compress.core.callback import flushing_denormals
from lightning_compress.core.schedules import is_update_step

HERE = Path(__file__).parent


def _zero_fraction(model: nn.Module, names: list[str]) -> float:
    return sum(int((model.get_parameter(n) == 0).sum()) for n in names) / sum(
        model.get_parameter(n).numel() for n in names
    )


def test_updates_follow_the_schedule_and_sparsity_is_exact(tmp_path: Path) -> None:
    seen: list[int] = []

    class Spy(GradualPruning):
        def update_masks(self, step: int) -> None:
            seen.append(step)
            super().update_masks(step)

    cb = Spy(target_sparsity=0.98, start=3, end=20, frequency=4)
    model = TinyNet()
    trainer(tmp_path, [cb]).fit(model, tiny_data())
    assert seen == [t for t in range(32) if is_update_step(t, 3, 20, 4)] == [3, 7, 11, 15, 19, 20]
    names = ["conv.weight", "fc1.weight", "fc2.weight"]
    total = sum(model.get_parameter(n).numel() for n in names)
    assert cb.sparsity == round(0.98 * total) / total
    assert abs(_zero_fraction(model, names) - 0.98) < 1e-3


def test_fractions_resolve_against_estimated_stepping_batches(tmp_path: Path) -> None:
    cb = GradualPruning(target_sparsity=0.5, start=0.25, end=0.5, frequency=1)
    trainer(tmp_path, [cb]).fit(TinyNet(), tiny_data())  # 32 steps
    assert (cb.step_schedule.start_step, cb.step_schedule.end_step, cb.last_update_step) == (8, 16, 16)


def test_targets_and_exclude_leave_other_layers_dense(tmp_path: Path) -> None:
    model = TinyNet()
    cb = GradualPruning(target_sparsity=0.7, end=10, frequency=2, targets=["fc*"], exclude=["fc2"])
    trainer(tmp_path, [cb]).fit(model, tiny_data())
    assert cb.masks.names == ["fc1.weight"]
    assert _zero_fraction(model, ["fc1.weight"]) == pytest.approx(0.7, abs=1e-3)
    assert _zero_fraction(model, ["conv.weight", "fc2.weight"]) == 0.0


def test_nm_pattern_keeps_n_of_every_m_inputs(tmp_path: Path) -> None:
    model = TinyNet()
    trainer(tmp_path, [GradualPruning(pattern="2:4", end=12, frequency=3)]).fit(model, tiny_data())
    w = model.fc1.weight.detach()
    assert torch.equal((w.view(16, -1, 4) != 0).sum(-1), torch.full((16, 32), 2))
    conv = model.conv.weight.detach().movedim(1, -1)  # groups run along input channels
    assert torch.equal((conv != 0).sum(-1), torch.full((8, 3, 3), 2))


def test_sparsity_is_logged_to_every_logger(tmp_path: Path) -> None:
    cb = GradualPruning(target_sparsity=0.5, end=8, frequency=2, log_per_layer=True)
    logger = CSVLogger(tmp_path, name="run")
    trainer(tmp_path, [cb], logger=logger, log_every_n_steps=4).fit(TinyNet(), tiny_data())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    values = [float(r["sparsity"]) for r in rows if r.get("sparsity")]
    assert values
    assert values[-1] == pytest.approx(0.5, abs=1e-3)
    assert values == sorted(values)
    assert any(r.get("sparsity/fc1") for r in rows)


@pytest.mark.parametrize(
    "strategy", [object(), object.__new__(DeepSpeedStrategy), object.__new__(FSDPStrategy)]
)
def test_sharding_strategies_are_refused(strategy: object) -> None:
    fake = types.SimpleNamespace(strategy=strategy)
    name = type(strategy).__name__
    with pytest.raises(RuntimeError, match=f"GradualPruning does not support strategy {name} yet: it shards"):
        GradualPruning().setup(fake, TinyNet(), "fit")  # type: ignore[arg-type]


def test_layer_that_cannot_take_the_pattern_is_named(tmp_path: Path) -> None:
    class Odd(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = nn.Linear(16, 4)
            self.head = nn.Linear(6, 2)

    model = Odd()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"cannot prune layer 'head': its input dimension 6 is not a multiple of 4"
    ):
        trainer(tmp_path, [GradualPruning(pattern="2:4")]).fit(model, tiny_data())
    for k, v in model.state_dict().items():  # nothing half-applied
        assert torch.equal(v, before[k])


def test_no_matching_layer_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"GradualPruning: no layer matches targets=\['encoder\.\*'\]"):
        trainer(tmp_path, [GradualPruning(targets=["encoder.*"])]).fit(TinyNet(), tiny_data())


def test_fraction_without_known_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"GradualPruning: `start`=0.0 is a fraction of training, but training has no length",
    ):
        trainer(tmp_path, [GradualPruning()], max_epochs=-1, max_steps=-1, max_time="00:00:00:30").fit(
            TinyNet(), tiny_data()
        )


def test_adamw_weight_decay_does_not_revive_weights(tmp_path: Path) -> None:
    model = TinyNet(optimizer="adam", lr=0.01)
    cb = GradualPruning(target_sparsity=0.6, start=0, end=4, frequency=2)

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            for name in cb.masks.names:
                assert not pl_module.get_parameter(name)[~cb.masks[name]].any()

    trainer(tmp_path, [cb, Check()]).fit(model, tiny_data())
    assert _zero_fraction(model, cb.masks.names) == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("flush", [True, False])
def test_denormals_flushed_only_inside_the_optimizer_step(tmp_path: Path, flush: bool) -> None:
    seen: list[bool] = []

    class Spy(pl.Callback):  # runs after GradualPruning's hook, right before clipping and the step
        def on_before_optimizer_step(self, *args: Any) -> None:
            seen.append(flushing_denormals())

        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(flushing_denormals())

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    assert not flushing_denormals()
    cb = GradualPruning(target_sparsity=0.5, end=8, frequency=2, flush_denormal=flush)
    trainer(tmp_path, [cb, Spy()], max_epochs=1).fit(TinyNet(), tiny_data())
    assert seen[0::2] == [flush] * STEPS_PER_EPOCH
    assert seen[1::2] == [False] * STEPS_PER_EPOCH
    assert not flushing_denormals()


def test_two_instances_keep_separate_checkpoint_state() -> None:
    a, b = GradualPruning(targets=["fc*"]), GradualPruning(targets=["conv"])
    assert a.state_key != b.state_key


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=3)))
def test_target_sparsity_range(value: Any) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    if valid:
        assert GradualPruning(target_sparsity=value).target_sparsity == float(value)
    else:
        with pytest.raises(
            ValueError, match=r"`target_sparsity`=.* is not supported; expected a number in \[0, 1\)"
        ):
            GradualPruning(target_sparsity=value)


@pytest.mark.slow
def test_mnist_accuracy_at_90_percent_sparsity(tmp_path: Path) -> None:
    from lightning_compress.demos import LeNet300100, MNIST5kDataModule

    pl.seed_everything(0)
    model, data = LeNet300100(), MNIST5kDataModule(batch_size=64)
    cb = GradualPruning(target_sparsity=0.9, end=0.5, frequency=25)
    tr = trainer(tmp_path, [cb], max_epochs=8)
    tr.fit(model, data)
    acc = tr.test(model, data, verbose=False)[0]["test_acc"]
    assert acc > 0.90  # dense LeNet-300-100 reaches ~0.93 on this 4k/1k split
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert _zero_fraction(model, names) == pytest.approx(0.9, abs=1e-3)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_strategy_subprocess(tmp_path: Path) -> None:
    """`strategy="ddp"` re-executes the script per rank, so it runs as a subprocess.

    The activation criterion is data dependent: each rank sees half the batches, so the masks only
    agree if the statistics are reduced across ranks.
    """
    env = {**os.environ, "PYTHONPATH": str(HERE), "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_script.py"), "gradual-activation-global-resnet", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    masks = [k for k in r0 if not k.startswith("param:")]
    assert masks == ["0:stem.weight", "0:block.0.weight", "0:block.3.weight", "0:fc.weight"]
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    kept = torch.cat([r0[k].flatten() for k in masks]).float().mean().item()
    assert kept == pytest.approx(0.2, abs=1e-3)
