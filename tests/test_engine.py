"""core/engine.py: phase order, the training-step clock, AMP-skipped steps, schedules, statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import MLP, STEPS_PER_EPOCH, TinyNet, tiny_data, trainer
from pytorch_lightning.callbacks import OnExceptionCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

import lightning_compress as lc
from lightning_compress.core.engine import (
    CLUSTER,
    MASK,
    MASK_GRADS,
    OBSERVE,
    QUANTIZE,
    REGULARIZE,
    CompressionEngine,
    FunctionConstraint,
    get_engine,
)
from lightning_compress.core.importance import ActivationImportance, TaylorImportance
from lightning_compress.core.params import select_parameters
from lightning_compress.core.schedules import StepSchedule


class PhaseProbe(lc.CompressionCallback):
    """Registers one constraint per given phase; each records its phase when the engine runs it."""

    def __init__(self, phases: list[str], log: list[str], tag: str = "") -> None:
        super().__init__(targets=["fc1"])
        self.phases, self.record, self.tag = phases, log, tag
        self.params: list[nn.Parameter] = []

    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = [pl_module.fc1.weight]

    def constraints(self) -> list[Any]:
        return [
            FunctionConstraint(ph, self.params, lambda ps, ph=ph: self.record.append(ph + self.tag))
            for ph in self.phases
        ]


@pytest.mark.parametrize("reverse", [False, True])
def test_constraints_run_by_phase_not_by_registration_order(tmp_path: Path, reverse: bool) -> None:
    log: list[str] = []
    a = PhaseProbe([QUANTIZE, MASK_GRADS], log)
    b = PhaseProbe([CLUSTER, OBSERVE, MASK], log)
    c = PhaseProbe([REGULARIZE], log)
    cbs = [c, b, a] if reverse else [a, b, c]
    trainer(tmp_path, cbs, max_steps=2).fit(MLP(), tiny_data())
    per_step = [OBSERVE, REGULARIZE, MASK_GRADS, MASK, CLUSTER, QUANTIZE]
    assert log == per_step * 2
    engines = [cb for cb in trainer(tmp_path, [a]).callbacks if isinstance(cb, CompressionEngine)]
    assert engines == []  # a Trainer gets its engine only when a compression callback sets up


def test_one_engine_per_trainer_and_it_comes_first(tmp_path: Path) -> None:
    log: list[str] = []
    user_cb = pl.Callback()
    tr = trainer(tmp_path, [user_cb, PhaseProbe([MASK], log), PhaseProbe([MASK], log)], max_steps=1)
    tr.fit(MLP(), tiny_data())
    engines = [cb for cb in tr.callbacks if isinstance(cb, CompressionEngine)]
    assert len(engines) == 1
    assert tr.callbacks[0] is engines[0]
    assert get_engine(tr) is engines[0]
    assert log == [MASK, MASK]


def test_clock_counts_training_steps_and_resumes(tmp_path: Path) -> None:
    steps: list[int] = []

    class Spy(lc.CompressionCallback):
        def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
            steps.append(step)
            assert step == trainer.global_step  # automatic optimization: the same clock

    tr = trainer(tmp_path, [Spy()], max_epochs=2)
    tr.fit(MLP(), tiny_data())
    assert steps == list(range(2 * STEPS_PER_EPOCH))
    engine = get_engine(tr)
    assert engine.state_dict() == {"clock": 2 * STEPS_PER_EPOCH}


class _OverflowOnce(pl.Callback):
    """Puts an inf into one gradient at the given step: the GradScaler must skip that step."""

    def __init__(self, at: int) -> None:
        self.at, self.batches = at, 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.batches == self.at:
            pl_module.fc1.weight.grad[0, 0] = float("inf")
        self.batches += 1


def test_amp_skipped_step_gathers_no_statistics_and_updates_nothing(tmp_path: Path) -> None:
    cb = lc.GradualPruning(target_sparsity=0.5, criterion="taylor", start=3, end=3, frequency=1)
    seen: list[int] = []
    original = cb.begin_step
    cb.begin_step = lambda tr, m, step: (seen.append(step), original(tr, m, step))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    tr = trainer(tmp_path, [cb, _OverflowOnce(at=3)], max_steps=6, plugins=[plugin])
    tr.fit(MLP(), tiny_data())
    assert scaler.get_scale() < 2.0**8  # the scaler did see the overflow and backed off
    assert 3 not in seen  # no technique work from the skipped step ...
    assert seen == [0, 1, 2, 4, 5]  # ... but the clock still advanced
    assert cb.last_update_step == 4  # the update due at step 3 happened at the next real step
    for acc in cb.importance.acc:
        assert torch.isfinite(acc).all()
    assert cb.sparsity == pytest.approx(0.5, abs=1e-3)


def test_partial_statistics_survive_an_exception_checkpoint(tmp_path: Path) -> None:
    cb = lc.GradualPruning(target_sparsity=0.5, criterion="activation", start=6, end=6, calibration_steps=4)

    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 5:  # inside the calibration window (forwards of steps 3..6)
                raise RuntimeError("boom")

    on_exc = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [cb, Crash(), on_exc], max_steps=10, enable_checkpointing=True).fit(
            MLP(), tiny_data()
        )
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=True)
    state = saved["callbacks"][cb.state_key]["importance"]
    assert set(state["counts"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert list(state["counts"].values()) == [2, 2, 2], state["counts"]  # steps 3 and 4 were gathered
    assert all(float(s.abs().sum()) > 0 for s in state["sums"].values())


def test_end_one_reaches_the_target_on_the_last_step(tmp_path: Path) -> None:
    sched = StepSchedule(0.0, 1.0, 100)
    sched.resolve(1000)
    assert (sched.start_step, sched.end_step) == (0, 999)
    updates = [s for s in range(1000) if sched.next_update(s, "cubic") == s]
    assert updates == [*range(0, 1000, 100), 999]
    cb = lc.GradualPruning(target_sparsity=0.9, start=0.0, end=1.0, frequency=10)
    trainer(tmp_path, [cb], max_steps=25).fit(MLP(), tiny_data())
    assert cb.last_update_step == 24
    assert cb.sparsity == pytest.approx(0.9, abs=1e-4)


def test_resolved_points_are_kept_when_resuming_with_another_length() -> None:
    sched = StepSchedule(0.25, 0.5, 10)
    sched.resolve(100)
    saved = sched.state_dict()
    resumed = StepSchedule(0.25, 0.5, 10)
    resumed.load_state_dict(saved)
    resumed.resolve(400)  # max_epochs raised on resume: the curve does not stretch
    assert (resumed.start_step, resumed.end_step) == (25, 50)
    shorter = StepSchedule(0.25, 0.5, 10)
    shorter.load_state_dict(saved)
    shorter.resolve(40)  # too short to reach end: clamped to the last step run
    assert (shorter.start_step, shorter.end_step) == (25, 39)


def test_unknown_length_with_fraction_fails_before_sanity_check(tmp_path: Path) -> None:
    class IterData(torch.utils.data.IterableDataset):
        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            for _ in range(64):
                yield torch.randn(4, 6, 6, generator=gen), torch.tensor(1)

    sanity: list[int] = []

    class Probe(pl.Callback):
        def on_sanity_check_start(self, *args: Any) -> None:
            sanity.append(1)

    loader = torch.utils.data.DataLoader(IterData(), batch_size=8)
    with pytest.raises(
        ValueError, match=r"GradualPruning: `end`=0.75 is a fraction of training, but the number"
    ):
        trainer(tmp_path, [lc.GradualPruning(start=0, end=0.75), Probe()], max_epochs=2).fit(
            MLP(), loader, loader
        )
    assert sanity == []


# ---------------------------------------------------------------------------- importance references
def test_taylor_reference_prunes_the_smallest_weight_times_gradient() -> None:
    net = nn.Sequential(nn.Linear(3, 1, bias=False))
    lin = net[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.1, -2.0]]))
    imp = TaylorImportance()
    imp.attach(net, select_parameters(net))
    # hand-made gradients over two steps: |w*g| averages to [(0.5+0.5)/2, (1.0+0.2)/2, (0.02+0.04)/2]
    for grad in ([[0.5, 10.0, 0.01]], [[-0.5, -2.0, 0.02]]):
        lin.weight.grad = torch.tensor(grad)
        fn = imp.constraints()[0].bind(imp.params)
        fn()
    (score,) = imp.scores(step=0)
    torch.testing.assert_close(score, torch.tensor([[0.5, 0.6, 0.03]]))
    from lightning_compress.functional.pruning import unstructured_masks

    (mask,) = unstructured_masks([score], 1 / 3)  # prunes the largest weight: its |w*g| is smallest
    assert mask.tolist() == [[True, True, False]]


def test_activation_reference_weights_by_mean_input_magnitude() -> None:
    net = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.5, 1.0]]))
    imp = ActivationImportance(calibration_steps=2)
    imp.attach(net, select_parameters(net))
    imp.open_window(net)
    net(torch.tensor([[1.0, -10.0, 0.0], [3.0, 10.0, 0.0]]))  # E|x| = [2, 10, 0]
    imp.close_window()
    net(torch.ones(1, 3) * 100)  # outside the window: ignored
    imp.reduce(lambda t, op: t)
    (score,) = imp.scores(step=0)
    torch.testing.assert_close(score, torch.tensor([[2.0, 10.0, 0.0], [4.0, 5.0, 0.0]]))
    from lightning_compress.functional.pruning import unstructured_masks

    (mask,) = unstructured_masks([score], 0.5)  # the third input never fires: pruned first
    assert mask.tolist() == [[False, True, False], [True, True, False]]


def test_activation_grouped_conv_uses_each_groups_own_input_channels() -> None:
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    net = nn.Sequential(conv)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    imp = ActivationImportance()
    imp.attach(net, select_parameters(net))
    imp.open_window(net)
    x = torch.zeros(1, 4, 2, 2)
    x[:, 0], x[:, 3] = 1.0, 3.0  # channel means: [1, 0, 0, 3]
    net(x)
    imp.close_window()
    imp.reduce(lambda t, op: t)
    (score,) = imp.scores(step=0)
    # outputs 0,1 read input channels 0,1; outputs 2,3 read input channels 2,3
    assert score.flatten(1).tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 3.0]]


def test_pruned_optimizer_state_is_exactly_zero_or_one(tmp_path: Path) -> None:
    for optimizer in ("sgd", "adam"):
        model = TinyNet(optimizer=optimizer)
        cb = lc.GradualPruning(target_sparsity=0.8, start=0, end=20, frequency=5)
        tr = trainer(tmp_path, [cb], max_epochs=6)
        tr.fit(model, tiny_data())
        opt = tr.optimizers[0]
        checked = 0
        for name in cb.masks.names:
            p, pruned = cb.masks.parameter(name), ~cb.masks[name]
            for key, value in opt.state[p].items():
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    continue
                v = value[pruned]
                expected = 1.0 if key == "exp_avg_sq" else 0.0
                # renewed at every epoch start: at most one epoch (8 steps) of beta2 decay
                assert torch.all((v == expected) | ((v > 0.99) & (v <= 1.0))), (optimizer, key)
                tiny = (v != 0) & (v.abs() < torch.finfo(v.dtype).tiny)
                assert not tiny.any()  # no denormals
                checked += 1
        assert checked >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_amp_skipped_step(tmp_path: Path) -> None:
    cb = lc.GradualPruning(target_sparsity=0.5, criterion="taylor", start=3, end=3, frequency=1)
    seen: list[int] = []
    original = cb.begin_step
    cb.begin_step = lambda tr, m, step: (seen.append(step), original(tr, m, step))
    tr = trainer(
        tmp_path,
        [cb, _OverflowOnce(at=3)],
        max_steps=6,
        accelerator="gpu",
        precision="16-mixed",
        deterministic=False,
    )
    model = MLP()
    tr.fit(model, tiny_data())
    assert seen == [0, 1, 2, 4, 5]
    assert cb.last_update_step == 4
    for acc in cb.importance.acc:
        assert acc.is_cuda
        assert torch.isfinite(acc).all()
    assert cb.sparsity == pytest.approx(0.5, abs=1e-3)
    for name in cb.masks.names:
        assert not model.get_parameter(name)[~cb.masks[name].cpu()].any()  # Lightning moved it back


def test_checkpoint_without_engine_state_resumes_on_the_global_step(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = lc.GradualPruning(target_sparsity=0.5, start=0, end=24, frequency=4)
    trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(MLP(), tiny_data())
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    del raw["callbacks"]["CompressionEngine"]  # as written before the engine existed
    torch.save(raw, tmp_path / "old.ckpt")
    resumed = lc.GradualPruning(target_sparsity=0.5, start=0, end=24, frequency=4)
    steps: list[int] = []
    original = resumed.begin_step
    resumed.begin_step = lambda tr, m, step: (steps.append(step), original(tr, m, step))
    trainer(tmp_path, [resumed], max_epochs=3).fit(MLP(), tiny_data(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert steps == list(range(2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH))
