"""``DistillationModule`` on student LightningModules we did not write, used the way users write them.

* Lightning's demo ``LightningTransformer`` as the student of a bigger demo ``Transformer``: logits of
  shape ``(N * L, V)`` (the KL runs over the vocabulary), a two-argument forward the teacher is fed
  with, and ``GradualPruning`` on the student in the same fit.
* Lightning's ``BoringModel``: a dict-returning ``training_step``, its own dataloaders, validation
  step and epoch-level StepLR; exported and reloaded with ``BoringModel.load_from_checkpoint``.
* A manual-optimization student (refused) and a student with a step-level LR scheduler plus FitNets
  hints (the adapters' param group joins the student's optimizer and its scheduler).

Every test trains on tiny random data on CPU; nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import trainer
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.demos.transformer import Transformer
from test_foreign_models import VOCAB, OfflineTransformer, token_data
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_compress as lc


def _seeded(seed: int, build: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a module from its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build(*args, **kwargs)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- 1. demo Transformer


def _kl_both_ways(
    student: nn.Module, teacher: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[float, float]:
    """``KL(p_s || p_t)`` and ``KL(p_t || p_s)`` at T = 1 (both forwards return log-probabilities)."""
    inputs, target = batch
    training = student.training
    student.eval()
    with torch.no_grad():
        log_s, log_t = student(inputs, target), teacher(inputs, target)
    student.train(training)
    kl_st = nn.functional.kl_div(log_t, log_s, reduction="batchmean", log_target=True)
    kl_ts = nn.functional.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return float(kl_st), float(kl_ts)


def test_transformer_student_moves_toward_a_bigger_teacher_while_it_is_pruned(tmp_path: Path) -> None:
    pl.seed_everything(0)
    student = OfflineTransformer(vocab_size=VOCAB)  # ninp=200, nhid=200
    teacher = _seeded(1, Transformer, vocab_size=VOCAB, ninp=256, nhead=4, nhid=512)
    teacher_before = _state(teacher)
    batch = next(iter(token_data()))
    kl_before = _kl_both_ways(student, teacher, batch)

    wrapper = lc.DistillationModule(student, teacher, temperature=2.0, alpha=0.9)
    cb = lc.GradualPruning(target_sparsity=0.5, end=0.5, frequency=4)
    tr = trainer(tmp_path, [cb], max_epochs=2)
    tr.fit(wrapper, token_data())  # 12 steps per epoch

    assert tr.global_step == 24
    assert {"distill/loss", "distill/soft_loss", "distill/task_loss"} <= set(tr.callback_metrics)
    # The distilled student's outputs moved toward the teacher's, in both directions of the KL.
    kl_after = _kl_both_ways(student, teacher, batch)
    assert kl_after[0] < 0.8 * kl_before[0], (kl_before, kl_after)
    assert kl_after[1] < 0.8 * kl_before[1], (kl_before, kl_after)

    # GradualPruning acted on the student, under its own names, and reached its target exactly.
    student_params = dict(student.named_parameters())
    assert cb.root_prefix == "student."
    assert cb.masks.names
    assert set(cb.masks.names) <= set(student_params)
    linear = [n for n, m in student.named_modules() if isinstance(m, nn.Linear)]
    assert {f"{n}.weight" for n in linear} <= set(cb.masks.names)  # every Linear, incl. the decoder
    assert any(n.endswith("self_attn.in_proj_weight") for n in cb.masks.names)
    counts = cb.masks.counts().values()
    pruned, total = sum(z for z, _ in counts), sum(t for _, t in counts)
    assert pruned == round(0.5 * total)
    for name in cb.masks.names:
        w = student_params[name].detach()
        assert not w[~cb.masks[name]].any(), name
    # The teacher: bit-identical, not trained, not pruned, not in the wrapper's parameters or state.
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not teacher.training
    wrapper_params = {id(p) for p in wrapper.parameters()}
    assert not any(id(p) in wrapper_params for p in teacher.parameters())
    assert all(k.startswith("student.") for k in wrapper.state_dict())


# ---------------------------------------------------------------------------- 2. BoringModel


def _boring_teacher() -> nn.Module:
    return _seeded(5, nn.Linear, 32, 2)


def test_boring_model_distills_exports_and_reloads(tmp_path: Path) -> None:
    pl.seed_everything(0)
    student = BoringModel()  # training_step returns {"loss": ...}; its own dataloaders and StepLR
    before = _state(student)
    wrapper = lc.DistillationModule(student, _boring_teacher(), alpha=0.5)
    tr = trainer(tmp_path, [], max_epochs=2, limit_train_batches=8, limit_val_batches=2)
    tr.fit(wrapper)  # BoringModel.train_dataloader / val_dataloader, reached through the wrapper

    assert tr.global_step == 16
    assert not torch.equal(student.layer.weight, before["layer.weight"])
    assert {"distill/loss", "distill/task_loss"} <= set(tr.callback_metrics)
    assert tr.lr_scheduler_configs[0].scheduler.last_epoch == 2  # BoringModel's StepLR stepped per epoch

    path = wrapper.export_student(tmp_path / "student.ckpt")
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {"layer.weight", "layer.bias"}
    loaded = BoringModel.load_from_checkpoint(path)
    probe = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    student.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe), student(probe))
        assert torch.equal(wrapper(probe), student(probe))


def test_wrapper_state_dict_is_the_student_under_the_student_prefix() -> None:
    # Regression: the forward-capture handle once registered the student a second time as a submodule
    # (every tensor twice in checkpoints, as "student.*" and "_forward_module.*").
    pl.seed_everything(0)
    student = BoringModel()
    wrapper = lc.DistillationModule(student, _boring_teacher())
    assert set(wrapper.state_dict()) == {f"student.{k}" for k in student.state_dict()}
    assert [n for n, _ in wrapper.named_children()] == ["student", "adapters"]


# ---------------------------------------------------------------------------- 3. manual optimization


class ManualStudent(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.step(batch))
        opt.step()


def test_manual_optimization_student_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"`student` ManualStudent uses manual optimization \(automatic_optimization=False\); the "
        r"wrapper adds the distillation loss to the loss its training_step returns, which needs "
        r"automatic optimization",
    ):
        lc.DistillationModule(ManualStudent(), _boring_teacher())


# ---------------------------------------------------------------------------- 4. LR scheduler + hints

STEPS = 16  # 2 epochs x 8 batches


class ScheduledStudent(pl.LightningModule):
    """A classifier whose optimizer has a step-level LR scheduler (OneCycleLR or StepLR)."""

    def __init__(self, scheduler: str = "onecycle") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 3)
        self.example_input_array = torch.zeros(1, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("task/ce", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        if self.hparams.scheduler == "onecycle":
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class HintTeacher(nn.Module):
    """Wider than the student: its hint layer ``fc1`` has 24 features (the student's has 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _classes(n: int = 64, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, 16, generator=gen)
    y = (x @ torch.randn(16, 3, generator=gen)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("scheduler", ["onecycle", "steplr"])
def test_hint_adapters_join_the_students_optimizer_and_scheduler(tmp_path: Path, scheduler: str) -> None:
    pl.seed_everything(0)
    student = ScheduledStudent(scheduler)
    wrapper = lc.DistillationModule(student, _seeded(2, HintTeacher), hints={"fc1": "fc1"}, hint_weight=0.5)
    (key,) = wrapper.adapters.keys()
    adapter = wrapper.adapters[key]
    assert isinstance(adapter, nn.Linear)
    assert (adapter.in_features, adapter.out_features) == (12, 24)
    adapter_before = adapter.weight.detach().clone()
    lrs = _LearningRates()
    tr = trainer(tmp_path, [lrs], max_epochs=2)
    tr.fit(wrapper, _classes())

    assert tr.global_step == STEPS
    opt = tr.optimizers[0]
    assert len(opt.param_groups) == 2
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in wrapper.adapters.parameters()}
    sched = tr.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == STEPS  # stepped every optimizer step without error
    # The adapters' group follows the same schedule as the student's.
    assert len(lrs.lrs) == STEPS
    for student_lr, adapter_lr in lrs.lrs:
        assert adapter_lr == pytest.approx(student_lr)
    assert len({round(lr, 8) for lr, _ in lrs.lrs}) > 2, "the schedule never changed the learning rate"
    assert not torch.equal(adapter.weight, adapter_before)  # the adapter trained
    assert math.isfinite(float(tr.callback_metrics["distill/hint_loss"]))
    assert "task/ce" in tr.callback_metrics  # the student's own self.log works inside its step

    path = wrapper.export_student(tmp_path / "student.ckpt")
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert not any("adapter" in k for k in raw["state_dict"])
    loaded = ScheduledStudent.load_from_checkpoint(path)
    assert loaded.hparams.scheduler == scheduler
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))


