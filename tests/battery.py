"""The shared test battery: model factories, test-only techniques and the registry of entries.

Every battery test (fit, crash-and-resume, compressed checkpoint, 2-process DDP, gradient
accumulation, bf16-mixed, bad arguments) runs every :class:`Entry` of ``REGISTRY``. An entry names
its callback(s), the model it trains (MLP, CNN with BatchNorm, a residual net, a wrapper whose
compression root is its student, or the conv+linear ``TinyNet``), how its checkpoint loads
(``load_from_checkpoint`` for shape-preserving techniques, ``lightning_compress.load_checkpoint``
for shape-changing ones) and whether it changes the structure. A completeness test fails when an
exported compression callback has no entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_compress as lc
from lightning_compress.core.engine import QUANTIZE, FunctionConstraint

STEPS_PER_EPOCH = 8  # 128 samples / batch 16


# ---------------------------------------------------------------------------- models
class _Classifier(pl.LightningModule):
    """Shared training step / optimizer of the battery models (inputs (N, 4, 6, 6), 4 classes)."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.example_input_array = torch.zeros(1, 4, 6, 6)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "adam":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)
        if self.hparams.optimizer == "sgd-steplr":
            sched = torch.optim.lr_scheduler.StepLR(opt, 8, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class TinyNet(_Classifier):
    """Conv + two Linear layers: covers conv and linear code paths, every in-dim divisible by 4."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__(lr, optimizer)
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class MLP(_Classifier):
    """Three Linear layers on the flattened input."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__(lr, optimizer)
        self.fc1 = nn.Linear(144, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class BNConvNet(_Classifier):
    """Conv-BN-ReLU twice, global pooling, Linear head."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__(lr, optimizer)
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class ResNet(_Classifier):
    """A stem and one residual block (identity shortcut: coupled channels), Linear head."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__(lr, optimizer)
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.block(x))
        return self.fc(x.mean(dim=(2, 3)))


class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(144, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Wrapper(_Classifier):
    """A distillation-style wrapper: trains ``student`` against labels and a frozen ``teacher``.

    ``compression_root`` names the student: techniques target, mask and log its own layer names,
    and can never touch the teacher.
    """

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__(lr, optimizer)
        self.student = _Student()
        self.teacher = _Student()
        self.teacher.requires_grad_(False)

    @property
    def compression_root(self) -> nn.Module:
        return self.student

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.student(x)
        with torch.no_grad():
            soft = torch.softmax(self.teacher(x), dim=-1)
        loss = nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(logits, soft)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.student.parameters(), lr=self.hparams.lr, momentum=0.9)


class _DistilledStudent(_Classifier):
    """The student of :class:`Distill`: a LightningModule of its own (training step, optimizers)."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__(lr, optimizer)
        self.fc1 = nn.Linear(144, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _distilled_student(lr: float, optimizer: str) -> _DistilledStudent:
    # Built outside Distill.__init__'s frame: save_hyperparameters walks up the chain of __init__
    # frames, so building it inline would also record the wrapper's arguments as the student's.
    return _DistilledStudent(lr, optimizer)


def _oracle_teacher() -> nn.Module:
    """A fixed, deterministic teacher: the linear map that labels :func:`tiny_data` (scaled down)."""
    gen = torch.Generator().manual_seed(1234)
    torch.randn(128, 4, 6, 6, generator=gen)  # tiny_data's inputs come first from the same generator
    w = torch.randn(4 * 6 * 6, 4, generator=gen)
    with torch.random.fork_rng():  # the global RNG (the student's init) is left as it was
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    with torch.no_grad():
        teacher[1].weight.copy_(w.T / 4)
        teacher[1].bias.zero_()
    return teacher.requires_grad_(False).eval()


class Distill(lc.DistillationModule):
    """``DistillationModule`` around its own student LightningModule and a fixed oracle teacher.

    Loadable with ``Distill.load_from_checkpoint``: the hyper-parameters are ``lr``, ``optimizer`` and
    the wrapper's own arguments (``temperature``, ``alpha``, ...), never the networks.
    """

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd", **kwargs: Any) -> None:
        kwargs = {"temperature": 2.0, "alpha": 0.5, **kwargs}
        super().__init__(_distilled_student(lr, optimizer), _oracle_teacher(), **kwargs)


MODELS: dict[str, type[pl.LightningModule]] = {
    "tiny": TinyNet,
    "mlp": MLP,
    "bn-cnn": BNConvNet,
    "resnet": ResNet,
    "wrapper": Wrapper,
    "distill": Distill,
}


def tiny_data(n: int = 128, batch_size: int = 16) -> DataLoader:
    """Fixed, learnable data; no shuffling, so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 4, 6, 6, generator=gen)
    teacher = torch.randn(4 * 6 * 6, 4, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: os.PathLike | str, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer for tests."""
    opts: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "default_root_dir": str(tmp_path),
    }
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


# ---------------------------------------------------------------------------- test-only techniques
class GridSnap(lc.CompressionCallback):
    """Test-only weight constraint in the ``quantize`` phase: snaps targeted weights to a 1/16 grid.

    It keeps zeros at zero, so with pruning both orders of the callbacks must give the same weights.
    """

    def __init__(self, targets: list[str] | None = None, step: float = 1 / 16) -> None:
        super().__init__(targets=targets)
        self.grid = step
        self.calls = 0
        self._params: list[nn.Parameter] = []

    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = self.root(pl_module)
        self._params = [root.get_submodule(n).weight for n in self.module_names]
        with torch.no_grad():
            self._snap(self._params)

    def _snap(self, params: list[nn.Parameter]) -> None:
        self.calls += 1
        for p in params:
            p.copy_(torch.round(p / self.grid) * self.grid)

    def constraints(self) -> list[Any]:
        return (
            [FunctionConstraint(QUANTIZE, self._params, self._snap, owner="GridSnap")] if self._params else []
        )

    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        root = self.root(pl_module)
        self._params = [root.get_submodule(n).weight for n in self.module_names]

    def state_dict(self) -> dict[str, Any]:
        return {"grid": self.grid}


class ShrinkHidden(lc.CompressionCallback):
    """Test-only shape-changing technique: at step ``at`` removes the hidden units of ``layer`` whose
    outgoing weight norm is smallest (keeping ``keep`` of them), physically, through the engine.

    ``layer`` and ``next_layer`` are Linear modules of the compression root.
    """

    changes_structure = True

    def __init__(self, at: int = 10, layer: str = "fc1", next_layer: str = "fc2", keep: float = 0.5) -> None:
        super().__init__(targets=[layer, next_layer])
        self.at, self.layer, self.next_layer, self.keep = at, layer, next_layer, keep
        self.done = False
        self.kept: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.done or self.engine is None or self.engine.clock < self.at:
            return
        root = self.root(pl_module)
        w = root.get_submodule(self.layer).weight.detach()
        n_keep = max(1, int(w.shape[0] * self.keep))
        kept = sorted(torch.topk(w.norm(dim=1), n_keep).indices.tolist())
        p = self.root_prefix
        ops = [
            {"op": "slice", "tensor": f"{p}{self.layer}.weight", "dim": 0, "index": kept},
            {"op": "slice", "tensor": f"{p}{self.layer}.bias", "dim": 0, "index": kept},
            {"op": "slice", "tensor": f"{p}{self.next_layer}.weight", "dim": 1, "index": kept},
        ]
        self.engine.change_structure(trainer, pl_module, ops, self.name)
        self.done, self.kept = True, kept

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "kept": torch.tensor(self.kept, dtype=torch.long)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict["done"])
        self.kept = state_dict["kept"].tolist()


# ---------------------------------------------------------------------------- entries
@dataclass
class Entry:
    """One configuration the battery runs.

    Attributes:
        id: Test id.
        make: Builds fresh callbacks (4 epochs x 8 steps = 32 training steps); ``make(**kw)``
            passes ``kw`` to the first one (bad-argument tests).
        check: Asserts the trained (or loaded) model is compressed: ``check(callbacks, model)``.
        model: Key of :data:`MODELS`.
        state: Tensors that must agree across DDP ranks and between an interrupted-and-resumed run
            and an uninterrupted one (default: every compression callback's masks / state).
        loads_with: ``"load_from_checkpoint"`` (shape-preserving), ``"load_checkpoint"`` or
            ``"restore_quantization"`` (``load_from_checkpoint`` gives the float weights, then the QAT
            callback state in the checkpoint re-applies the quantizers).
        changes_structure: Whether the entry changes parameter shapes.
        bad_args: ``(kwargs, regex)``: ``make(**kwargs)`` raises ValueError matching regex.
        checkpoint_after_fit: The compressed model exists only once training ended (layer fusion):
            the checkpoint test saves one with ``trainer.save_checkpoint`` after fit.
    """

    id: str
    make: Callable[..., list[pl.Callback]]
    check: Callable[[list[pl.Callback], nn.Module], None]
    model: str = "tiny"
    state: Callable[[list[pl.Callback]], dict[str, Tensor]] | None = None
    loads_with: str = "load_from_checkpoint"
    changes_structure: bool = False
    bad_args: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    checkpoint_after_fit: bool = False

    def build_model(self, **kwargs: Any) -> pl.LightningModule:
        return MODELS[self.model](**kwargs)

    def collect_state(self, callbacks: list[pl.Callback]) -> dict[str, Tensor]:
        if self.state is not None:
            return self.state(callbacks)
        out: dict[str, Tensor] = {}
        for i, cb in enumerate(callbacks):
            if isinstance(getattr(cb, "masks", None), lc.MaskSet):
                out.update({f"{i}:{n}": cb.masks[n].cpu() for n in cb.masks.names})
            if isinstance(cb, lc.DynamicNetworkSurgery):
                out.update({f"{i}:dense:{n}": t.cpu() for n, t in cb.dense.items()})
            elif isinstance(cb, ShrinkHidden):
                out[f"{i}:kept"] = torch.tensor(cb.kept)
            if isinstance(cb, lc.StructuredPruning):
                out.update({f"{i}:removed:{k}": torch.tensor(v) for k, v in cb.removed.items()})
                out.update({f"{i}:keep:{g.name}": k for g, k in zip(cb.groups, cb.keep)})
        return out


def compressed_root(model: nn.Module) -> nn.Module:
    return lc.compression_root(model)[0]


def _weight_sparsity(model: nn.Module, names: list[str]) -> float:
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / sum(model.get_parameter(n).numel() for n in names)


def _pruning_check(target: float) -> Callable[[list[pl.Callback], nn.Module], None]:
    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        root = compressed_root(model)
        cb = next(c for c in callbacks if isinstance(getattr(c, "masks", None), lc.MaskSet))
        names = cb.masks.names or [
            n for n, p in root.named_parameters() if n.endswith("weight") and p.dim() > 1
        ]
        assert abs(_weight_sparsity(root, names) - target) < 2e-3, _weight_sparsity(root, names)
        for name in cb.masks.names:  # weights are zero wherever the mask says so
            assert not bool(root.get_parameter(name)[~cb.masks[name].cpu()].any())

    return check


def _both(
    *checks: Callable[[list[pl.Callback], nn.Module], None],
) -> Callable[[list[pl.Callback], nn.Module], None]:
    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        for c in checks:
            c(callbacks, model)

    return check


def _on_grid(callbacks: list[pl.Callback], model: nn.Module) -> None:
    root = compressed_root(model)
    snap = next(c for c in callbacks if isinstance(c, GridSnap))
    for name in snap.module_names:
        w = root.get_submodule(name).weight
        torch.testing.assert_close(w, torch.round(w * 16) / 16, rtol=0, atol=0)


def _shrunk(width: int) -> Callable[[list[pl.Callback], nn.Module], None]:
    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        root = compressed_root(model)
        assert root.fc1.out_features == width
        assert root.fc1.weight.shape[0] == width
        assert root.fc2.in_features == width
        assert root.fc2.weight.shape[1] == width

    return check


_PRUNING_BAD = [
    ({"target_sparsity": 1.0}, r"`target_sparsity`=1.0 is not supported; expected a number in \[0, 1\)"),
    ({"schedule": "cosine"}, r"`schedule`='cosine' is not supported; expected one of \['constant', 'linear'"),
    ({"criterion": "l3"}, r"`criterion`='l3' is not supported; expected one of \['magnitude', 'taylor'"),
    ({"scope": "layer"}, r"`scope`='layer' is not supported; expected one of \['global', 'local'\]"),
    ({"pattern": "blocks"}, r"`pattern`='blocks' is not supported; expected 'unstructured' or an 'N:M'"),
    ({"pattern": "4:4"}, r"`pattern`='4:4': N:M needs 1 <= N < M"),
    ({"pattern": "2:4", "target_sparsity": 0.9}, r"`target_sparsity`=0.9 contradicts `pattern`='2:4'"),
    ({"frequency": 0}, r"`frequency`=0 is not supported; expected an int >= 1"),
    ({"start": -1}, r"`start`=-1 is a negative step"),
    ({"end": 1.5}, r"`end`=1.5 is a float outside \[0, 1\]"),
    ({"start": 0.8, "end": 0.5}, r"`end`=0.5 is before `start`=0.8"),
    ({"targets": "fc1"}, r"`targets`='fc1' is not supported; expected a list of fnmatch patterns"),
    ({"exclude": [""]}, r"`exclude` entries must be non-empty strings"),
    (
        {"initial_sparsity": 0.95, "target_sparsity": 0.5},
        r"`initial_sparsity`=0.95 is above `target_sparsity`",
    ),
    ({"power": 0}, r"`power`=0 is not supported; expected a number > 0"),
    ({"seed": -1}, r"`seed`=-1 is not supported; expected an int >= 0"),
    ({"log_per_layer": "no"}, r"`log_per_layer`='no' is not supported; expected true or false"),
    ({"calibration_steps": 0}, r"`calibration_steps`=0 is not supported; expected an int >= 1"),
    ({"flush_denormal": "yes"}, r"`flush_denormal`='yes' is not supported; expected true or false"),
    ({"min_density": 1.0}, r"`min_density`=1.0 is not supported; expected a number in \[0, 1\)"),
    (
        {"target_sparsity": 0.995, "min_density": 0.01},
        r"`min_density`=0.01 is above the density that `target_sparsity`=0.995 leaves",
    ),
    ({"include_embeddings": 1}, r"`include_embeddings`=1 is not supported; expected true or false"),
]


_DNS_BAD = [
    ({"target_sparsity": 0.9, "c": 1.0}, r"`target_sparsity`=0.9 and `c`=1.0 were both given; give one"),
    ({"gamma": -1e-4}, r"`gamma`=-0.0001 is not supported; expected a number in \[0, inf\)"),
    ({"power": -1}, r"`power`=-1 is not supported; expected a number in \[0, inf\)"),
    (
        {"c": "high", "target_sparsity": None},
        r"`c`='high' is not supported; expected a finite number or a \{pattern: number\}",
    ),
    ({"c": {}, "target_sparsity": None}, r"`c`=\{\} is empty; expected a number or a non-empty"),
    (
        {"c": {"fc*": "x"}, "target_sparsity": None},
        r"`c\['fc\*'\]`='x' is not supported; expected a finite number",
    ),
    ({"target_sparsity": 1.0}, r"`target_sparsity`=1.0 is not supported; expected a number in \[0, 1\)"),
    ({"stop": 1.5}, r"`stop`=1.5 is a float outside \[0, 1\]"),
    ({"start": 0.8, "stop": 0.5}, r"`stop`=0.5 is before `start`=0.8"),
    ({"end": 0.8, "stop": 0.5}, r"`end`=0.8 is after `stop`=0.5; expected end <= stop"),
    (
        {"calibration": "layer"},
        r"`calibration`='layer' is not supported; expected one of \['global', 'shared_c'",
    ),
    ({"schedule": "cosine"}, r"`schedule`='cosine' is not supported; expected one of \['constant'"),
    ({"seed": -1}, r"`seed`=-1 is not supported; expected an int >= 0"),
    (
        {"target_sparsity": 0.995, "min_density": 0.01},
        r"`min_density`=0.01 is above the density that `target_sparsity`=0.995 leaves",
    ),
]

_ENERGY_BAD = [
    (
        {"restore": False, "restore_fraction": 1.0},
        r"`restore_fraction`=1.0 has no effect with `restore`=False",
    ),
    ({"target_energy_reduction": 1.0}, r"`target_energy_reduction`=1.0 is not supported"),
    ({"energy_table": {"fp32_mult": 3.7}}, r"`energy_table` is missing 'fp32_add'; expected all of"),
]


def _student_prefixed(callbacks: list[pl.Callback], model: nn.Module) -> None:
    """A DistillationModule's state is its student's, under "student.": no teacher, no second copy."""
    assert isinstance(model, lc.DistillationModule)
    student = {f"student.{k}" for k in model.student.state_dict()}
    assert set(model.state_dict()) == student  # (no hints: no adapter entries)
    assert not any(p is q for p in model.teacher.parameters() for q in model.parameters())


def _energy_check(target: float) -> Callable[[list[pl.Callback], nn.Module], None]:
    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        root = compressed_root(model)
        cb = next(c for c in callbacks if isinstance(c, lc.EnergyAwarePruning))
        layers = {n.rsplit(".", 1)[0] for n in cb.masks.names}
        profile = [e for e in lc.energy_profile(root, torch.zeros(1, 4, 6, 6)) if e.name in layers]
        dense = sum(e.energy_pj(1.0) for e in profile)
        reduction = 1.0 - sum(e.energy_pj() for e in profile) / dense
        assert reduction == pytest.approx(target, abs=0.02), reduction
        for name in cb.masks.names:
            assert not bool(root.get_parameter(name)[~cb.masks[name].cpu()].any())

    return check


_REGULARIZER_BAD = [
    ({"l1": 1e-3, "end": 10}, r"`end`=10 has no effect with `schedule`='constant'"),
    ({"l1": 0.0, "group_lasso": 0.0}, r"`l1`=0.0 and `group_lasso`=0.0"),
    ({"l1": -1.0}, r"`l1`=-1.0 is not supported; expected a number"),
    ({"groups": "rows"}, r"`groups`='rows' is not supported; expected one of \['output', 'input', 'both'\]"),
]


def _gradual(**defaults: Any) -> Callable[..., list[pl.Callback]]:
    def make(**overrides: Any) -> list[pl.Callback]:
        return [lc.GradualPruning(**{**defaults, **overrides})]

    return make


def _stack(*factories: Callable[[], pl.Callback]) -> Callable[..., list[pl.Callback]]:
    def make(**overrides: Any) -> list[pl.Callback]:
        first, *rest = factories
        return [first(**overrides), *(f() for f in rest)]

    return make


_SCHED = {"start": 2, "end": 26, "frequency": 3}
#: Surgery from step 2, ramp to the target by 12, masks fixed from 26 (updates with probability ~0.9).
_DNS_SCHED = {"start": 2, "end": 12, "stop": 26, "gamma": 0.01}
#: With a fixed c there is no ramp (`end` would be refused).
_DNS_FIXED_C = {"start": 2, "stop": 26, "gamma": 0.01}


def _dns_check(callbacks: list[pl.Callback], model: nn.Module) -> None:
    root = compressed_root(model)
    cb = next(c for c in callbacks if isinstance(c, lc.DynamicNetworkSurgery))
    assert cb.frozen
    assert cb.updates > 1
    assert 0.05 < _weight_sparsity(root, cb.masks.names) < 0.95, _weight_sparsity(root, cb.masks.names)
    for name in cb.masks.names:  # weights are zero exactly where the mask says so
        assert not bool(root.get_parameter(name)[~cb.masks[name].cpu()].any())


#: Hard prune at the schedule's end (step 26): after the crash-and-resume checkpoint (step 16).
_STRUCT_LATE = {"start": 2, "end": 26, "frequency": 3}
#: Hard prune at step 12: before that checkpoint (the resumed run replays the recipe).
_STRUCT_EARLY = {"start": 2, "end": 10, "frequency": 3, "hard_prune_at": 12}

_STRUCTURED_BAD = [
    ({"target_ratio": 1.0}, r"`target_ratio`=1.0 is not supported; expected a number in \[0, 1\)"),
    (
        {"target_macs": 0.0, "target_ratio": None},
        r"`target_macs`=0.0 is not supported; expected a number in \(0, 1\]",
    ),
    ({"target_ratio": 0.5, "target_params": 0.5}, r"`target_ratio` and `target_params` were both given"),
    ({"criterion": "l3"}, r"`criterion`='l3' is not supported; expected one of \['l1', 'l2', 'fpgm'"),
    ({"scope": "layer"}, r"`scope`='layer' is not supported; expected one of \['global', 'local'\]"),
    ({"hard_prune_at": "later"}, r"`hard_prune_at`='later' is not supported; expected 'end', an int"),
    ({"hard_prune_at": 1.5}, r"`hard_prune_at`=1.5 is a float outside \[0, 1\]"),
    ({"round_to": 0}, r"`round_to`=0 is not supported; expected an int >= 1"),
    ({"schedule": "cosine"}, r"`schedule`='cosine' is not supported; expected one of \['constant'"),
    ({"frequency": 0}, r"`frequency`=0 is not supported; expected an int >= 1"),
    ({"carry_optimizer_state": "yes"}, r"`carry_optimizer_state`='yes' is not supported; expected true"),
]

_SLIMMING_BAD = [
    ({"lam": -1.0}, r"`lam`=-1.0 is not supported; expected a number"),
    ({"channel_ratio": 1.0}, r"`channel_ratio`=1.0 is not supported; expected a number in \[0, 1\)"),
    ({"prune_at": "later"}, r"`prune_at`='later' is not supported; expected 'end', an int"),
    ({"lam_schedule": "cosine"}, r"`lam_schedule`='cosine' is not supported; expected one of"),
    ({"lam_end": 10}, r"`lam_end`=10 has no effect with `lam_schedule`='constant'"),
]


def _fused(callbacks: list[pl.Callback], model: nn.Module) -> None:
    root = compressed_root(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in root.modules())
    assert any(isinstance(m, nn.Identity) for m in root.modules())


def _widths_of(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return module.num_features


def _structured_check(ratio: float | None = None) -> Callable[[list[pl.Callback], nn.Module], None]:
    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        root = compressed_root(model)
        cb = next(c for c in callbacks if isinstance(c, lc.StructuredPruning))
        assert cb.hard_pruned
        assert not len(cb.masks)  # no per-step work after the hard prune
        assert cb.removed, "no layer lost channels"
        for layer, (original, kept) in cb.removed.items():
            assert kept < original
            module = root.get_submodule(layer)
            if not isinstance(module, nn.Identity):  # a BatchNorm that LayerFusion folded since
                assert _widths_of(module) == kept, layer
        if ratio is not None:
            assert abs(cb.channel_ratio - ratio) < 0.08, cb.channel_ratio
        fresh = compressed_root(type(model)())
        assert sum(p.numel() for p in root.parameters()) < sum(p.numel() for p in fresh.parameters())
        training = model.training
        model.eval()  # a train-mode forward would update BatchNorm statistics
        with torch.no_grad():
            assert model(torch.randn(3, 4, 6, 6)).shape == (3, 4)  # runs, keeps its classes
        model.train(training)

    return check


def _qat_check(bits: int = 8) -> Callable[[list[pl.Callback], nn.Module], None]:
    """Every targeted layer is fake-quantized, on its grid, with an observed range; the forward really quantizes."""

    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        from lightning_compress.quantization.fake_quant import dequantize_model, quantized_layers

        root = compressed_root(model)
        layers = quantized_layers(root)
        assert layers, "no quantized layer"
        with torch.no_grad():
            for name, layer in layers.items():
                assert layer.weight_quant.bits == bits, name
                assert layer.weight_quant.enabled, name
                assert layer.input_quant.ready, name
                qw = layer.quantized_weight()
                qmax = 2 ** (bits - 1) - 1
                scale = qw.abs().flatten(1).amax(1).clamp_min(1e-12) / qmax
                levels = qw / scale.reshape((-1,) + (1,) * (qw.dim() - 1))
                torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
                assert levels.abs().max() <= qmax + 1e-3
                # zero weights (pruned) stay exactly zero after fake quantization
                assert torch.equal(qw[layer.weight == 0], torch.zeros_like(qw[layer.weight == 0]))
            training = model.training
            model.eval()
            x = torch.randn(3, 4, 6, 6)
            quantized = model(x)
            import copy

            plain = copy.deepcopy(model)
            dequantize_model(compressed_root(plain))
            assert not torch.equal(plain(x), quantized), "the forward does not quantize"
            model.train(training)

    return check


def _qat_state(callbacks: list[pl.Callback]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i, cb in enumerate(callbacks):
        if isinstance(cb, lc.QuantizationAwareTraining):
            for name, layer in cb.layers.items():
                q = layer.input_quant
                out[f"{i}:{name}:min"] = q.min_val.detach().cpu().clone()
                out[f"{i}:{name}:max"] = q.max_val.detach().cpu().clone()
                if q.learned_scale is not None:
                    out[f"{i}:{name}:lsq"] = q.learned_scale.detach().cpu().clone()
        elif isinstance(getattr(cb, "masks", None), lc.MaskSet):
            out.update({f"{i}:{n}": cb.masks[n].cpu() for n in cb.masks.names})
    return out


_QAT_BAD = [
    ({"weight_bits": 1}, r"`weight_bits`=1 is not supported; expected an int from 2 to 8"),
    ({"activation_bits": 16}, r"`activation_bits`=16 is not supported; expected an int from 2 to 8"),
    (
        {"start": 10, "freeze_bn_at": 4},
        r"`freeze_bn_at`=4 is before `start`=10; expected freeze_bn_at >= start",
    ),
    (
        {"start": 10, "freeze_observers_at": 4},
        r"`freeze_observers_at`=4 is before `start`=10; expected freeze_observers_at >= start",
    ),
    (
        {"start": 5, "freeze_observers_at": 5},
        r"`freeze_observers_at`=5 equals `start`: the observers would never see data",
    ),
    ({"learn_scales": True, "freeze_observers_at": None}, r"`learn_scales`=True needs `freeze_observers_at`"),
    ({"init": "zeroq"}, r"`init`='zeroq' is not supported; expected one of \['observe', 'data_free'\]"),
]
#: Float warm-up to step 4, BatchNorm frozen at 20, observers at 24.
_QAT_SCHED = {"start": 4, "freeze_bn_at": 20, "freeze_observers_at": 24}


def _lowbit_check(levels_per_channel: int) -> Callable[[list[pl.Callback], nn.Module], None]:
    """The targeted weights hold binary / ternary values; the first and last layers stay float."""

    def check(callbacks: list[pl.Callback], model: nn.Module) -> None:
        root = compressed_root(model)
        cb = next(c for c in callbacks if isinstance(c, lc.LowBitWeights))
        assert cb.param_names, "no layer quantized"
        for name in cb.param_names:
            w = root.get_parameter(name).detach()
            for row in w.flatten(1):
                assert row.unique().numel() <= levels_per_channel, name
        quantized = {n.rsplit(".", 1)[0] for n in cb.param_names}
        layers = [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert layers[0] not in quantized
        assert layers[-1] not in quantized

    return check


def _lowbit_state(callbacks: list[pl.Callback]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i, cb in enumerate(callbacks):
        if isinstance(cb, lc.LowBitWeights):
            out.update({f"{i}:shadow:{n}": t.detach().cpu().clone() for n, t in cb.shadow.items()})
        elif isinstance(getattr(cb, "masks", None), lc.MaskSet):
            out.update({f"{i}:{n}": cb.masks[n].cpu() for n in cb.masks.names})
    return out


_LOWBIT_BAD = [
    (
        {"mode": "quaternary"},
        r"`mode`='quaternary' is not supported; expected one of \['binary', 'ternary', 'ttq'\]",
    ),
    ({"mode": "ttq", "ttq_threshold": 1.5}, r"`ttq_threshold`=1.5 is not supported"),
]


def _dfq_check(callbacks: list[pl.Callback], model: nn.Module) -> None:
    """Layer pairs equalized, the int8 copy built from distilled data (the DDP dump sees no callback)."""
    from lightning_compress.quantization.fake_quant import quantized_layers

    cb = next((c for c in callbacks if isinstance(c, lc.DataFreeQuantization)), None)
    if cb is None:  # DumpState passes CompressionCallbacks only; ranks still compare every parameter
        return
    assert cb.pairs, "no pair equalized"
    assert cb.quantized_model is not None
    assert quantized_layers(cb.quantized_model)


REGISTRY: list[Entry] = [
    Entry(
        "gradual-magnitude-global",
        _gradual(target_sparsity=0.75, **_SCHED),
        _pruning_check(0.75),
        bad_args=_PRUNING_BAD,
    ),
    Entry(
        "gradual-taylor-local-mlp",
        _gradual(target_sparsity=0.6, criterion="taylor", scope="local", schedule="linear", **_SCHED),
        _pruning_check(0.6),
        model="mlp",
    ),
    Entry(
        "gradual-activation-global-resnet",
        _gradual(target_sparsity=0.8, criterion="activation", calibration_steps=2, **_SCHED),
        _pruning_check(0.8),
        model="resnet",
    ),
    Entry(
        "gradual-lamp-bn-cnn",
        _gradual(target_sparsity=0.7, schedule="exponential", criterion="lamp", **_SCHED),
        _pruning_check(0.7),
        model="bn-cnn",
    ),
    Entry(
        "gradual-random-2:4",
        _gradual(pattern="2:4", criterion="random", schedule="exponential", **_SCHED),
        _pruning_check(0.5),
    ),
    Entry(
        "gradual-wrapper-student",
        _gradual(target_sparsity=0.7, **_SCHED),
        _pruning_check(0.7),
        model="wrapper",
    ),
    Entry(
        "gradual-distillation-student",  # lc.DistillationModule: the student's own names, no teacher
        _gradual(target_sparsity=0.7, **_SCHED),
        _both(_pruning_check(0.7), _student_prefixed),
        model="distill",
    ),
    Entry(
        "stacked-gradual+gridsnap",
        _stack(lambda **kw: lc.GradualPruning(**{"target_sparsity": 0.75, **_SCHED, **kw}), GridSnap),
        _both(_pruning_check(0.75), _on_grid),
    ),
    Entry(
        "stacked-gridsnap+gradual",
        _stack(GridSnap, lambda: lc.GradualPruning(target_sparsity=0.75, **_SCHED)),
        _both(_pruning_check(0.75), _on_grid),
    ),
    Entry(
        "dns-calibrated-mlp",
        lambda **kw: [lc.DynamicNetworkSurgery(**{"target_sparsity": 0.75, **_DNS_SCHED, **kw})],
        _pruning_check(0.75),
        model="mlp",
        bad_args=_DNS_BAD,
    ),
    Entry(
        "dns-c-per-layer-bn-cnn",  # the paper's hand-set c (the rest is spliced/pruned by the band)
        lambda **kw: [lc.DynamicNetworkSurgery(c={"conv*": 0.5, "*": 1.0}, **{**_DNS_FIXED_C, **kw})],
        _dns_check,
        model="bn-cnn",
    ),
    Entry(
        "dns-wrapper-student",
        lambda **kw: [lc.DynamicNetworkSurgery(**{"target_sparsity": 0.6, **_DNS_SCHED, **kw})],
        _pruning_check(0.6),
        model="wrapper",
    ),
    Entry(
        "energy-aware-tiny",
        lambda **kw: [lc.EnergyAwarePruning(**{"target_energy_reduction": 0.5, **_SCHED, **kw})],
        _energy_check(0.5),
        bad_args=_ENERGY_BAD,
    ),
    Entry(
        "energy-aware-wrapper-student",
        lambda **kw: [lc.EnergyAwarePruning(**{"target_energy_reduction": 0.4, **_SCHED, **kw})],
        _energy_check(0.4),
        model="wrapper",
    ),
    Entry(
        "stacked-gridsnap+energy-aware-resnet",
        _stack(GridSnap, lambda: lc.EnergyAwarePruning(target_energy_reduction=0.5, **_SCHED)),
        _both(_energy_check(0.5), _on_grid),
        model="resnet",
    ),
    Entry(
        "stacked-regularizer+gradual",
        _stack(
            lambda **kw: lc.SparsityRegularizer(**{"l1": 1e-3, "group_lasso": 1e-3, **kw}),
            lambda: lc.GradualPruning(target_sparsity=0.75, **_SCHED),
        ),
        _pruning_check(0.75),
        bad_args=_REGULARIZER_BAD,
    ),
    Entry(
        "stacked-gradual+regularizer-resnet",
        _stack(
            lambda **kw: lc.GradualPruning(**{"target_sparsity": 0.75, **_SCHED, **kw}),
            lambda: lc.SparsityRegularizer(l1=1e-3, schedule="linear", start=2, end=20),
        ),
        _pruning_check(0.75),
        model="resnet",
    ),
    Entry(
        "stacked-dns+gridsnap",
        _stack(
            lambda **kw: lc.DynamicNetworkSurgery(**{"target_sparsity": 0.75, **_DNS_SCHED, **kw}), GridSnap
        ),
        _both(_pruning_check(0.75), _on_grid),
    ),
    Entry(
        "shrink-early-mlp",  # changed at step 10, before the crash-and-resume checkpoint (step 16)
        _stack(lambda **kw: ShrinkHidden(at=10, **kw)),
        _shrunk(16),
        model="mlp",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "shrink-late+gradual-mlp",  # changed at step 20, after the resume checkpoint: masks follow
        _stack(
            lambda **kw: ShrinkHidden(at=20, **kw),
            lambda: lc.GradualPruning(target_sparsity=0.5, targets=["fc1", "fc2"], **_SCHED),
        ),
        _both(_shrunk(16), _pruning_check(0.5)),
        model="mlp",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "shrink-wrapper-student",
        _stack(lambda **kw: ShrinkHidden(at=10, **kw)),
        _shrunk(16),
        model="wrapper",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "shrink-distillation-student",
        _stack(lambda **kw: ShrinkHidden(at=10, **kw)),
        _both(_shrunk(16), _student_prefixed),
        model="distill",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "structured-l1-bn-cnn",  # soft masks through the resume checkpoint, hard prune at step 26
        lambda **kw: [lc.StructuredPruning(**{"target_ratio": 0.5, **_STRUCT_LATE, **kw})],
        _structured_check(0.5),
        model="bn-cnn",
        loads_with="load_checkpoint",
        changes_structure=True,
        bad_args=_STRUCTURED_BAD,
    ),
    Entry(
        "structured-taylor-resnet-early",  # hard prune at step 12, before the resume checkpoint
        lambda **kw: [
            lc.StructuredPruning(**{"target_ratio": 0.5, "criterion": "taylor", **_STRUCT_EARLY, **kw})
        ],
        _structured_check(0.5),
        model="resnet",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "structured-fpgm-macs-tiny",  # a MACs budget, met through the cost model; conv -> flatten -> Linear
        lambda **kw: [
            lc.StructuredPruning(**{"target_macs": 0.6, "criterion": "fpgm", **_STRUCT_EARLY, **kw})
        ],
        _structured_check(),
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "structured-l2-local-wrapper-student",
        lambda **kw: [
            lc.StructuredPruning(
                **{"target_ratio": 0.5, "criterion": "l2", "scope": "local", **_STRUCT_LATE, **kw}
            )
        ],
        _structured_check(0.5),
        model="wrapper",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "structured-l2-distillation-student",  # hard prune at step 12, before the resume checkpoint
        lambda **kw: [
            lc.StructuredPruning(**{"target_ratio": 0.5, "criterion": "l2", **_STRUCT_EARLY, **kw})
        ],
        _both(_structured_check(0.5), _student_prefixed),
        model="distill",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "slimming-bn-cnn",  # L1 on BatchNorm scales, prune at step 20, fine-tune the slim net after
        lambda **kw: [lc.NetworkSlimming(**{"lam": 1e-3, "channel_ratio": 0.5, "prune_at": 20, **kw})],
        _structured_check(0.5),
        model="bn-cnn",
        loads_with="load_checkpoint",
        changes_structure=True,
        bad_args=_SLIMMING_BAD,
    ),
    Entry(
        "stacked-structured+gradual-bn-cnn",  # channels removed at 12, then unstructured pruning of the rest
        _stack(
            lambda **kw: lc.StructuredPruning(**{"target_ratio": 0.5, **_STRUCT_EARLY, **kw}),
            lambda: lc.GradualPruning(target_sparsity=0.6, start=14, end=26, frequency=3),
        ),
        _both(_structured_check(0.5), _pruning_check(0.6)),
        model="bn-cnn",
        loads_with="load_checkpoint",
        changes_structure=True,
    ),
    Entry(
        "fusion-bn-cnn",  # BatchNorm folded when training ends
        lambda **kw: [lc.LayerFusion(**kw)],
        _fused,
        model="bn-cnn",
        loads_with="load_checkpoint",
        changes_structure=True,
        checkpoint_after_fit=True,
        bad_args=[({"on": "epoch"}, r"`on`='epoch' is not supported; expected one of \['fit_end'\]")],
    ),
    Entry(
        "stacked-structured+fusion-resnet",  # channels removed at step 12, BatchNorm folded at the end
        _stack(
            lambda **kw: lc.StructuredPruning(**{"target_ratio": 0.5, **_STRUCT_EARLY, **kw}), lc.LayerFusion
        ),
        _both(_structured_check(0.5), _fused),
        model="resnet",
        loads_with="load_checkpoint",
        changes_structure=True,
        checkpoint_after_fit=True,
    ),
    Entry(
        "qat-int8-bn-cnn",  # BatchNorm folded while training, frozen at 20; observers frozen at 24
        lambda **kw: [lc.QuantizationAwareTraining(**{**_QAT_SCHED, **kw})],
        _qat_check(8),
        model="bn-cnn",
        state=_qat_state,
        loads_with="restore_quantization",
        bad_args=_QAT_BAD,
    ),
    Entry(
        "qat-4bit-lsq-resnet",  # 4-bit weights, 6-bit activations, learned step sizes from step 16
        lambda **kw: [
            lc.QuantizationAwareTraining(
                **{
                    "weight_bits": 4,
                    "activation_bits": 6,
                    "learn_scales": True,
                    "freeze_observers_at": 16,
                    **kw,
                }
            )
        ],
        _qat_check(4),
        model="resnet",
        state=_qat_state,
        loads_with="restore_quantization",
    ),
    Entry(
        "qat-wrapper-student",
        lambda **kw: [lc.QuantizationAwareTraining(**{"start": 2, **kw})],
        _qat_check(8),
        model="wrapper",
        state=_qat_state,
        loads_with="restore_quantization",
    ),
    Entry(
        "qat-distillation-student",
        lambda **kw: [lc.QuantizationAwareTraining(**{"start": 2, **kw})],
        _both(_qat_check(8), _student_prefixed),
        model="distill",
        state=_qat_state,
        loads_with="restore_quantization",
    ),
    Entry(
        "stacked-gradual+qat",  # pruned weights stay exactly zero in the quantized weights
        _stack(
            lambda **kw: lc.GradualPruning(**{"target_sparsity": 0.75, **_SCHED, **kw}),
            lambda: lc.QuantizationAwareTraining(start=2),
        ),
        _both(_pruning_check(0.75), _qat_check(8)),
        state=_qat_state,
        loads_with="restore_quantization",
    ),
    Entry(
        "stacked-qat+gradual-bn-cnn",
        _stack(
            lambda **kw: lc.QuantizationAwareTraining(**{**_QAT_SCHED, **kw}),
            lambda: lc.GradualPruning(target_sparsity=0.75, **_SCHED),
        ),
        _both(_pruning_check(0.75), _qat_check(8)),
        model="bn-cnn",
        state=_qat_state,
        loads_with="restore_quantization",
    ),
    Entry(
        "lowbit-ternary-mlp",  # TWN: {-a, 0, a} per layer (fc2 only: fc1 and fc3 are first / last)
        lambda **kw: [lc.LowBitWeights(**{"mode": "ternary", "start": 2, **kw})],
        _lowbit_check(3),
        model="mlp",
        state=_lowbit_state,
        bad_args=_LOWBIT_BAD,
    ),
    Entry(
        "lowbit-binary-bn-cnn",  # BinaryConnect with per-channel scales: 2 values per output channel
        lambda **kw: [lc.LowBitWeights(**{"mode": "binary", **kw})],
        _lowbit_check(2),
        model="bn-cnn",
        state=_lowbit_state,
    ),
    Entry(
        "stacked-gradual+lowbit-ttq-mlp",  # learned scales; pruned weights stay zero
        _stack(
            lambda **kw: lc.GradualPruning(**{"target_sparsity": 0.5, "targets": ["fc2"], **_SCHED, **kw}),
            lambda: lc.LowBitWeights(mode="ttq"),
        ),
        _both(_pruning_check(0.5), _lowbit_check(3)),
        model="mlp",
        state=_lowbit_state,
    ),
    Entry(
        "dfq-bn-cnn",  # equalization + bias absorption at fit end, int8 copy calibrated on ZeroQ data
        lambda **kw: [lc.DataFreeQuantization(**{"iterations": 20, "num_batches": 1, "batch_size": 8, **kw})],
        _dfq_check,
        model="bn-cnn",
        state=lambda cbs: {},
        checkpoint_after_fit=True,
        bad_args=[
            ({"on": "epoch"}, r"`on`='epoch' is not supported; expected one of \['fit_start', 'fit_end'\]"),
            ({"weight_bits": 1}, r"`weight_bits`=1 is not supported; expected an int from 2 to 8"),
        ],
    ),
]

#: Test-only techniques, exempt from the completeness test's "exported" requirement.
TEST_ONLY = (GridSnap, ShrinkHidden)


class DumpState(pl.Callback):
    """Saves the compression state of each rank at train end (for DDP agreement checks)."""

    def __init__(self, entry_id: str, out_dir: str) -> None:
        self.entry_id, self.out_dir = entry_id, out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entry = next(e for e in REGISTRY if e.id == self.entry_id)
        cbs = [c for c in trainer.callbacks if isinstance(c, lc.CompressionCallback)]
        entry.check(cbs, pl_module)
        state = entry.collect_state(cbs)
        state.update({f"param:{n}": p.detach().clone() for n, p in pl_module.named_parameters()})
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
