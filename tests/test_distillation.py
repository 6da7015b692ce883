"""DistillationModule, the teacher-output cache and FeatureCache: real fits, real outcomes."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import lightning_compress as lc
from lightning_compress.demos import DigitsDataModule, HintonMLP, MNIST5kDataModule
from lightning_compress.distillation.module import CHECKPOINT_KEY
from lightning_compress.functional.distillation import hint_loss, soft_target_loss
from lightning_compress.quantization.qat import restore_quantization

# ----------------------------------------------------------------------------- fixtures


def clusters(n: int = 192, d: int = 12, c: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian clusters (the same centers for every ``seed``): learnable in a few steps."""
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(0)) * 2
    gen = torch.Generator().manual_seed(seed + 100)
    y = torch.randint(0, c, (n,), generator=gen)
    x = centers[y] + torch.randn(n, d, generator=gen)
    return TensorDataset(x, y)


class Student(pl.LightningModule):
    """A user's module: its own loss, metrics, logging names, optimizer and LR scheduler."""

    def __init__(self, d: int = 12, hidden: int = 16, c: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.train_acc = MulticlassAccuracy(num_classes=c)
        self.val_acc = MulticlassAccuracy(num_classes=c)
        self.example_input_array = torch.zeros(1, d)
        self.epoch_ends = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def on_train_epoch_end(self) -> None:
        self.epoch_ends += 1

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
        }


def teacher_net(d: int = 12, c: int = 4, seed: int = 1, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, c))


