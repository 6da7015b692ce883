"""Distillation benchmark: Hinton et al. (2015) on MNIST 5k, the teacher cache, distillation + pruning.

Sections (``--sections``, default all), each a table in the report; every number comes from real
Lightning ``Trainer.fit`` runs of :class:`~lightning_compress.DistillationModule`:

* ``hinton``: the MNIST experiment of Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a
  Neural Network", on the 5k subset: the teacher ``HintonMLP(hidden=1200, dropout=0.5,
  input_dropout=0.2)``, the student ``HintonMLP(hidden=800)`` trained on hard labels and the same
  student distilled from the teacher; also the small ``HintonMLP(hidden=30)`` student. Per-seed and
  mean test accuracy, errors out of the 1,000 test images and the share of the teacher / hard-label
  gap that distillation closes.
* ``cache``: epoch time of distilling a 2x30 student from the 2x1200 teacher with the teacher cache
  (``cache=True``: teacher logits computed once per training sample, in epoch 1) vs without, same
  data path (``MNIST5kDataModule(indexed=True)``), fits alternating ABBA, torch's default thread
  count and 1 thread.
* ``prune``: ``GradualPruning(target_sparsity=0.9)`` of the 2x800 student with hard labels vs
  distillation + the same pruning schedule.

Recipes (from a plain-PyTorch hyper-parameter search on this data): teacher Adam lr 1e-3 decayed to 0
along a cosine over the fit (per step), 30 epochs, 2-pixel random shifts; hard-label students SGD lr
0.1, momentum 0.9, weight decay 5e-4, cosine, 30 epochs, no augmentation (the best of the recipes
tried); distilled students Adam lr 1e-3 (constant), 20 epochs, T = 8, alpha = 0.9, no augmentation.
Batch 64 everywhere. A seed fixes the initial weights, the data order and the train / test split,
and the teacher a student distils from (one teacher per seed, trained once and reused). Fits run
``--jobs`` at a time in a spawn pool, one torch thread each.

Usage::

    python benchmarks/distillation.py --out benchmarks/results/distillation.md   # ~5 min on 2 idle cores
    python benchmarks/distillation.py --quick                                      # smoke test, < 2 min
    python benchmarks/distillation.py --sections cache --cache-rounds 9
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    TORCH_DEFAULT_THREADS,
    header,
    library_mtime,
    md_table,
    pct,
    quiet,
    trainer_for,
    with_cosine,
)

SECTIONS = ("hinton", "cache", "prune")
BATCH_SIZE = 64
STEPS_PER_EPOCH = math.ceil(4000 / BATCH_SIZE)  # 63
TEACHER = {"hidden": 1200, "dropout": 0.5, "input_dropout": 0.2}
#: Row -> label, student width, distilled, 2-px shifts, pruned, optimizer, lr, weight decay, cosine,
#: which epochs argument.
ROWS: dict[str, tuple[str, int, bool, int, bool, str, float, float, bool, str]] = {
    "teacher": (
        "teacher 2x1200 (dropout, 2-px shifts)",
        1200,
        False,
        2,
        False,
        "adam",
        1e-3,
        0,
        True,
        "teacher",
    ),
    "hard800": ("2x800, hard labels", 800, False, 0, False, "sgd", 0.1, 5e-4, True, "hard"),
    "kd800": ("2x800, distilled", 800, True, 0, False, "adam", 1e-3, 0, False, "kd"),
    "kd800_shift": (
        "2x800, distilled on 2-px shifted images",
        800,
        True,
        2,
        False,
        "adam",
        1e-3,
        0,
        False,
        "kd",
    ),
    "hard30": ("2x30, hard labels", 30, False, 0, False, "adam", 3e-3, 0, False, "small"),
    "kd30": ("2x30, distilled", 30, True, 0, False, "adam", 1e-3, 0, False, "small"),
    "prune_hard800": (
        "2x800, hard labels + GradualPruning",
        800,
        False,
        0,
        True,
        "sgd",
        0.1,
        5e-4,
        True,
        "hard",
    ),
    "prune_kd800": ("2x800, distilled + GradualPruning", 800, True, 0, True, "adam", 1e-3, 0, False, "kd"),
}
Done = dict[tuple[str, int], dict[str, Any]]
SECTION_ROWS = {
    "hinton": ["teacher", "hard800", "kd800", "kd800_shift", "hard30", "kd30"],
    "prune": ["prune_hard800", "prune_kd800"],
}


@dataclass(frozen=True)
class Job:
    row: str
    seed: int
    epochs: int

    @property
    def spec(self) -> tuple[str, int, bool, int, bool, str, float, float, bool, str]:
        return ROWS[self.row]

    def cost(self) -> float:  # rough seconds, to start the longest fits first
        width, distill, shift = self.spec[1:4]
        per_epoch = {1200: 1.5, 800: 0.6, 30: 0.15}[width] + (0.3 if distill and shift else 0.05 * distill)
        return self.epochs * per_epoch


def teacher_path(folder: str, seed: int) -> str:
    return os.path.join(folder, f"teacher_s{seed}.pt")


def make_teacher() -> nn.Module:
    from lightning_compress.demos import HintonMLP

    return HintonMLP(**TEACHER)


def linear_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def accuracy(model: nn.Module, dm: Any) -> float:
    model.eval()
    x, y = dm.test_dataset.tensors
    return float((model(x).argmax(1) == y).float().mean())


def run_job(job: Job, extra: dict[str, Any]) -> dict[str, Any]:
    """Train and test one row for one seed (in a worker process, one torch thread)."""
    import lightning_compress as lc
    from lightning_compress.demos import HintonMLP, MNIST5kDataModule

    quiet()
    torch.set_num_threads(1)
    _, width, distill, shift, prune, optimizer, lr, weight_decay, cosine, _ = job.spec
    teacher = None
    if distill:  # built before seeding: the student's initial weights and data order match the hard row
        teacher = make_teacher()
        teacher.load_state_dict(torch.load(teacher_path(extra["tmp"], job.seed), weights_only=True))
    pl.seed_everything(job.seed, verbose=False)
    cache = distill and shift == 0  # the teacher cache needs fixed inputs
    dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=job.seed, random_shift=shift, indexed=cache)
    dm.setup()
    cls = with_cosine(HintonMLP) if cosine else HintonMLP
    kw = TEACHER if job.row == "teacher" else {"hidden": width}
    model: pl.LightningModule = cls(**kw, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
    if distill:
        model = lc.DistillationModule(
            model, teacher, temperature=extra["temperature"], alpha=extra["alpha"], cache=cache
        )
    callbacks: list[pl.Callback] = []
    if prune:
        callbacks.append(
            lc.GradualPruning(
                target_sparsity=extra["sparsity"], end=extra["prune_end"], frequency=extra["freq"]
            )
        )
    limit = {} if extra["limit_batches"] is None else {"limit_train_batches": extra["limit_batches"]}
    trainer = trainer_for(callbacks, max_epochs=job.epochs, **limit)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    net = model.student if distill else model
    out = {"acc": accuracy(net, dm), "fit_s": fit_s, "sparsity": linear_sparsity(net)}
    if job.row == "teacher":
        torch.save(net.state_dict(), teacher_path(extra["tmp"], job.seed))
    return out


def run_fits(args: argparse.Namespace, extra: dict[str, Any], log: Any) -> Done:
    """Every fit of the training sections; a distilled row starts once its seed's teacher is saved."""
    rows = [r for s in ("hinton", "prune") if s in args.sections for r in SECTION_ROWS[s]]
    needs_teacher = any(ROWS[r][2] for r in rows)
    if needs_teacher and "teacher" not in rows:
        rows.insert(0, "teacher")
    epochs = {
        "teacher": args.teacher_epochs,
        "hard": args.hard_epochs,
        "kd": args.kd_epochs,
        "small": args.small_epochs,
    }
    jobs = [Job(r, s, epochs[ROWS[r][9]]) for r in rows for s in args.seeds]
    ready = [j for j in jobs if not ROWS[j.row][2]]
    waiting = [j for j in jobs if ROWS[j.row][2]]
    ready.sort(key=lambda j: (j.row != "teacher", -j.cost()))  # teachers first, then longest first
    done: dict[tuple[str, int], dict[str, Any]] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        running: dict[Future[dict[str, Any]], Job] = {}

        def submit_more() -> None:
            nonlocal ready
            unlocked = [j for j in waiting if ("teacher", j.seed) in done]
            for j in unlocked:
                waiting.remove(j)
            # teachers first, then the distilled rows whose teacher is ready, then the other fits
            teachers = [j for j in ready if j.row == "teacher"]
            others = [j for j in ready if j.row != "teacher"]
            ready = teachers + sorted(unlocked, key=lambda j: -j.cost()) + others
            while ready and len(running) < args.jobs:
                job = ready.pop(0)
                running[pool.submit(run_job, job, extra)] = job

        submit_more()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                res = done[(job.row, job.seed)] = fut.result()
                log(
                    f"[fit] {job.row:<14} seed {job.seed} acc {res['acc']:.4f} sparsity "
                    f"{res['sparsity']:.3f} fit {res['fit_s']:.1f} s ({(time.perf_counter() - t0) / 60:.1f} "
                    "min)"
                )
            submit_more()
    return done


