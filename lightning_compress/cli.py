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

__all__ = ["CompressionCLI", "main"]


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


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-compress`` console script.

    ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's; ``report`` prints the
    compression summary of a recipe's model, optionally loaded from a checkpoint (see :func:`report`).

    Args:
        args: Command-line style arguments; ``None`` reads ``sys.argv``.
    """
    if args is None or isinstance(args, (list, tuple)):
        argv = list(sys.argv[1:] if args is None else args)
        if argv and argv[0] == "report":
            report(argv[1:])
            return
    CompressionCLI(args=args)


if __name__ == "__main__":
    main()
