#!/usr/bin/env python
"""Pruning benchmark: GradualPruning vs Lightning's ModelPruning on LeNet-300-100 / MNIST 5k.

Every row trains the same model (same seed, so the same initial weights), on the same data in the
same order (``seed_everything`` before every fit; neither callback draws from the torch RNG), with
the same optimizer (Adam, lr 1e-3) for the same number of epochs. Rows:

* ``dense``: no pruning.
* ``GradualPruning s``: ``GradualPruning(target_sparsity=s, schedule="cubic", start=0.0,
  end=0.75, frequency=100, criterion="magnitude", scope="global")`` over fc1/fc2/fc3 weights.
* ``ModelPruning s``: ``ModelPruning("l1_unstructured", parameters_to_prune=[fc1/fc2/fc3 weight],
  use_global_unstructured=True, amount=<callable>, make_pruning_permanent=True,
  use_lottery_ticket_hypothesis=False)``. ModelPruning prunes once per epoch (at the end of the
  training epoch) and its ``amount`` is a fraction of the weights that are *still unpruned*
  (``torch.nn.utils.prune`` applies the method to the surviving slice only), so a per-epoch amount
  ``a_k`` gives a cumulative sparsity ``1 - prod(1 - a_k)``. The callable makes the cumulative
  sparsity follow the same cubic curve as GradualPruning, sampled at epoch ends, and reach the
  target at the first epoch end at or after 75 % of training: ``a_k = (N_k - N_{k-1}) /
  (total - N_{k-1})`` with ``N_k = round(s_k * total)`` pruned weights after epoch ``k``, which makes
  ``round(a_k * remaining)`` (what torch prunes) exactly ``N_k - N_{k-1}``. The lottery-ticket
  rewind (on by default) is turned off: it resets the surviving weights to their initial values
  after every pruning call, a different algorithm from prune-and-keep-training.

Timing: progress bar, model summary, logger and checkpointing are off for every row; validation
during fit is off too (the test split is the only held-out data, measured once by ``trainer.test``
after fit), so the fit time is the training loop. ``torch.set_num_threads`` is fixed. Configs run
alternating in rounds (dense, GP 90, MP 90, GP 95, ... then the reverse order, ABBA, so drift within
a round cancels), after one short untimed warm-up
fit per config; each config's fit time is the median over rounds and its ratio is
``median(config) / median(dense)``: ratios measured side by side in one run are the result, absolute
times are noise. Accuracy and sparsity come from the first round; all rounds are seeded identically,
so the script checks that every round reproduces them.

Usage::

    python benchmarks/pruning.py --out benchmarks/RESULTS.md     # default: 12 epochs, 4 repeats
    python benchmarks/pruning.py --quick                          # 1 epoch, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelPruning
from rich.console import Console
from rich.table import Table

from lightning_compress.core.schedules import sparsity_at
from lightning_compress.demos import LeNet300100, MNIST5kDataModule
from lightning_compress.pruning import GradualPruning

LAYERS = ("fc1", "fc2", "fc3")
SPARSITIES = (0.90, 0.95, 0.98)
END = 0.75  # fraction of training at which both callbacks reach the target
GP_FREQUENCY = 100  # GradualPruning's default: optimizer steps between mask updates


# ---------------------------------------------------------------------------- configs
def cubic(progress: float, final: float) -> float:
    """Zhu & Gupta's cubic ramp from 0 to ``final``: GradualPruning's own schedule function."""
    return sparsity_at(round(progress * 1_000_000), schedule="cubic", start=0, end=1_000_000, final=final)


def prune_epochs(epochs: int, end: float = END) -> int:
    """Number of ModelPruning calls: the target is reached at the first epoch end >= ``end``."""
    return min(epochs, max(1, math.ceil(end * epochs - 1e-9)))


def model_pruning_amounts(target: float, epochs: int, total: int, end: float = END) -> list[float]:
    """Per-epoch ``amount`` (fraction of the *remaining* weights) for ModelPruning.

    The cumulative number of pruned weights after the pruning call at the end of epoch ``k`` is
    ``N_k = round(cubic((k + 1) / n) * total)``; the call prunes ``N_k - N_{k-1}`` of the
    ``total - N_{k-1}`` weights still alive. Zero after epoch ``n - 1`` (ModelPruning then skips).
    """
    n = prune_epochs(epochs, end)
    amounts, pruned = [], 0
    for k in range(epochs):
        if k >= n:
            amounts.append(0.0)
            continue
        goal = round(cubic((k + 1) / n, target) * total)
        amounts.append((goal - pruned) / (total - pruned))
        pruned = goal
    return amounts


@dataclass
class Config:
    name: str
    kind: str  # "dense" | "gp" | "mp"
    sparsity: float = 0.0
    gp_frequency: int = GP_FREQUENCY

    def callbacks(self, model: LeNet300100, epochs: int) -> list[Callback]:
        if self.kind == "dense":
            return []
        if self.kind == "gp":
            return [
                GradualPruning(
                    target_sparsity=self.sparsity,
                    schedule="cubic",
                    start=0.0,
                    end=END,
                    frequency=self.gp_frequency,
                    criterion="magnitude",
                    scope="global",
                    targets=list(LAYERS),
                )
            ]
        params = [(getattr(model, layer), "weight") for layer in LAYERS]
        total = sum(getattr(model, layer).weight.numel() for layer in LAYERS)
        amounts = model_pruning_amounts(self.sparsity, epochs, total)

        def amount(epoch: int) -> float:
            return amounts[epoch] if epoch < len(amounts) else 0.0

        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=params,
                use_global_unstructured=True,
                amount=amount,
                make_pruning_permanent=True,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        ]


def build_configs(gp_frequency: int = GP_FREQUENCY) -> list[Config]:
    configs = [Config("dense", "dense")]
    for s in SPARSITIES:
        configs.append(Config(f"GradualPruning {s:.0%}", "gp", s, gp_frequency))
        configs.append(Config(f"ModelPruning {s:.0%}", "mp", s))
    return configs


# ---------------------------------------------------------------------------- one fit
class DataOrderProbe(Callback):
    """Fingerprint of the first batch of every epoch, to check that every row saw the same data order.

    Two hook calls per epoch do any work (every row carries the probe, so timing stays comparable).
    """

    def __init__(self) -> None:
        self.fingerprint: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            y = batch[1]
            self.fingerprint.append(int((y * torch.arange(1, len(y) + 1)).sum()))


@dataclass
class RunResult:
    fit_wall_s: float
    fit_cpu_s: float
    test_acc: float
    zeros: int
    total: int
    reported_sparsity: float | None  # GradualPruning's own `.sparsity`, for a cross-check
    data_order: list[int]  # DataOrderProbe fingerprint

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total


def make_trainer(epochs: int, callbacks: list[Callback], limit_train_batches: float = 1.0) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        limit_train_batches=limit_train_batches,
    )


def run_one(cfg: Config, dm: MNIST5kDataModule, epochs: int, seed: int, warmup: bool = False) -> RunResult:
    pl.seed_everything(seed, verbose=False)
    model = LeNet300100(lr=1e-3, optimizer="adam")
    callbacks = cfg.callbacks(model, epochs)
    probe = DataOrderProbe()
    trainer = make_trainer(epochs, [*callbacks, probe], limit_train_batches=5 if warmup else 1.0)
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=dm)
    fit_wall, fit_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    weights = [getattr(model, layer).weight.detach() for layer in LAYERS]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    acc = float("nan")
    if not warmup:
        acc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"])
    reported = next((cb.sparsity for cb in callbacks if isinstance(cb, GradualPruning)), None)
    return RunResult(fit_wall, fit_cpu, acc, zeros, total, reported, probe.fingerprint)


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class Summary:
    cfg: Config
    runs: list[RunResult] = field(default_factory=list)

    @property
    def first(self) -> RunResult:
        return self.runs[0]

    @property
    def wall(self) -> float:
        return statistics.median(r.fit_wall_s for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.fit_cpu_s for r in self.runs)

    @property
    def reproducible(self) -> bool:
        f = self.first
        return all(r.test_acc == f.test_acc and r.zeros == f.zeros for r in self.runs)


def benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> list[Summary]:
    dm = MNIST5kDataModule(batch_size=64, seed=args.seed)
    dm.setup()
    configs = build_configs(args.gp_frequency)
    log("warm-up: one short untimed fit per config")
    for cfg in configs:
        run_one(cfg, dm, args.epochs, args.seed, warmup=True)
    summaries = [Summary(cfg) for cfg in configs]
    for rnd in range(args.repeats):
        # ABBA order (forward, then backward): a slow drift of the machine's speed within a round
        # cancels out instead of penalising the configs that run last.
        for s in summaries if rnd % 2 == 0 else summaries[::-1]:
            r = run_one(s.cfg, dm, args.epochs, args.seed)
            s.runs.append(r)
            log(
                f"round {rnd + 1}/{args.repeats}  {s.cfg.name:<20} fit {r.fit_wall_s:6.2f} s  "
                f"acc {r.test_acc:.4f}  sparsity {r.sparsity:.4%}"
            )
    return summaries


# ---------------------------------------------------------------------------- reporting
COLUMNS = (
    "Config",
    "Test acc",
    "Sparsity reached",
    "Zero weights / total",
    "Fit wall time (median)",
    "Fit time ratio vs dense",
    "CPU-time ratio vs dense",
)


def rows(summaries: list[Summary]) -> list[list[str]]:
    dense = summaries[0]
    out = []
    for s in summaries:
        f = s.first
        target = f" (target {s.cfg.sparsity:.0%})" if s.cfg.kind != "dense" else ""
        acc = f"{f.test_acc:.2%}" + ("" if s.reproducible else " (!)")
        out.append(
            [
                s.cfg.name,
                acc,
                f"{f.sparsity:.3%}{target}",
                f"{f.zeros:,} / {f.total:,}",
                f"{s.wall:.2f} s",
                f"{s.wall / dense.wall:.3f}x",
                f"{s.cpu / dense.cpu:.3f}x",
            ]
        )
    return out


def _times(runs: list[RunResult], attr: str) -> str:
    return ", ".join(f"{getattr(r, attr):.2f}" for r in runs)


def markdown(summaries: list[Summary], args: argparse.Namespace, total_wall: float) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    align = "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"
    table = [header, align] + ["| " + " | ".join(r) + " |" for r in rows(summaries)]
    all_times = [
        f"| {s.cfg.name} | {_times(s.runs, 'fit_wall_s')} | {_times(s.runs, 'fit_cpu_s')} |"
        for s in summaries
    ]
    total = summaries[0].first.total
    mp_lines = []
    for s in SPARSITIES:
        amounts = model_pruning_amounts(s, args.epochs, total)
        mp_lines.append(f"  - {s:.0%}: " + ", ".join(f"{a:.4f}" for a in amounts if a > 0))
    mismatched = [s.cfg.name for s in summaries if not s.reproducible]
    gp_check = [
        s.cfg.name
        for s in summaries
        if s.first.reported_sparsity is not None and abs(s.first.reported_sparsity - s.first.sparsity) > 1e-9
    ]
    if mismatched:
        repro = f"this did NOT hold for: {', '.join(mismatched)} (marked (!); round-1 values shown)."
    else:
        repro = "this held for every config."
    if same_data_order(summaries):
        order = "was identical for every config and round."
    else:
        order = "DIFFERED between configs or rounds: the rows are not comparable."
    if gp_check:
        gp_note = f"GradualPruning's `.sparsity` disagrees with the count for: {', '.join(gp_check)}."
    else:
        gp_note = "GradualPruning's own `.sparsity` agrees with the count for every row."
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    cpu = f"{os.cpu_count()} logical cores ({platform.machine()}), `torch.set_num_threads({args.threads})`"
    data = (
        "LeNet-300-100 (Adam, lr 1e-3), MNIST 5k subset (4,000 train / 1,000 test), "
        f"batch 64 ({math.ceil(4000 / 64)} steps/epoch), seed {args.seed}"
    )
    paragraphs = [
        "- **Test acc**: `trainer.test` on the 1,000 held-out images after fit, from round 1. Every round is "
        "seeded identically (same init, same data order), so every round must give the same accuracy and "
        f"sparsity; {repro} One seed on 1,000 images: accuracy differences under ~1 point (10 images; "
        "the binomial standard error at 92 % is 0.9 points) are not meaningful.",
        f"- **Data order**: a fingerprint of the first batch of every epoch {order}",
        "- **Sparsity reached**: exact count of zero weights over fc1/fc2/fc3 `.weight` after fit "
        f"(biases are not pruned by either callback). {gp_note}",
        "- **Fit wall time**: `trainer.fit` only (training loop; validation during fit is off for every "
        "row), median over the rounds. Absolute times depend on the machine and its load; the **ratios** "
        "are the result: configs run alternating in rounds in one process, every other round in reverse "
        "order, so drift and background load hit every config alike. The CPU-time ratio "
        "(`time.process_time`) is a cross-check that is less sensitive to other processes competing for "
        "the cores.",
        "- GradualPruning: cubic schedule from step 0 to 75 % of training, mask update every "
        f"{args.gp_frequency} optimizer steps, global magnitude ranking; masks are applied to the "
        "gradients before and to the weights after every optimizer step.",
        "- ModelPruning: global L1 unstructured, pruning at the end of each training epoch with an `amount` "
        "callable that follows the same cubic curve sampled at epoch ends and reaches the target at the "
        f"first epoch end at or after 75 % of training (end of epoch {prune_epochs(args.epochs)} of "
        f"{args.epochs}). `amount` is a fraction of the weights still unpruned, so the per-epoch amounts "
        "are `a_k = (N_k - N_(k-1)) / (total - N_(k-1))`:",
    ]
    lines = [
        "# Pruning benchmark: GradualPruning vs Lightning ModelPruning",
        "",
        f"- Date: {now}",
        f"- Command: `python {cmd}`",
        f"- {versions}",
        f"- CPU: {cpu}",
        f"- Model / data: {data}",
        f"- Epochs: {args.epochs}; repeats (rounds): {args.repeats}; whole benchmark run: {total_wall:.0f} s",
        "",
        *table,
        "",
        "## How to read",
        "",
        *paragraphs,
        *mp_lines,
        "  `use_lottery_ticket_hypothesis=False` (its default, True, rewinds the surviving weights to their "
        "initial values after every pruning call, a different algorithm); `make_pruning_permanent=True`.",
        "",
        "### Fit times of every round (s)",
        "",
        "| Config | wall | CPU |",
        "|---|---|---|",
        *all_times,
        "",
    ]
    return "\n".join(lines)


def same_data_order(summaries: list[Summary]) -> bool:
    ref = summaries[0].first.data_order
    return all(r.data_order == ref for s in summaries for r in s.runs)


def print_rich(summaries: list[Summary], console: Console) -> None:
    table = Table(title="Pruning benchmark (LeNet-300-100, MNIST 5k)")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows(summaries):
        table.add_row(*r)
    console.print(table)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12, help="training epochs per fit (default 12)")
    p.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="timing rounds over all configs, alternately reversed (default 4)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 1 repeat")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--gp-frequency",
        type=int,
        default=GP_FREQUENCY,
        help=f"GradualPruning frequency (default {GP_FREQUENCY})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 1, 1
    if min(args.epochs, args.repeats, args.threads, args.gp_frequency) < 1:
        p.error("--epochs, --repeats, --threads and --gp-frequency must be >= 1")
    return args


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*[Tt]he number of training batches.*")
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    start = time.perf_counter()
    summaries = benchmark(args, lambda msg: console.print(f"[dim]{msg}[/dim]"))
    total_wall = time.perf_counter() - start
    print_rich(summaries, console)
    mismatched = [s.cfg.name for s in summaries if not s.reproducible]
    if mismatched:
        console.print(f"[yellow]warning: rounds disagree on accuracy/sparsity for {mismatched}[/yellow]")
    if not same_data_order(summaries):
        console.print("[yellow]warning: the data order differed between runs[/yellow]")
    console.print(f"benchmark wall time: {total_wall:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(summaries, args, total_wall))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