@pytest.mark.parametrize("technique", ["structured", "shrink"])
def test_hint_adapter_follows_a_structure_change_of_its_student_layer(tmp_path: Path, technique: str) -> None:
    # Regression: removing output channels of a hint layer once left the adapter reading 32 features
    # ("mat1 and mat2 shapes cannot be multiplied (16x16 and 32x4)" at the next step).
    from battery import Distill, ShrinkHidden, tiny_data

    pl.seed_everything(0)
    wrapper = Distill(hints={"fc1": "1"})  # student fc1 (32 features) -> the teacher's Linear (4)
    if technique == "structured":
        cb: pl.Callback = lc.StructuredPruning(
            target_ratio=0.5, start=2, end=10, frequency=3, hard_prune_at=12
        )
    else:
        cb = ShrinkHidden(at=10)
    tr = trainer(tmp_path, [cb], max_epochs=4)
    tr.fit(wrapper, tiny_data())
    assert wrapper.student.fc1.out_features == 16
    adapter = wrapper.adapters["fc1__to__1"]
    assert adapter.weight.shape == (4, 16)
    opt_params = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert id(adapter.weight) in opt_params  # the rebuilt optimizer still trains the sliced adapter
    # The wrapper's checkpoint replays both slices: student layer and adapter.
    tr.save_checkpoint(tmp_path / "wrapper.ckpt")
    loaded = lc.load_checkpoint(Distill, tmp_path / "wrapper.ckpt")
    assert loaded.adapters["fc1__to__1"].weight.shape == (4, 16)
    assert torch.equal(loaded.adapters["fc1__to__1"].weight, adapter.weight)
    x = torch.randn(5, 4, 6, 6)
    wrapper.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), wrapper(x))


