"""Make your CNN really smaller and faster inside the Trainer you already have.

Your LightningModule and Trainer stay as they are. Add ``StructuredPruning`` (it picks the least
important channels, masks them while training goes on, and half-way through removes them from the
layers physically), ``LayerFusion`` (it folds every BatchNorm into the convolution before it when
training ends) and ``CompressionReport`` (it prints the layer widths and the measured latency
before and after). The checkpoint holds the slim network; ``lightning_compress.load_checkpoint``
rebuilds it without a Trainer.

    python examples/slim_existing_trainer.py                      # ~1 min on a 2-core CPU
    python examples/slim_existing_trainer.py --keep-macs 0.3 --max-epochs 6
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import CompressionReport, LayerFusion, StructuredPruning, load_checkpoint
from lightning_compress.demos import DigitsDataModule


class DigitCNN(pl.LightningModule):
    """Your own model: a small residual CNN for scikit-learn's 8x8 digits. It knows nothing of pruning."""

    def __init__(self, width: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.head = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 10),
        )
        self.example_input_array = torch.zeros(2, 1, 8, 8)  # traced to find coupled channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))  # the residual couples the stem's and the block's channels
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--keep-macs", type=float, default=0.4, help="fraction of the MACs to keep")
    parser.add_argument("--root-dir", default=None, help="where logs and checkpoints go (default: .)")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    model = DigitCNN()
    datamodule = DigitsDataModule(batch_size=64)
    dense_params = sum(p.numel() for p in model.parameters())
    pruning = StructuredPruning(target_macs=args.keep_macs, criterion="l1", round_to=8, end=0.5, frequency=10)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(args.root_dir or ".", "checkpoints"), save_last=True)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        default_root_dir=args.root_dir,
        enable_progress_bar=False,
        callbacks=[pruning, LayerFusion(), CompressionReport(latency_batch=64, plot=False), checkpoint],
    )
    trainer.fit(model, datamodule)
    test_acc = trainer.test(model, datamodule, verbose=False)[0]["test_acc"]

    print(f"channels removed per layer: {pruning.removed}")
    print(
        f"MACs kept {pruning.macs_kept:.3f}, parameters kept {pruning.params_kept:.3f}, "
        f"test accuracy {test_acc:.3f}"
    )
    # The slim, fused model rebuilt from a checkpoint, with no Trainer and no callback.
    final = os.path.join(args.root_dir or ".", "slim.ckpt")
    trainer.save_checkpoint(final)
    rebuilt = load_checkpoint(DigitCNN, final).eval()
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        same = torch.equal(rebuilt(x), model(x))
    print(f"rebuilt from {final}: same outputs: {same}")
    return {
        "test_acc": float(test_acc),
        "macs_kept": pruning.macs_kept,
        "params": float(sum(p.numel() for p in model.parameters())),
        "dense_params": float(dense_params),
        "same_outputs": float(same),
    }


if __name__ == "__main__":
    main()
