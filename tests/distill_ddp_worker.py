"""Run by tests/test_distillation_ddp.py: the teacher-output and feature caches under 2-process DDP.

``strategy="ddp"`` re-executes this script for rank 1, so it must be a file. Usage:
``python distill_ddp_worker.py OUT_DIR``. Three fits, 2 epochs each, on :func:`indexed_data`:

* ``cached``: ``Distill(cache=True)`` (the battery's distillation model) with a FitNets hint from the
  student's ``fc1`` to the teacher's ``Flatten`` (so the cache holds two tensors: the logits and the
  teacher feature, which is the flattened input);
* ``uncached``: the same model and seed without the cache;
* ``features``: :class:`FrozenBackbone` with ``FeatureCache(cache="disk")``, both ranks' memory-mapped
  files in one shared folder;
* ``plain``: the same model and seed without the ``FeatureCache`` (nor indices).

Each rank saves ``OUT_DIR/{run}_rank{r}.pt``: the cache (values, filled, hits) as it is at the end of
training (``on_train_end``, before teardown closes it) and the trained parameters.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from battery import Distill, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_compress as lc

N_SAMPLES = 128
BATCH = 16  # 64 samples per rank: 4 steps per epoch
HINTS = {"fc1": "0"}  # the oracle teacher is Sequential(Flatten, Linear)


def samples() -> tuple[Tensor, Tensor]:
    """The battery's inputs (N, 4, 6, 6) with 4 classes."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, 4, 6, 6, generator=gen)
    y = (x.flatten(1) @ torch.randn(144, 4, generator=gen)).argmax(1)
    return x, y


def indexed_data(indexed: bool = True) -> DataLoader:
    dataset = TensorDataset(*samples())
    return DataLoader(lc.IndexedDataset(dataset) if indexed else dataset, batch_size=BATCH, shuffle=False)


def backbone() -> nn.Module:
    """A fixed, deterministic (no dropout / batch norm) feature extractor."""
    with torch.random.fork_rng():
        torch.manual_seed(99)
        net = nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 16))
    return net.requires_grad_(False)


class FrozenBackbone(pl.LightningModule):
    """Transfer learning: a frozen ``backbone`` and a trained ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = backbone()
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.backbone(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.head.parameters(), lr=0.1, momentum=0.9)


class DumpCache(pl.Callback):
    """Each rank saves its cache and parameters when training ends (teardown closes the cache)."""

    def __init__(self, run: str, out: str) -> None:
        self.run, self.out = run, out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        feature = next((c for c in trainer.callbacks if isinstance(c, lc.FeatureCache)), None)
        cache = feature.cache if feature is not None else getattr(pl_module, "cache", None)
        state: dict[str, Tensor] = {f"param:{n}": p.detach().clone() for n, p in pl_module.named_parameters()}
        if cache is not None:
            state["filled"] = cache.filled.clone()
            state["hits"] = torch.tensor(cache.hits)
            state["misses"] = torch.tensor(cache.misses)
            for k, v in enumerate(cache.values or []):
                state[f"values:{k}"] = v.clone()
        torch.save(state, os.path.join(self.out, f"{self.run}_rank{trainer.global_rank}.pt"))


def fit(run: str, out: str) -> None:
    pl.seed_everything(0)
    callbacks: list[pl.Callback] = [DumpCache(run, out)]
    distill = run in ("cached", "uncached")
    model: pl.LightningModule = Distill(cache=run == "cached", hints=HINTS) if distill else FrozenBackbone()
    if run == "features":
        mmap = os.path.join(out, "mmap")
        callbacks.insert(0, lc.FeatureCache("backbone", cache="disk", cache_dir=mmap))
    trainer(out, callbacks, devices=2, strategy="ddp", max_epochs=2).fit(model, indexed_data(run != "plain"))


if __name__ == "__main__":
    out_dir = sys.argv[1]
    for name in sys.argv[2:] or ["cached", "uncached", "features", "plain"]:
        fit(name, out_dir)
