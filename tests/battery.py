"""The shared test battery: a tiny model, its data, and the registry of callbacks under test.

A new technique plugs into every battery test (fit, crash-and-resume, compressed checkpoint,
2-process DDP, gradient accumulation, bf16-mixed) by adding one :class:`Entry` to ``REGISTRY``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_compress as lc


class TinyNet(pl.LightningModule):
    """Conv + two Linear layers: covers conv and linear code paths, every in-dim divisible by 4."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)
        self.example_input_array = torch.zeros(1, 4, 6, 6)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)


def tiny_data(n: int = 128, batch_size: int = 16) -> DataLoader:
    """Fixed, learnable data; no shuffling, so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 4, 6, 6, generator=gen)
    teacher = torch.randn(4 * 6 * 6, 4, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


STEPS_PER_EPOCH = 8  # 128 samples / batch 16


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


@dataclass
class Entry:
    """One callback configuration the battery runs.

    Attributes:
        id: Test id.
        make: Builds a fresh callback (state in steps: 4 epochs x 8 steps = 32 optimizer steps).
        state: Tensors that must agree across DDP ranks and between an interrupted-and-resumed
            run and an uninterrupted one.
        check: Asserts the model (from the callback's fit or loaded from a checkpoint) is compressed.
        bad_args: ``(kwargs, regex)`` pairs: constructing with kwargs raises ValueError matching regex.
    """

    id: str
    make: Callable[..., pl.Callback]
    state: Callable[[pl.Callback], dict[str, Tensor]]
    check: Callable[[pl.Callback, nn.Module], None]
    bad_args: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def _pruning_state(cb: lc.GradualPruning) -> dict[str, Tensor]:
    return {name: cb.masks[name].cpu() for name in cb.masks.names}


def _weight_sparsity(model: nn.Module, names: list[str]) -> float:
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / sum(model.get_parameter(n).numel() for n in names)


def _pruning_check(target: float) -> Callable[[pl.Callback, nn.Module], None]:
    def check(cb: pl.Callback, model: nn.Module) -> None:
        names = ["conv.weight", "fc1.weight", "fc2.weight"]
        assert abs(_weight_sparsity(model, names) - target) < 2e-3, _weight_sparsity(model, names)
        if isinstance(cb, lc.GradualPruning) and len(cb.masks):
            for name in names:  # weights are zero exactly where the mask says so
                assert torch.equal(
                    model.get_parameter(name) != 0, cb.masks[name].cpu() & (model.get_parameter(name) != 0)
                )
                assert not bool(model.get_parameter(name)[~cb.masks[name].cpu()].any())

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
]


def _gradual(**defaults: Any) -> Callable[..., pl.Callback]:
    def make(**overrides: Any) -> pl.Callback:
        return lc.GradualPruning(**{**defaults, **overrides})

    return make


_SCHED = {"start": 2, "end": 26, "frequency": 3}

REGISTRY: list[Entry] = [
    Entry(
        "gradual-magnitude-global",
        _gradual(target_sparsity=0.75, **_SCHED),
        _pruning_state,
        _pruning_check(0.75),
        _PRUNING_BAD,
    ),
    Entry(
        "gradual-taylor-local",
        _gradual(target_sparsity=0.6, criterion="taylor", scope="local", schedule="linear", **_SCHED),
        _pruning_state,
        _pruning_check(0.6),
    ),
    Entry(
        "gradual-activation-global",
        _gradual(target_sparsity=0.8, criterion="activation", calibration_steps=2, **_SCHED),
        _pruning_state,
        _pruning_check(0.8),
    ),
    Entry(
        "gradual-random-2:4",
        _gradual(pattern="2:4", criterion="random", schedule="exponential", **_SCHED),
        _pruning_state,
        _pruning_check(0.5),
    ),
]


class DumpState(pl.Callback):
    """Saves the compression state of each rank at train end (for DDP agreement checks)."""

    def __init__(self, entry_id: str, out_dir: str) -> None:
        self.entry_id, self.out_dir = entry_id, out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entry = next(e for e in REGISTRY if e.id == self.entry_id)
        cb = next(c for c in trainer.callbacks if type(c).__module__.startswith("lightning_compress"))
        entry.check(cb, pl_module)
        torch.save(entry.state(cb), os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
