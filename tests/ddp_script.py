"""Run by tests/test_gradual.py: GradualPruning under `strategy="ddp"` with 2 CPU processes (gloo).

Lightning's ddp launcher re-executes this script for rank 1, so it must be a file, not a pytest
function. Each rank saves its masks to OUT_DIR/rank{r}.pt.
"""

import os
import sys

import pytorch_lightning as pl
import torch
from battery import TinyNet, tiny_data, trainer

from lightning_compress import GradualPruning


class Dump(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, GradualPruning))
        masks = {n: cb.masks[n].cpu() for n in cb.masks.names}
        torch.save(masks, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    out = sys.argv[1]
    pl.seed_everything(0)
    cb = GradualPruning(
        target_sparsity=0.7, criterion="activation", start=1, end=10, frequency=3, calibration_steps=2
    )
    tr = trainer(out, [cb, Dump(out)], devices=2, strategy="ddp")
    tr.fit(TinyNet(), tiny_data())
