"""Network slimming (Liu et al., ICCV 2017): L1 on BatchNorm scales, then remove the small channels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.engine import REGULARIZE, Constraint
from lightning_compress.core.schedules import SCHEDULES, StepSchedule, sparsity_at, validate_step_arg
from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.pruning.structured import StructuredPruning

__all__ = ["NetworkSlimming"]

ScheduleName = Literal["constant", "linear", "cubic", "exponential", "polynomial"]


class _SignPenalty(Constraint):
    """``grad += lam * sign(gamma)``: the subgradient of ``lam * sum |gamma|``, in two fused calls."""

    def __init__(self, owner: NetworkSlimming, params: Sequence[nn.Parameter]) -> None:
        super().__init__(REGULARIZE, params, owner="NetworkSlimming")
        self.owner = owner

    def bind(self, params: Sequence[nn.Parameter]) -> Any:
        subset = list(params)
        owner = self.owner

        def run() -> None:
            lam = owner.current_lam
            with_grad = [p for p in subset if p.grad is not None]
            if lam <= 0 or not with_grad:
                return
            torch._foreach_add_([p.grad for p in with_grad], torch._foreach_sign(with_grad), alpha=lam)

        return run


class NetworkSlimming(StructuredPruning):
    r"""Network slimming: sparsify BatchNorm scales with L1, then physically remove small channels.

    Liu et al. (ICCV 2017, "Learning Efficient Convolutional Networks through Network Slimming")
    train with the penalty :math:`\lambda \sum |\gamma|` on every BatchNorm scale that gates a
    prunable channel, added to the gradients as :math:`\lambda\,\mathrm{sign}(\gamma)` in the
    engine's ``regularize`` phase; at ``prune_at`` one *global* threshold on :math:`|\gamma|`
    (across all layers, no per-layer normalisation, as in the paper) removes ``channel_ratio`` of
    the channels, physically, through the same surgery as
    :class:`~lightning_compress.pruning.StructuredPruning` (optimizer state carried over, DDP
    re-wrapped, recipe in the checkpoint for ``lightning_compress.load_checkpoint``). Training after
    ``prune_at`` is the paper's fine-tuning, without the penalty.

    Works for CNNs with ``BatchNorm2d`` and MLPs with ``BatchNorm1d`` (the paper's 784-500-300-10
    MNIST net, :class:`~lightning_compress.demos.LeNet300100BN`). Channels coupled by residual
    additions are scored by the mean ``|gamma|`` of their BatchNorms.

    Logs ``slimming/lambda``, ``slimming/gamma_mean`` and ``slimming/gamma_small`` (fraction of
    ``|gamma| < 1e-2``) every ``log_every_n_steps``, the ``|gamma|`` histogram at every epoch end to
    loggers that take one (TensorBoard), and the channels removed per layer.

    Args:
        lam: Penalty strength :math:`\lambda` (paper, with SGD: 1e-4 for VGG, 1e-5 for
            ResNet/DenseNet). With Adam much more is needed (about 1e-2 on the 784-500-300-10 MLP):
            Adam lets the layers' scales drift apart, and a global threshold on weakly penalised
            scales can cut a whole layer down to one channel.
        channel_ratio: Fraction of the BatchNorm-gated channels to remove, in [0, 1).
        prune_at: ``"end"`` (the last training step: no fine-tuning in this fit), an int training step
            or a float fraction of training (the rest fine-tunes the slim model).
        targets: Layers whose output channels may be removed (fnmatch patterns).
        exclude: Layers to keep whole.
        lam_schedule: How :math:`\lambda` ramps from 0 to ``lam`` between ``lam_start`` and
            ``lam_end`` (``"constant"``: ``lam`` from ``lam_start`` on).
        lam_start: Step or fraction where the penalty starts.
        lam_end: Step or fraction where it reaches ``lam`` (ramped schedules).
        round_to: Kept widths rounded to the nearest multiple of this (at least one).
        carry_optimizer_state: Carry optimizer state to the surviving channels.
        log_histogram: Log the ``|gamma|`` histogram to loggers that support it.
    """

    def __init__(
        self,
        lam: float = 1e-4,
        channel_ratio: float = 0.5,
        prune_at: int | float | str = "end",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        lam_schedule: ScheduleName = "constant",
        lam_start: int | float = 0.0,
        lam_end: int | float = 0.0,
        round_to: int | None = None,
        carry_optimizer_state: bool = True,
        log_histogram: bool = True,
        flush_denormal: bool = True,
    ) -> None:
        if isinstance(prune_at, str):
            if prune_at != "end":
                raise ValueError(
                    f"`prune_at`={prune_at!r} is not supported; expected 'end', an int training step or a "
                    "float fraction of training in [0, 1]."
                )
            point: int | float = 1.0
        else:
            point = validate_step_arg("prune_at", prune_at)
        channel_ratio = check_number("channel_ratio", channel_ratio, 0.0, 1.0, high_open=True)
        super().__init__(
            target_ratio=channel_ratio,
            criterion="bn_scale",
            scope="global",
            hard_prune_at="end",
            round_to=round_to,
            schedule="constant",
            start=point,
            end=point,
            frequency=1,
            targets=targets,
            exclude=exclude,
            carry_optimizer_state=carry_optimizer_state,
            flush_denormal=flush_denormal,
        )
        self.prune_at = prune_at
        self.channel_ratio_target = channel_ratio
        self.lam = check_number("lam", lam, low=0.0)
        self.lam_schedule = check_choice("lam_schedule", lam_schedule, SCHEDULES)
        self.lam_steps = StepSchedule(lam_start, lam_end, None, names=("lam_start", "lam_end"))
        if self.lam_schedule == "constant" and lam_end != 0.0:
            raise ValueError(
                f"`lam_end`={lam_end!r} has no effect with `lam_schedule`='constant'; expected a ramped "
                "lam_schedule ('linear', 'cubic', ...) or no lam_end."
            )
        self.log_histogram = check_bool("log_histogram", log_histogram)
        self.current_lam = 0.0
        self._penalized: list[nn.Parameter] = []

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "lam": self.lam}

    @override
    def schedules(self) -> list[StepSchedule]:
        return [*super().schedules(), self.lam_steps]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            root = self.root(pl_module)
            if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in root.modules()):
                raise ValueError(
                    f"NetworkSlimming needs BatchNorm layers (their scales gate the channels) but "
                    f"{type(root).__name__} has none; add BatchNorm after the Conv / Linear layers, or use "
                    "StructuredPruning with criterion='l1' / 'taylor'."
                )
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        sched = self.step_schedule
        if self.prune_at == "end" and sched._fresh and sched.total is not None:
            sched.start_step = sched.end_step = max(int(sched.total) - 1, 0)  # the last step run

    @override
    def on_training_length(self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: int) -> None:
        super().on_training_length(trainer, pl_module, total)
        sched = self.step_schedule
        if self.prune_at == "end" and sched._fresh:
            sched.start_step = sched.end_step = max(int(total) - 1, 0)
            self.schedules_changed()

    # ------------------------------------------------------------------ the penalty
    def lam_at(self, step: int) -> float:
        r""":math:`\\lambda` at ``step`` (0 once the channels are removed: fine-tuning has no penalty)."""
        if self.hard_pruned or self._hard_requested:
            return 0.0
        s = self.lam_steps
        if s.start_step is None:
            return 0.0
        return sparsity_at(
            step,
            schedule=self.lam_schedule,
            start=s.start_step,
            end=s.end_step if s.end_step is not None else s.start_step,
            final=self.lam,
            initial=0.0,
        )

    def _gammas(self) -> list[nn.Parameter]:
        root = self._root
        if root is None or self.hard_pruned:
            return []
        names = dict.fromkeys(m.tensor for g in self.groups for m in g.norms())
        return [root.get_parameter(n) for n in names]

    @override
    def constraints(self) -> list[Constraint]:
        base = super().constraints()
        self._penalized = self._gammas()
        return [*base, _SignPenalty(self, self._penalized)] if self._penalized and self.lam > 0 else base

    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        super().begin_step(trainer, pl_module, step)
        self.current_lam = self.lam_at(step)

    # ------------------------------------------------------------------ logging
    def gamma_values(self) -> Tensor:
        """``|gamma|`` of every penalised BatchNorm channel (empty after the prune)."""
        params = self._gammas()
        if not params:
            return torch.empty(0)
        return torch.cat([p.detach().abs().flatten().float().cpu() for p in params])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("slimming/lambda", self.current_lam, on_step=True, on_epoch=False)
            gammas = self.gamma_values()
            if gammas.numel():
                pl_module.log("slimming/gamma_mean", float(gammas.mean()), on_step=True, on_epoch=False)
                small = float((gammas < 1e-2).float().mean())
                pl_module.log("slimming/gamma_small", small, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_histogram or trainer.global_rank != 0:
            return
        gammas = self.gamma_values()
        if not gammas.numel():
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            add = getattr(experiment, "add_histogram", None)
            if callable(add):
                add("slimming/gamma", gammas, trainer.global_step)

    @override
    def _finish(self, widths: dict[str, dict[str, tuple[int, int]]]) -> None:
        super()._finish(widths)
        self.current_lam = 0.0
