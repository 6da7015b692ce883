r"""Energy-aware pruning (Yang, Chen & Sze, CVPR 2017).

"Designing Energy-Efficient Convolutional Neural Networks using Energy-Aware Pruning" prunes where
the *energy* is, not where the weights are: a weight of a convolution is applied at every output
position, so removing it saves its DRAM read plus hundreds of MACs and their SRAM reads, while a
fully connected weight saves one DRAM read and one MAC. This module turns that into a training-time
callback:

* :func:`energy_aware_masks`: the pure allocation kernel (a greedy knapsack over all weights);
* :class:`OutputErrorImportance`: ``|w_ij| * sqrt(E[x_j^2])``, the output error a single removal
  causes (the score of the paper's weight restoration step);
* :class:`EnergyAwarePruning`: the callback, a :class:`~lightning_compress.pruning.gradual.GradualPruning`
  whose schedule ramps an energy reduction instead of a sparsity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.callback import InputCapture
from lightning_compress.core.cost import (
    ENERGY_LAYERS,
    EnergyTable,
    LayerEnergy,
    energy_profile,
    resolve_energy_table,
)
from lightning_compress.core.importance import ActivationImportance, Importance, MagnitudeImportance
from lightning_compress.core.params import select_parameters
from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.functional.pruning import lamp_score, magnitude_score
from lightning_compress.pruning.gradual import GradualPruning

ScheduleName = Literal["constant", "linear", "cubic", "exponential", "polynomial"]
AllocationName = Literal["lamp", "magnitude"]
ALLOCATIONS: tuple[str, ...] = ("lamp", "magnitude")

__all__ = ["ALLOCATIONS", "EnergyAwarePruning", "OutputErrorImportance", "energy_aware_masks"]


# ---------------------------------------------------------------------------- pure kernel
def energy_aware_masks(
    allocation_scores: Sequence[Tensor],
    costs: Sequence[float],
    energy: float,
    previous: Sequence[Tensor] | None = None,
    min_keep: Sequence[int] | None = None,
    selection_scores: Sequence[Tensor] | None = None,
    restore_fraction: float | None = None,
) -> list[Tensor]:
    r"""Keep-masks that remove at least ``energy`` picojoules at the least importance per picojoule.

    Every live entry ``w`` of tensor ``i`` has an importance ``I(w)`` (``allocation_scores``) and
    costs ``costs[i]`` pJ while it is kept. Removing the live entries in ascending order of
    ``I(w) / costs[i]`` until the removed energy reaches ``energy`` is the greedy solution of the
    knapsack "remove ``energy`` pJ, losing the least importance"; it prunes the entries of the most
    expensive layers first, which is the paper's "prune the most energy-hungry layers first" made
    precise per weight. It runs as one concatenation, one stable sort, a cumulative sum of costs and
    a ``searchsorted``; the last entry taken crosses the target, so the removed energy exceeds
    ``energy`` by less than one entry's cost.

    Floors: tensor ``i`` keeps at least ``min(min_keep[i], live_i)`` entries, its highest-scored
    ones (inside a tensor the greedy order is the score order, so protecting the top entries is
    exactly the floor constraint).

    Selection (the paper's restoration): with ``selection_scores`` the knapsack only fixes *how
    many* entries ``k`` every tensor loses (the *proposal* is its ``k`` lowest-allocation-score
    live entries); *which* ones are then the ``k`` lowest ``selection_scores`` within a pool made
    of the proposal and the next ``ceil(restore_fraction * k)`` live entries in allocation order
    (all live entries when ``restore_fraction`` is ``None`` or infinite). Entries of the proposal
    that score high are restored and pool entries that score lowest are pruned instead, so at most
    ``restore_fraction * k`` entries are swapped and every tensor's count, hence the energy, is
    unchanged.

    Args:
        allocation_scores: One score tensor per parameter (higher = keep), e.g. ``|w|``.
        costs: Picojoules one kept entry of each tensor costs (``LayerEnergy.per_weight_pj``).
            Entries of a tensor with cost ``<= 0`` are never pruned (removing them saves nothing).
        energy: Picojoules still to remove; ``<= 0`` returns the previous masks unchanged.
        previous: Current keep-masks; pruned entries stay pruned (masks only grow).
        min_keep: Per tensor, the least number of entries kept (``None``: no floor).
        selection_scores: Scores choosing the entries inside each tensor (``None``: the allocation
            scores, i.e. exactly the knapsack's entries).
        restore_fraction: Size of the restoration pool beyond the proposal, as a fraction of it
            (only with ``selection_scores``); ``None`` selects among all live entries.

    Returns:
        Boolean keep-masks shaped like ``allocation_scores``. When ``energy`` exceeds what the live
        entries above the floors cost, all of them are pruned.

    Raises:
        ValueError: When the lengths of the arguments disagree, or a cost or floor is invalid.
    """
    count = len(allocation_scores)
    if len(costs) != count:
        raise ValueError(f"`costs` has {len(costs)} entries but there are {count} score tensors.")
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"`costs`[{i}]={c!r} is not supported; expected a finite number (pJ).")
    floors_in = [0] * count if min_keep is None else list(min_keep)
    if len(floors_in) != count or any(
        isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in floors_in
    ):
        raise ValueError(
            f"`min_keep`={min_keep!r} is not supported; expected one non-negative int per score tensor "
            f"({count} here), or None."
        )
    if selection_scores is not None and len(selection_scores) != count:
        raise ValueError(f"`selection_scores` has {len(selection_scores)} entries; expected {count}.")
    flat = [s.detach().float().flatten() for s in allocation_scores]
    alive = (
        [m.flatten().to(torch.bool) for m in previous]
        if previous is not None
        else [torch.ones_like(f, dtype=torch.bool) for f in flat]
    )
    keeps = [a.clone() for a in alive]
    if energy <= 0 or not flat:
        return [k.view_as(s) for k, s in zip(keeps, allocation_scores)]

    # Candidates: live entries above each tensor's floor (the floor keeps the top live entries).
    cand_index, ratios, cand_cost, segment = [], [], [], []
    for i, (f, a) in enumerate(zip(flat, alive)):
        live = int(a.sum())
        floor = min(floors_in[i], live)
        if costs[i] <= 0 or live - floor <= 0:
            continue
        cand = a.clone()
        if floor > 0:
            top = torch.topk(f.masked_fill(~a, float("-inf")), floor, sorted=False).indices
            cand[top] = False
        idx = cand.nonzero().squeeze(1)
        cand_index.append(idx)
        ratios.append(f[idx].double() / float(costs[i]))
        cand_cost.append(torch.full((idx.numel(),), float(costs[i]), dtype=torch.float64, device=f.device))
        segment.append(torch.full((idx.numel(),), i, dtype=torch.long, device=f.device))
    if not cand_index:
        return [k.view_as(s) for k, s in zip(keeps, allocation_scores)]
    ratio = torch.cat(ratios)
    order = torch.sort(ratio, stable=True).indices
    cum = torch.cumsum(torch.cat(cand_cost)[order], 0)
    # First position whose cumulative cost reaches the target (a hair below it, against rounding).
    crossing = int(torch.searchsorted(cum, cum.new_tensor([energy * (1 - 1e-12)])))
    taken = order[: min(crossing + 1, order.numel())]
    seg = torch.cat(segment)[taken]
    if selection_scores is None:
        positions = torch.cat(cand_index)[taken]
        for i in seg.unique().tolist():
            keeps[i][positions[seg == i]] = False
    else:
        per_tensor = torch.bincount(seg, minlength=count).tolist()
        for i, k in enumerate(per_tensor):
            if k == 0:
                continue
            s = selection_scores[i].detach().float().flatten().masked_fill(~alive[i], float("inf"))
            live = int(alive[i].sum())
            if restore_fraction is not None and math.isfinite(restore_fraction):
                # The pool: the k entries of the proposal and the next restore_fraction * k lowest.
                pool = min(live, k + math.ceil(restore_fraction * k))
                if pool < live:
                    low = torch.topk(flat[i].masked_fill(~alive[i], float("inf")), pool, largest=False)
                    outside = torch.ones_like(alive[i])
                    outside[low.indices] = False
                    s = s.masked_fill(outside, float("inf"))
            keeps[i][torch.topk(s, k, largest=False, sorted=False).indices] = False
    return [k.view_as(s) for k, s in zip(keeps, allocation_scores)]


# ---------------------------------------------------------------------------- importance
def channel_mean_square(x: Tensor, channel_dim: int) -> Tensor:
    """Mean of ``x**2`` over every dimension but ``channel_dim`` (float32)."""
    x = x.detach().float().square()
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return x.mean(dim=dims) if dims else x


class OutputErrorImportance(ActivationImportance):
    r"""``|w_ij| * sqrt(E[x_j^2])``: the output error that removing one weight causes.

    Removing ``w_ij`` from a Linear layer changes output ``i`` by ``-w_ij x_j``, so its expected
    squared output error is ``w_ij^2 E[x_j^2]``; for a convolution ``x_j`` runs over the input
    channel's positions. This is the diagonal of the least-squares objective
    ``E||(W - W') x||^2`` that Yang et al. (2017) minimise when they restore weights, and the score
    of Wanda (Sun et al., 2023) with its L2 input norm. ``E[x_j^2]`` is gathered by forward hooks
    during the ``calibration_steps`` training steps before each update (only then), and reduced
    across DDP ranks like :class:`~lightning_compress.core.importance.ActivationImportance`, whose
    window, grouping and checkpointing it reuses. Layers that saw no input in the window are scored
    by magnitude.
    """

    name = "output_error"

    @staticmethod
    @override
    def statistic(x: Tensor, channel_dim: int) -> Tensor:
        return channel_mean_square(x, channel_dim)

    @override
    @staticmethod
    @override
    def channel_scale(mean_statistic: Tensor) -> Tensor:
        return mean_statistic.clamp_min(0).sqrt()  # sqrt(E[x_j^2])


# ---------------------------------------------------------------------------- callback
_PROFILE_FIELDS = ("name", "kind", "macs", "weights", "input_elems", "output_elems")


class EnergyAwarePruning(GradualPruning):
    r"""Prune where the energy is: reach an estimated energy reduction with the least importance lost.

    Yang, Chen & Sze (CVPR 2017), "Designing Energy-Efficient Convolutional Neural Networks using
    Energy-Aware Pruning". The energy of a Linear / Conv layer (per sample, Horowitz 45 nm table by
    default; see :class:`~lightning_compress.core.cost.LayerEnergy`) is

    .. math:: E_l = F_l + \mathrm{nnz}(W_l)\, c_l, \qquad
              c_l = e_\mathrm{DRAM} + \frac{\mathrm{MACs}_l}{|W_l|}\,(e_\mathrm{MAC} + 2 e_\mathrm{SRAM}),

    where :math:`F_l` is activation traffic (independent of the weights) and :math:`c_l` what one
    kept weight costs: a weight of a convolution is used at every output position, so it costs far
    more than a fully connected one. ``target_energy_reduction`` is the fraction of the targeted
    layers' dense energy :math:`E = \sum_l (F_l + |W_l| c_l)` removed at the end of the schedule;
    the removed fraction :math:`e_t` ramps like :class:`GradualPruning`'s sparsity (same
    ``schedule``, ``start``, ``end``, ``frequency``; ``initial_energy_reduction`` is :math:`e_i`).

    At every update:

    1. **Allocation** (the paper's "order layers by energy, prune the most energy-hungry first",
       made precise per weight as a greedy knapsack, :func:`energy_aware_masks`): every live weight
       :math:`w` of layer :math:`l` is worth :math:`I(w)` and costs :math:`c_l`; live weights are
       removed in ascending order of :math:`I(w) / c_l` until the removed energy reaches
       :math:`e_t E`, never below the ``min_density`` floor of a layer, and pruned weights stay
       pruned (masks only grow). This fixes how many weights every layer loses, hence the energy.
       :math:`I` is ``allocation="lamp"`` (default), the layer-adaptive magnitude
       :math:`w_u^2 / \sum_{|w_v| \ge |w_u|} w_v^2` of Lee et al. (ICLR 2021), or
       ``"magnitude"``, :math:`|w|`. Both order a layer's weights by magnitude (the paper's
       magnitude-based pruning); they differ across layers. Plain :math:`|w| / c_l` strips the few
       weights of a first convolution first (they are the most expensive) down to the floor: on
       LeNet-5 / MNIST-5k (6 epochs, seed 0) conv1 lost 99 % of its weights and test accuracy fell
       from 0.946 (dense) to 0.891 at 50 % energy reduction and 0.769 at 80 %, whereas LAMP, which
       weighs a weight against what is left of its layer, kept 0.927 and 0.905.
    2. **Restoration** (``restore=True``): inside each layer the paper restores, among the weights
       magnitude pruning would remove (the *proposal*), those whose removal increases the layer's
       output error most. Here the weights removed are the ones with the lowest output-error
       importance :math:`|w_{ij}| \sqrt{E[x_j^2]}` (:class:`OutputErrorImportance`, input statistics
       from the ``calibration_steps`` training steps before each update) within a pool made of the
       proposal and the next ``restore_fraction`` x its size of smallest-magnitude live weights: up
       to that many proposal weights are restored, and the pool weights that matter least for the
       output are pruned in their place. Every layer's count, and so the energy, is unchanged.
       ``restore=False`` prunes the proposal as is.
    3. Training (the paper's global fine-tuning) recovers between updates; masks are enforced on
       weights and gradients after / before every optimizer step exactly as in
       :class:`GradualPruning`.

    How this relates to the paper, honestly: Yang et al. prune one layer at a time in energy order
    by magnitude, greedily restore pruned weights that reduce the layer's output error most (until
    the error is below a tolerance, which sets that layer's sparsity), re-fit the layer's remaining
    weights by closed-form least squares, fine-tune globally, and iterate until an accuracy budget
    is spent. Here the energy budget is the input and the per-layer sparsities follow from it (the
    knapsack replaces the layer order and the error tolerance); restoration ranks single removals by
    the *diagonal* of the least-squares output error (each weight's own error, ignoring the
    correlation of inputs) instead of a greedy joint selection, and there is no closed-form re-fit:
    the gradient steps between gradual updates do that job. Measured on LeNet-5 / MNIST-5k at 80 %
    energy reduction (3 seeds), restoration with the default pool was on par with ``restore=False``
    (0.915 vs 0.916 test accuracy), and ranking *all* live weights by output error
    (``restore_fraction=float("inf")``) was worse (0.900): restricted to the borderline weights, as
    in the paper, it does no harm; with training recovering in between, do not expect much from it.

    The energy profile (MACs and activation sizes of every targeted layer, for one sample) comes
    from one forward pass of :func:`~lightning_compress.core.cost.energy_profile` on the compression
    root's ``example_input_array`` (when the root is a LightningModule that sets it), else on the
    input of the root's forward in the first training step, captured by a forward pre-hook that is
    removed at that step's optimizer step (the last call before it wins). It is
    computed once (dense MACs do not change with pruning), agreed across DDP ranks (rank 0's), and
    kept in the callback state, so a resumed run needs no input. A target the model cannot reach
    (activation energy, floors) is refused before the first update, naming the largest reachable
    value (:attr:`max_energy_reduction`).

    Args:
        target_energy_reduction: Fraction of the targeted layers' estimated dense energy removed at
            the end of the schedule, in (0, 1).
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"``, ``"polynomial"`` or ``"constant"``
            (see :func:`lightning_compress.core.schedules.sparsity_at`), applied to the removed
            energy fraction.
        start: First update: an int training step, or a float fraction of training.
        end: Step (int) or fraction (float) at which the target is reached (clamped to the run).
        frequency: Training steps between updates.
        restore: Restore weights of the magnitude proposal by output-error importance (step 2).
        restore_fraction: Restoration pool beyond the proposal, as a fraction of its size (>= 0; 0 is
            ``restore=False``, ``float("inf")`` ranks every live weight of the layer by output error).
        allocation: Cross-layer importance of the knapsack: ``"lamp"`` or ``"magnitude"`` (step 1).
        targets: fnmatch patterns over module names (default every Linear / Conv1d/2d/3d layer;
            ``nn.MultiheadAttention`` projections are not priced by the energy model and are left
            out).
        exclude: fnmatch patterns to leave dense; a pattern that matches no module is an error.
        initial_energy_reduction: :math:`e_i` of the schedule, in [0, target_energy_reduction].
        power: Exponent of the ``"polynomial"`` schedule.
        calibration_steps: Training steps of input statistics before each update (``restore=True``).
        energy_table: Energy per operation in pJ: ``None`` (Horowitz 45 nm), an
            :class:`~lightning_compress.core.cost.EnergyTable`, or a mapping giving every entry
            (``fp32_mult``, ``fp32_add``, ``int8_mult``, ``int8_add``, ``sram_read``, ``dram_read``).
        bits: Bits per stored value in the energy model, 2..32 (int8 arithmetic for ``<= 8``, e.g.
            8 when the model is also quantized to int8).
        log_per_layer: Also log ``sparsity/<layer>`` for every pruned layer.
        flush_denormal: On CPU, also flush denormals on the main thread during each optimizer step.
        min_density: No layer keeps fewer than ``ceil(min_density * n)`` of its ``n`` weights; 0
            turns the floor off.

    Logged (at Lightning's ``log_every_n_steps``): ``sparsity`` (fraction of targeted weights
    pruned) and ``energy_reduction`` (estimated fraction of the targeted layers' dense energy
    removed, from the masks); attributes :attr:`sparsity`, :attr:`energy_reduction`,
    :attr:`layer_sparsity`.

    Example:
        >>> pruning = EnergyAwarePruning(target_energy_reduction=0.6, end=0.75)
        >>> trainer = pl.Trainer(callbacks=[pruning])  # doctest: +SKIP
    """

    supported_types = ENERGY_LAYERS

    def __init__(
        self,
        target_energy_reduction: float = 0.5,
        schedule: ScheduleName = "cubic",
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        restore: bool = True,
        restore_fraction: float = 0.5,
        allocation: AllocationName = "lamp",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        initial_energy_reduction: float = 0.0,
        power: float = 3.0,
        calibration_steps: int = 8,
        energy_table: dict[str, float] | EnergyTable | None = None,
        bits: int = 32,
        log_per_layer: bool = False,
        flush_denormal: bool = True,
        min_density: float = 0.01,
    ) -> None:
        self.target_energy_reduction = check_number(
            "target_energy_reduction", target_energy_reduction, 0.0, 1.0, low_open=True, high_open=True
        )
        self.initial_energy_reduction = check_number(
            "initial_energy_reduction", initial_energy_reduction, 0.0, 1.0, high_open=True
        )
        if self.initial_energy_reduction > self.target_energy_reduction:
            raise ValueError(
                f"`initial_energy_reduction`={initial_energy_reduction!r} is above "
                f"`target_energy_reduction`={target_energy_reduction!r}; expected "
                "initial_energy_reduction <= target_energy_reduction."
            )
        self.restore = check_bool("restore", restore)
        self.allocation = check_choice("allocation", allocation, ALLOCATIONS)
        self.restore_fraction = check_number("restore_fraction", restore_fraction, low=0.0)
        if not self.restore and restore_fraction != 0.5:
            raise ValueError(
                f"`restore_fraction`={restore_fraction!r} has no effect with `restore`=False; "
                "set restore=True or leave restore_fraction at its default."
            )
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
            raise ValueError(f"`bits`={bits!r} is not supported; expected an int in [2, 32].")
        self.bits = bits
        self.energy_table = resolve_energy_table(energy_table)  # names a missing / unknown / bad entry
        super().__init__(
            target_sparsity=0.0,  # unused: the schedule drives the energy fraction instead
            schedule=schedule,
            start=start,
            end=end,
            frequency=frequency,
            criterion="magnitude",  # unused: build_importance decides (see `restore`)
            scope="global",
            targets=targets,
            exclude=exclude,
            power=power,
            calibration_steps=calibration_steps,
            log_per_layer=log_per_layer,
            flush_denormal=flush_denormal,
            min_density=min_density,
        )
        self.masks.owner = "EnergyAwarePruning"
        self.applied_energy_reduction = 0.0  # schedule value of the last update
        self.energy_reduction = 0.0  # estimated removed fraction, from the masks
        #: Energy model inputs of the targeted layers, by module name (None until measured).
        self.profile: dict[str, LayerEnergy] | None = None
        self._capture_handle: InputCapture | None = None
        #: Largest reachable ``target_energy_reduction`` (known once the profile is measured).
        self.max_energy_reduction: float | None = None
        self._shapes: dict[str, list[int]] = {}  # weight shapes the profile describes
        self._costs: list[float] = []
        self._dense_pj = 0.0

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {"targets": self.targets, "exclude": self.exclude}

    @override
    def build_importance(self) -> Importance:
        """Within-layer selection score: :class:`OutputErrorImportance` with ``restore``, else magnitude."""
        return OutputErrorImportance(self.calibration_steps) if self.restore else MagnitudeImportance()

    # ------------------------------------------------------------------ setup
    @override
    def select_targets(self, root: nn.Module) -> list[str]:
        selected = select_parameters(root, self.targets, self.exclude, False, owner=self.name)
        # Only layers the energy model prices: Linear / Conv weights whose own forward runs (the
        # out_proj of an nn.MultiheadAttention is applied inside its parent and is not priced).
        self.target_params = [
            t
            for t in selected
            if t.observable and isinstance(root.get_submodule(t.module), ENERGY_LAYERS) and t.attr == "weight"
        ]
        if not self.target_params:
            raise ValueError(
                f"{self.name}: the layers matching targets={self.targets!r} exclude={self.exclude!r} "
                f"include no Linear or Conv1d/2d/3d layer, the only layers the energy model prices."
            )
        self.param_names = [t.param for t in self.target_params]
        return [t.module for t in self.target_params]

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().compression_setup(trainer, pl_module)
        self._remove_capture_hook()
        root = self._root
        assert root is not None
        if self.profile is not None and self._profile_matches():
            for t in self.target_params:  # (checkpoints always hold them; kept for safety)
                self._shapes.setdefault(t.module, list(root.get_parameter(t.param).shape))
            self._derive_costs()  # restored from a checkpoint: no input needed
            return
        self.profile = None
        example = getattr(root, "example_input_array", None) if isinstance(root, pl.LightningModule) else None
        if example is not None:
            self._measure(trainer.precision_plugin.convert_input(example), "`example_input_array`")
        else:
            self._capture_handle = InputCapture(root, self.name)

    def _remove_capture_hook(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def _measure(self, example: Any, source: str) -> None:
        """Measure the energy profile on ``example`` (rank 0's wins under DDP), then check the target."""
        root, trainer = self._root, self._trainer
        assert root is not None
        context = contextlib.nullcontext() if trainer is None else trainer.precision_plugin.forward_context()
        try:
            with context:
                layers = energy_profile(root, example)
        except Exception as err:
            raise RuntimeError(
                f"{self.name}: the forward pass on {source} that measures the energy profile failed: {err}"
            ) from err
        rows = [[getattr(e, f) for f in _PROFILE_FIELDS] for e in layers]
        if trainer is not None:
            rows = trainer.strategy.broadcast(rows, src=0)
        by_name = {r[0]: r for r in rows}
        missing = [t.module for t in self.target_params if t.module not in by_name]
        if missing:
            raise ValueError(
                f"{self.name} cannot price layer {missing[0]!r}: its forward did not run on the model's "
                f"input ({source}), so the energy model has no MACs for it (an unused layer, or a weight "
                f"applied by a parent module). Add {missing[0]!r} to `exclude`."
            )
        self.profile = {t.module: _energy_from_row(by_name[t.module]) for t in self.target_params}
        self._shapes = {t.module: list(root.get_parameter(t.param).shape) for t in self.target_params}
        self._derive_costs()

    def _profile_matches(self) -> bool:
        profile, root = self.profile, self._root
        if profile is None or root is None:
            return False
        return all(
            t.module in profile and profile[t.module].weights == root.get_parameter(t.param).numel()
            for t in self.target_params
        )

    def _derive_costs(self) -> None:
        """Per-weight costs and dense energy of the targets; refuse an unreachable target."""
        assert self.profile is not None
        table, bits = self.energy_table, self.bits
        layers = [self.profile[t.module] for t in self.target_params]
        self._costs = [e.per_weight_pj(table, bits) for e in layers]
        fixed = sum(e.fixed_pj(table, bits) for e in layers)
        self._dense_pj = fixed + sum(e.weights * c for e, c in zip(layers, self._costs))
        floors = self._floors()
        removable = sum((e.weights - f) * c for e, f, c in zip(layers, floors, self._costs))
        reachable = removable / self._dense_pj if self._dense_pj > 0 else 0.0
        self.max_energy_reduction = reachable
        if self.target_energy_reduction > reachable + 1e-9:
            raise ValueError(
                f"{self.name}: `target_energy_reduction`={self.target_energy_reduction!r} cannot be reached "
                f"on this model; at most {math.floor(reachable * 1e4) / 1e4:.4f} of the targeted layers' "
                f"estimated energy ({self._dense_pj:.4g} pJ per sample) can be removed: "
                f"{fixed:.4g} pJ ({fixed / self._dense_pj:.1%}) is activation traffic that pruning "
                f"weights does not remove, and `min_density`={self.min_density!r} keeps "
                f"ceil(min_density * n) weights of every layer. Expected target_energy_reduction <= "
                f"{math.floor(reachable * 1e4) / 1e4:.4f} (or a lower min_density)."
            )
        self._refresh_stats()

    def _floors(self) -> list[int]:
        assert self.profile is not None
        return [math.ceil(self.min_density * self.profile[t.module].weights) for t in self.target_params]

    # ------------------------------------------------------------------ per step
    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.profile is None:
            capture, self._capture_handle = self._capture_handle, None
            if capture is None:  # (compression_setup always installs one when there is no profile)
                capture = InputCapture(self._root, self.name)
            captured = capture.take("to estimate energy")
            self._measure(captured, "the first training batch")
        super().begin_step(trainer, pl_module, step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("energy_reduction", self.energy_reduction, on_step=True, on_epoch=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_capture_hook()
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_capture_hook()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        super().on_structure_change(pl_module, changes)
        if self.profile is None:
            return
        # A Linear / Conv does (positions x weights) MACs and its activations scale with its output /
        # input channels: rescale the measured profile by the new weight shape (no input needed).
        root = self.root(pl_module)
        profile, shapes = {}, {}
        for t in self.target_params:
            old = self.profile.get(t.module)
            if old is None:
                continue
            shape = list(root.get_parameter(t.param).shape)
            before = self._shapes.get(t.module, shape)
            n = math.prod(shape)
            macs = old.macs * n // old.weights if old.weights else 0
            out_elems = round(old.output_elems * shape[0] / before[0]) if before[0] else old.output_elems
            in_elems = round(old.input_elems * shape[1] / before[1]) if before[1] else old.input_elems
            profile[t.module] = LayerEnergy(old.name, old.kind, macs, n, n, in_elems, out_elems)
            shapes[t.module] = shape
        self.profile, self._shapes = profile, shapes
        self._derive_costs()

    # ------------------------------------------------------------------ the update
    def update_masks(self, step: int) -> None:
        """Remove the schedule's energy fraction at ``step`` (allocation, then restoration).

        Masks agree on every rank: the profile is rank 0's, weights are identical under DDP and the
        input statistics are reduced across ranks before scoring.
        """
        target = self.scheduled(step, self.target_energy_reduction, self.initial_energy_reduction)
        self.importance.close_window()
        trainer = self._trainer
        if target > self.applied_energy_reduction and self.profile is not None:
            if trainer is not None:
                self.importance.reduce(lambda t, op: trainer.strategy.reduce(t, reduce_op=op))
            weights = [self.masks.parameter(n) for n in self.param_names]
            previous = [self.masks[n] for n in self.param_names]
            selection = None
            if self.restore:
                self._scores = dict(zip(self.param_names, self.importance.scores(step)))
                selection = [self.score(n, w, step) for n, w in zip(self.param_names, weights)]
                self._scores = {}
            removed = self._removed_pj()
            new = energy_aware_masks(
                [self.allocation_score(n, w) for n, w in zip(self.param_names, weights)],
                self._costs,
                target * self._dense_pj - removed,
                previous=previous,
                min_keep=self._floors() if self.min_density > 0 else None,
                selection_scores=selection,
                restore_fraction=self.restore_fraction,
            )
            self.apply_masks(new)
            self.applied_energy_reduction = target
            self._refresh_stats()
            self.debug(
                f"{self.name}: step {step}: energy reduction {self.energy_reduction:.4f} "
                f"(target {target:.4f}), sparsity {self.sparsity:.4f}"
            )
        self.last_update_step = step
        self.importance.reset()
        self._next_update = self.step_schedule.next_update(step + 1, self.schedule)

    def allocation_score(self, name: str, weight: Tensor) -> Tensor:
        """Importance that the knapsack weighs against energy across layers. Override to customize."""
        return lamp_score(weight) if self.allocation == "lamp" else magnitude_score(weight)

    def _removed_pj(self) -> float:
        counts = self.masks.counts()
        return sum(counts[n][0] * c for n, c in zip(self.param_names, self._costs) if n in counts)

    def _refresh_stats(self) -> None:
        if not len(self.masks) or not self._costs:
            return
        self.sparsity, self.layer_sparsity = self.masks.layer_sparsity()
        self.applied_sparsity = self.sparsity  # (the base class resets optimizer state when > 0)
        self.energy_reduction = self._removed_pj() / self._dense_pj if self._dense_pj > 0 else 0.0

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            {
                "applied_energy_reduction": self.applied_energy_reduction,
                "energy_reduction": self.energy_reduction,
                "profile": None
                if self.profile is None
                else [[getattr(e, f) for f in _PROFILE_FIELDS] for e in self.profile.values()],
                "profile_shapes": {k: list(v) for k, v in self._shapes.items()},
            }
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.applied_energy_reduction = float(state_dict.get("applied_energy_reduction", 0.0))
        self.energy_reduction = float(state_dict.get("energy_reduction", 0.0))
        rows = state_dict.get("profile")
        self.profile = None if rows is None else {r[0]: _energy_from_row(r) for r in rows}
        self._shapes = {k: [int(d) for d in v] for k, v in state_dict.get("profile_shapes", {}).items()}


def _energy_from_row(row: Sequence[Any]) -> LayerEnergy:
    name, kind, macs, weights, input_elems, output_elems = row
    return LayerEnergy(
        name=str(name),
        kind=str(kind),
        macs=int(macs),
        weights=int(weights),
        nonzero_weights=int(weights),
        input_elems=int(input_elems),
        output_elems=int(output_elems),
    )