# ---------------------------------------------------------------------------- cache timing
class EpochTimer(pl.Callback):
    """Epoch wall times (one epoch start to the next, the last to the end of training); cache stats."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.cache: tuple[int, int] | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(time.perf_counter())
        cache = getattr(pl_module, "cache", None)
        if cache is not None:
            self.cache = (cache.hits, cache.misses)

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def macs(model: nn.Module) -> tuple[int, int]:
    """(MACs per image from ``compression_summary``, the same from the Linear layer sizes)."""
    import lightning_compress as lc

    summary = lc.compression_summary(model, torch.zeros(1, 784))
    by_size = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return int(summary.total_macs or 0), by_size


def run_cache(args: argparse.Namespace, extra: dict[str, Any], log: Any) -> dict[str, Any]:
    import lightning_compress as lc
    from lightning_compress.demos import HintonMLP, MNIST5kDataModule

    quiet()
    teacher = make_teacher()
    path = teacher_path(extra["tmp"], args.seeds[0])
    trained = os.path.exists(path)
    if trained:
        teacher.load_state_dict(torch.load(path, weights_only=True))
    dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=0, indexed=True)  # loaded once, new loaders per fit
    dm.setup()
    plain_dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=0)  # the student alone takes no indices
    plain_dm.setup()

    def fit(config: str, epochs: int) -> tuple[EpochTimer, float]:
        pl.seed_everything(0, verbose=False)
        student = HintonMLP(hidden=30, lr=1e-3, optimizer="adam")
        timer = EpochTimer()
        if config == "alone":
            trainer_for([timer], max_epochs=epochs).fit(student, datamodule=plain_dm)
            return timer, accuracy(student, dm)
        model = lc.DistillationModule(
            student,
            teacher,
            temperature=extra["temperature"],
            alpha=extra["alpha"],
            cache=config == "cached",
        )
        trainer_for([timer], max_epochs=epochs).fit(model, datamodule=dm)
        return timer, accuracy(model.student, dm)

    out: dict[str, Any] = {
        "trained": trained,
        "macs": (macs(teacher), macs(HintonMLP(hidden=30))),
        "rows": [],
    }
    configs = ("cached", "uncached", "alone")
    for threads in args.cache_threads:
        torch.set_num_threads(threads)
        for config in configs:  # untimed warm-up
            fit(config, 1)
        first: dict[str, list[float]] = {c: [] for c in configs}
        later: dict[str, list[float]] = {c: [] for c in configs}
        ratios, stats, accs = [], None, {}
        for r in range(args.cache_rounds):
            for config in configs if r % 2 == 0 else configs[::-1]:
                timer, accs[config] = fit(config, args.cache_epochs)
                times = timer.epochs()
                first[config].append(times[0])
                later[config].append(statistics.fmean(times[1:]))
                stats = timer.cache if config == "cached" else stats
            ratios.append(later["cached"][-1] / later["uncached"][-1])
        row = {
            "threads": threads,
            "first": {k: statistics.median(v) for k, v in first.items()},
            "later": {k: statistics.median(v) for k, v in later.items()},
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "stats": stats,
            "accs": accs,
        }
        out["rows"].append(row)
        log(
            f"[cache] threads {threads}: uncached {row['later']['uncached'] * 1e3:.0f} ms/epoch, cached "
            f"{row['later']['cached'] * 1e3:.0f} ms/epoch, ratio {row['ratio']:.2f} "
            f"(rounds {' '.join(f'{x:.2f}' for x in ratios)}); student alone "
            f"{row['later']['alone'] * 1e3:.0f} ms/epoch"
        )
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    return out


# ---------------------------------------------------------------------------- report
def accs(done: Done, row: str, seeds: list[int]) -> list[float]:
    return [done[(row, s)]["acc"] for s in seeds if (row, s) in done]


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def gap_closed(done: Done, row: str, hard: str, seeds: list[int]) -> float | None:
    t, h, d = (mean(accs(done, r, seeds)) for r in ("teacher", hard, row))
    if t is None or h is None or d is None or t <= h:
        return None
    return (d - h) / (t - h)


def recipe(row: str, args: argparse.Namespace) -> str:
    _, _, _, shift, _, optimizer, lr, wd, cosine, key = ROWS[row]
    epochs = {"teacher": args.teacher_epochs, "hard": args.hard_epochs, "kd": args.kd_epochs}
    text = f"{'SGD' if optimizer == 'sgd' else 'Adam'} {lr:g}" + (f" wd {wd:g}" if wd else "")
    text += (", cosine" if cosine else ", constant") + f", {epochs.get(key, args.small_epochs)} ep"
    return text + (", 2-px shifts" if shift else "")


def fit_rows(done: Done, rows: list[str], args: argparse.Namespace, prune: bool) -> list[list[str]]:
    hard = {"kd800": "hard800", "kd800_shift": "hard800", "kd30": "hard30", "prune_kd800": "prune_hard800"}
    body = []
    for row in rows:
        a = accs(done, row, args.seeds)
        if not a:
            continue
        m = statistics.fmean(a)
        cells = [ROWS[row][0], recipe(row, args)]
        cells += [pct(done[(row, s)]["acc"]) if (row, s) in done else "-" for s in args.seeds]
        cells += [f"**{pct(m)}**", f"{(1 - m) * 1000:.0f}"]
        if prune:
            dense = mean(accs(done, {"prune_hard800": "hard800", "prune_kd800": "kd800"}[row], args.seeds))
            cells.append(pct(mean([done[(row, s)]["sparsity"] for s in args.seeds if (row, s) in done])))
            cells.append("-" if dense is None else f"{(m - dense) * 100:+.2f}")
        g = gap_closed(done, row, hard[row], args.seeds) if row in hard else None
        cells.append("" if g is None else f"{g:.0%}")
        cells.append(f"{mean([done[(row, s)]['fit_s'] for s in args.seeds if (row, s) in done]):.0f} s")
        body.append(cells)
    return body


def hinton_md(done: Done, args: argparse.Namespace, targets: list[list[str]]) -> list[str]:
    seeds = args.seeds
    g = gap_closed(done, "kd800", "hard800", seeds)
    if g is not None:
        t, h, d = (mean(accs(done, r, seeds)) for r in ("teacher", "hard800", "kd800"))
        targets.append(
            [
                "2x800 student: distillation closes >= 50 % of the teacher / hard-label gap "
                f"(mean of {len(seeds)} seeds)",
                f"{g:.0%} (hard {pct(h)}, distilled {pct(d)}, teacher {pct(t)})",
                "yes" if g >= 0.5 else "**no**",
            ]
        )
    cols = ["Network", "recipe", *[f"seed {s}" for s in seeds], "mean", "errors / 1000", "gap closed"]
    return [
        "## Hinton et al. (2015) on MNIST 5k",
        "",
        "Teacher: `HintonMLP(hidden=1200, dropout=0.5, input_dropout=0.2)` on 2-pixel random shifts. "
        "Students: `HintonMLP(hidden=800)` and `HintonMLP(hidden=30)`, no dropout, no augmentation (as in "
        "the paper). *Hard labels*: plain training with the best recipe of the hyper-parameter search for "
        "that width (for 2x800 SGD momentum 0.9 beat Adam lr 1e-3, 20 epochs, by 0.1 point). *Distilled*: "
        f"the same student in `DistillationModule(student, teacher, temperature={args.temperature:g}, "
        f"alpha={args.alpha:g}, cache=True)` on `MNIST5kDataModule(indexed=True)`, distilling from the "
        "teacher of the same seed, with the same initial weights and data order as the hard-label row; the "
        "*2-px shifted* row (an extra, not the paper's setting) distils on randomly shifted images with "
        "`cache=False` (the teacher runs on every shifted batch). cosine = learning rate decayed to 0 along "
        "a cosine over the fit, per step. *Gap closed* = (distilled - hard) / (teacher - hard) of the "
        "means. The paper (full MNIST, 60k training images): teacher 67 test errors, 2x800 student 146 on "
        "hard labels and 74 distilled (91 % of the gap). Here 1 error = 0.1 point; the binomial standard "
        "error of one seed's accuracy near 95 % is about 0.7 point, 0.4 for a mean of 3 seeds.",
        "",
        *md_table([*cols, "fit time"], fit_rows(done, SECTION_ROWS["hinton"], args, False)),
        "",
    ]


def prune_md(done: Done, args: argparse.Namespace) -> list[str]:
    cols = ["Row", "recipe", *[f"seed {s}" for s in args.seeds], "mean", "errors / 1000", "sparsity"]
    cols += ["vs unpruned (pt)", "gap closed", "fit time"]
    return [
        f"## Distillation + pruning (2x800 student, {args.sparsity:.0%} sparsity)",
        "",
        f"`GradualPruning(target_sparsity={args.sparsity:g}, end={args.prune_end:g}, frequency={args.freq})` "
        "(defaults otherwise: cubic schedule, global magnitude over fc1 / fc2 / fc3; a mask update every "
        f"{args.freq} steps, about half an epoch; target reached at {args.prune_end:.0%} of training) added "
        "to the two 2x800 recipes of the section above: pruning alone on hard labels, and distillation "
        "(same teacher, T, alpha, cache) + pruning; the callback acts on the student only. *vs unpruned* "
        "compares with the unpruned row of the same recipe above; *gap closed* is the distilled row's share "
        "of the teacher / pruned-hard-label gap. Sparsity: zero weights over all Linear weights of the "
        "student after the fit.",
        "",
        *md_table(cols, fit_rows(done, SECTION_ROWS["prune"], args, True)),
        "",
    ]


def cache_md(res: dict[str, Any], args: argparse.Namespace, targets: list[list[str]]) -> list[str]:
    (t_sum, t_size), (s_sum, s_size) = res["macs"]
    ratio_macs = t_sum / s_sum if s_sum else t_size / s_size
    targets.append(
        [
            "Cache setting: teacher / student MACs >= 10x",
            f"{ratio_macs:.0f}x ({t_sum:,} / {s_sum:,} MACs per image)",
            "yes" if ratio_macs >= 10 else "**no**",
        ]
    )
    body = []
    for r in res["rows"]:
        plural = "s" if r["threads"] > 1 else ""
        targets.append(
            [
                f"Cached epoch time <= 0.5x uncached ({r['threads']} thread{plural})",
                f"{r['ratio']:.2f}x",
                "yes" if r["ratio"] <= 0.5 else "**no**",
            ]
        )
        hits, misses = r["stats"] or (0, 0)
        body.append(
            [
                str(r["threads"]),
                f"{r['first']['uncached'] * 1e3:.0f}",
                f"{r['first']['cached'] * 1e3:.0f}",
                f"{r['later']['uncached'] * 1e3:.0f}",
                f"{r['later']['cached'] * 1e3:.0f}",
                f"{r['later']['alone'] * 1e3:.0f}",
                f"**{r['ratio']:.2f}x**",
                f"{r['later']['cached'] / r['later']['uncached']:.2f}x",
                f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}",
                f"{hits} / {misses}",
                f"{pct(r['accs']['cached'])} / {pct(r['accs']['uncached'])}",
            ]
        )
    n = args.cache_epochs
    cols = ["threads", "epoch 1 uncached ms", "epoch 1 cached ms (fill)", f"epochs 2-{n} uncached ms"]
    cols += [
        f"epochs 2-{n} cached ms",
        f"epochs 2-{n} student alone ms",
        "cached / uncached",
        "ratio of medians",
        "per-round range",
    ]
    cols += ["cache hits / misses", "acc cached / uncached"]
    which = f"the seed-{args.seeds[0]} teacher of the section above" if res["trained"] else "untrained"
    return [
        "## Teacher cache: epoch time with and without",
        "",
        "Student `HintonMLP(hidden=30)` (Adam lr 1e-3), teacher `HintonMLP(hidden=1200, dropout=0.5, "
        f"input_dropout=0.2)` ({which}; its weights do not change the time), "
        f"`DistillationModule(temperature={args.temperature:g}, alpha={args.alpha:g}, cache=True)` vs "
        "`cache=False`, both on `MNIST5kDataModule(indexed=True)` (no augmentation), so the data path is "
        "identical. MACs per image from `lc.compression_summary(model, torch.zeros(1, 784)).total_macs`: "
        f"teacher {t_sum:,}, student {s_sum:,} (the sums of in x out over the Linear layers give {t_size:,} "
        f"and {s_size:,}). Each fit runs {n} epochs of {STEPS_PER_EPOCH} steps in the main process, after "
        "the training sections (nothing else of this script running); epoch time = wall time from one epoch "
        f"start to the next. {args.cache_rounds} rounds of one cached fit, one uncached fit and one fit of "
        "the *student alone* (plain `HintonMLP(hidden=30)` training on hard labels, no wrapper, no teacher: "
        "the floor a cached epoch can approach) in ABBA order, after an untimed 1-epoch warm-up fit of "
        "each; the time columns are medians over rounds, *cached / uncached* is the median of the per-round "
        f"ratios of the mean time of epochs 2-{n} (epoch 1 fills the cache and is shown separately). Hits / "
        f"misses: batches served from the cache / by the teacher in the last cached fit; the accuracies ({n} "
        "epochs, last round) agree if the cached logits equal the computed ones. With the teacher cached, "
        "what is left of an epoch is what the cache cannot remove: the student's step and the per-step work "
        "of Lightning and of the wrapper (the soft-target loss, the forward hooks, the cache lookup, its "
        "`self.log` calls); *cached - student alone* is the wrapper's share. None of "
        "it gets faster with a second thread (on batch-64 steps of a 2x30 MLP the second thread costs more "
        "than it saves), and the teacher's batch-64 forward gains little from it, so the ratio is higher "
        "with 2 threads. On a shared machine the 2-thread row also depends on whether the other process "
        "holds a core at the time (see the load average): its per-round range is wider.",
        "",
        *md_table(cols, body),
        "",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="fits in parallel (default 2)")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--hard-epochs", type=int, default=30)
    p.add_argument("--kd-epochs", type=int, default=20)
    p.add_argument("--small-epochs", type=int, default=40, help="epochs of both 2x30 rows")
    p.add_argument("--temperature", type=float, default=8.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--prune-end", type=float, default=0.6)
    p.add_argument("--freq", type=int, default=32, help="GradualPruning frequency (steps)")
    p.add_argument("--cache-epochs", type=int, default=5)
    p.add_argument("--cache-rounds", type=int, default=5)
    p.add_argument("--cache-threads", default="default,1", help="torch thread counts of the cache section")
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default all)")
    p.add_argument("--quick", action="store_true", help="smoke test: numbers are not results")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if set(args.sections) - set(SECTIONS):
        p.error(f"--sections takes {SECTIONS}")
    args.cache_threads = [
        TORCH_DEFAULT_THREADS if t == "default" else int(t) for t in args.cache_threads.split(",") if t
    ]
    args.cache_threads = sorted(set(args.cache_threads), key=args.cache_threads.index)
    if args.quick:
        args.seeds, args.teacher_epochs, args.hard_epochs, args.kd_epochs, args.small_epochs = [0], 2, 2, 2, 2
        args.cache_epochs, args.cache_rounds, args.limit_batches, args.freq = 3, 1, 20, 5
        args.cache_threads = [1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    lib_start = library_mtime()
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="distillation_bench_") as tmp:
        extra = {
            "tmp": tmp,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "sparsity": args.sparsity,
            "prune_end": args.prune_end,
            "freq": args.freq,
            "limit_batches": args.limit_batches,
        }
        done = run_fits(args, extra, log) if {"hinton", "prune"} & set(args.sections) else {}
        cache = run_cache(args, extra, log) if "cache" in args.sections else None
    targets: list[list[str]] = []
    lines: list[str] = []
    if "hinton" in args.sections:
        lines += hinton_md(done, args, targets)
    if cache is not None:
        lines += cache_md(cache, args, targets)
    if "prune" in args.sections:
        lines += prune_md(done, args)
    wall = time.perf_counter() - t0
    head = header(
        "Distillation benchmark: Hinton et al. (2015) on MNIST 5k, teacher cache, distillation + pruning",
        args.quick,
        wall,
        (load_start, os.getloadavg()),
        (lib_start, library_mtime()),
        [
            f"- Training sections: {args.jobs} fits in parallel, one torch thread each; batch {BATCH_SIZE} "
            f"({STEPS_PER_EPOCH} steps per epoch), MNIST 5k (4,000 train / 1,000 test); seeds "
            f"{', '.join(map(str, args.seeds))}"
            + (
                ""
                if args.limit_batches is None
                else f" (only the first {args.limit_batches} batches of each epoch)"
            ),
        ],
    )
    summary = ["## Targets", "", *md_table(["Target", "Measured", "Met"], targets), ""] if targets else []
    text = "\n".join(head + summary + lines).rstrip() + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
