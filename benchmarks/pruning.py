#!/usr/bin/env python
"""Pruning benchmark: GradualPruning vs Lightning's ModelPruning on LeNet-300-100 / MNIST 5k.

Two sections, both run by default (``--sections timing,accuracy``); see ``benchmarks/README.md``
for the fairness rules and ``benchmarks/RESULTS.md`` for the latest report.

* **timing**: fit time of ``dense``, ``GradualPruning s`` and ``ModelPruning s`` (s = 98 % by
  default) side by side, for every thread count in ``--threads`` (torch's default and 1) and every
  optimizer in ``--optimizers`` (SGD lr 0.05 momentum 0.9 weight decay 1e-4; AdamW lr 1e-3 weight
  decay 1e-4). Every (threads, optimizer) pair is its own section: one untimed warm-up fit per
  config, then ``--rounds`` rounds (>= 5 for a result) in which every config fits once, alternately
  in forward and reverse order (ABBA, so a drift of the machine's speed within a round cancels).
  A config's ratio is the median over rounds of ``time(config) / time(dense)`` of the same round.
  Timed fits are the full recipe (20 epochs = 1,260 optimizer steps), long enough for the optimizer
  state of pruned weights to settle (decaying values would reach the slow denormal range after a
  few hundred masked steps).
* **accuracy**: the competitive recipe (SGD lr 0.05, momentum 0.9, weight decay 1e-4, batch 64,
  20 epochs, training images shifted by up to 2 pixels) for seeds ``--seeds`` (0, 1, 2; the seed
  fixes the weights, the data order, the shifts and the train / test split) x dense, GradualPruning
  and ModelPruning at ``--sparsities`` (90/95/98 %) reaching the target at ``--ends`` of training
  (75 % and 50 %). Per-seed and mean test accuracy and reached sparsity.

Every fit of the same seed starts from the same weights and sees the same batches in the same
order (``seed_everything`` before every fit; neither callback draws from the torch RNG; a probe
fingerprints the first batch of every epoch). ModelPruning gets an ``amount`` callable that makes
its cumulative sparsity follow the same cubic curve as GradualPruning, sampled at epoch ends (its
``amount`` is a fraction of the weights *still unpruned*), and the lottery-ticket rewind is off.

Usage::

    python benchmarks/pruning.py --out benchmarks/RESULTS.md      # everything (~10 min, 2 idle cores)
    python benchmarks/pruning.py --quick                           # smoke test (~25 s)
    python benchmarks/pruning.py --sections timing --threads 1 --optimizers sgd --rounds 5
    python benchmarks/pruning.py --sections accuracy --seeds 0 --ends 0.75
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
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelPruning
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lightning_compress.core.schedules import sparsity_at
from lightning_compress.demos import LeNet300100, MNIST5kDataModule
from lightning_compress.pruning import GradualPruning

LAYERS = ("fc1", "fc2", "fc3")
BATCH_SIZE = 64
STEPS_PER_EPOCH = math.ceil(4000 / BATCH_SIZE)  # 63
GP_FREQUENCY = 100  # GradualPruning's default: optimizer steps between mask updates
# Accuracy rows update the mask every 25 steps (2.5 times per epoch): ModelPruning can only prune at
# epoch ends (every 63 steps here), GradualPruning's finer schedule is one of the things it offers.
ACCURACY_GP_FREQUENCY = 25
RANDOM_SHIFT = 2  # augmentation of the accuracy recipe (pixels)
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it


@dataclass(frozen=True)
class Recipe:
    key: str
    label: str
    model_kwargs: dict


RECIPES = {
    "sgd": Recipe(
        "sgd",
        "SGD (lr 0.05, momentum 0.9, weight decay 1e-4)",
        {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-4},
    ),
    "adamw": Recipe(
        "adamw",
        "AdamW (lr 1e-3, weight decay 1e-4)",
        {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
    ),
}


# ---------------------------------------------------------------------------- configs
def cubic(progress: float, final: float) -> float:
    """Zhu & Gupta's cubic ramp from 0 to ``final``: GradualPruning's own schedule function."""
    return sparsity_at(round(progress * 1_000_000), schedule="cubic", start=0, end=1_000_000, final=final)


def prune_epochs(epochs: int, end: float) -> int:
    """Number of ModelPruning calls: the target is reached at the first epoch end >= ``end``."""
    return min(epochs, max(1, math.ceil(end * epochs - 1e-9)))


def model_pruning_amounts(target: float, epochs: int, total: int, end: float) -> list[float]:
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


@dataclass(frozen=True)
class Config:
    kind: str  # "dense" | "gp" | "mp"
    sparsity: float = 0.0
    end: float = 0.75
    gp_frequency: int = GP_FREQUENCY
    criterion: str = "magnitude"

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        method = "ModelPruning"
        if self.kind == "gp":
            method = (
                "GradualPruning" if self.criterion == "magnitude" else f"GradualPruning[{self.criterion}]"
            )
        return f"{method} {self.sparsity:.0%} (end {self.end:g})"

    def callbacks(self, model: LeNet300100, epochs: int) -> list[Callback]:
        if self.kind == "dense":
            return []
        if self.kind == "gp":
            return [
                GradualPruning(
                    target_sparsity=self.sparsity,
                    schedule="cubic",
                    start=0.0,
                    end=self.end,
                    frequency=self.gp_frequency,
                    criterion=self.criterion,
                    scope="global",
                    targets=list(LAYERS),
                )
            ]
        params = [(getattr(model, layer), "weight") for layer in LAYERS]
        total = sum(getattr(model, layer).weight.numel() for layer in LAYERS)
        amounts = model_pruning_amounts(self.sparsity, epochs, total, self.end)

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


# ---------------------------------------------------------------------------- one fit
class DataOrderProbe(Callback):
    """Fingerprint of the first batch of every epoch, to check that fits saw the same data.

    Labels give the order, the image sum the random shifts. Two hook calls per epoch do any work
    (every row carries the probe, so timing stays comparable).
    """

    def __init__(self) -> None:
        self.fingerprint: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            x, y = batch
            self.fingerprint.append((int((y * torch.arange(1, len(y) + 1)).sum()), round(float(x.sum()), 2)))


@dataclass
class RunResult:
    fit_wall_s: float
    fit_cpu_s: float
    test_acc: float
    zeros: int
    total: int
    reported_sparsity: float | None  # GradualPruning's own `.sparsity`, for a cross-check
    data_order: list[tuple[int, float]]  # DataOrderProbe fingerprint

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


def run_one(
    cfg: Config,
    dm: MNIST5kDataModule,
    epochs: int,
    seed: int,
    recipe: Recipe,
    warmup: bool = False,
) -> RunResult:
    pl.seed_everything(seed, verbose=False)
    model = LeNet300100(**recipe.model_kwargs)
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


def gp_disagrees(run: RunResult) -> bool:
    return run.reported_sparsity is not None and abs(run.reported_sparsity - run.sparsity) > 1e-9


# ---------------------------------------------------------------------------- timing section
@dataclass
class Timed:
    cfg: Config
    runs: list[RunResult] = field(default_factory=list)

    @property
    def first(self) -> RunResult:
        return self.runs[0]

    @property
    def wall(self) -> float:
        return statistics.median(r.fit_wall_s for r in self.runs)

    @property
    def reproducible(self) -> bool:
        f = self.first
        return all(r.test_acc == f.test_acc and r.zeros == f.zeros for r in self.runs)


@dataclass
class TimingSection:
    threads: int
    recipe: Recipe
    rows: list[Timed]

    @property
    def title(self) -> str:
        default = " (torch default)" if self.threads == TORCH_DEFAULT_THREADS else ""
        return f"{self.threads} thread{'s' if self.threads > 1 else ''}{default}, {self.recipe.label}"

    @property
    def dense(self) -> Timed:
        return self.rows[0]

    def paired(self, row: Timed, attr: str = "fit_wall_s") -> list[float]:
        """Per-round ratio ``time(row) / time(dense)`` of the same round."""
        return [getattr(r, attr) / getattr(d, attr) for r, d in zip(row.runs, self.dense.runs)]

    def ratio(self, row: Timed, attr: str = "fit_wall_s") -> float:
        return statistics.median(self.paired(row, attr))

    def find(self, kind: str, sparsity: float) -> Timed | None:
        return next((r for r in self.rows if r.cfg.kind == kind and r.cfg.sparsity == sparsity), None)


def run_timing(args: argparse.Namespace, log: Callable[[str], None]) -> list[TimingSection]:
    dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=args.timing_seed)  # no shifts: the bare loop
    dm.setup()
    configs = [Config("dense")]
    for s in args.timing_sparsities:
        configs += [Config("gp", s, args.timing_end, args.gp_frequency), Config("mp", s, args.timing_end)]
    sections = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for key in args.optimizers:
            section = TimingSection(threads, RECIPES[key], [Timed(cfg) for cfg in configs])
            log(f"[timing] {section.title}: warm-up (one short untimed fit per config)")
            for cfg in configs:
                run_one(cfg, dm, args.timing_epochs, args.timing_seed, section.recipe, warmup=True)
            for rnd in range(args.rounds):
                # ABBA order: a slow drift within a round hits every config alike.
                for row in section.rows if rnd % 2 == 0 else section.rows[::-1]:
                    r = run_one(row.cfg, dm, args.timing_epochs, args.timing_seed, section.recipe)
                    row.runs.append(r)
                    log(
                        f"[timing] {threads} thr {key:<5} round {rnd + 1}/{args.rounds}  {row.cfg.name:<33} "
                        f"fit {r.fit_wall_s:6.2f} s  acc {r.test_acc:.4f}  sparsity {r.sparsity:.4%}"
                    )
            sections.append(section)
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    return sections


# ---------------------------------------------------------------------------- accuracy section
@dataclass
class Scored:
    cfg: Config
    runs: dict[int, RunResult] = field(default_factory=dict)  # seed -> run

    def accs(self) -> list[float]:
        return [r.test_acc for r in self.runs.values()]

    @property
    def mean_acc(self) -> float:
        return statistics.mean(self.accs())

    @property
    def mean_sparsity(self) -> float:
        return statistics.mean(r.sparsity for r in self.runs.values())


def accuracy_configs(args: argparse.Namespace) -> list[Config]:
    configs = [Config("dense")]
    for end in args.ends:
        for kind in ("gp", "mp"):
            for s in args.sparsities:
                if kind == "mp":
                    configs.append(Config(kind, s, end))
                    continue
                for criterion in args.gp_criteria:
                    configs.append(Config(kind, s, end, args.accuracy_gp_frequency, criterion))
    return configs


def run_accuracy(args: argparse.Namespace, log: Callable[[str], None]) -> list[Scored]:
    torch.set_num_threads(args.accuracy_threads)
    rows = [Scored(cfg) for cfg in accuracy_configs(args)]
    recipe = RECIPES["sgd"]
    for seed in args.seeds:
        dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=seed, random_shift=args.random_shift)
        dm.setup()
        for row in rows:
            r = run_one(row.cfg, dm, args.epochs, seed, recipe)
            row.runs[seed] = r
            log(
                f"[accuracy] seed {seed}  {row.cfg.name:<33} acc {r.test_acc:.4f}  "
                f"sparsity {r.sparsity:.4%}  fit {r.fit_wall_s:.1f} s"
            )
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    return rows


def find_scored(
    rows: list[Scored], kind: str, sparsity: float, end: float, criterion: str = "magnitude"
) -> Scored | None:
    key = (kind, sparsity, end, criterion)
    return next((r for r in rows if (r.cfg.kind, r.cfg.sparsity, r.cfg.end, r.cfg.criterion) == key), None)


def accuracy_data_order_ok(rows: list[Scored]) -> bool:
    seeds = rows[0].runs
    return all(row.runs[s].data_order == rows[0].runs[s].data_order for row in rows for s in seeds)


# ---------------------------------------------------------------------------- reporting
TIMING_COLUMNS = (
    "Config",
    "Fit wall (median)",
    "vs dense (paired)",
    "vs dense (medians)",
    "CPU vs dense (paired)",
    "Sparsity reached",
    "Test acc",
)


def timing_rows(section: TimingSection) -> list[list[str]]:
    out = []
    for row in section.rows:
        f = row.first
        target = f" (target {row.cfg.sparsity:.0%})" if row.cfg.kind != "dense" else ""
        out.append(
            [
                row.cfg.name,
                f"{row.wall:.2f} s",
                f"{section.ratio(row):.3f}x",
                f"{row.wall / section.dense.wall:.3f}x",
                f"{section.ratio(row, 'fit_cpu_s'):.3f}x",
                f"{f.sparsity:.3%}{target}",
                f"{f.test_acc:.2%}" + ("" if row.reproducible else " (!)"),
            ]
        )
    return out


def accuracy_columns(seeds: Sequence[int]) -> list[str]:
    return ["Config", *[f"seed {s}" for s in seeds], "Mean test acc", "Sparsity reached (mean)", "vs dense"]


def accuracy_rows(rows: list[Scored]) -> list[list[str]]:
    dense = rows[0]
    out = []
    for row in rows:
        delta = 100 * (row.mean_acc - dense.mean_acc)
        out.append(
            [
                row.cfg.name,
                *[f"{r.test_acc:.2%}" for r in row.runs.values()],
                f"**{row.mean_acc:.2%}**",
                f"{row.mean_sparsity:.3%}",
                "" if row.cfg.kind == "dense" else f"{delta:+.2f} pt",
            ]
        )
    return out


@dataclass
class Target:
    what: str
    measured: str
    met: bool


def targets(args: argparse.Namespace, timing: list[TimingSection], accuracy: list[Scored]) -> list[Target]:
    out = []
    if accuracy:
        dense = accuracy[0]
        if 0 in dense.runs:
            acc0 = dense.runs[0].test_acc
            out.append(Target("Dense accuracy, seed 0 >= 95.3 %", f"{acc0:.2%}", acc0 >= 0.953))
        out.append(
            Target(
                f"Dense accuracy, mean of seeds {','.join(map(str, args.seeds))} >= 95.3 %",
                f"{dense.mean_acc:.2%}",
                dense.mean_acc >= 0.953,
            )
        )
        for end in args.ends:
            mp = find_scored(accuracy, "mp", 0.98, end)
            for criterion in args.gp_criteria:
                gp = find_scored(accuracy, "gp", 0.98, end, criterion)
                if gp is not None and mp is not None:
                    out.append(
                        Target(
                            f"Accuracy {gp.cfg.name.split(' ')[0]} 98 % >= ModelPruning 98 % "
                            f"(end {end:g}, mean of seeds)",
                            f"{gp.mean_acc:.2%} vs {mp.mean_acc:.2%}",
                            gp.mean_acc >= mp.mean_acc,
                        )
                    )
    for section in timing:
        for s in args.timing_sparsities:
            gp, mp = section.find("gp", s), section.find("mp", s)
            if gp is None or mp is None:
                continue
            where = f"{section.threads} thr, {section.recipe.key}"
            out.append(
                Target(
                    f"Fit time GP {s:.0%} / dense <= 1.05x ({where})",
                    f"{section.ratio(gp):.3f}x",
                    section.ratio(gp) <= 1.05,
                )
            )
            out.append(
                Target(
                    f"Fit time GP {s:.0%} < MP {s:.0%} ({where})",
                    f"{section.ratio(gp):.3f}x vs {section.ratio(mp):.3f}x",
                    section.ratio(gp) < section.ratio(mp),
                )
            )
    return out


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def md_table(columns: Sequence[str], body: list[list[str]], left: int = 1) -> list[str]:
    """A markdown table; the first ``left`` columns are left-aligned, the others right-aligned."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def _git() -> str:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> list[str]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    return [
        f"CPU: {_cpu_model()}; {os.cpu_count()} logical cores, {usable} usable by this process; "
        f"torch's default thread count here: {TORCH_DEFAULT_THREADS}; torch CPU capability: {capability}",
        f"Python {platform.python_version()}, torch {torch.__version__}, pytorch-lightning {pl.__version__}, "
        f"{platform.system()} {platform.release()}",
    ]


