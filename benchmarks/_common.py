"""Small helpers shared by ``distillation.py``: report header, markdown tables, trainer, cosine LR."""

from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it


def quiet() -> None:
    """Silence Lightning's banners and warnings (the report is the output)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def with_cosine(cls: type[pl.LightningModule]) -> type[pl.LightningModule]:
    """``cls`` whose optimizer's learning rate decays to 0 along a cosine over the whole fit, per step."""

    class Cosine(cls):  # type: ignore[misc, valid-type]
        def configure_optimizers(self) -> Any:
            optimizer = super().configure_optimizers()
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    Cosine.__name__ = Cosine.__qualname__ = cls.__name__
    return Cosine


def trainer_for(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A bare CPU trainer: no logger, checkpoints, progress bar, summary or validation."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


def md_table(columns: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def library_mtime() -> tuple[float, str]:
    """Newest modification time of the library's sources (the code under test; no git here)."""
    newest = max((ROOT / "lightning_compress").rglob("*.py"), key=lambda f: f.stat().st_mtime)
    return newest.stat().st_mtime, newest.relative_to(ROOT).as_posix()


def stamp(mtime: tuple[float, str]) -> str:
    return f"`{mtime[1]}` modified {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(mtime[0]))}"


def header(
    title: str,
    quick: bool,
    wall: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    lib: tuple[tuple[float, str], tuple[float, str]],
    extra: list[str],
) -> list[str]:
    """The environment header every report starts with (date, command, machine, versions, load)."""
    cmd = " ".join(shlex.quote(a) for a in ["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    lines = [f"# {title}", ""]
    if quick:
        lines += [
            "**`--quick` smoke run: tiny epochs, 1 seed, few rounds. These numbers are not results.**",
            "",
        ]
    lines += [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; whole run {wall / 60:.1f} min",
        f"- Command: `{cmd}`",
        f"- Machine: {os.cpu_count()} logical cores ({platform.machine()}, torch CPU capability "
        f"{capability}); torch's default thread count {TORCH_DEFAULT_THREADS}; load average (1/5/15 min) at "
        "start "
        + "/".join(f"{x:.2f}" for x in load[0])
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load[1])
        + " (the machine is shared: times are noisy, ratios are measured side by side)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"pytorch-lightning {pl.__version__}",
        *extra,
        f"- Code: newest library source at the start {stamp(lib[0])}"
        + (
            ""
            if lib[1][0] <= lib[0][0]
            else f"; **changed during the run** (newest at the end {stamp(lib[1])}: the workers import the "
            "library when they start, so fits may mix versions)"
        ),
        "",
    ]
    return lines
