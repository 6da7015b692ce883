"""The ``lightning-compress`` console script: LightningCLI with every compression callback built in.

Model and datamodule are chosen by ``class_path`` (any ``LightningModule`` / ``LightningDataModule``
subclass, the user's own included), and every public callback of the package can be named by its
short class name in YAML::

    model:
      class_path: lightning_compress.demos.LeNet300100
    data:
      class_path: lightning_compress.demos.MNIST5kDataModule
    trainer:
      callbacks:
        - class_path: GradualPruning
          init_args: {target_sparsity: 0.9, end: 0.75}

Run ``lightning-compress fit --config recipe.yaml`` (also ``validate``, ``test``, ``predict``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from rich.console import Console

# jsonargparse resolves a short ``class_path`` (``GradualPruning``) by searching the *imported*
# subclasses of the expected base class, so every technique and the report callback must be
# imported before the parser is built. The package re-exports are imported too, so that the
# public (``lightning_compress.X``) path is known wherever it exists.
import lightning_compress
import lightning_compress.demos
import lightning_compress.pruning
import lightning_compress.report  # noqa: F401
from lightning_compress.core.engine import CHECKPOINT_KEY
from lightning_compress.core.surgery import replay_recipe
from lightning_compress.report import CompressionSummary, compression_summary

__all__ = ["CompressionCLI", "export", "main"]


class CompressionCLI(LightningCLI):
    """:class:`~pytorch_lightning.cli.LightningCLI` set up for compression recipes.

    Model and data are given by ``class_path`` (subclass mode), the compression callbacks by their
    short names under ``trainer.callbacks``, and the resolved config is saved next to the logs
    (overwriting the file of a previous run in the same folder).

    Args:
        args: Command-line style arguments (``["fit", "--config", "recipe.yaml"]``); ``None`` reads
            ``sys.argv``.
        run: Run the subcommand. With ``run=False`` no subcommand is expected and the CLI only
            builds ``cli.model``, ``cli.datamodule`` and ``cli.trainer``.
        **kwargs: Passed on to :class:`~pytorch_lightning.cli.LightningCLI` (they override the
            defaults above).
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        options: dict[str, Any] = {
            "model_class": pl.LightningModule,
            "datamodule_class": pl.LightningDataModule,
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "save_config_kwargs": {"overwrite": True},
            "parser_kwargs": {
                "description": "Compress a neural network while it trains (lightning-compress). "
                "Also: `lightning-compress report --config RECIPE --ckpt_path CKPT` prints the "
                "compression summary of a trained model."
            },
        }
        options.update(kwargs)
        super().__init__(args=args, run=run, **options)

    def instantiate_classes(self) -> None:
        """Instantiate model, datamodule, callbacks and trainer; a rejected argument is a usage error.

        Choices (``schedule``, ``criterion``, ``scope``, ...) are typed ``Literal[...]``, so a bad
        choice already fails at parse time with the accepted values listed. Range checks live in the
        classes' ``__init__`` and raise ``ValueError`` naming the argument, the value and what is
        accepted; that message is reported as a configuration error (usage line, exit status 2)
        instead of a traceback.
        """
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            self.parser.error(f"invalid configuration: {_innermost(err)}", err)


def _innermost(err: BaseException) -> BaseException:
    """The original error behind jsonargparse's wrappers (the class's own message)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def report(args: Sequence[str]) -> CompressionSummary:
    """``lightning-compress report``: the compression summary of a trained (compressed) model.

    The model is built from the same recipe as ``fit`` (``--config`` and any ``--model.*``
    overrides) and, with ``--ckpt_path``, loaded with the checkpoint's weights, so it shows what the
    run produced: params, non-zeros, sparsity, dense/effective MACs, dense/sparse bytes per layer.

    Usage::

        lightning-compress report --config recipe.yaml --ckpt_path path/to/last.ckpt
        lightning-compress report --config recipe.yaml --ckpt_path last.ckpt --json summary.json

    Returns:
        The :class:`~lightning_compress.report.CompressionSummary` that was printed.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-compress report",
        description="Print the compression summary of a model built from a recipe (and a checkpoint).",
        epilog="Every other argument (--config, --model.*, ...) is read as by `lightning-compress fit`.",
    )
    parser.add_argument("--ckpt_path", help="checkpoint whose weights to report (default: fresh model)")
    parser.add_argument("--json", help="also write the summary as JSON to this path")
    own, rest = parser.parse_known_args(list(args))
    cli = CompressionCLI(args=rest, run=False)
    model = cli.model
    if own.ckpt_path is not None:
        if not os.path.isfile(own.ckpt_path):
            parser.error(f"--ckpt_path={own.ckpt_path!r}: no such file")
        checkpoint = torch.load(own.ckpt_path, map_location="cpu", weights_only=True)
        recipe = (checkpoint.get(CHECKPOINT_KEY) or {}).get("recipe", [])
        if recipe:  # channels removed or modules swapped during training: rebuild that structure first
            replay_recipe(model, recipe)
        model.load_state_dict(checkpoint["state_dict"])
    summary = compression_summary(model)
    Console().print(summary.to_rich_table())
    if own.json is not None:
        with open(own.json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return summary


def _import_class(path: str) -> type[pl.LightningModule]:
    import importlib

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"--model_class={path!r}: cannot import it ({err}).") from err
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ValueError(f"--model_class={path!r} is not a LightningModule subclass.")
    return cls


