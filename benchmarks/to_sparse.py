"""to_sparse benchmark: CSR inference of a 98 %-pruned LeNet-300-100 vs the dense model, on CPU.

Method:

* **Model**: LeNet-300-100 (``lightning_compress.demos``) trained ``--epochs`` epochs (default 2;
  Adam lr 1e-3, batch 64, seed 0) on the MNIST 5k subset (4,000 train / 1,000 test images), then
  pruned once to ``--sparsity`` (default 98 %) by global magnitude over fc1/fc2/fc3 weights (the
  smallest |w| of the three layers together are zeroed; biases kept; no fine-tuning: the
  latency depends on the sparsity pattern, which a trained network gives realistically).
* **Configs**: *dense* (the pruned model as it is, zeros stored), *to_sparse* (``to_sparse(model)``
  with its defaults: each candidate layer timed dense vs CSR at batch 1 and 64 at the thread count
  of the row, converted only where CSR is faster at both), *all CSR* (``to_sparse(model,
  layers=["fc1", "fc2", "fc3"], force=True)``: every layer converted, no timing).
* **Latency**: ``model(x)`` in eval mode under ``torch.no_grad`` on real test images, at batch 1
  and 64, at torch's default thread count and at 1 thread. One warm-up block per config, then
  ``--rounds`` rounds in which every config runs ``--calls`` individually timed calls, in ABBA order
  (forward, then reverse order in the next round, so a drift of the machine's speed hits every
  config alike); the figure is the median over all timed calls.
* **Correctness**: largest ``|dense - converted|`` over the logits of the 1,000 test images.

Usage::

    python benchmarks/to_sparse.py                       # ~20 s on 2 idle cores
    python benchmarks/to_sparse.py --quick               # smoke test (a few seconds)
    python benchmarks/to_sparse.py --out /tmp/to_sparse.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress.demos import LeNet300100, MNIST5kDataModule
from lightning_compress.export import SparseLinear, to_sparse

LAYERS = ("fc1", "fc2", "fc3")
BATCH_SIZES = (1, 64)
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def md_table(columns: Sequence[str], body: list[list[str]], left: int = 1, right_end: int = 0) -> list[str]:
    """A markdown table: the first ``left`` and the last ``right_end`` columns left-aligned, others right."""
    align = ["---"] * left + ["---:"] * (len(columns) - left - right_end) + ["---"] * right_end
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


# ---------------------------------------------------------------------------- model
def train_and_prune(args: argparse.Namespace) -> tuple[LeNet300100, torch.Tensor, torch.Tensor, float]:
    """Train LeNet-300-100 briefly, prune it by global magnitude; return it, test data, dense accuracy."""
    pl.seed_everything(args.seed, verbose=False)
    dm = MNIST5kDataModule(batch_size=64, seed=args.seed)
    dm.setup()
    model = LeNet300100(optimizer="adam", lr=1e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_train_batches=5 if args.quick else 1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    model.eval()
    x_test, y_test = dm.test_dataset.tensors
    dense_acc = accuracy(model, x_test, y_test)
    with torch.no_grad():
        weights = [getattr(model, n).weight for n in LAYERS]
        scores = torch.cat([w.abs().flatten() for w in weights])
        keep = round(scores.numel() * (1 - args.sparsity))
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[scores.topk(keep).indices] = True
        for w, m in zip(weights, mask.split([w.numel() for w in weights])):
            w.mul_(m.view_as(w))
    return model, x_test, y_test, dense_acc


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def layer_sparsity(model: nn.Module) -> str:
    parts = []
    for n in LAYERS:
        m = getattr(model, n)
        w = m.to_dense().weight if isinstance(m, SparseLinear) else m.weight
        parts.append(f"{n} {1 - int(torch.count_nonzero(w)) / w.numel():.1%}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- timing
def time_configs(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per ``model(x)`` of every config, timed in ABBA rounds."""
    samples: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for model in models.values():  # warm-up block
            for _ in range(max(5, calls // 5)):
                model(x)
        names = list(models)
        for rnd in range(rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                model, out = models[name], samples[name]
                for _ in range(calls):
                    start = time.perf_counter()
                    model(x)
                    out.append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda msg: None) -> str:
    """Run the benchmark and return its markdown section."""
    start, load0 = time.perf_counter(), os.getloadavg()
    model, x_test, y_test, dense_acc = train_and_prune(args)
    pruned_acc = accuracy(model, x_test, y_test)
    log(f"trained {args.epochs} epoch(s): test acc {dense_acc:.2%}; pruned: {pruned_acc:.2%}")
    forced = to_sparse(model, layers=list(LAYERS), force=True)
    threads = list(dict.fromkeys([TORCH_DEFAULT_THREADS, 1]))
    body, reports, diffs = [], [], []
    for n in threads:
        torch.set_num_threads(n)
        converted = to_sparse(model, repeats=args.repeats)
        report = converted.sparse_report
        reports.append((n, report))
        diffs.append(max_abs_diff(model, converted, x_test))
        log(f"{n} thread(s): to_sparse converted {report.converted}")
        configs = {"dense": model, "to_sparse": converted, "all CSR": forced}
        for b in BATCH_SIZES:
            x = x_test[:b].contiguous()
            t = time_configs(configs, x, args.rounds, args.calls_1 if b == 1 else args.calls_64)
            log(f"{n} thread(s), batch {b}: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in t.items()))
            body.append(
                [
                    f"{n}{' (torch default)' if n == TORCH_DEFAULT_THREADS else ''}",
                    str(b),
                    f"{t['dense'] * 1e6:.1f}",
                    f"{t['to_sparse'] * 1e6:.1f}",
                    f"**{t['dense'] / t['to_sparse']:.2f}x**",
                    f"{t['all CSR'] * 1e6:.1f}",
                    f"{t['dense'] / t['all CSR']:.2f}x",
                    ", ".join(report.converted) or "none",
                ]
            )
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    diffs.append(max_abs_diff(model, forced, x_test))
    wall = time.perf_counter() - start

    lines = [
        f"## to_sparse: CSR inference of LeNet-300-100 at {args.sparsity:.0%} sparsity (CPU latency)",
        "",
    ]
    if args.quick:
        lines += [
            "**`--quick` smoke run: 5 training batches, few timed calls. These numbers are not results.**",
            "",
        ]
    lines += [
        f"LeNet-300-100 trained {args.epochs} epoch(s) on the MNIST 5k subset (Adam lr 1e-3, batch 64, "
        f"seed {args.seed}; test accuracy {dense_acc:.2%}), then pruned once by global magnitude over "
        f"fc1/fc2/fc3 to {args.sparsity:.0%} ({layer_sparsity(model)}; no fine-tuning, "
        f"test accuracy {pruned_acc:.2%}). "
        "*dense*: the pruned model as it is; *to_sparse*: `to_sparse(model)` with its defaults, run at the "
        "row's thread count (each candidate layer timed dense vs CSR at batch 1 and 64, converted only "
        "where CSR is faster at both; fc3, 1,000 weights, is below `min_numel`); *all CSR*: "
        '`to_sparse(model, layers=["fc1", "fc2", "fc3"], force=True)`. Latency of one `model(x)` call '
        "(eval, `torch.no_grad`, real test images): median of "
        f"{args.rounds} ABBA rounds x {args.calls_1} (batch 1) / {args.calls_64} (batch 64) timed calls "
        "after a warm-up.",
        "",
        *md_table(
            [
                "Threads",
                "Batch",
                "dense (us)",
                "to_sparse (us)",
                "to_sparse speedup",
                "all CSR (us)",
                "all CSR speedup",
                "Converted by to_sparse",
            ],
            body,
            left=1,
            right_end=1,
        ),
        "",
        f"- Max abs difference of the logits on the 1,000 test images, dense vs converted: "
        f"{max(diffs):.2e} (to_sparse at each thread count and all CSR).",
        "",
    ]
    for n, report in reports:
        lines += [
            f"Decisions of `to_sparse` at {n} thread(s) (per-layer median latencies it measured):",
            "",
            report.to_markdown(),
            "",
        ]
    lines += [
        f"- Machine: {_cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"(default {TORCH_DEFAULT_THREADS} threads), Python {platform.python_version()}; "
        f"load average (1/5/15 min) at start {'/'.join(f'{v:.2f}' for v in load0)}, "
        f"at end {'/'.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"benchmark wall time {wall:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: a few seconds, numbers are not results")
    p.add_argument("--out", type=Path, default=None, help="write the markdown section here")
    p.add_argument("--epochs", type=int, default=2, help="training epochs before pruning (default 2)")
    p.add_argument("--sparsity", type=float, default=0.98, help="global magnitude sparsity (default 0.98)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=6, help="ABBA timing rounds (default 6)")
    p.add_argument("--calls-1", type=int, default=400, help="timed calls per round at batch 1 (default 400)")
    p.add_argument(
        "--calls-64", type=int, default=100, help="timed calls per round at batch 64 (default 100)"
    )
    p.add_argument("--repeats", type=int, default=50, help="to_sparse's own `repeats` (default 50)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.rounds, args.calls_1, args.calls_64, args.repeats = 1, 2, 50, 10, 10
    if min(args.epochs, args.rounds, args.calls_1, args.calls_64, args.repeats) < 1:
        p.error("--epochs, --rounds, --calls-* and --repeats must be >= 1")
    if not 0 < args.sparsity < 1:
        p.error("--sparsity must be in (0, 1)")
    return args


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*[Tt]he number of training batches.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    section = run(args, log=lambda msg: print(msg, file=sys.stderr))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(section)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