# ---------------------------------------------------------------------------- 5. exported compressed students


@pytest.mark.parametrize("technique", ["gradual", "qat", "shrink", "structured"])
def test_exported_student_of_a_compressed_run_reloads_with_the_students_own_class(
    tmp_path: Path, technique: str
) -> None:
    """``export_student`` carries the callbacks' state and the recipe under the student's names."""
    from battery import Distill, ShrinkHidden, _DistilledStudent, tiny_data

    from lightning_compress.quantization import restore_quantization

    callbacks = {
        "gradual": lambda: lc.GradualPruning(target_sparsity=0.7, start=2, end=26, frequency=3),
        "qat": lambda: lc.QuantizationAwareTraining(start=2),
        "shrink": lambda: ShrinkHidden(at=10),
        "structured": lambda: lc.StructuredPruning(
            target_ratio=0.5, start=2, end=10, frequency=3, hard_prune_at=12
        ),
    }
    pl.seed_everything(0)
    wrapper = Distill()
    trainer(tmp_path, [callbacks[technique]()], max_epochs=4).fit(wrapper, tiny_data())
    path = wrapper.export_student(tmp_path / "student.ckpt")
    if technique in ("shrink", "structured"):
        student = lc.load_checkpoint(_DistilledStudent, path)
        assert student.fc1.out_features == 16
    else:
        student = _DistilledStudent.load_from_checkpoint(path)
    if technique == "qat":
        assert sorted(restore_quantization(student, str(path))) == ["fc1", "fc2"]
    if technique == "gradual":
        w = [student.fc1.weight, student.fc2.weight]
        zeros = sum(int((p == 0).sum()) for p in w) / sum(p.numel() for p in w)
        assert zeros == pytest.approx(0.7, abs=2e-3)
    assert dict(student.hparams) == {"lr": 0.05, "optimizer": "sgd"}
    x = torch.randn(5, 4, 6, 6)
    wrapper.eval()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), wrapper(x), rtol=0, atol=0)