def export(args: Sequence[str]) -> str:
    """``lightning-compress export``: write a trained model as ONNX (QDQ int8 when it was quantized).

    The model is rebuilt from the checkpoint: its class from ``--config`` (the recipe, as for
    ``fit``), ``--model_class``, or the class path LightningCLI stored in the checkpoint's
    hyper-parameters; the structure recipe is replayed and the weights loaded
    (:func:`~lightning_compress.core.surgery.load_checkpoint`), then the
    :class:`~lightning_compress.QuantizationAwareTraining` state in the checkpoint (if any) is re-applied
    (:func:`~lightning_compress.quantization.qat.restore_quantization`) and the model is exported with
    :func:`~lightning_compress.export_onnx` on its ``example_input_array``.

    Usage::

        lightning-compress export --ckpt_path last.ckpt --format onnx --output model.onnx
        lightning-compress export --config recipe.yaml --ckpt_path last.ckpt --format onnx

    Returns:
        The path written.
    """
    from lightning_compress.core.surgery import load_checkpoint
    from lightning_compress.export.onnx import INTEGER_OPS, export_onnx, optimized_ops
    from lightning_compress.quantization.qat import restore_quantization

    parser = argparse.ArgumentParser(
        prog="lightning-compress export",
        description="Export a trained model (a checkpoint) to ONNX; quantized models become QDQ int8 graphs.",
        epilog="Every other argument (--config, --model.*, ...) is read as by `lightning-compress fit`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to export")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default: onnx)")
    parser.add_argument("--output", help="output file (default: the checkpoint path with .onnx)")
    parser.add_argument("--model_class", help="LightningModule class path, when there is no --config")
    own, rest = parser.parse_known_args(list(args))
    if not os.path.isfile(own.ckpt_path):
        parser.error(f"--ckpt_path={own.ckpt_path!r}: no such file")
    checkpoint = torch.load(own.ckpt_path, map_location="cpu", weights_only=True)
    if rest:
        model = CompressionCLI(args=rest, run=False).model
        recipe = (checkpoint.get(CHECKPOINT_KEY) or {}).get("recipe", [])
        if recipe:
            replay_recipe(model, recipe)
        model.load_state_dict(checkpoint["state_dict"])
    else:
        class_path = own.model_class or (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        if class_path is None:
            parser.error(
                "the checkpoint does not say which LightningModule it holds: give --config RECIPE.yaml "
                "or --model_class package.module.Class"
            )
        try:
            cls = _import_class(class_path)
        except ValueError as err:
            parser.error(str(err))
        model = load_checkpoint(cls, own.ckpt_path)
    model.eval()
    restore_quantization(model, checkpoint)
    example = getattr(model, "example_input_array", None)
    if example is None:
        parser.error(
            f"{type(model).__name__} has no example_input_array; set it in the module so the exporter "
            "knows the input shape."
        )
    output = own.output or os.path.splitext(own.ckpt_path)[0] + ".onnx"
    try:
        export_onnx(model, example, output)
    except ValueError as err:
        parser.error(str(err))
    ops = optimized_ops(output)
    integer = sorted({op for op in ops if op in INTEGER_OPS})
    kind = f"integer kernels: {', '.join(integer)}" if integer else "float graph"
    Console().print(f"wrote {output} ({kind})")
    return output


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-compress`` console script.

    ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's; ``report`` prints the
    compression summary of a recipe's model, optionally loaded from a checkpoint (see :func:`report`);
    ``export`` writes a checkpoint's model as ONNX (see :func:`export`).

    Args:
        args: Command-line style arguments; ``None`` reads ``sys.argv``.
    """
    if args is None or isinstance(args, (list, tuple)):
        argv = list(sys.argv[1:] if args is None else args)
        if argv and argv[0] == "report":
            report(argv[1:])
            return
        if argv and argv[0] == "export":
            export(argv[1:])
            return
    CompressionCLI(args=args)


if __name__ == "__main__":
    main()
