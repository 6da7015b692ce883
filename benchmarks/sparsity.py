"""Sparsity benchmark: dynamic network surgery, energy-aware pruning, regularized pruning, to_sparse.

Sections (``--sections``, default all), each a table in the report:

* ``surgery``: DynamicNetworkSurgery vs GradualPruning vs dense on LeNet-300-100 at 98.2 % sparsity
  (56x fewer weights) and on the Caffe LeNet-5 (20-50-500) at 99.07 % (108x), the compression rates
  of Guo et al. (2016); the same epochs, recipe and seeds for every row.
* ``energy``: EnergyAwarePruning vs magnitude GradualPruning on the Caffe LeNet-5: accuracy and the
  estimated energy reduction (Horowitz 45 nm table, ``lightning_compress.core.cost``) for a few
  targets each; the comparison pairs every magnitude row with the energy-aware row of the largest
  energy reduction whose mean accuracy is within 0.3 points of it (or better).
* ``regularizer``: SparsityRegularizer (L1 + group lasso) + GradualPruning vs GradualPruning alone at
  95 % on LeNet-300-100.
* ``to_sparse``: ``benchmarks/to_sparse.py``'s latency section (CSR inference vs dense).

Recipe of every accuracy row: SGD (lr 0.02 for LeNet-300-100, 0.01 for the Caffe LeNet-5, see
``LR``), momentum 0.9, weight decay 1e-4, batch 64, ``--epochs`` epochs (default 20), training images
shifted by up to 2 pixels; MNIST 5k (4,000 train / 1,000 test); a seed fixes the initial weights,
data order, shifts and the split; one torch thread per fit, ``--jobs`` fits in parallel.

Usage::

    python benchmarks/sparsity.py --out benchmarks/results/sparsity.md      # ~11 min on 2 cores
    python benchmarks/sparsity.py --quick                                     # smoke test, ~2 min
    python benchmarks/sparsity.py --sections surgery --models lenet300 --seeds 0
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SECTIONS = ("surgery", "energy", "regularizer", "to_sparse")
MODELS = {"lenet300": 0.982, "lenet5caffe": 0.9907}  # DNS paper's 56x / 108x
#: SGD learning rate per model. LeNet-300-100: 0.02 (dense 96.1 % on seeds 0-2, better than the 0.05 of
#: benchmarks/pruning.py); the Caffe LeNet-5 has no ReLU after its convolutions and diverges at 0.05:
#: 0.01, Caffe's own lenet_solver value.
LR = {"lenet300": 0.02, "lenet5caffe": 0.01}
MODEL_LABEL = {"lenet300": "LeNet-300-100", "lenet5caffe": "LeNet-5 (Caffe 20-50-500)"}


@dataclass(frozen=True)
class Job:
    """One fit: ``method`` on ``model`` with ``kwargs`` for its callback(s)."""

    section: str
    row: str
    model: str
    method: str
    seed: int
    epochs: int
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass
class Row:
    section: str
    name: str
    model: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)

    def mean(self, key: str) -> float:
        return statistics.fmean(r[key] for r in self.results.values())


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def run_job(job: Job) -> dict[str, Any]:
    """Train, test and measure one configuration (runs in a worker process, one torch thread)."""
    import pytorch_lightning as pl
    import torch

    import lightning_compress as lc
    from lightning_compress.core.cost import energy_profile
    from lightning_compress.demos import LeNet5Caffe, LeNet300100, MNIST5kDataModule

    quiet()
    torch.set_num_threads(1)
    kwargs = dict(job.kwargs)
    pl.seed_everything(job.seed, verbose=False)
    dm = MNIST5kDataModule(batch_size=64, seed=job.seed, random_shift=2)
    recipe = {"optimizer": "sgd", "lr": LR[job.model], "weight_decay": 1e-4}
    model = LeNet300100(**recipe) if job.model == "lenet300" else LeNet5Caffe(**recipe)
    callbacks: list[pl.Callback] = []
    if job.method == "gp":
        callbacks = [lc.GradualPruning(**{"end": 0.75, **kwargs})]
    elif job.method == "dns":
        callbacks = [lc.DynamicNetworkSurgery(**kwargs)]
    elif job.method == "eap":
        from lightning_compress.pruning.energy import EnergyAwarePruning

        callbacks = [EnergyAwarePruning(**{"end": 0.75, **kwargs})]
    elif job.method == "reg+gp":
        reg = {k[4:]: v for k, v in kwargs.items() if k.startswith("reg_")}
        gp = {k: v for k, v in kwargs.items() if not k.startswith("reg_")}
        callbacks = [lc.SparsityRegularizer(**reg), lc.GradualPruning(**{"end": 0.75, **gp})]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=job.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    acc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"])
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    profile = energy_profile(model, model.example_input_array)
    dense_pj = sum(layer.energy_pj(1.0) for layer in profile)
    compressed_pj = sum(layer.energy_pj() for layer in profile)
    layers = {
        name: float((model.get_parameter(f"{name}.weight") == 0).float().mean())
        for name in ("conv1", "conv2", "fc1", "fc2", "fc3")
        if hasattr(model, name)
    }
    out = {
        "acc": acc,
        "sparsity": zeros / total,
        "fit_s": fit_s,
        "energy_reduction": dense_pj / compressed_pj,
        "layers": layers,
    }
    for cb in callbacks:
        if isinstance(cb, lc.DynamicNetworkSurgery):
            out["spliced"] = cb.spliced_total
            out["updates"] = cb.updates
    return out


# ---------------------------------------------------------------------------- job lists
def surgery_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for model in args.models:
        sparsity = MODELS[model]
        # The per-layer floor must fit under the target (the 108x case keeps 0.93 % of the weights).
        floor = {"min_density": 0.005} if sparsity > 0.99 else {}
        rows = [
            ("dense", "dense", {}),
            (f"GradualPruning {sparsity:.2%}", "gp", {"target_sparsity": sparsity, **floor}),
            (
                f"DynamicNetworkSurgery {sparsity:.2%}",
                "dns",
                {"target_sparsity": sparsity, **floor, **args.dns_kwargs},
            ),
        ]
        for seed in args.seeds:
            for name, method, kw in rows:
                jobs.append(Job("surgery", name, model, method, seed, args.epochs, tuple(kw.items())))
    return jobs


def energy_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for seed in args.seeds:
        jobs.append(Job("energy", "dense", "lenet5caffe", "dense", seed, args.epochs))
        for s in args.energy_sparsities:
            jobs.append(
                Job(
                    "energy",
                    f"GradualPruning {s:.0%}",
                    "lenet5caffe",
                    "gp",
                    seed,
                    args.epochs,
                    (("target_sparsity", s),),
                )
            )
        for e in args.energy_targets:
            jobs.append(
                Job(
                    "energy",
                    f"EnergyAwarePruning {e:.0%}",
                    "lenet5caffe",
                    "eap",
                    seed,
                    args.epochs,
                    (("target_energy_reduction", e),),
                )
            )
    return jobs


def regularizer_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    reg = {
        "reg_l1": 1e-5,
        "reg_group_lasso": 1e-5,
        "reg_schedule": "linear",
        "reg_start": 0.0,
        "reg_end": 0.25,
    }
    for seed in args.seeds:
        jobs.append(
            Job(
                "regularizer",
                "GradualPruning 95%",
                "lenet300",
                "gp",
                seed,
                args.epochs,
                (("target_sparsity", 0.95),),
            )
        )
        jobs.append(
            Job(
                "regularizer",
                "SparsityRegularizer + GradualPruning 95%",
                "lenet300",
                "reg+gp",
                seed,
                args.epochs,
                (("target_sparsity", 0.95), *reg.items()),
            )
        )
    return jobs


# ---------------------------------------------------------------------------- report
def md_table(columns: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def rows_of(results: list[tuple[Job, dict[str, Any]]], section: str) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for job, res in results:
        if job.section != section:
            continue
        row = rows.setdefault((job.model, job.row), Row(section, job.row, job.model))
        row.results[job.seed] = res
    return list(rows.values())


def accuracy_table(
    rows: list[Row], seeds: list[int], dense: Row | None, extra: str | None = None
) -> list[str]:
    cols = ["Row", *[f"seed {s}" for s in seeds], "mean", "vs dense", "sparsity", "weights"]
    if extra:
        cols.append(extra)
    body = []
    for row in rows:
        accs = [f"{row.results[s]['acc']:.2%}" if s in row.results else "-" for s in seeds]
        delta = "" if dense is None or row is dense else f"{(row.mean('acc') - dense.mean('acc')) * 100:+.2f}"
        sp = row.mean("sparsity")
        cells = [row.name, *accs, f"**{row.mean('acc'):.2%}**", delta, f"{sp:.2%}", f"{1 / (1 - sp):.1f}x"]
        if extra == "energy reduction":
            cells.append(f"{row.mean('energy_reduction'):.2f}x")
        elif extra == "spliced (mean)":
            cells.append(
                f"{row.mean('spliced'):,.0f}" if "spliced" in next(iter(row.results.values())) else ""
            )
        body.append(cells)
    return md_table(cols, body)


def layer_table(rows: list[Row]) -> list[str]:
    names = list(next(iter(rows[0].results.values()))["layers"])
    body = [
        [r.name, *[f"{statistics.fmean(x['layers'][n] for x in r.results.values()):.1%}" for n in names]]
        for r in rows
    ]
    return md_table(["Row (mean layer sparsity)", *names], body)


def report(
    args: argparse.Namespace, results: list[tuple[Job, dict[str, Any]]], extra_md: str, wall: float
) -> str:
    import torch

    lines = [
        "# Sparsity benchmark: surgery, energy-aware pruning, regularizer, to_sparse",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; whole run {wall / 60:.1f} min",
        f"- Command: `python benchmarks/sparsity.py {' '.join(sys.argv[1:])}`",
        f"- Python {platform.python_version()}, torch {torch.__version__}; {os.cpu_count()} logical cores; "
        f"{args.jobs} fits in parallel, one torch thread each",
        f"- Recipe: SGD lr {LR['lenet300']} (LeNet-300-100) / {LR['lenet5caffe']} (Caffe LeNet-5), "
        "momentum 0.9, "
        f"wd 1e-4, batch 64, {args.epochs} epochs, 2-px random shifts; "
        f"seeds {', '.join(map(str, args.seeds))}; MNIST 5k (4,000 train / 1,000 test)",
        "",
    ]
    targets: list[list[str]] = []
    if "surgery" in args.sections:
        lines += [
            "## Dynamic network surgery",
            "",
            f"DNS arguments: `{args.dns_kwargs}`; GradualPruning: "
            "cubic, end 0.75, frequency 100, global magnitude.",
            "",
        ]
        for model in args.models:
            rows = [r for r in rows_of(results, "surgery") if r.model == model]
            dense = next(r for r in rows if r.name == "dense")
            lines += [
                f"### {MODEL_LABEL[model]}",
                "",
                *accuracy_table(rows, args.seeds, dense, "spliced (mean)"),
                "",
            ]
            lines += [*layer_table(rows), ""]
            gp = next(r for r in rows if r.name.startswith("GradualPruning"))
            dns = next(r for r in rows if r.name.startswith("DynamicNetworkSurgery"))
            d = (dns.mean("acc") - dense.mean("acc")) * 100
            targets.append(
                [
                    f"{MODEL_LABEL[model]}: DNS {MODELS[model]:.2%} within 0.5 points of dense",
                    f"{d:+.2f} points",
                    "yes" if d >= -0.5 else "**no**",
                ]
            )
            targets.append(
                [
                    f"{MODEL_LABEL[model]}: DNS beats GradualPruning at {MODELS[model]:.2%}",
                    f"{dns.mean('acc'):.2%} vs {gp.mean('acc'):.2%}",
                    "yes" if dns.mean("acc") > gp.mean("acc") else "**no**",
                ]
            )
    if "energy" in args.sections:
        rows = rows_of(results, "energy")
        dense = next(r for r in rows if r.name == "dense")
        lines += [
            "## Energy-aware pruning (Caffe LeNet-5)",
            "",
            "Estimated energy per inference from `core/cost.py` (Horowitz 45 nm; pruned weights cost no "
            "MAC and no weight read); *energy reduction* = dense / compressed estimate.",
            "",
            *accuracy_table(rows, args.seeds, dense, "energy reduction"),
            "",
            *layer_table(rows),
            "",
        ]
        gps = [r for r in rows if r.name.startswith("GradualPruning")]
        eaps = [r for r in rows if r.name.startswith("EnergyAware")]
        pairs = []
        for gp in gps:
            ok = [e for e in eaps if e.mean("acc") >= gp.mean("acc") - 0.003]
            if not ok:
                pairs.append(
                    [gp.name, f"{gp.mean('acc'):.2%}", f"{gp.mean('energy_reduction'):.2f}x", "none", "", ""]
                )
                continue
            best = max(ok, key=lambda e: e.mean("energy_reduction"))
            ratio = best.mean("energy_reduction") / gp.mean("energy_reduction")
            pairs.append(
                [
                    gp.name,
                    f"{gp.mean('acc'):.2%}",
                    f"{gp.mean('energy_reduction'):.2f}x",
                    best.name,
                    f"{best.mean('acc'):.2%} / {best.mean('energy_reduction'):.2f}x",
                    f"**{ratio:.2f}x**",
                ]
            )
            targets.append(
                [
                    f"Energy reduction EAP / magnitude at equal accuracy ({gp.name}) >= 1.5x",
                    f"{ratio:.2f}x",
                    "yes" if ratio >= 1.5 else "**no**",
                ]
            )
        lines += [
            "Pairs at equal accuracy (energy-aware mean accuracy >= magnitude's - 0.3 points):",
            "",
            *md_table(
                ["Magnitude row", "acc", "energy red.", "Energy-aware row", "acc / energy red.", "ratio"],
                pairs,
            ),
            "",
        ]
    if "regularizer" in args.sections:
        rows = rows_of(results, "regularizer")
        lines += [
            "## SparsityRegularizer + GradualPruning (LeNet-300-100, 95 %)",
            "",
            "Regularizer: L1 1e-5 + group lasso 1e-5 over output neurons, ramped linearly over the first "
            "25 % of training.",
            "",
            *accuracy_table(rows, args.seeds, None),
            "",
        ]
        base, reg = rows
        targets.append(
            [
                "Regularizer + GP 95 % vs GP 95 % (accuracy, information)",
                f"{reg.mean('acc'):.2%} vs {base.mean('acc'):.2%}",
                "better" if reg.mean("acc") > base.mean("acc") else "not better",
            ]
        )
    head = ["## Targets", "", *md_table(["Target", "Measured", "Met"], targets), ""] if targets else []
    return "\n".join(lines[:7] + head + lines[7:]) + "\n" + (("\n" + extra_md) if extra_md else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--models", default="lenet300,lenet5caffe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="fits in parallel (default 2)")
    p.add_argument("--dns", default="", help="extra DynamicNetworkSurgery kwargs, e.g. 'end=0.5,stop=0.75'")
    p.add_argument("--energy-sparsities", default="0.9,0.95,0.98")
    p.add_argument("--energy-targets", default="0.85,0.9,0.93,0.95")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 1 epoch, 1 seed; numbers are not results"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.models = [m for m in args.models.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.energy_sparsities = [float(s) for s in args.energy_sparsities.split(",") if s]
    args.energy_targets = [float(s) for s in args.energy_targets.split(",") if s]
    args.dns_kwargs = {}
    for item in filter(None, args.dns.split(",")):
        key, _, value = item.partition("=")
        try:
            args.dns_kwargs[key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            args.dns_kwargs[key] = value
    if set(args.sections) - set(SECTIONS) or set(args.models) - set(MODELS):
        p.error(f"--sections takes {SECTIONS}; --models takes {tuple(MODELS)}")
    if args.quick:
        args.epochs, args.seeds = 1, [0]
        args.energy_sparsities, args.energy_targets = [0.9], [0.9]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    t0 = time.perf_counter()
    jobs: list[Job] = []
    if "surgery" in args.sections:
        jobs += surgery_jobs(args)
    if "energy" in args.sections:
        jobs += energy_jobs(args)
    if "regularizer" in args.sections:
        jobs += regularizer_jobs(args)
    results: list[tuple[Job, dict[str, Any]]] = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for job, res in zip(jobs, pool.imap(run_job, jobs)):
            results.append((job, res))
            print(
                f"[{job.section}] {job.model} seed {job.seed} {job.row:<45} acc {res['acc']:.4f} "
                f"sparsity {res['sparsity']:.4%} energy {res['energy_reduction']:.2f}x "
                f"fit {res['fit_s']:.1f} s",
                flush=True,
            )
    extra = ""
    if "to_sparse" in args.sections:
        import to_sparse as ts

        extra = ts.run(ts.parse_args(["--quick"] if args.quick else []), log=lambda m: print(m, flush=True))
    text = report(args, results, extra, time.perf_counter() - t0)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
