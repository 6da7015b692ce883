"""Dynamic network surgery (Guo, Yao & Chen, NeurIPS 2016): pruning *and splicing* during training."""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.engine import MASK, MASK_GRADS, Constraint
from lightning_compress.core.masks import MaskSet
from lightning_compress.core.params import TargetParam, select_parameters
from lightning_compress.core.schedules import SCHEDULES, StepSchedule, sparsity_at
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number
from lightning_compress.functional.surgery import (
    HIGH,
    LOW,
    critical_c,
    kth_smallest,
    surgery_mask,
    surgery_thresholds,
    threshold_masks,
    update_probability,
)

ScheduleName = Literal["constant", "linear", "cubic", "exponential", "polynomial"]
CalibrationName = Literal["global", "shared_c", "local"]
CALIBRATIONS: tuple[str, ...] = ("global", "shared_c", "local")


def _draw(seed: int, step: int) -> float:
    # A pure function of (seed, step): identical on every rank and after a resume, no RNG state to carry.
    return random.Random(f"dns:{seed}:{step}").random()


class DynamicNetworkSurgery(CompressionCallback):
    r"""Dynamic network surgery: prune and splice weights while the model trains.

    Guo, Yao & Chen, "Dynamic Network Surgery for Efficient DNNs" (NeurIPS 2016). Every targeted
    weight ``W`` gets a binary mask ``T``; the forward pass uses ``W * T`` while the **dense** ``W``
    keeps receiving the gradient of the masked weights (straight through the mask,
    :math:`W \leftarrow W - \beta\, \partial L / \partial (W \odot T)`), so a pruned weight whose
    dense value grows again is *spliced* back. From the mean :math:`\mu` and standard deviation
    :math:`\sigma` of ``|W|`` of each layer, taken when surgery starts, an update sets

    .. math:: T = 0 \text{ where } |W| < a,\quad T = 1 \text{ where } |W| > b,\quad
              T \text{ unchanged in between},

    .. math:: a = 0.9\max(\mu + c\sigma, 0),\qquad b = 1.1\max(\mu + c\sigma, 0).

    Updates happen at step ``start + i`` with probability :math:`(1 + \gamma i)^{-p}` (``gamma``,
    ``power``), drawn from a generator seeded by ``(seed, step)``: identical on every DDP rank and
    after a resume. They stop at ``stop``; from then on the masks are fixed and the callback
    enforces them like :class:`~lightning_compress.GradualPruning` (masked gradients and weights,
    the dense copy is dropped).

    **How the dense weights are kept.** The model's parameter holds ``W * T`` except *inside* the
    optimizer step: the engine copies the dense ``W`` in right before ``optimizer.step()`` (after
    the gradient, computed at ``W * T``, is final) and, right after it, stores the updated dense
    ``W`` and multiplies the parameter by ``T`` again. Momentum, Adam moments and weight decay
    therefore act on the dense ``W`` as in the paper, the ``Parameter`` objects and names never
    change, and every checkpoint's model weights are the masked ones (deployable, they load into
    the plain module with no callback). The dense ``W`` and the masks live in the callback's state,
    so ``fit(ckpt_path=...)`` continues the surgery exactly. Cost per optimizer step: two fused
    copies and one fused multiply over the targeted weights.

    **Choosing c.** Give ``c`` (one number, or a mapping from fnmatch patterns over layer names to
    numbers; every targeted layer must match a pattern, the first match wins), as in the paper; or
    give ``target_sparsity`` and ``c`` is calibrated at every update. With the band, whether an
    entry ends up pruned is monotone in ``c``: a kept entry is pruned when
    :math:`c > (|w|/0.9-\mu)/\sigma`, a pruned one stays pruned while :math:`c \ge (|w|/1.1-\mu)/\sigma`
    (:func:`critical_c`). Calibrating to prune exactly ``round(s N)`` entries is therefore a
    selection of the ``k`` smallest critical values, not a search. ``calibration`` says what is
    shared across layers: ``"global"`` (default) one magnitude threshold with the band, i.e. per
    layer :math:`c_l = (t - \mu_l)/\sigma_l` for one ``t``, which allocates sparsity across layers
    like global magnitude pruning (a small classifier keeps more of its larger weights);
    ``"shared_c"`` the paper's single ``c`` for every layer (per-layer statistics then make every
    layer about equally sparse); ``"local"`` one ``c`` per layer, every layer at the target. With
    ``"global"`` / ``"shared_c"`` the ``min_density`` floor keeps a layer's top entries. A
    calibration (every ``calibrate_every``-th update, and always right before ``stop``) lands
    exactly on the scheduled sparsity; the updates in between keep its thresholds fixed, as the
    paper does, so the sparsity drifts a little with the weights until the next one. The masks
    splice and prune within the band throughout, and ``c`` converges as the weights settle (logged
    as ``dns/c`` for ``"shared_c"``, ``dns/threshold`` for ``"global"``, ``dns/c/<layer>`` with
    ``log_per_layer``). ``schedule`` / ``end`` ramp the calibrated
    sparsity (e.g. ``"cubic"`` from 0 at ``start`` to ``target_sparsity`` at ``end``) so that a
    network trained from scratch is not cut to its final size on its first step; with
    ``schedule="constant"`` the target applies from ``start``, as in the paper's fine-tuning
    setting.

    Logs ``sparsity``, ``dns/spliced`` (entries spliced back since the previous log), ``dns/updates``
    (mask updates so far) and ``dns/c`` on the steps Lightning writes logs.

    Args:
        target_sparsity: Fraction of the targeted weights to prune, in [0, 1); ``c`` is calibrated.
            Give this or ``c``, not both (neither: 0.9).
        c: The paper's threshold coefficient: a number, or ``{pattern: number}`` per layer.
        gamma: Decay of the update probability, >= 0.
        power: Exponent of the update probability, >= 0.
        stop: Step (int) or fraction of training (float) at which mask updates stop.
        targets: fnmatch patterns over module names (default: every Linear / Conv layer).
        exclude: fnmatch patterns to leave dense.
        start: Step or fraction at which surgery starts (statistics of ``|W|`` are taken then).
        schedule: Ramp of the calibrated sparsity (``target_sparsity`` only): a schedule of
            :func:`~lightning_compress.core.schedules.sparsity_at`.
        end: Step or fraction at which the ramp reaches ``target_sparsity`` (at most ``stop``).
        calibration: ``"global"``, ``"shared_c"`` or ``"local"`` (see above).
        min_density: With a global calibration, no layer keeps fewer than ``ceil(min_density * n)``
            of its ``n`` weights.
        calibrate_every: With ``target_sparsity``: calibrate the thresholds at every this many-th
            update (and always at the first one and right before ``stop``, so the masks fix exactly
            at the target); the updates in between use the last thresholds, as the paper uses fixed
            ones, and cost one comparison per weight instead of a selection.
        seed: Seed of the update draws.
        include_embeddings: Also operate on ``nn.Embedding`` tables.
        log_per_layer: Also log ``sparsity/<layer>``.
        flush_denormal: On CPU, flush denormals on the main thread during optimizer steps.

    Example:
        >>> trainer = pl.Trainer(callbacks=[DynamicNetworkSurgery(target_sparsity=0.98)])  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        c: float | dict[str, float] | None = None,
        gamma: float = 1e-4,
        power: float = 1.0,
        stop: int | float = 0.75,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        start: int | float = 0.0,
        schedule: ScheduleName = "cubic",
        end: int | float = 0.5,
        calibration: CalibrationName = "global",
        min_density: float = 0.01,
        calibrate_every: int = 10,
        seed: int = 0,
        include_embeddings: bool = False,
        log_per_layer: bool = False,
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, flush_denormal=flush_denormal)
        self.calibrate_every = check_int("calibrate_every", calibrate_every, minimum=1)
        if target_sparsity is not None and c is not None:
            raise ValueError(
                f"`target_sparsity`={target_sparsity!r} and `c`={c!r} were both given; give one: "
                "`c` sets the thresholds directly, `target_sparsity` calibrates c."
            )
        self.c: float | dict[str, float] | None = None
        if c is not None:
            if isinstance(c, Mapping):
                if not c:
                    raise ValueError("`c`={} is empty; expected a number or a non-empty {pattern: number}.")
                for key, value in c.items():
                    if not isinstance(key, str) or not key:
                        raise ValueError(f"`c` key {key!r} is not supported; expected an fnmatch pattern.")
                    if (
                        not isinstance(value, (int, float))
                        or isinstance(value, bool)
                        or not math.isfinite(value)
                    ):
                        raise ValueError(
                            f"`c[{key!r}]`={value!r} is not supported; expected a finite number."
                        )
                self.c = {k: float(v) for k, v in c.items()}
            else:
                if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
                    raise ValueError(
                        f"`c`={c!r} is not supported; expected a finite number or a "
                        "{pattern: number} mapping."
                    )
                self.c = float(c)
        if self.c is not None:
            calibration_only = {
                "schedule": (schedule, "cubic"),
                "end": (end, 0.5),
                "calibration": (calibration, "global"),
                "calibrate_every": (calibrate_every, 10),
            }
            given = [f"`{k}`={v!r}" for k, (v, default) in calibration_only.items() if v != default]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply with `target_sparsity` (they ramp and calibrate c), but "
                    f"`c`={c!r} was given; drop them, or give target_sparsity instead of c."
                )
        self.target_sparsity = (
            None
            if self.c is not None
            else check_number(
                "target_sparsity",
                0.9 if target_sparsity is None else target_sparsity,
                0.0,
                1.0,
                high_open=True,
            )
        )
        self.gamma = check_number("gamma", gamma, low=0.0, high=math.inf, high_open=True)
        self.power = check_number("power", power, low=0.0, high=math.inf, high_open=True)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.calibration = check_choice("calibration", calibration, CALIBRATIONS)
        self.min_density = check_number("min_density", min_density, 0.0, 1.0, high_open=True)
        if (
            self.target_sparsity is not None
            and self.calibration != "local"
            and self.min_density > 1.0 - self.target_sparsity + 1e-12
        ):
            raise ValueError(
                f"`min_density`={min_density!r} is above the density that `target_sparsity`="
                f"{self.target_sparsity!r} leaves ({1.0 - self.target_sparsity:g}); expected min_density <= "
                "1 - target_sparsity (0 turns the per-layer floor off)."
            )
        self.seed = check_int("seed", seed, minimum=0)
        self.include_embeddings = check_bool("include_embeddings", include_embeddings)
        self.log_per_layer = check_bool("log_per_layer", log_per_layer)
        self.ramp = StepSchedule(start, end, None, names=("start", "end"))
        self.window = StepSchedule(start, stop, None, names=("start", "stop"))
        if type(end) is type(stop) and end > stop:  # mixed int/float points are checked once resolved
            raise ValueError(f"`end`={end!r} is after `stop`={stop!r}; expected end <= stop.")
        self.start, self.end, self.stop = self.ramp.start, self.ramp.end, self.window.end

        self.masks = MaskSet(owner="DynamicNetworkSurgery")
        self.target_params: list[TargetParam] = []
        self.param_names: list[str] = []
        self.dense: dict[str, Tensor] = {}  # the dense W while surgery runs
        self.stats: dict[str, tuple[float, float]] = {}  # (mu, sigma) of |W| at the start
        self.started = False
        self.frozen = False  # past `stop`: masks fixed, dense copy dropped
        self.updates = 0
        self._spliced: Tensor | int = 0  # entries spliced back so far (a device counter: no sync per update)
        self._spliced_logged = 0  # the total at the previous log
        self.sparsity = 0.0
        self.current_c: float | dict[str, float] | None = None
        self.layer_sparsity: dict[str, float] = {}
        self._updated_this_batch = False
        self._c_per_param: dict[str, float] = {}
        self._thresholds: list[float] = []  # of the last calibration: hints for the next one
        self._since_calibration = 0  # updates with fixed thresholds since the last calibration
        self._pending: set[str] = set()  # new masks not yet applied to the parameters
        self._open = False  # the dense W is in the parameters (between the two constraints)
        self._counts_stale = False
        self._root: nn.Module | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def spliced_total(self) -> int:
        """Entries spliced back (pruned, then kept again) over all updates so far."""
        return int(self._spliced)

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "target_sparsity": self.target_sparsity, "c": self.c}

    @override
    def schedules(self) -> list[StepSchedule]:
        return [self.ramp, self.window]

    # ------------------------------------------------------------------ setup
    @override
    def select_targets(self, root: nn.Module) -> list[str]:
        self.target_params = select_parameters(
            root, self.targets, self.exclude, self.include_embeddings, owner=self.name
        )
        self.param_names = [t.param for t in self.target_params]
        self._c_per_param = self._layer_c() if isinstance(self.c, dict) else {}  # fails before training
        return list(dict.fromkeys(t.module for t in self.target_params))

    def _layer_c(self) -> dict[str, float]:
        assert isinstance(self.c, dict)
        out, used = {}, set()
        for t in self.target_params:
            for pattern, value in self.c.items():
                if fnmatch.fnmatchcase(t.module, pattern):
                    out[t.param] = value
                    used.add(pattern)
                    break
            else:
                raise ValueError(
                    f"DynamicNetworkSurgery: layer {t.module!r} matches no pattern of `c`={self.c!r}; "
                    "give every targeted layer a value (e.g. add '*': <c>) or exclude it."
                )
        unused = [p for p in self.c if p not in used]
        if unused:
            raise ValueError(
                f"DynamicNetworkSurgery: `c` pattern(s) {unused} match no targeted layer; targeted layers: "
                f"{[t.module for t in self.target_params]}."
            )
        return out

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        ramp_end, stop = self.ramp.end_step, self.window.end_step
        if ramp_end is not None and stop is not None and ramp_end > stop:
            raise ValueError(
                f"DynamicNetworkSurgery: `end`={self.end!r} (step {self.ramp.end_step}) is after "
                f"`stop`={self.stop!r} (step {self.window.end_step}); expected end <= stop."
            )

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._root = root = self.root(pl_module)
        self._trainer = trainer
        self.masks.bind(root, self.param_names)
        if self.dense:
            unknown = set(self.dense) - set(self.param_names)
            if unknown:
                raise ValueError(
                    f"DynamicNetworkSurgery: the checkpoint holds dense weights for {sorted(unknown)}, which "
                    f"are not targeted now ({self.param_names}); resume with the same targets."
                )
            for name in self.param_names:
                p = self.masks.parameter(name)
                self.dense[name] = self.dense[name].to(device=p.device, dtype=p.dtype)
        self.masks.apply_to_weights_()
        if self.frozen:
            self._clean_optimizer_state()

    @override
    def constraints(self) -> list[Constraint]:
        if not len(self.masks) or self._root is None or not self.started:
            return []
        if self.frozen:
            return [self.masks.grad_constraint(), self.masks.weight_constraint()]
        return [_RestoreDense(self, self.masks), _KeepDense(self, self.masks)]

    # ------------------------------------------------------------------ per step
    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        start, stop = self.window.start_step, self.window.end_step
        if self.frozen or start is None or step < start:
            return
        if stop is not None and step >= stop and self.started:
            self.freeze()
            return
        if not self.started:
            self._start()
        last = stop is not None and step == stop - 1  # calibrated once more so the masks fix at the target
        if (
            step == start
            or last
            or _draw(self.seed, step) < update_probability(step - start, self.gamma, self.power)
        ):
            self.update_masks(step, calibrate=last)

    def _start(self) -> None:
        """Take the dense copy and the per-layer statistics of ``|W|`` (once, when surgery starts)."""
        with torch.no_grad():
            for name in self.param_names:
                w = self.masks.parameter(name).detach()
                self.dense[name] = w.clone()
                magnitude = w.abs().float().flatten()
                nonzero = magnitude[magnitude != 0]  # as the authors' code: statistics of the live weights
                sigma, mu = torch.std_mean(nonzero if nonzero.numel() else magnitude, correction=0)
                self.stats[name] = (float(mu), float(sigma))
        self.started = True
        if self.engine is not None:
            self.engine.invalidate()

    def freeze(self) -> None:
        """Stop the surgery: masks fixed, dense copy dropped, plain masked training from here on."""
        # The parameters hold W * T already (they do outside every optimizer step).
        self._refresh_counts()
        self.dense = {}
        self.frozen = True
        self._clean_optimizer_state()
        if self.engine is not None:
            self.engine.invalidate()
        self.debug(f"DynamicNetworkSurgery: masks fixed at sparsity {self.sparsity:.4f}")

    def target_at(self, step: int) -> float:
        """The calibrated sparsity scheduled at ``step`` (``target_sparsity`` mode)."""
        assert self.target_sparsity is not None
        return sparsity_at(
            step,
            schedule=self.schedule,
            start=self.ramp.start_step or 0,
            end=self.ramp.end_step if self.ramp.end_step is not None else 0,
            final=self.target_sparsity,
        )

    def _band(self, name: str, index: int) -> tuple[float, float]:
        """``(a, b)`` of layer ``name``: from ``c`` as given, or from the last calibration."""
        if self.target_sparsity is None:
            c = self._c_per_param[name] if isinstance(self.c, dict) else self.c
            return surgery_thresholds(*self.stats[name], c)
        t = self._thresholds[index]
        if self.calibration == "global":  # t is a magnitude: |w| / 0.9 or |w| / 1.1 against t
            return LOW * max(t, 0.0), HIGH * max(t, 0.0)
        return surgery_thresholds(*self.stats[name], t)  # t is this layer's c

    @torch.no_grad()
    def update_masks(self, step: int, calibrate: bool = False) -> None:
        """One surgery update of every mask from the dense weights (identical on every rank).

        With ``target_sparsity``, the thresholds are calibrated at the first update, then every
        ``calibrate_every`` updates and right before ``stop`` (``calibrate=True``); in between they
        stay fixed, as in the paper, and an update is one comparison per weight.
        """
        names = self.param_names
        dense = [self.dense[n] for n in names]
        previous = [self.masks[n] for n in names]
        fixed = self.target_sparsity is None or (
            not calibrate and self._thresholds and self._since_calibration + 1 < self.calibrate_every
        )
        if fixed:
            new = [
                surgery_mask(w, m, *self._band(n, i))
                for i, (n, w, m) in enumerate(zip(names, dense, previous))
            ]
            self._since_calibration += 1
            if self.target_sparsity is None:
                self.current_c = self.c
        else:
            self._since_calibration = 0
            if self.calibration == "global":  # one magnitude threshold (with the band) for every layer
                crit = [w.abs() / torch.where(m, LOW, HIGH).to(w.dtype) for w, m in zip(dense, previous)]
            else:
                crit = [critical_c(w, m, *self.stats[n]) for n, w, m in zip(names, dense, previous)]
            min_keep = None
            if self.calibration != "local" and self.min_density > 0:
                min_keep = [math.ceil(self.min_density * w.numel()) for w in dense]
            scope = "local" if self.calibration == "local" else "global"
            new, self._thresholds = threshold_masks(
                crit, self.target_at(step), scope, min_keep=min_keep, hints=self._thresholds or None
            )
            if self.calibration == "shared_c":
                self.current_c = max(self._thresholds)
            elif self.calibration == "local":
                self.current_c = dict(zip(names, self._thresholds))
            else:  # a magnitude threshold t_l = mu_l + c_l * sigma_l (shared but at floors)
                self.current_c = {
                    n: (t - self.stats[n][0]) / max(self.stats[n][1], 1e-12)
                    for n, t in zip(names, self._thresholds)
                }
        spliced = sum(((~m) & k).sum() for m, k in zip(previous, new))
        self._spliced = self._spliced + spliced
        # Only the masks change here. The parameters about to step are set from the dense copy by
        # the engine's constraints around this step; the others (a second optimizer's, whose
        # autograd graph may still be needed in this batch) are set at the batch end.
        self.masks.update(dict(zip(names, new)), apply=False)
        self._pending.update(names)
        self.updates += 1
        self._updated_this_batch = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._open:  # the dense W went in, but no optimizer step took it out (a skipped step)
            self._pending.update(self.param_names)
            self._open = False
        if self._updated_this_batch or self._pending:
            self._updated_this_batch = False
            self._set_weights()
            self._counts_stale = True
        if self.started and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._refresh_counts()
            total = self.spliced_total
            spliced, self._spliced_logged = total - self._spliced_logged, total
            pl_module.log("sparsity", self.sparsity, on_step=True, on_epoch=False)
            pl_module.log("dns/spliced", float(spliced), on_step=True, on_epoch=False)
            pl_module.log("dns/updates", float(self.updates), on_step=True, on_epoch=False)
            if isinstance(self.current_c, float):
                pl_module.log("dns/c", self.current_c, on_step=True, on_epoch=False)
            elif isinstance(self.current_c, dict) and self.log_per_layer:
                for name, value in self.current_c.items():
                    pl_module.log(f"dns/c/{name.rpartition('.')[0]}", value, on_step=True, on_epoch=False)
            if self.calibration == "global" and self._thresholds and self.target_sparsity is not None:
                pl_module.log("dns/threshold", max(self._thresholds), on_step=True, on_epoch=False)
            if self.log_per_layer:
                for name, value in self.layer_sparsity.items():
                    pl_module.log(f"sparsity/{name}", value, on_step=True, on_epoch=False)

    @torch.no_grad()
    def _set_weights(self) -> None:
        """Parameters = dense W * T for those whose optimizer did not step since the masks changed.

        The ones that stepped got it from the engine's constraints, followed by any later phase
        (cluster, quantize) that must not be overwritten here.
        """
        names = [n for n in self.param_names if n in self._pending]
        self._pending.clear()
        if names and self.dense and not self.frozen:
            params = [self.masks.parameter(n) for n in names]
            masks = [self.masks.float_mask(n) for n in names]
            torch._foreach_copy_(params, torch._foreach_mul([self.dense[n] for n in names], masks))

    def _refresh_counts(self) -> None:
        """``sparsity`` / ``layer_sparsity`` from the masks (one sync; only on log steps and at the end)."""
        if self._counts_stale:
            self._counts_stale = False
            self.sparsity, self.layer_sparsity = self.masks.layer_sparsity()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refresh_counts()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen:  # masked gradients from here on: keep pruned optimizer state out of denormals
            self._clean_optimizer_state()

    def _clean_optimizer_state(self) -> None:
        if self._trainer is not None:
            self.masks.clean_optimizer_state(self._trainer.optimizers)

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        root = self.root(pl_module)
        prefix = self.root_prefix
        dense, stats = {}, {}
        renamed = {c.old_name: c for c in changes}
        for name in self.param_names:
            change = renamed.get(prefix + name)
            if change is None:
                if name in self.dense:
                    dense[name] = self.dense[name]
                stats[name] = self.stats.get(name)
                continue
            if change.new_name is None or not change.new_name.startswith(prefix):
                continue
            new = change.new_name[len(prefix) :]
            if name in self.dense:
                dense[new] = change.slice(self.dense[name])
            stats[new] = self.stats.get(name)
        self.masks.structure_changed(root, changes, prefix)
        kept = []
        for t in self.target_params:
            change = renamed.get(prefix + t.param)
            new = t.param if change is None else (change.new_name or "")[len(prefix) :]
            if new in self.masks:
                kept.append(t if new == t.param else _renamed(t, new))
        self.target_params = kept
        self.param_names = [t.param for t in kept]
        self.dense = {n: dense[n] for n in self.param_names if n in dense}
        self._thresholds = []  # per-layer; recalibrated at the next update
        self.stats = {n: s for n, s in stats.items() if n in self.param_names and s is not None}

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        self._refresh_counts()
        return {
            "masks": self.masks.state_dict(),
            "dense": {n: t.detach().cpu().clone() for n, t in self.dense.items()},
            "stats": {n: [mu, sigma] for n, (mu, sigma) in self.stats.items()},
            "started": self.started,
            "frozen": self.frozen,
            "updates": self.updates,
            "spliced_total": self.spliced_total,
            "spliced_logged": self._spliced_logged,
            "sparsity": self.sparsity,
            "layer_sparsity": dict(self.layer_sparsity),
            "current_c": self.current_c,
            "thresholds": list(self._thresholds),
            "since_calibration": self._since_calibration,
            "ramp": self.ramp.state_dict(),
            "window": self.window.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks.load_state_dict(state_dict["masks"])
        self.dense = {n: t.clone() for n, t in state_dict.get("dense", {}).items()}
        self.stats = {n: (float(v[0]), float(v[1])) for n, v in state_dict.get("stats", {}).items()}
        self.started = bool(state_dict.get("started", False))
        self.frozen = bool(state_dict.get("frozen", False))
        self.updates = int(state_dict.get("updates", 0))
        self._spliced = int(state_dict.get("spliced_total", 0))
        self._spliced_logged = int(state_dict.get("spliced_logged", 0))
        self.sparsity = float(state_dict.get("sparsity", 0.0))
        self.layer_sparsity = dict(state_dict.get("layer_sparsity", {}))
        self.current_c = state_dict.get("current_c")
        self._thresholds = [float(t) for t in state_dict.get("thresholds", [])]
        self._since_calibration = int(state_dict.get("since_calibration", 0))
        if "ramp" in state_dict:
            self.ramp.load_state_dict(state_dict["ramp"])
        if "window" in state_dict:
            self.window.load_state_dict(state_dict["window"])


class _RestoreDense(Constraint):
    """Before the step: the parameters take their dense values, so the optimizer updates the dense W."""

    def __init__(self, owner: DynamicNetworkSurgery, masks: MaskSet) -> None:
        super().__init__(MASK_GRADS, masks.parameters(), owner.name)
        self.dns, self.masks = owner, masks

    def _names(self, params: Sequence[nn.Parameter]) -> list[str]:
        return [n for p in params if (n := self.masks.name_of(p)) is not None]

    def _pairs(self, params: Sequence[nn.Parameter]) -> tuple[list[nn.Parameter], list[Tensor], list[Tensor]]:
        names = self._names(params)
        return (
            [self.masks.parameter(n) for n in names],
            [self.dns.dense[n] for n in names],
            [self.masks.float_mask(n) for n in names],
        )

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        plist, dlist, _ = self._pairs(params)
        if not plist:
            return None
        dns = self.dns

        def run() -> None:
            torch._foreach_copy_(plist, dlist)
            dns._open = True

        return run

    @override
    def verify(self) -> None:
        self.masks.verify()


class _KeepDense(_RestoreDense):
    """After the step: keep the updated dense W, and the parameters go back to ``W * T``."""

    def __init__(self, owner: DynamicNetworkSurgery, masks: MaskSet) -> None:
        super().__init__(owner, masks)
        self.phase = MASK

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        plist, dlist, mlist = self._pairs(params)
        if not plist:
            return None

        pending, names = self.dns._pending, set(self._names(params))
        dns = self.dns

        def run() -> None:
            torch._foreach_copy_(dlist, plist)
            torch._foreach_mul_(plist, mlist)
            dns._open = False
            if pending:  # new masks are applied to these parameters now
                pending.difference_update(names)

        return run

    @override
    def verify(self) -> None:
        """Nothing: the paired :class:`_RestoreDense` checks the same parameters once per step."""


def _renamed(target: TargetParam, new_param: str) -> TargetParam:
    from dataclasses import replace

    return replace(target, param=new_param, module=new_param.rpartition(".")[0])


__all__ = [
    "DynamicNetworkSurgery",
    "critical_c",
    "kth_smallest",
    "surgery_mask",
    "surgery_thresholds",
    "threshold_masks",
    "update_probability",
]
