"""CompressionReport: print, log and plot the compression summary when training ends."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from rich.console import Console
from torch import nn
from typing_extensions import override

from lightning_compress.core.callback import compression_root
from lightning_compress.core.validation import check_bool
from lightning_compress.report.summary import CompressionSummary, compression_summary

__all__ = ["CompressionReport"]


def _cpu_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` on the CPU, without its hooks.

    Tensors on another device are copied straight to the CPU (through the deepcopy memo), so the
    copy never needs a second set of weights on the accelerator. Hooks are left out: the baseline
    is the plain network, and a hook that is a bound method of a callback would otherwise drag that
    callback (and whatever it holds, such as the trainer) into the copy.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for name, value in vars(sub).items():
            # torch keeps hooks in private dicts named `_forward_hooks`, `_state_dict_pre_hooks`, ...
            if name.startswith("_") and "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    for param in module.parameters():
        if param.device.type != "cpu":
            memo[id(param)] = nn.Parameter(param.detach().to("cpu", copy=True), param.requires_grad)
    for buffer in module.buffers():
        if buffer.device.type != "cpu":
            memo[id(buffer)] = buffer.detach().to("cpu", copy=True)
    return copy.deepcopy(module, memo).cpu()


def _valid_shape(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
    )


class CompressionReport(pl.Callback):
    """Report parameters, non-zeros, MACs and storage of the model at the end of ``fit``.

    On global rank zero it builds :func:`~lightning_compress.report.compression_summary` of the
    LightningModule, prints it as a table, logs the totals to every logger (``compression/params``,
    ``compression/nonzeros``, ``compression/sparsity``, ``compression/ratio`` and, when known,
    ``compression/effective_macs``, ``compression/latency_ms`` and ``compression/speedup``) and
    saves a per-layer sparsity bar chart next to the logs. When ``trainer.test`` runs without a
    preceding ``fit`` the report is made at the end of test.

    Latency: with ``latency_batch``, the summary times a forward of that many samples (see
    :func:`~lightning_compress.report.compression_summary`). With ``compare_to_initial``, a CPU
    copy of the LightningModule taken at ``on_fit_start`` (the model ``fit`` starts from: after a
    ``ckpt_path`` restore for most strategies; without its hooks) is timed too, on the module's
    device, as "before". The copy lives in a private attribute until the report and is never part
    of the callback's state.

    Args:
        example_input_shape: Shape of a float input (batch included, e.g. ``[1, 1, 28, 28]``) for
            the forward pass that measures MACs. ``None`` uses ``pl_module.example_input_array``
            when the module defines one; without either, convolution MACs are unknown.
        plot: Save the sparsity bar chart (needs matplotlib; skipped with a message without it).
        filename: Name of the PNG, relative to ``trainer.log_dir`` (or ``default_root_dir``).
        log_totals: Log the totals through ``trainer.loggers``.
        latency_batch: Samples per timed forward; ``None`` measures no latency. Needs
            ``example_input_shape`` or ``pl_module.example_input_array`` (checked at fit start).
        compare_to_initial: With ``latency_batch``, also time the model as it was at fit start.

    Raises:
        ValueError: If an argument has the wrong type or value.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: CompressionReport
              init_args: {example_input_shape: [1, 784], filename: report.png}
    """

    def __init__(
        self,
        example_input_shape: list[int] | None = None,
        plot: bool = True,
        filename: str = "compression_report.png",
        log_totals: bool = True,
        latency_batch: int | None = None,
        compare_to_initial: bool = True,
    ) -> None:
        super().__init__()
        if example_input_shape is not None and not _valid_shape(example_input_shape):
            raise ValueError(
                f"`example_input_shape` must be None or a non-empty list of positive ints including "
                f"the batch dimension (e.g. [1, 784]), got {example_input_shape!r}."
            )
        check_bool("plot", plot)
        if (
            not isinstance(filename, str)
            or not filename.lower().endswith(".png")
            or filename.lower() == ".png"
        ):
            raise ValueError(f"`filename` must be a string ending with '.png', got {filename!r}.")
        check_bool("log_totals", log_totals)
        if latency_batch is not None and (
            isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1
        ):
            raise ValueError(
                f"`latency_batch`={latency_batch!r} is not supported; expected None (no latency "
                "measured) or an int >= 1."
            )
        check_bool("compare_to_initial", compare_to_initial)
        self.example_input_shape = list(example_input_shape) if example_input_shape is not None else None
        self.plot = plot
        self.filename = filename
        self.log_totals = log_totals
        self.latency_batch = latency_batch
        self.compare_to_initial = compare_to_initial
        self.summary: CompressionSummary | None = None
        self.plot_path: str | None = None
        self._fitted = False
        self._baseline: nn.Module | None = None

    def build_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CompressionSummary:
        """Build the summary to report; override to add inputs or post-process layers."""
        if self.example_input_shape is not None:
            example = torch.zeros(self.example_input_shape, device=pl_module.device)
        else:
            example = pl_module.example_input_array
        baseline = self._baseline
        if baseline is not None:
            baseline = baseline.to(pl_module.device)  # time both models on the same device
        # The compression root (a distillation wrapper's student): its own layer names, no teacher.
        root = compression_root(pl_module)[0]
        if root is not pl_module:
            try:
                return compression_summary(root, example, latency_batch=self.latency_batch, baseline=baseline)
            except (TypeError, RuntimeError, ValueError):
                # The wrapper's example input is not the root's: summarise the whole module (the
                # baseline copy is the root's, so no latency comparison then).
                baseline = None
        return compression_summary(pl_module, example, latency_batch=self.latency_batch, baseline=baseline)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._baseline = None
        if self.latency_batch is None:
            return
        if self.example_input_shape is None and pl_module.example_input_array is None:
            # Fail now rather than after the whole fit, when the report would need it.
            raise ValueError(
                "`latency_batch` needs an example input: set `example_input_shape` or the "
                "LightningModule's `example_input_array`."
            )
        if self.compare_to_initial:
            # Every rank may copy (cheap, no collective); only rank zero reports and uses it.
            self._baseline = _cpu_copy(compression_root(pl_module)[0])

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitted = True
        try:
            self._report(trainer, pl_module)
        finally:
            self._baseline = None  # a model-sized copy: keep it no longer than the report

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fitted:
            self._report(trainer, pl_module)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only rank zero does work, and nothing below is a collective op: `trainer.log_dir` would
        # broadcast (and hang the other ranks), so the directory is read from the logger directly.
        if not trainer.is_global_zero:
            return
        summary = self.build_summary(trainer, pl_module)
        self.summary = summary
        console = Console()
        if not console.is_terminal:
            console.width = 120  # log files and CI get the whole table rather than elided columns
        console.print(summary.to_rich_table())

        if self.log_totals and trainer.loggers:
            metrics = {
                "compression/params": float(summary.params),
                "compression/nonzeros": float(summary.nonzeros),
                "compression/sparsity": float(summary.sparsity),
                "compression/ratio": float(summary.compression_ratio),
            }
            if summary.effective_macs is not None:
                metrics["compression/effective_macs"] = float(summary.effective_macs)
            if summary.latency_ms is not None:
                metrics["compression/latency_ms"] = float(summary.latency_ms)
            if summary.speedup is not None:
                metrics["compression/speedup"] = float(summary.speedup)
            # `pl_module.log` is not allowed in on_fit_end, so go to the loggers directly.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

        if self.plot:
            self.plot_path = self._save_plot(summary, os.path.join(_output_dir(trainer), self.filename))

    def _save_plot(self, summary: CompressionSummary, path: str) -> str | None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            rank_zero_info("CompressionReport: matplotlib is not installed, skipping the sparsity plot.")
            return None
        if not summary.layers:
            rank_zero_info(
                "CompressionReport: the model has no supported layers, skipping the sparsity plot."
            )
            return None

        names = [layer.name or "(root)" for layer in summary.layers]
        values = [100.0 * layer.sparsity for layer in summary.layers]
        # Build a Figure directly on the Agg canvas: pyplot would touch the user's global backend.
        fig = Figure(figsize=(8, 1.5 + 0.35 * len(names)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        bars = ax.barh(names, values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=8)
        ax.invert_yaxis()  # first layer on top, as in the table
        ax.set_xlim(0, 110)
        ax.set_xticks(range(0, 101, 20))
        ax.set_xticklabels([f"{t}%" for t in range(0, 101, 20)])
        ax.set_xlabel("Sparsity (% of parameters that are zero)")
        ax.set_ylabel("Layer")
        ratio = summary.compression_ratio
        ax.set_title(
            f"Per-layer sparsity (total {summary.sparsity:.1%}, sparse storage {ratio:.2f}x smaller)"
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
        rank_zero_info(f"CompressionReport: saved the sparsity plot to {path}")
        return path


def _output_dir(trainer: pl.Trainer) -> str:
    """What ``trainer.log_dir`` returns, without its broadcast (this runs on rank zero only)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        path = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if path:
            return str(path)
    return str(trainer.default_root_dir)
