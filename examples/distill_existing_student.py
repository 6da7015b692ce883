"""Distil a trained teacher into the student LightningModule you already have, and prune it.

You have a small model (a LightningModule with its own ``training_step``, metrics and optimizer)
and a bigger trained model. Wrap the student in ``DistillationModule`` with the teacher: your
``training_step`` still computes the task loss and logs ``val_acc`` as usual; the wrapper adds
Hinton et al.'s soft-target loss on the teacher's logits. ``GradualPruning`` in the same Trainer
compresses the student only (the teacher is never a target), and ``export_student`` writes a plain
student checkpoint that ``DigitMLP.load_from_checkpoint`` reads.

    python examples/distill_existing_student.py                 # about 2 minutes on a 2-core CPU
    python examples/distill_existing_student.py --sparsity 0.0  # distillation only

The teacher is Hinton et al.'s 2x1200 MLP with dropout, trained by the script itself on the MNIST 5k
subset with random shifts, and the student a 784-300-300-10 MLP (distillation works across
architectures as long as the logits agree). The training images carry their index
(``indexed=True``), so the teacher runs in the first epoch only and its logits are read from the
cache afterwards (``cache=True``).

How much distillation buys depends on the teacher. The script trains it only briefly (10 epochs,
about 94 %), and then the distilled student matches the hard-label one (92.8 % each at 90 %
sparsity, seed 0). With a fully trained teacher (30 epochs, cosine schedule, 97.1 %),
``benchmarks/distillation.py`` measures 96.4 % against 95.1 % for the 2x800 student, and 96.2 %
against 94.8 % at 90 % sparsity (mean of 3 seeds).
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress import CompressionReport, DistillationModule, GradualPruning
from lightning_compress.demos import HintonMLP, MNIST5kDataModule


class DigitMLP(pl.LightningModule):
    """Your own student: nothing in it knows about distillation or pruning."""

    def __init__(self, hidden: int = 300, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
        self.val_acc = MulticlassAccuracy(num_classes=10)
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)}


def make_trainer(args: argparse.Namespace, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.root_dir,
        callbacks=callbacks,
        limit_train_batches=args.limit_batches,
    )


@torch.no_grad()
def accuracy(model: nn.Module, dm: MNIST5kDataModule) -> float:
    x, y = dm.test_dataset.tensors
    return float((model.eval()(x).argmax(dim=1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--max-epochs", type=int, default=8, help="student epochs")
    parser.add_argument(
        "--sparsity", type=float, default=0.9, help="pruned fraction of the student (0: none)"
    )
    parser.add_argument("--temperature", type=float, default=8.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit-batches", type=float, default=1.0, help="fraction of each epoch (smoke runs)"
    )
    parser.add_argument("--root-dir", default=".", help="where the exported student goes")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    # The teacher: any trained network with the same logits (here trained now, briefly).
    pl.seed_everything(args.seed)
    # Hinton et al.'s teacher: a wide MLP with dropout, trained on randomly shifted images.
    teacher = HintonMLP(hidden=1200, dropout=0.5, input_dropout=0.2)
    make_trainer(args, args.teacher_epochs, []).fit(
        teacher, MNIST5kDataModule(batch_size=64, seed=0, random_shift=2)
    )
    dm = MNIST5kDataModule(batch_size=64, seed=0)
    dm.setup()
    teacher_acc = accuracy(teacher, dm)

    # Your student, trained as usual (hard labels only), for comparison.
    pl.seed_everything(args.seed + 1)
    alone = DigitMLP()
    pruning = [GradualPruning(target_sparsity=args.sparsity, end=0.7, frequency=25)] if args.sparsity else []
    make_trainer(args, args.max_epochs, pruning).fit(alone, dm)

    # The same student distilled from the teacher, in the same kind of Trainer.
    pl.seed_everything(args.seed + 1)
    student = DigitMLP()
    model = DistillationModule(student, teacher, temperature=args.temperature, alpha=args.alpha, cache=True)
    pruning = [GradualPruning(target_sparsity=args.sparsity, end=0.7, frequency=25)] if args.sparsity else []
    # The same data, each training sample with its index (the wrapper strips it for your student).
    indexed = MNIST5kDataModule(batch_size=64, seed=0, indexed=True)
    make_trainer(args, args.max_epochs, [*pruning, CompressionReport()]).fit(model, indexed)

    path = model.export_student(f"{args.root_dir}/distilled_student.ckpt")
    reloaded = DigitMLP.load_from_checkpoint(path)  # the plain student, already pruned
    x = dm.test_dataset.tensors[0][:8]
    weights = [m.weight for m in reloaded.modules() if isinstance(m, nn.Linear)]
    result = {
        "teacher_acc": teacher_acc,
        "student_acc": accuracy(alone, dm),
        "distilled_acc": accuracy(student, dm),
        "student_sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
        "export_path": path,
        "export_matches": bool(torch.equal(reloaded.eval()(x), student.eval()(x))),
        "wall_s": time.perf_counter() - t0,
    }
    print(f"teacher (2x1200 MLP):               test accuracy {result['teacher_acc']:.3f}")
    print(f"student on hard labels:             test accuracy {result['student_acc']:.3f}")
    print(
        f"student distilled from the teacher: test accuracy {result['distilled_acc']:.3f} "
        f"({result['student_sparsity']:.0%} of its weights zero)"
    )
    print(
        f"exported to {path}; DigitMLP.load_from_checkpoint gives the same outputs: "
        f"{result['export_matches']}"
    )
    return result


if __name__ == "__main__":
    main()
