"""Write your own technique on lightning-compress's core: a custom importance and a custom constraint.

Two small extensions, each a few lines, that get everything the built-in techniques get (exact
resume, DDP agreement, once-per-step accounting, phase ordering when stacked with other techniques):

* ``MovementImportance``: prune the weights that moved least since training started (a simple
  "movement" criterion; Sanh et al., 2020, score weights by how they move). Plugged into
  ``GradualPruning`` by overriding ``build_importance``.
* ``WeightClipping``: a weight constraint that keeps every targeted weight in ``[-limit, limit]``
  after each optimizer step. It runs in the engine's ``quantize`` phase, i.e. after the pruning
  mask, whatever the order of the callbacks, as one fused ``torch._foreach_clamp_*`` per step.

    python examples/custom_technique.py                  # ~15 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

import lightning_compress as lc
from lightning_compress.core.engine import QUANTIZE
from lightning_compress.demos import DigitsDataModule, LeNet300100


class MovementImportance(lc.Importance):
    """Score = ``|w - w_0|``: how far each weight moved from its value when pruning started."""

    name = "movement"

    def attach(self, root: nn.Module, targets: Sequence[lc.TargetParam]) -> None:
        super().attach(root, targets)
        if not getattr(self, "initial", None):  # keep the reference across re-attachments
            self.initial = [p.detach().clone() for p in self.params]

    def scores(self, step: int) -> list[Tensor]:
        return [(p.detach() - p0).abs() for p, p0 in zip(self.params, self.initial)]

    def state_dict(self) -> dict:
        return {"initial": [t.cpu() for t in getattr(self, "initial", [])]}

    def load_state_dict(self, state: dict) -> None:
        self.initial = list(state.get("initial", []))


class MovementPruning(lc.GradualPruning):
    """GradualPruning with the movement score instead of a built-in criterion."""

    def build_importance(self) -> lc.Importance:
        return MovementImportance()


class _Clamp(lc.Constraint):
    def __init__(self, params: list[nn.Parameter], limit: float) -> None:
        super().__init__(QUANTIZE, params, owner="WeightClipping")
        self.limit = limit

    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None]:
        plist = list(params)  # the subset one optimizer owns, fixed until the next rebind

        def run() -> None:
            torch._foreach_clamp_min_(plist, -self.limit)
            torch._foreach_clamp_max_(plist, self.limit)

        return run


class WeightClipping(lc.CompressionCallback):
    """Keep targeted weights within ``[-limit, limit]`` after every optimizer step."""

    def __init__(
        self, limit: float = 0.2, targets: list[str] | None = None, exclude: list[str] | None = None
    ):
        super().__init__(targets=targets, exclude=exclude)
        self.limit = limit
        self._params: list[nn.Parameter] = []

    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = self.root(pl_module)
        self._params = [root.get_submodule(name).weight for name in self.module_names]

    def constraints(self) -> list[lc.Constraint]:
        return [_Clamp(self._params, self.limit)] if self._params else []


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--root-dir", default="lightning_logs")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    model = LeNet300100(in_features=64, optimizer="sgd", lr=0.05, weight_decay=1e-4)
    pruning = MovementPruning(target_sparsity=0.8, end=0.6, frequency=20)
    clipping = WeightClipping(limit=0.3)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[clipping, pruning],  # any order: the engine runs mask before clipping
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.root_dir,
    )
    data = DigitsDataModule(batch_size=64)
    trainer.fit(model, data)
    acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    weights = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    result = {
        "test_acc": acc,
        "sparsity": float((weights == 0).float().mean()),
        "max_abs_weight": float(weights.abs().max()),
    }
    print(
        f"test accuracy {acc:.3f}, sparsity {result['sparsity']:.3f}, max |w| {result['max_abs_weight']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