class CountingTeacher(nn.Module):
    """A teacher that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = teacher_net()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def trainer(tmp_path: Path, max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def loader(dataset: Any, shuffle: bool = False, batch_size: int = 32) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


# ----------------------------------------------------------------------------- losses


def test_soft_target_loss_is_hinton_kl_times_t_squared() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    T = 3.0
    p_t, log_p_s = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * T * T
    loss = soft_target_loss(s, t, T)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # d/ds of T^2 KL = T (p_s - p_t) / N (Hinton et al. eq. 2, averaged over the batch)
    torch.testing.assert_close(s.grad, T * (torch.softmax(s / T, -1) - p_t) / 8)
    # a sequence model's (N, L, V) logits: every position is a sample
    s3, t3 = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    torch.testing.assert_close(
        soft_target_loss(s3, t3, T), soft_target_loss(s3.reshape(6, 5), t3.reshape(6, 5), T)
    )
    with pytest.raises(ValueError, match="differ in shape"):
        soft_target_loss(torch.randn(2, 5), torch.randn(2, 4), T)


def test_hint_loss_pools_the_larger_map() -> None:
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(hint_loss(s, t), F.mse_loss(F.adaptive_avg_pool2d(s, 4), t))
    with pytest.raises(ValueError, match="channel"):
        hint_loss(torch.randn(2, 3, 4, 4), t)


# ----------------------------------------------------------------------------- the wrapper


def test_wrapper_trains_the_student_only_and_reuses_its_logic(tmp_path: Path) -> None:
    teacher = teacher_net()
    before = copy.deepcopy(teacher.state_dict())
    student = Student()
    model = lc.DistillationModule(student, teacher)
    tr = trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)]
    )
    tr.fit(model, loader(clusters(), shuffle=True), loader(clusters(seed=3)))
    # the teacher: frozen, eval, untouched, not a submodule, not in the optimizer
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") or k.startswith("_teacher") for k in model.state_dict())
    owned = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert owned == {id(p) for p in student.parameters()}
    # the student's own logging names, metrics, hooks and scheduler
    for key in (
        "train_loss",
        "train_acc",
        "val_acc",
        "distill/loss",
        "distill/soft_loss",
        "distill/task_loss",
    ):
        assert key in tr.callback_metrics, key
    assert student.epoch_ends == 2
    assert tr.lr_scheduler_configs[0].scheduler.last_epoch == 2
    # the checkpoint: student weights under "student.", no teacher, the record of how to rebuild it
    ckpt = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=True)
    assert set(ckpt["state_dict"]) == {f"student.{k}" for k in student.state_dict()}
    record = ckpt[CHECKPOINT_KEY]["teacher"]
    assert record["class_path"] == "torch.nn.modules.container.Sequential"
    assert "teacher_state_dict" not in ckpt[CHECKPOINT_KEY]


class LossProbe(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.losses.append(loss.detach().clone())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_first_step_loss_is_the_hinton_objective(tmp_path: Path, alpha: float) -> None:
    teacher, student = teacher_net(), Student()
    fresh = copy.deepcopy(student)
    probe = LossProbe()
    model = lc.DistillationModule(student, teacher, temperature=2.5, alpha=alpha)
    data = clusters()
    trainer(tmp_path, max_steps=1, callbacks=[probe]).fit(model, loader(data))
    x, y = data.tensors[0][:32], data.tensors[1][:32]
    s = fresh(x)
    expected = alpha * soft_target_loss(s, teacher(x), 2.5) + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(probe.losses[0], expected)


def test_alpha_zero_trains_exactly_like_the_student_alone(tmp_path: Path) -> None:
    data = clusters()
    pl.seed_everything(0)
    alone = Student()
    distilled_student = copy.deepcopy(alone)
    pl.seed_everything(1)
    trainer(tmp_path).fit(alone, loader(data, shuffle=True))
    model = lc.DistillationModule(distilled_student, teacher_net(), alpha=0.0)
    pl.seed_everything(1)  # the same shuffling
    trainer(tmp_path).fit(model, loader(data, shuffle=True))
    for (name, a), b in zip(alone.state_dict().items(), distilled_student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_temperature_and_alpha_follow_their_schedule(tmp_path: Path) -> None:
    model = lc.DistillationModule(
        Student(),
        teacher_net(),
        temperature=8.0,
        temperature_end=2.0,
        alpha=0.9,
        alpha_end=0.5,
        schedule_end=1.0,
    )
    tr = trainer(tmp_path, max_epochs=2)
    tr.fit(model, loader(clusters()))  # 6 batches x 2 epochs = 12 steps
    end = model.value_schedule.end_step
    assert end == 11
    assert model.temperature_at(0) == 8.0
    assert model.temperature_at(end) == pytest.approx(2.0)
    assert model.temperature_at(end // 2) == pytest.approx(8.0 - 6.0 * (end // 2) / end)
    assert model.alpha_at(end) == pytest.approx(0.5)
    logged = float(tr.callback_metrics["distill/temperature"])  # mean over the last epoch's steps 6..11
    assert logged == pytest.approx(sum(model.temperature_at(s) for s in range(6, 12)) / 6, rel=1e-5)
    cubic = lc.DistillationModule(Student(), teacher_net(), temperature_end=1.0, schedule="cubic")
    with pytest.raises(ValueError, match="`schedule`"):
        lc.DistillationModule(Student(), teacher_net(), schedule="zigzag")
    assert cubic.temperature_at(0) == 4.0  # unresolved before fit: the start value


def test_resume_from_a_checkpoint_continues_exactly(tmp_path: Path) -> None:
    data = clusters()

    def build() -> lc.DistillationModule:
        torch.manual_seed(0)
        return lc.DistillationModule(Student(), teacher_net(), temperature_end=1.0)

    full = build()
    trainer(tmp_path, max_epochs=3).fit(full, loader(data))

    class StopAfterFirstEpoch(pl.Callback):  # an interrupted 3-epoch run
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            trainer.should_stop = True

    first = build()
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1)
    callbacks = [cb, StopAfterFirstEpoch()]
    trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=callbacks).fit(first, loader(data))
    resumed = build()
    ckpt = next((tmp_path / "ck").glob("*.ckpt"))
    trainer(tmp_path, max_epochs=3).fit(resumed, loader(data), ckpt_path=str(ckpt))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_teacher_from_class_or_import_path_and_checkpoint(tmp_path: Path) -> None:
    teacher = HintonMLP(hidden=24, in_features=12, num_classes=4)
    tr = trainer(tmp_path, max_epochs=1)
    tr.fit(teacher, loader(clusters()))
    path = tmp_path / "teacher.ckpt"
    tr.save_checkpoint(path)
    student = HintonMLP(hidden=8, in_features=12, num_classes=4)
    for spec in (HintonMLP, "lightning_compress.demos.HintonMLP"):
        model = lc.DistillationModule(student, spec, teacher_checkpoint=str(path))
        assert isinstance(model.teacher, HintonMLP)
        assert model.teacher.hparams.hidden == 24
        for k, v in teacher.state_dict().items():
            assert torch.equal(model.teacher.state_dict()[k], v), k
    # an instance built with other sizes: a clear error naming the argument
    with pytest.raises(ValueError, match="`teacher_checkpoint`"):
        lc.DistillationModule(
            student, HintonMLP(hidden=16, in_features=12, num_classes=4), teacher_checkpoint=str(path)
        )
    # save_teacher: the weights travel in the checkpoint and are restored on load
    model = lc.DistillationModule(student, HintonMLP, teacher_checkpoint=str(path), save_teacher=True)
    tr = trainer(tmp_path, max_steps=2)
    tr.fit(model, loader(clusters()))
    tr.save_checkpoint(tmp_path / "wrapper.ckpt")
    saved = torch.load(tmp_path / "wrapper.ckpt", weights_only=False)[CHECKPOINT_KEY]
    assert saved["teacher"]["init_args"]["hidden"] == 24
    assert saved["teacher"]["checkpoint"] == str(path)
    assert torch.equal(saved["teacher_state_dict"]["fc1.weight"], teacher.fc1.weight)


def test_precision_bf16(tmp_path: Path) -> None:
    teacher = teacher_net()
    model = lc.DistillationModule(Student(), teacher)
    trainer(tmp_path, max_steps=3, precision="bf16-true").fit(model, loader(clusters()))
    assert next(teacher.parameters()).dtype == torch.bfloat16  # moved to the student's dtype
    model = lc.DistillationModule(Student(), teacher_net())
    trainer(tmp_path, max_steps=3, precision="bf16-mixed").fit(model, loader(clusters()))
    assert next(model.teacher.parameters()).dtype == torch.float32  # autocast runs it in bf16


# ----------------------------------------------------------------------------- compression of the student


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> HintonMLP:
    pl.seed_everything(0)
    teacher = HintonMLP(hidden=128, dropout=0.2, in_features=64, lr=3e-3)
    trainer(tmp_path_factory.mktemp("t"), max_epochs=8).fit(teacher, DigitsDataModule(batch_size=32))
    return teacher.eval()


def _accuracy(model: nn.Module, dm: DigitsDataModule) -> float:
    dm.setup()
    x, y = dm.test_dataset.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


def test_gradual_pruning_of_the_distilled_student(tmp_path: Path, digits_teacher: HintonMLP) -> None:
    pl.seed_everything(0)
    student = HintonMLP(hidden=32, in_features=64, lr=3e-3)
    model = lc.DistillationModule(student, digits_teacher, temperature=4.0, alpha=0.7)
    pruning = lc.GradualPruning(target_sparsity=0.8, end=0.6, frequency=10)
    report = lc.CompressionReport(plot=False)
    dm = DigitsDataModule(batch_size=32)
    tr = trainer(tmp_path, max_epochs=8, callbacks=[pruning, report])
    tr.fit(model, dm)
    assert report.summary is not None
    assert [layer.name for layer in report.summary.layers] == ["fc1", "fc2", "fc3"]  # the student's rows
    # the callback saw the student's own names; the teacher was never a target
    assert sorted(pruning.masks.names) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    weights = [student.fc1.weight, student.fc2.weight, student.fc3.weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01)
    assert all(
        float((m.weight == 0).float().mean()) < 0.01
        for m in digits_teacher.modules()
        if isinstance(m, nn.Linear)
    )
    assert _accuracy(student, dm) > 0.85
    # the exported plain student loads into its class, already compressed, with equal outputs
    path = model.export_student(tmp_path / "student.ckpt")
    loaded = HintonMLP.load_from_checkpoint(path)
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.eval()(x), student.eval()(x), rtol=0, atol=0)
    assert int((loaded.fc1.weight == 0).sum()) == int((student.fc1.weight == 0).sum())
    assert model.student_state_dict().keys() == loaded.state_dict().keys()
    ckpt = torch.load(path, weights_only=True)
    assert not any("adapter" in k or "teacher" in k for k in ckpt["state_dict"])


def test_qat_of_the_distilled_student_exports_and_restores(tmp_path: Path, digits_teacher: HintonMLP) -> None:
    pl.seed_everything(0)
    student = HintonMLP(hidden=32, in_features=64, lr=3e-3)
    model = lc.DistillationModule(student, digits_teacher)
    qat = lc.QuantizationAwareTraining(start=0.2, freeze_observers_at=0.8)
    dm = DigitsDataModule(batch_size=32)
    trainer(tmp_path, max_epochs=4, callbacks=[qat]).fit(model, dm)
    assert _accuracy(student, dm) > 0.85
    path = model.export_student(tmp_path / "student_int8.ckpt")
    loaded = HintonMLP.load_from_checkpoint(path)
    layers = restore_quantization(loaded, str(path))
    assert sorted(layers) == ["fc1", "fc2", "fc3"]
    x = torch.randn(7, 64)
    torch.testing.assert_close(loaded.eval()(x), student.eval()(x), rtol=0, atol=0)
    # the teacher was not quantized
    assert type(digits_teacher.fc1) is nn.Linear


# ----------------------------------------------------------------------------- hints


class ConvNet(pl.LightningModule):
    def __init__(self, width: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, 4)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)]


def images(n: int = 96) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen))


def test_fitnets_hints_train_adapters_that_are_not_exported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = ConvNet(width=8).eval(), ConvNet(width=2)
    model = lc.DistillationModule(
        student, teacher, hints={"conv2": "conv2", "conv1": "conv1"}, hint_weight=0.5
    )
    adapter = model.adapters["conv2__to__conv2"]
    assert isinstance(adapter, nn.Conv2d)
    assert (adapter.in_channels, adapter.out_channels) == (4, 16)
    before = adapter.weight.detach().clone()
    probe = LossProbe()
    tr = trainer(tmp_path, max_epochs=2, callbacks=[probe])
    tr.fit(model, loader(images()))
    assert not torch.equal(adapter.weight, before)  # trained, in the student's optimizer
    groups = tr.optimizers[0].param_groups
    assert len(groups) == 2
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.adapters.parameters()}
    assert groups[1]["lr"] == groups[0]["lr"]  # OneCycleLR schedules the adapters' group too
    assert "distill/hint_loss" in tr.callback_metrics
    path = model.export_student(tmp_path / "student.ckpt")
    assert set(torch.load(path, weights_only=True)["state_dict"]) == set(student.state_dict())


def test_hint_widths_without_example_input(tmp_path: Path) -> None:
    student, teacher = Student(hidden=6), Student(hidden=10)
    student.example_input_array = None
    model = lc.DistillationModule(student, teacher, hints={"fc1": "fc1"})
    adapter = model.adapters["fc1__to__fc1"]
    assert isinstance(adapter, nn.Linear)
    assert (adapter.in_features, adapter.out_features) == (6, 10)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"`alpha`=1.5 .*\[0, 1\]"),
        ({"alpha": -0.1}, r"`alpha`=-0.1"),
        ({"temperature": 0.0}, r"`temperature`=0.0 .*> 0"),
        ({"temperature": -2}, r"`temperature`=-2"),
        ({"temperature_end": 0}, r"`temperature_end`"),
        ({"alpha_end": 2}, r"`alpha_end`"),
        ({"hints": {"nope": "fc1"}}, r"`hints`: 'nope' is not a layer of the student Student"),
        ({"hints": {"fc1": "nope"}}, r"`hints`: 'nope' is not a layer of the teacher Student"),
        ({"hints": ["fc1"]}, r"`hints`=\['fc1'\] is not supported"),
        ({"cache": "gpu"}, r"`cache`='gpu' is not supported; expected False, True"),
        ({"student_forward": "head"}, r"`student_forward`: 'head' is not a layer of the student"),
        ({"schedule_start": -1}, r"`schedule_start`"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lc.DistillationModule(Student(), Student(hidden=10), **kwargs)


def test_bad_student_and_teacher_are_named() -> None:
    with pytest.raises(ValueError, match="`student` must be a LightningModule, got Sequential"):
        lc.DistillationModule(teacher_net(), teacher_net())
    with pytest.raises(ValueError, match="`teacher` is the class HintonMLP but `teacher_checkpoint` is None"):
        lc.DistillationModule(Student(), HintonMLP)
    with pytest.raises(ValueError, match="`teacher`='nowhere' is not an import path"):
        lc.DistillationModule(Student(), "nowhere")
    with pytest.raises(ValueError, match="`teacher`=3 is not supported"):
        lc.DistillationModule(Student(), 3)
    student = Student()
    with pytest.raises(ValueError, match="`teacher` is \\(part of\\) the student"):
        lc.DistillationModule(student, student.fc1)


def test_teacher_output_shape_mismatch_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"`teacher`: its output shape \(1, 5\) differs from the student's \(1, 4\)"
    ):
        lc.DistillationModule(Student(), teacher_net(c=5))
    # without example_input_array: at the first step, before any weight changes
    student = Student()
    student.example_input_array = None
    before = copy.deepcopy(student.state_dict())
    model = lc.DistillationModule(student, teacher_net(c=5))
    with pytest.raises(ValueError, match=r"`teacher`: its output shape \(32, 5\) differs"):
        trainer(tmp_path, max_steps=2).fit(model, loader(clusters()))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_student_that_does_not_call_itself_is_explained(tmp_path: Path) -> None:
    class Indirect(Student):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.fc2(torch.relu(self.fc1(x))), y)

    with pytest.raises(RuntimeError, match="did not call the student"):
        trainer(tmp_path, max_steps=1).fit(
            lc.DistillationModule(Indirect(), teacher_net()), loader(clusters())
        )
    # naming the submodule that computes the logits works (its input goes to the teacher)
    model = lc.DistillationModule(Indirect(), nn.Linear(16, 4), student_forward="fc2")
    trainer(tmp_path, max_steps=2).fit(model, loader(clusters()))


# ----------------------------------------------------------------------------- teacher-output cache


def _fit_cached(
    tmp_path: Path, cache: Any, epochs: int = 3, **kwargs: Any
) -> tuple[lc.DistillationModule, int]:
    pl.seed_everything(0)
    teacher = CountingTeacher()
    model = lc.DistillationModule(Student(), teacher, cache=cache, **kwargs)
    data = lc.IndexedDataset(clusters()) if cache else clusters()
    trainer(tmp_path, max_epochs=epochs).fit(model, loader(data, shuffle=True))
    return model, teacher.calls


def test_cache_reuses_teacher_outputs_and_changes_nothing(tmp_path: Path) -> None:
    plain, plain_calls = _fit_cached(tmp_path, False)
    cached, cached_calls = _fit_cached(tmp_path, True)
    assert plain_calls == 18 + 1  # 6 batches x 3 epochs, plus the shape check at construction
    assert cached_calls == 6 + 1  # the first epoch only
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert cached.cache is None  # closed at the end of fit


def test_disk_cache_is_memory_mapped_and_removed(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    class Look(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen.append(sorted(os.listdir(tmp_path / "cache")))
            assert pl_module.cache.n_filled == 192

    pl.seed_everything(0)
    teacher = CountingTeacher()  # the same construction order as _fit_cached: same initial weights
    model = lc.DistillationModule(Student(), teacher, cache="disk", cache_dir=str(tmp_path / "cache"))
    trainer(tmp_path, max_epochs=2, callbacks=[Look()]).fit(
        model, loader(lc.IndexedDataset(clusters()), shuffle=True)
    )
    assert seen[0] == ["teacher_rank0_0.bin"]
    assert os.listdir(tmp_path / "cache") == []
    memory, _ = _fit_cached(tmp_path, True, epochs=2)
    for a, b in zip(model.state_dict().values(), memory.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_with_hints_and_dict_batches_with_indices(tmp_path: Path) -> None:
    class DictStudent(Student):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch["x"]), batch["y"])

    class DictData(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = clusters()

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> dict[str, Any]:
            x, y = self.data[i]
            return {"x": x, "y": y, "index": i}

    results = []
    for cache in (False, True):
        pl.seed_everything(0)
        teacher = CountingTeacher()
        model = lc.DistillationModule(DictStudent(), teacher, cache=cache, hints={"fc1": "net.0"})
        trainer(tmp_path, max_epochs=2).fit(model, loader(DictData(), shuffle=True))
        results.append((model, teacher.calls))
    assert results[1][1] == 6 + 1
    for a, b in zip(results[0][0].state_dict().values(), results[1][0].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_refuses_data_without_identity_before_training(tmp_path: Path) -> None:
    student = Student()
    before = copy.deepcopy(student.state_dict())
    model = lc.DistillationModule(student, teacher_net(), cache=True)
    with pytest.raises(ValueError, match=r"cache='memory'\) needs sample identity .*IndexedDataset"):
        trainer(tmp_path).fit(model, loader(clusters()))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_cache_refuses_random_augmentation_unless_declared_invariant(tmp_path: Path) -> None:
    student = HintonMLP(hidden=8)
    dm = MNIST5kDataModule(batch_size=64, random_shift=2, indexed=True)
    model = lc.DistillationModule(student, HintonMLP(hidden=16), cache=True)
    with pytest.raises(ValueError, match=r"the training data is random .* invariant_transforms=True"):
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, dm)
    model = lc.DistillationModule(student, HintonMLP(hidden=16), cache=True, invariant_transforms=True)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, dm)
    # without augmentation the indexed datamodule is accepted and the student sees plain batches
    model = lc.DistillationModule(HintonMLP(hidden=8), HintonMLP(hidden=16), cache=True)
    tr = trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    tr.fit(model, MNIST5kDataModule(batch_size=64, indexed=True))
    assert "val_acc" in tr.callback_metrics


def test_output_cache_unit() -> None:
    cache = lc.OutputCache(10)
    assert cache.lookup(torch.tensor([1, 2])) is None
    cache.store(torch.tensor([1, 2]), (torch.ones(2, 3), torch.zeros(2, 4, 2)))
    got = cache.lookup(torch.tensor([2, 1]))
    assert got is not None
    assert got[0].shape == (2, 3)
    assert got[1].shape == (2, 4, 2)
    assert cache.lookup(torch.tensor([1, 3])) is None
    with pytest.raises(IndexError, match="outside the dataset"):
        cache.store(torch.tensor([10]), (torch.ones(1, 3), torch.zeros(1, 4, 2)))
    with pytest.raises(ValueError, match="fixed shape"):
        cache.store(torch.tensor([3]), (torch.ones(1, 5), torch.zeros(1, 4, 2)))
    cache.clear()
    assert cache.n_filled == 0
    with pytest.raises(TypeError, match="map-style"):
        lc.IndexedDataset(iter([1, 2]))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- FeatureCache


class CountingBackbone(nn.Sequential):
    """Counts the forward passes it really computes."""

    calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return super().forward(x)


class Transfer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = CountingBackbone(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    @property
    def backbone_calls(self) -> int:
        return self.backbone.calls

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def _fit_transfer(
    tmp_path: Path, cache: bool, callbacks: list[pl.Callback], epochs: int = 4
) -> tuple[Transfer, Any]:
    pl.seed_everything(0)
    model = Transfer()
    feature_cache = lc.FeatureCache("backbone") if cache else None
    data = lc.IndexedDataset(clusters()) if cache else clusters()
    cbs = [*callbacks, *([feature_cache] if feature_cache else [])]
    trainer(tmp_path, max_epochs=epochs, callbacks=cbs).fit(model, loader(data, shuffle=True))
    return model, feature_cache


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_feature_cache_on_a_frozen_backbone(tmp_path: Path) -> None:
    class Freeze(pl.Callback):
        def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
            pl_module.backbone.requires_grad_(False)

    plain, _ = _fit_transfer(tmp_path, False, [Freeze()])
    cached, _fc = _fit_transfer(tmp_path, True, [Freeze()])
    _same_weights(plain, cached)
    assert plain.backbone_calls == 24
    assert cached.backbone_calls == 6  # the first epoch only
    assert "forward" not in cached.backbone.__dict__
    assert "training_step" not in cached.__dict__


def test_feature_cache_with_backbone_finetuning_and_pruning(tmp_path: Path) -> None:
    def callbacks() -> list[pl.Callback]:
        return [
            BackboneFinetuning(unfreeze_backbone_at_epoch=3, train_bn=False),
            lc.GradualPruning(target_sparsity=0.5, start=0, end=4, frequency=2),
        ]

    plain, _ = _fit_transfer(tmp_path, False, callbacks(), epochs=5)
    cached, _ = _fit_transfer(tmp_path, True, callbacks(), epochs=5)
    _same_weights(plain, cached)  # the cache never served a stale feature
    assert plain.backbone_calls == 30
    # epoch 0 fills the cache, the mask update at step 4 changes the frozen backbone (cleared), epoch 1
    # refills it, epoch 2 reads it, and from epoch 3 on the unfrozen backbone trains and always runs
    assert cached.backbone_calls == 24


def test_feature_cache_bad_module_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`module`='trunk' is not a submodule of Transfer; its children"):
        trainer(tmp_path, max_steps=1, callbacks=[lc.FeatureCache("trunk")]).fit(
            Transfer(), loader(lc.IndexedDataset(clusters()))
        )
    with pytest.raises(ValueError, match="`cache`='ssd'"):
        lc.FeatureCache("backbone", cache="ssd")  # type: ignore[arg-type]


def test_structured_pruning_of_a_hinted_student_slices_the_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = ConvNet(width=8).eval(), ConvNet(width=4)
    model = lc.DistillationModule(student, teacher, hints={"conv2": "conv2"})
    pruning = lc.StructuredPruning(
        target_ratio=0.5, hard_prune_at=6, end=4, frequency=2, targets=["conv1", "conv2"]
    )
    tr = trainer(tmp_path, max_epochs=3, callbacks=[pruning])
    tr.fit(model, loader(images()))  # 9 steps: channels removed at step 6, training goes on after
    assert student.conv2.out_channels < 8
    adapter = model.adapters["conv2__to__conv2"]
    assert adapter.in_channels == student.conv2.out_channels  # sliced with the student's channels
    assert adapter.weight.shape[1] == student.conv2.out_channels
    path = model.export_student(tmp_path / "student.ckpt")
    recipe = torch.load(path, weights_only=True)["lightning_compress"]["recipe"]
    assert recipe
    assert all(not str(op.get("tensor", "")).startswith(("adapters", "student.")) for op in recipe)
    loaded = lc.load_checkpoint(ConvNet, path)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), student.eval()(x), rtol=0, atol=0)
    # resuming the wrapper replays the recipe on a fresh wrapper, adapters included
    tr.save_checkpoint(tmp_path / "wrapper.ckpt")
    fresh = lc.DistillationModule(ConvNet(width=4), ConvNet(width=8).eval(), hints={"conv2": "conv2"})
    trainer(
        tmp_path,
        max_epochs=4,
        callbacks=[
            lc.StructuredPruning(
                target_ratio=0.5, hard_prune_at=6, end=4, frequency=2, targets=["conv1", "conv2"]
            )
        ],
    ).fit(fresh, loader(images()), ckpt_path=str(tmp_path / "wrapper.ckpt"))
    assert fresh.adapters["conv2__to__conv2"].weight.shape == adapter.weight.shape


def test_validate_test_and_predict_run_the_students_steps(tmp_path: Path) -> None:
    student = HintonMLP(hidden=8, in_features=12, num_classes=4)
    model = lc.DistillationModule(student, teacher_net())
    tr = trainer(tmp_path, max_epochs=1)
    tr.fit(model, loader(clusters()))
    (metrics,) = tr.test(model, loader(clusters(seed=5)), verbose=False)
    assert set(metrics) == {"test_loss", "test_acc"}  # the student's own names
    predictions = torch.cat(tr.predict(model, loader(lc.IndexedDataset(clusters(seed=5)))))
    x = clusters(seed=5).tensors[0]
    assert torch.equal(
        predictions, student.eval()(x).argmax(-1)
    )  # the student's predict_step, index stripped


# ----------------------------------------------------------------------------- review regressions


def test_wrapper_pickles_and_deep_copies_with_its_hooks() -> None:
    import pickle

    model = lc.DistillationModule(Student(), teacher_net())
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        hook = clone.__dict__["validation_step"]
        assert hook.args[0] is clone  # bound to the copy, whose student is the copy's
        x = torch.randn(2, 12)
        torch.testing.assert_close(clone.teacher(x), model.teacher(x))


@pytest.mark.parametrize("kind", ["sequential", "chained"])
def test_composite_lr_schedulers_cover_the_adapter_group(tmp_path: Path, kind: str) -> None:
    class Scheduled(Student):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
            decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
            if kind == "sequential":
                sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[2])
            else:
                sched = torch.optim.lr_scheduler.ChainedScheduler([warm, decay])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    reference = Scheduled()
    ref_opt = reference.configure_optimizers()
    model = lc.DistillationModule(Scheduled(), teacher_net(), hints={"fc1": "0"})
    tr = trainer(tmp_path, max_steps=5)
    tr.fit(model, loader(clusters()))
    for _ in range(5):
        ref_opt["optimizer"].step()
        ref_opt["lr_scheduler"]["scheduler"].step()
    groups = tr.optimizers[0].param_groups
    expected = ref_opt["optimizer"].param_groups[0]["lr"]
    assert groups[0]["lr"] == pytest.approx(expected)
    assert groups[1]["lr"] == pytest.approx(expected)  # the adapters follow the same schedule


def test_batch_transfer_hooks_and_a_training_step_without_batch_idx(tmp_path: Path) -> None:
    class Hooked(Student):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, y = batch  # the plain batch, not the indexed dict
            return x * 2, y

        def training_step(self, batch: Any) -> Tensor:  # Lightning allows leaving out batch_idx
            x, y = batch
            self.seen = x
            return F.cross_entropy(self(x), y)

    student = Hooked()
    model = lc.DistillationModule(student, teacher_net(), cache=True)
    trainer(tmp_path, max_epochs=2).fit(model, loader(lc.IndexedDataset(clusters())))
    torch.testing.assert_close(student.seen, clusters().tensors[0][-32:] * 2)


def test_sequence_hints_get_a_linear_adapter_and_modes_are_kept() -> None:
    class Seq(pl.LightningModule):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, d)
            self.norm = nn.BatchNorm1d(10).eval()  # a frozen part, in eval mode
            self.proj = nn.Linear(d, d)
            self.out = nn.Linear(d, 20)
            self.example_input_array = torch.zeros(2, 10, dtype=torch.long)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.out(torch.relu(self.proj(self.norm(self.embed(tokens)))))

    student = Seq(8)
    model = lc.DistillationModule(student, Seq(32), hints={"proj": "proj"})
    adapter = model.adapters["proj__to__proj"]
    assert isinstance(adapter, nn.Linear)
    assert (adapter.in_features, adapter.out_features) == (8, 32)  # features, not the 10 tokens
    assert student.training
    assert not student.norm.training  # per-module modes restored after the construction check


def test_teacher_in_another_dtype_and_a_teacher_without_parameters(tmp_path: Path) -> None:
    lc.DistillationModule(Student(), teacher_net().half())  # the construction check casts the example

    class BufferTeacher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(12, 4, generator=torch.Generator().manual_seed(0)))
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return x @ self.w

    teacher = BufferTeacher()
    model = lc.DistillationModule(Student(), teacher, cache=True)
    trainer(tmp_path, max_epochs=3).fit(model, loader(lc.IndexedDataset(clusters())))
    assert teacher.calls == 6 + 1  # cached after the first epoch


def test_feature_cache_with_two_backbone_calls_per_step_and_nan_data(tmp_path: Path) -> None:
    class TwoViews(Transfer):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.head(self.backbone(x) + self.backbone(-x)), y)

    def run(cache: bool) -> TwoViews:
        pl.seed_everything(0)
        model = TwoViews()
        model.backbone.requires_grad_(False)
        data = clusters()
        x = data.tensors[0].clone()
        x[:, -1] = float("nan")  # a NaN feature must not look like a random transform
        data = TensorDataset(torch.nan_to_num(x) * 0 + data.tensors[0], data.tensors[1])
        data_nan = TensorDataset(x, data.tensors[1])
        cbs = [lc.FeatureCache("backbone")] if cache else []
        trainer(tmp_path, max_epochs=3, callbacks=cbs).fit(
            model, loader(lc.IndexedDataset(data) if cache else data, shuffle=True)
        )
        if cache:  # the probe accepts data with NaNs
            lc.distillation.cache.probe_training_data(
                loader(lc.IndexedDataset(data_nan)), "FeatureCache", "index", False, "test"
            )
        return model

    _same_weights(run(False), run(True))  # the second view was never served the first one's features


def test_student_model_eval_hook_is_forwarded(tmp_path: Path) -> None:
    class EvalHook(Student):
        calls = 0

        def on_validation_model_eval(self) -> None:
            self.calls += 1
            super().on_validation_model_eval()

    student = EvalHook()
    trainer(tmp_path, max_epochs=1).fit(
        lc.DistillationModule(student, teacher_net()), loader(clusters()), loader(clusters())
    )
    assert student.calls == 1


def test_cache_refuses_augmentation_inside_the_students_step(tmp_path: Path) -> None:
    class Augments(Student):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            x = x + 0.5 * torch.randn_like(x)  # randomness the pre-training probe cannot see
            return F.cross_entropy(self(x), y)

    model = lc.DistillationModule(Augments(), teacher_net(), cache=True, cache_check_every=3)
    with pytest.raises(ValueError, match=r"the teacher's output for cached samples changed .* training_step"):
        trainer(tmp_path, max_epochs=3).fit(model, loader(lc.IndexedDataset(clusters()), shuffle=True))
    # declared invariant: no check; a deterministic student passes the check (covered with
    # cache_check_every=1 here)
    model = lc.DistillationModule(Augments(), teacher_net(), cache=True, invariant_transforms=True)
    trainer(tmp_path, max_epochs=2).fit(model, loader(lc.IndexedDataset(clusters()), shuffle=True))
    model = lc.DistillationModule(Student(), teacher_net(), cache=True, cache_check_every=1)
    trainer(tmp_path, max_epochs=3).fit(model, loader(lc.IndexedDataset(clusters()), shuffle=True))
    with pytest.raises(ValueError, match="`cache_check_every`"):
        lc.DistillationModule(Student(), teacher_net(), cache_check_every=-1)