def markdown(
    args: argparse.Namespace,
    timing: list[TimingSection],
    accuracy: list[Scored],
    total_wall: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = ["# Pruning benchmark: GradualPruning vs Lightning ModelPruning", ""]
    if args.quick:
        lines += ["**`--quick` smoke run: 1 epoch, 2 rounds, 1 seed. These numbers are not results.**", ""]
    lines += [
        f"- Date: {now}; whole run {total_wall / 60:.1f} min",
        f"- Command: `python {cmd}`",
        f"- Code: git {_git()}",
        *[f"- {m}" for m in machine_info()],
        "- Load average (1/5/15 min) at start: "
        + "/".join(f"{x:.2f}" for x in load[0])
        + "; at end: "
        + "/".join(f"{x:.2f}" for x in load[1]),
        f"- Model / data: LeNet-300-100 (266,200 prunable weights in fc1/fc2/fc3), MNIST 5k subset "
        f"(4,000 train / 1,000 test), batch {BATCH_SIZE} ({STEPS_PER_EPOCH} steps/epoch)",
        "",
    ]
    goals = targets(args, timing, accuracy)
    if goals:
        lines += ["## Targets", ""]
        body = [[t.what, t.measured, "yes" if t.met else "**no**"] for t in goals]
        lines += md_table(["Target", "Measured", "Met"], body)
        lines += [""]
    if timing:
        lines += [
            "## Fit time",
            "",
            f"{_epochs(args.timing_epochs)} ({args.timing_epochs * STEPS_PER_EPOCH:,} optimizer steps) "
            f"per fit, seed {args.timing_seed}, no augmentation (the bare training loop); pruning reaches "
            f"the target at {args.timing_end:.0%} of training. Per section: one untimed warm-up fit per "
            f"config, then {args.rounds} rounds in alternating (ABBA) order. The ratio to dense is the "
            "median over rounds of `fit time / dense fit time of the same round`.",
            "",
        ]
        for section in timing:
            lines += [f"### {section.title}", ""]
            lines += md_table(TIMING_COLUMNS, timing_rows(section))
            lines += [""]
    if accuracy:
        seeds = list(accuracy[0].runs)
        lines += [
            "## Accuracy",
            "",
            f"SGD (lr 0.05, momentum 0.9, weight decay 1e-4), batch {BATCH_SIZE}, {_epochs(args.epochs)}, "
            f"training images shifted by up to {args.random_shift} px at random, "
            f"`torch.set_num_threads({args.accuracy_threads})`; seeds {', '.join(map(str, seeds))} (a seed "
            "fixes the initial weights, the data order and shifts, and the train / test split). `end`: "
            "fraction of training at which the target sparsity is reached; the rest fine-tunes at the "
            "target. Test accuracy on the 1,000 held-out images after fit.",
            "",
        ]
        lines += md_table(accuracy_columns(seeds), accuracy_rows(accuracy))
        lines += [""]
    lines += ["## How to read", ""]
    lines += notes(args, timing, accuracy)
    if timing:
        lines += ["", "### Fit times of every round (s)", ""]
        body = []
        for section in timing:
            for row in section.rows:
                body.append(
                    [
                        f"{section.threads} thr, {section.recipe.key}",
                        row.cfg.name,
                        ", ".join(f"{r.fit_wall_s:.2f}" for r in row.runs),
                        ", ".join(f"{x:.3f}" for x in section.paired(row)),
                        ", ".join(f"{r.fit_cpu_s:.2f}" for r in row.runs),
                    ]
                )
        lines += md_table(["Section", "Config", "wall", "wall / dense (same round)", "CPU"], body, left=2)
    lines += [""]
    return "\n".join(lines)


def notes(args: argparse.Namespace, timing: list[TimingSection], accuracy: list[Scored]) -> list[str]:
    out = []
    runs = [r for s in timing for row in s.rows for r in row.runs]
    runs += [r for row in accuracy for r in row.runs.values()]
    gp_bad = any(gp_disagrees(r) for r in runs)
    if timing:
        unrepro = [
            f"{s.threads} thr {s.recipe.key} {row.cfg.name}"
            for s in timing
            for row in s.rows
            if not row.reproducible
        ]
        order_ok = all(
            r.data_order == s.dense.first.data_order for s in timing for row in s.rows for r in row.runs
        )
        out += [
            "- **Fit time**: `trainer.fit` only (progress bar, model summary, logger, checkpointing and "
            "validation are off for every config; the test split is measured once, by `trainer.test`, "
            "after the timed fit). Absolute times depend on the machine and its load; the **ratios** are "
            "the result: the configs of a section run alternating in rounds in one process, every other "
            "round in reverse order, so drift and background load hit every config alike, and every config "
            "is compared with the dense fit of the same round: *vs dense (paired)* is the median over rounds "
            "of `time(config) / time(dense)` of the same round. Cross-checks: *vs dense (medians)*, the "
            "ratio of the median times, and *CPU vs dense (paired)*, the same paired ratio of CPU time "
            "(`time.process_time`, less sensitive to other processes competing for the cores; with more "
            "than one thread it also counts idle worker threads spinning).",
            "- **Timing rows are reproducible**: every round of a section is seeded identically, so it must "
            "give the same accuracy and sparsity; "
            + (
                f"this did NOT hold for {', '.join(unrepro)} (marked (!))."
                if unrepro
                else "this held everywhere."
            )
            + " The data order (first-batch fingerprint of every epoch) "
            + (
                "was identical for every fit."
                if order_ok
                else "DIFFERED between fits: rows are not comparable."
            ),
        ]
    if accuracy:
        order = accuracy_data_order_ok(accuracy)
        out += [
            "- **Accuracy**: one fit per config and seed; every config of a seed saw the same initial "
            + (
                "weights and the same batches, order and shifts (checked)."
                if order
                else "weights but NOT the same data (the check failed): rows are not comparable."
            )
            + " On 1,000 test images one image is 0.1 point and the binomial standard error at 95 % is about "
            "0.7 point per seed (0.4 for a mean of 3 seeds): differences of a few tenths are noise.",
        ]
    out += [
        "- **Sparsity reached**: exact count of zero weights over fc1/fc2/fc3 `.weight` after fit (biases "
        "are not pruned by either callback). GradualPruning's own `.sparsity` "
        + ("DISAGREES with the count for some fit." if gp_bad else "agrees with the count for every fit."),
        f'- **GradualPruning**: `GradualPruning(target_sparsity=s, schedule="cubic", start=0.0, end=end, '
        f'frequency=f, criterion=c, scope="global", targets=["fc1", "fc2", "fc3"])`: cubic ramp from step 0, '
        f"the mask enforced on every step; f = {args.gp_frequency} (the callback's default) in the timing "
        f"section and {args.accuracy_gp_frequency} in the accuracy section (ModelPruning can only prune at "
        "epoch ends, every 63 steps here; a finer schedule is part of what GradualPruning offers). c = "
        '`"magnitude"` (global |w|, the same ranking as ModelPruning\'s global l1_unstructured) or '
        '`"lamp"` (GradualPruning[lamp]: layer-adaptive magnitude, Lee et al. 2021, same order as |w| inside '
        "a layer, a different per-layer allocation under one global threshold).",
        '- **ModelPruning**: `ModelPruning("l1_unstructured", parameters_to_prune=[(fc1, "weight"), (fc2, '
        '"weight"), (fc3, "weight")], use_global_unstructured=True, amount=<callable>, '
        "make_pruning_permanent=True, use_lottery_ticket_hypothesis=False)`. It prunes at the end of each "
        "training epoch and `amount` is a fraction of the weights *still unpruned*, so the callable "
        "follows the same cubic curve as GradualPruning sampled at epoch ends, "
        "`a_k = (N_k - N_(k-1)) / (total - N_(k-1))` with `N_k = round(cubic(k+1) * total)`, and reaches "
        "the target at the first epoch end at or after `end`. Lottery-ticket rewinding (on by default) is "
        "off: it resets the surviving weights to their initial "
        "values after every pruning call, a different algorithm. Amounts per epoch:",
    ]
    plans = set()
    if timing:
        plans |= {(s, args.timing_epochs, args.timing_end) for s in args.timing_sparsities}
    if accuracy:
        plans |= {(s, args.epochs, e) for s in args.sparsities for e in args.ends}
    total = 266_200
    for s, epochs, end in sorted(plans):
        amounts = model_pruning_amounts(s, epochs, total, end)
        out.append(
            f"  - {s:.0%}, {_epochs(epochs)}, end {end:g} "
            f"(last call after epoch {prune_epochs(epochs, end)}): "
            + ", ".join(f"{a:.4f}" for a in amounts if a > 0)
        )
    return out


def print_rich(console: Console, args, timing: list[TimingSection], accuracy: list[Scored]) -> None:
    for section in timing:
        table = Table(title=f"Fit time: {section.title}")
        for i, col in enumerate(TIMING_COLUMNS):
            table.add_column(col, justify="left" if i == 0 else "right")
        for r in timing_rows(section):
            table.add_row(*r)
        console.print(table)
    if accuracy:
        table = Table(
            title=f"Accuracy: SGD recipe, {_epochs(args.epochs)}, random shifts of {args.random_shift} px"
        )
        for i, col in enumerate(accuracy_columns(list(accuracy[0].runs))):
            table.add_column(col, justify="left" if i == 0 else "right")
        for r in accuracy_rows(accuracy):
            table.add_row(*[c.replace("**", "") for c in r])
        console.print(table)
    goals = targets(args, timing, accuracy)
    if goals:
        table = Table(title="Targets")
        for col in ("Target", "Measured", "Met"):
            table.add_column(col)
        for t in goals:
            table.add_row(t.what, t.measured, "yes" if t.met else "[red]no[/red]")
        console.print(table)


# ---------------------------------------------------------------------------- main
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _threads(text: str) -> list[int]:
    return [TORCH_DEFAULT_THREADS if x.strip() == "default" else int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sections", default="timing,accuracy", help="comma-separated: timing, accuracy (default both)"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 2 rounds, seed 0, 98 %% only")
    g = p.add_argument_group("timing section")
    g.add_argument(
        "--threads",
        default="default,1",
        help=f"comma-separated torch thread counts; 'default' is torch's own ({TORCH_DEFAULT_THREADS} here) "
        "(default: default,1)",
    )
    g.add_argument("--optimizers", default="sgd,adamw", help="comma-separated: sgd, adamw (default both)")
    g.add_argument("--rounds", "--repeats", type=int, default=5, help="ABBA timing rounds (default 5)")
    g.add_argument("--timing-epochs", type=int, default=20, help="epochs per timed fit (default 20)")
    g.add_argument("--timing-sparsities", default="0.98", help="comma-separated (default 0.98)")
    g.add_argument(
        "--timing-end", type=float, default=0.75, help="end of pruning in timed fits (default 0.75)"
    )
    g.add_argument("--timing-seed", type=int, default=0)
    g = p.add_argument_group("accuracy section")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    g.add_argument("--epochs", type=int, default=20, help="epochs per fit (default 20)")
    g.add_argument("--sparsities", default="0.9,0.95,0.98", help="comma-separated (default 0.9,0.95,0.98)")
    g.add_argument("--ends", default="0.75,0.5", help="comma-separated pruning ends (default 0.75,0.5)")
    g.add_argument("--random-shift", type=int, default=RANDOM_SHIFT, help=f"pixels (default {RANDOM_SHIFT})")
    g.add_argument("--accuracy-threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--gp-frequency",
        type=int,
        default=GP_FREQUENCY,
        help=f"GradualPruning frequency in the timing section (default {GP_FREQUENCY}, the callback's own)",
    )
    g.add_argument(
        "--accuracy-gp-frequency",
        type=int,
        default=ACCURACY_GP_FREQUENCY,
        help=f"GradualPruning frequency in the accuracy section (default {ACCURACY_GP_FREQUENCY})",
    )
    g.add_argument(
        "--gp-criteria",
        default="magnitude,lamp",
        help="comma-separated GradualPruning criteria in the accuracy section (default magnitude,lamp)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    try:
        args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        args.threads = _threads(args.threads)
        args.optimizers = [s.strip() for s in args.optimizers.split(",") if s.strip()]
        args.timing_sparsities = _floats(args.timing_sparsities)
        args.seeds = _ints(args.seeds)
        args.sparsities = _floats(args.sparsities)
        args.ends = _floats(args.ends)
        args.gp_criteria = [s.strip() for s in args.gp_criteria.split(",") if s.strip()]
    except ValueError as err:
        p.error(str(err))
    if args.quick:
        args.rounds, args.timing_epochs, args.epochs = 2, 1, 1
        args.seeds, args.sparsities, args.timing_sparsities = [0], [0.98], [0.98]
    if not args.sections or set(args.sections) - {"timing", "accuracy"}:
        p.error("--sections takes timing and/or accuracy")
    if set(args.optimizers) - set(RECIPES) or not args.optimizers:
        p.error(f"--optimizers takes {', '.join(RECIPES)}")
    if (
        min(
            [
                args.rounds,
                args.timing_epochs,
                args.epochs,
                args.gp_frequency,
                args.accuracy_threads,
                *args.threads,
            ]
        )
        < 1
    ):
        p.error("--rounds, --*epochs, --*threads and --gp-frequency must be >= 1")
    if not args.seeds or min(args.seeds) < 0 or args.timing_seed < 0 or args.random_shift < 0:
        p.error("seeds and --random-shift must be >= 0")
    fractions = [*args.timing_sparsities, *args.sparsities]
    if not fractions or not all(0 < s < 1 for s in fractions):
        p.error("sparsities must be in (0, 1)")
    if not args.ends or not all(0 < e <= 1 for e in [*args.ends, args.timing_end]):
        p.error("ends must be in (0, 1]")
    return args


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*[Tt]he number of training batches.*")
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    console = Console(width=None if sys.stdout.isatty() else 160)
    log = lambda msg: console.print(Text(msg, style="dim"))  # noqa: E731
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    start = time.perf_counter()
    timing = run_timing(args, log) if "timing" in args.sections else []
    accuracy = run_accuracy(args, log) if "accuracy" in args.sections else []
    total_wall = time.perf_counter() - start
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print_rich(console, args, timing, accuracy)
    bad = [f"{s.title} / {row.cfg.name}" for s in timing for row in s.rows if not row.reproducible]
    if bad:
        console.print(f"[yellow]warning: rounds disagree on accuracy/sparsity for {bad}[/yellow]")
    if accuracy and not accuracy_data_order_ok(accuracy):
        console.print("[yellow]warning: the data order differed between configs of a seed[/yellow]")
    console.print(f"benchmark wall time: {total_wall:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(args, timing, accuracy, total_wall, (load0, load1)))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
