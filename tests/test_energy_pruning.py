"""EnergyAwarePruning: energy target, energy-driven allocation, restoration, checkpoints, resume."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.cost import HOROWITZ_45NM, energy_profile
from lightning_compress.pruning.energy import EnergyAwarePruning, OutputErrorImportance, energy_aware_masks
from lightning_compress.pruning.gradual import GradualPruning

NAMES = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
SCHED = {"start": 2, "end": 20, "frequency": 3, "calibration_steps": 2}


class EnergyNet(pl.LightningModule):
    """Two convolutions (many MACs per weight) and two Linear layers (one MAC per weight)."""

    def __init__(self, lr: float = 0.05, with_example: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # 216 weights x 144 positions
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)  # 1152 weights x 36 positions
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 4)
        if with_example:
            self.example_input_array = torch.zeros(1, 3, 12, 12)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-3)


class _Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 12, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Wrapper(EnergyNet):
    """Compression root = student (a plain module: no example_input_array of its own)."""

    def __init__(self) -> None:
        super().__init__(with_example=True)
        self.student = _Student()

    @property
    def compression_root(self) -> nn.Module:
        return self.student

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.student(x), y)


class NoForward(EnergyNet):
    """A training step that never calls ``self(...)``."""

    def __init__(self) -> None:
        super().__init__(with_example=False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1)
        return nn.functional.cross_entropy(self.fc2(torch.relu(self.fc1(h))), y)


def data(n: int = 128, batch_size: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 3, 12, 12, generator=gen)
    y = (x.flatten(1) @ torch.randn(3 * 144, 4, generator=gen)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path | str, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 4,  # 32 training steps
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "default_root_dir": str(tmp_path),
    }
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def _measured_reduction(model: nn.Module, layers: list[str] = LAYERS) -> float:
    """Energy removed from the targeted layers, by energy_profile on the model's actual non-zeros."""
    profile = {e.name: e for e in energy_profile(model, torch.zeros(2, 3, 12, 12))}
    dense = sum(profile[n].energy_pj(1.0) for n in layers)
    return 1.0 - sum(profile[n].energy_pj() for n in layers) / dense


def _zero_fraction(model: nn.Module, names: list[str]) -> float:
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / sum(model.get_parameter(n).numel() for n in names)


def _fit(tmp_path: Path, cb: pl.Callback, make_model: Callable[[], Any] = EnergyNet, **kw: Any) -> Any:
    pl.seed_everything(0)
    model = make_model()
    trainer(tmp_path, [cb], **kw).fit(model, data())
    return model


# ---------------------------------------------------------------------------- the target
@pytest.mark.parametrize("restore", [True, False])
def test_fit_reaches_the_energy_target(tmp_path: Path, restore: bool) -> None:
    cb = EnergyAwarePruning(target_energy_reduction=0.6, restore=restore, **SCHED)
    seen: list[dict[str, int]] = []
    scores = cb.importance.scores
    cb.importance.scores = lambda step: (
        seen.append(dict(getattr(cb.importance, "counts", {}))) or scores(step)
    )
    model = _fit(tmp_path, cb)
    if restore:  # every update restored from 2 calibration steps of input statistics per layer
        assert seen == [dict.fromkeys(NAMES, 2)] * 6
    else:
        assert seen == []
    measured = _measured_reduction(model)
    assert 0.6 <= measured < 0.6 + 2e-4, measured  # the last weight taken crosses the target
    assert cb.energy_reduction == pytest.approx(measured, abs=1e-9)
    assert cb.sparsity == pytest.approx(_zero_fraction(model, NAMES), abs=1e-9)
    for name in NAMES:  # weights are zero wherever the mask says so
        assert not bool(model.get_parameter(name)[~cb.masks[name]].any())
    assert cb.last_update_step == 20


@pytest.mark.parametrize("allocation", ["magnitude", "lamp"])
def test_conv_layers_get_more_sparsity_than_under_gradual_pruning(tmp_path: Path, allocation: str) -> None:
    energy = EnergyAwarePruning(target_energy_reduction=0.6, restore=False, allocation=allocation, **SCHED)
    model_e = _fit(tmp_path / "e", energy)
    pruned = sum(energy.masks.counts()[n][0] for n in NAMES)
    total = sum(energy.masks.counts()[n][1] for n in NAMES)
    # the same importance, without the energy cost per weight
    plain = GradualPruning(target_sparsity=pruned / total, criterion=allocation, start=2, end=20, frequency=3)
    model_g = _fit(tmp_path / "g", plain)
    assert _zero_fraction(model_g, NAMES) == pytest.approx(_zero_fraction(model_e, NAMES), abs=1e-9)
    for conv in ("conv1.weight", "conv2.weight"):  # the same number of weights, spent where energy is
        assert _zero_fraction(model_e, [conv]) > _zero_fraction(model_g, [conv]) + 0.05
    # ... which removes more energy than pruning the same number of weights without costs
    assert _measured_reduction(model_e) > _measured_reduction(model_g)


def test_energy_table_changes_the_allocation(tmp_path: Path) -> None:
    # With free DRAM, a Linear weight costs one MAC and conv1's 144: almost only convs are pruned.
    table = {"fp32_mult": 3.7, "fp32_add": 0.9, "int8_mult": 0.2, "int8_add": 0.03}
    cheap = EnergyAwarePruning(0.3, energy_table={**table, "sram_read": 5.0, "dram_read": 0.0}, **SCHED)
    default = EnergyAwarePruning(0.3, **SCHED)
    _fit(tmp_path / "a", cheap)
    _fit(tmp_path / "b", default)
    assert cheap.layer_sparsity["conv1"] > default.layer_sparsity["conv1"]
    assert cheap.layer_sparsity["fc1"] < default.layer_sparsity["fc1"]


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_sparse_and_loads_without_callback(tmp_path: Path) -> None:
    cb = EnergyAwarePruning(target_energy_reduction=0.5, **SCHED)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pl.seed_everything(0)
    model = EnergyNet()
    trainer(tmp_path, [cb, ckpt], enable_checkpointing=True).fit(model, data())
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)  # callback state: plain values only
    assert set(raw["state_dict"]) == set(model.state_dict())
    for name in NAMES:
        assert not bool(raw["state_dict"][name][~cb.masks[name]].any())
    fresh = EnergyNet.load_from_checkpoint(tmp_path / "last.ckpt")  # no callback, no Trainer
    assert _measured_reduction(fresh) >= 0.5
    x = torch.randn(5, 3, 12, 12)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


class _Crash(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == 1 and args[-1] == 5:  # step 13: between updates 11 and 14
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("with_example", [True, False], ids=["example_input_array", "captured"])
def test_crash_and_resume_equals_uninterrupted(tmp_path: Path, with_example: bool) -> None:
    def make() -> EnergyAwarePruning:
        return EnergyAwarePruning(target_energy_reduction=0.6, **SCHED)

    ref = make()
    model_ref = _fit(tmp_path / "ref", ref, lambda: EnergyNet(with_example=with_example))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    pl.seed_everything(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", [make(), ckpt, _Crash()], enable_checkpointing=True).fit(
            EnergyNet(with_example=with_example), data()
        )
    last = tmp_path / "ckpt" / "last.ckpt"
    state = next(v for k, v in torch.load(last, weights_only=True)["callbacks"].items() if "Energy" in k)
    assert state["profile"] is not None
    assert state["last_update_step"] == 5

    def no_measure(example: Any, source: str) -> None:
        raise AssertionError("profile measured again after resume")

    pl.seed_everything(0)
    resumed, model = make(), EnergyNet(with_example=with_example)
    resumed._measure = no_measure  # the resumed run must not need an input again
    trainer(tmp_path / "b", [resumed]).fit(model, data(), ckpt_path=str(last))
    assert resumed.profile == ref.profile
    for name in NAMES:
        assert torch.equal(resumed.masks[name], ref.masks[name]), name
    for name, p in model_ref.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), p, rtol=0, atol=0)
    assert resumed.energy_reduction == ref.energy_reduction


# ---------------------------------------------------------------------------- the profile
def test_missing_example_input_uses_the_captured_batch(tmp_path: Path) -> None:
    cb = EnergyAwarePruning(target_energy_reduction=0.5, **SCHED)
    model = _fit(tmp_path, cb, lambda: EnergyNet(with_example=False))
    batch = next(iter(data()))[0]
    expected = {e.name: e for e in energy_profile(EnergyNet(with_example=False), batch)}
    assert cb.profile is not None
    assert list(cb.profile) == LAYERS
    for name, entry in cb.profile.items():
        ref = expected[name]
        assert (entry.macs, entry.weights, entry.input_elems, entry.output_elems) == (
            ref.macs,
            ref.weights,
            ref.input_elems,
            ref.output_elems,
        )
    assert cb._capture_handle is None  # the one-shot hook is gone
    assert not model._forward_pre_hooks
    assert _measured_reduction(model) >= 0.5


def test_compression_root_input_is_captured(tmp_path: Path) -> None:
    cb = EnergyAwarePruning(target_energy_reduction=0.4, **SCHED)
    model = _fit(tmp_path, cb, Wrapper)  # the wrapper's example_input_array is not the student's
    assert cb.param_names == ["conv.weight", "fc.weight"]
    assert cb.profile is not None
    assert cb.profile["conv"].macs == 4 * 27 * 144
    profile = {e.name: e for e in energy_profile(model.student, torch.zeros(1, 3, 12, 12))}
    dense = sum(e.energy_pj(1.0) for e in profile.values())
    assert 1 - sum(e.energy_pj() for e in profile.values()) / dense >= 0.4


def test_forward_never_called_is_explained(tmp_path: Path) -> None:
    cb = EnergyAwarePruning(target_energy_reduction=0.5, **SCHED)
    with pytest.raises(ValueError, match=r"did not call the forward of the compression root \(NoForward\)"):
        _fit(tmp_path, cb, NoForward)
    assert _zero_fraction(cb._root, NAMES) == 0.0  # nothing half-applied


@pytest.mark.parametrize("with_example", [True, False], ids=["example_input_array", "captured"])
def test_unreachable_target_is_refused_before_any_update(tmp_path: Path, with_example: bool) -> None:
    model = EnergyNet(with_example=with_example)
    profile = {e.name: e for e in energy_profile(model, torch.zeros(1, 3, 12, 12))}
    dense = sum(e.energy_pj(1.0) for e in profile.values())
    removable = sum((e.weights - math.ceil(0.2 * e.weights)) * e.per_weight_pj() for e in profile.values())
    best = math.floor(removable / dense * 1e4) / 1e4
    cb = EnergyAwarePruning(target_energy_reduction=0.8, min_density=0.2, **SCHED)
    with pytest.raises(
        ValueError,
        match=rf"`target_energy_reduction`=0.8 cannot be reached on this model; at most {best:.4f} of the "
        r"targeted layers' estimated energy .* activation traffic .* `min_density`=0.2",
    ):
        _fit(tmp_path, cb, lambda: model)
    assert _zero_fraction(model, NAMES) == 0.0
    # just below the bound is fine
    ok = EnergyAwarePruning(target_energy_reduction=best - 1e-3, min_density=0.2, **SCHED)
    _fit(tmp_path / "ok", ok, lambda: EnergyNet(with_example=with_example))
    assert ok.energy_reduction >= best - 1e-3
    assert min(1 - s for s in ok.layer_sparsity.values()) >= 0.2 - 1e-9  # floors hold


def test_sparsity_and_energy_reduction_are_logged(tmp_path: Path) -> None:
    cb = EnergyAwarePruning(target_energy_reduction=0.5, log_per_layer=True, **SCHED)
    logger = CSVLogger(tmp_path, name="run")
    _fit(tmp_path, cb, logger=logger, log_every_n_steps=4)
    import csv

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    energy = [float(r["energy_reduction"]) for r in rows if r.get("energy_reduction")]
    assert energy[0] == 0.0
    assert energy[-1] == pytest.approx(cb.energy_reduction)
    assert energy == sorted(energy)
    assert any(r.get("sparsity/conv1") for r in rows)
    assert any(r.get("sparsity") for r in rows)


# ---------------------------------------------------------------------------- pure parts
def _greedy_reference(
    scores: list[Tensor], costs: list[float], energy: float, floors: list[int]
) -> list[Tensor]:
    """Remove one entry at a time: the lowest score / cost among entries whose layer is above its floor."""
    keeps = [torch.ones_like(s, dtype=torch.bool).flatten() for s in scores]
    removed = 0.0
    while removed < energy * (1 - 1e-12):
        best = None
        for i, s in enumerate(scores):
            if int(keeps[i].sum()) <= floors[i]:
                continue
            flat = s.flatten().double()
            for j in keeps[i].nonzero().squeeze(1).tolist():
                key = (float(flat[j]) / costs[i], i, j)
                if best is None or key < best:
                    best = key
        if best is None:
            break
        _, i, j = best
        keeps[i][j] = False
        removed += costs[i]
    return [k.view_as(s) for k, s in zip(keeps, scores)]


@pytest.mark.parametrize("seed", range(4))
def test_kernel_is_the_greedy_knapsack(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = [
        torch.rand(4, 5, generator=gen),
        torch.rand(3, 2, 2, generator=gen),
        torch.rand(7, generator=gen),
    ]
    costs = [1.0, 4.5, 2.0]
    floors = [2, 5, 0]
    energy = float(torch.rand(1, generator=gen)) * 40
    got = energy_aware_masks(scores, costs, energy, min_keep=floors)
    for a, b in zip(got, _greedy_reference(scores, costs, energy, floors)):
        assert torch.equal(a, b)
    # removed energy reaches the target and overshoots by less than one entry
    removed = sum(int((~m).sum()) * c for m, c in zip(got, costs))
    assert energy <= removed + 1e-9
    assert removed - energy < max(costs)


@pytest.mark.parametrize("fraction", [None, 0.5, 0.0])
def test_kernel_keeps_pruned_entries_and_restores_by_selection_scores(fraction: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    mag = [torch.rand(6, 4, generator=gen), torch.rand(10, generator=gen)]
    prev = [torch.rand(6, 4, generator=gen) > 0.3, torch.ones(10, dtype=torch.bool)]
    sel = [torch.rand(6, 4, generator=gen), torch.rand(10, generator=gen)]
    plain = energy_aware_masks(mag, [1.0, 3.0], 20.0, previous=prev)
    restored = energy_aware_masks(
        mag, [1.0, 3.0], 20.0, previous=prev, selection_scores=sel, restore_fraction=fraction
    )
    for m, p, a, b, s in zip(mag, prev, plain, restored, sel):
        assert not bool((a & ~p).any())  # masks only grow
        assert not bool((b & ~p).any())
        k = int((p & ~a).sum())
        assert int((p & ~b).sum()) == k  # the same count per tensor: the same energy
        if fraction == 0.0:
            assert torch.equal(a, b)  # an empty pool beyond the proposal: nothing restored
            continue
        live = p.flatten().nonzero().squeeze(1)
        size = live.numel() if fraction is None else min(live.numel(), k + math.ceil(fraction * k))
        pool = torch.zeros_like(p.flatten())
        pool[live[torch.argsort(m.flatten()[live])[:size]]] = True
        pool = pool.view_as(p)
        newly = p & ~b
        assert not bool((newly & ~pool).any())  # pruned entries come from the pool
        kept_in_pool = pool & b
        if newly.any() and kept_in_pool.any():  # ... and are its lowest selection scores
            assert float(s[newly].max()) <= float(s[kept_in_pool].min())
    for a, p in zip(energy_aware_masks(mag, [1.0, 3.0], 0.0, previous=prev), prev):
        assert torch.equal(a, p)  # nothing to remove: unchanged


def test_output_error_importance_is_weight_times_input_rms() -> None:
    from lightning_compress.core.params import select_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    imp = OutputErrorImportance(calibration_steps=2)
    imp.attach(model, select_parameters(model))
    imp.open_window(model)
    xs = [torch.randn(5, 4, 6, 6) for _ in range(2)]
    for x in xs:
        model(x)
    imp.close_window()
    conv_scores, fc_scores = imp.scores(0)
    ms = torch.stack([x.square().mean(dim=(0, 2, 3)) for x in xs]).mean(0).sqrt()  # per input channel
    expected = model[0].weight.abs() * torch.cat([ms[:2].expand(3, 2), ms[2:].expand(3, 2)]).view(6, 2, 1, 1)
    torch.testing.assert_close(conv_scores, expected)
    hs = [model[1](model[0](x)) for x in xs]  # the Linear's input
    ms_fc = torch.stack([h.square().mean(0) for h in hs]).mean(0).sqrt()
    torch.testing.assert_close(fc_scores, model[2].weight.abs() * ms_fc)


# ---------------------------------------------------------------------------- bad arguments
BAD = [
    (
        {"target_energy_reduction": 1.0},
        r"`target_energy_reduction`=1.0 is not supported; expected a number in \(0, 1\)",
    ),
    (
        {"target_energy_reduction": 0},
        r"`target_energy_reduction`=0 is not supported; expected a number in \(0, 1\)",
    ),
    ({"target_energy_reduction": "0.5"}, r"`target_energy_reduction`='0.5' is not supported"),
    (
        {"target_energy_reduction": 0.3, "initial_energy_reduction": 0.4},
        r"`initial_energy_reduction`=0.4 is above `target_energy_reduction`=0.3",
    ),
    (
        {"initial_energy_reduction": -0.1},
        r"`initial_energy_reduction`=-0.1 is not supported; expected a number in \[0, 1\)",
    ),
    ({"restore": "yes"}, r"`restore`='yes' is not supported; expected true or false"),
    ({"restore_fraction": -0.5}, r"`restore_fraction`=-0.5 is not supported; expected a number >= 0"),
    (
        {"allocation": "energy"},
        r"`allocation`='energy' is not supported; expected one of \['lamp', 'magnitude'\]",
    ),
    ({"bits": 64}, r"`bits`=64 is not supported; expected an int in \[2, 32\]"),
    ({"bits": 8.0}, r"`bits`=8.0 is not supported; expected an int in \[2, 32\]"),
    ({"energy_table": {"dram_read": 1.0}}, r"`energy_table` is missing 'fp32_mult'"),
    ({"energy_table": {"fp32_mul": 1.0}}, r"`energy_table` has unknown entry 'fp32_mul'"),
    (
        {"energy_table": {**HOROWITZ_45NM.__dict__, "dram_read": -1.0}},
        r"`energy_table\['dram_read'\]` must be a finite number >= 0 \(picojoules\), got -1.0",
    ),
    ({"energy_table": 3}, r"`energy_table` must be None, an EnergyTable or a mapping"),
    ({"schedule": "cosine"}, r"`schedule`='cosine' is not supported; expected one of \['constant', 'linear'"),
    ({"frequency": 0}, r"`frequency`=0 is not supported; expected an int >= 1"),
    ({"start": -1}, r"`start`=-1 is a negative step"),
    ({"end": 1.5}, r"`end`=1.5 is a float outside \[0, 1\]"),
    ({"start": 0.8, "end": 0.5}, r"`end`=0.5 is before `start`=0.8"),
    ({"targets": "fc1"}, r"`targets`='fc1' is not supported; expected a list of fnmatch patterns"),
    ({"power": 0}, r"`power`=0 is not supported; expected a number > 0"),
    ({"calibration_steps": 0}, r"`calibration_steps`=0 is not supported; expected an int >= 1"),
    ({"min_density": 1.0}, r"`min_density`=1.0 is not supported; expected a number in \[0, 1\)"),
    ({"log_per_layer": 1}, r"`log_per_layer`=1 is not supported; expected true or false"),
    ({"flush_denormal": "no"}, r"`flush_denormal`='no' is not supported; expected true or false"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EnergyAwarePruning(**kwargs)


class _AttentionNet(EnergyNet):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)


def test_layers_the_energy_model_cannot_price_are_refused(tmp_path: Path) -> None:
    cb = EnergyAwarePruning(targets=["attn"])  # only the attention's fused projection matches
    with pytest.raises(
        ValueError, match=r"include no Linear or Conv1d/2d/3d layer, the only layers the energy"
    ):
        trainer(tmp_path, [cb]).fit(_AttentionNet(), data())
    # with the default targets the attention (never run here) is left out, the rest is pruned
    cb = EnergyAwarePruning(target_energy_reduction=0.3, **SCHED)
    model = _fit(tmp_path / "b", cb, _AttentionNet)
    assert cb.param_names == NAMES
    assert _measured_reduction(model) >= 0.3


def test_a_layer_the_forward_never_runs_is_named(tmp_path: Path) -> None:
    class Unused(EnergyNet):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(4, 4)

    cb = EnergyAwarePruning(target_energy_reduction=0.3, **SCHED)
    with pytest.raises(
        ValueError, match=r"cannot price layer 'spare': its forward did not run .* to `exclude`"
    ):
        trainer(tmp_path, [cb]).fit(Unused(), data())
    cb = EnergyAwarePruning(target_energy_reduction=0.3, exclude=["spare"], **SCHED)
    _fit(tmp_path / "b", cb, Unused)
    assert "spare.weight" not in cb.param_names


def test_an_energy_table_instance_is_accepted() -> None:
    from lightning_compress.core.cost import EnergyTable

    table = EnergyTable(dram_read=100.0)
    assert EnergyAwarePruning(energy_table=table).energy_table is table
    assert EnergyAwarePruning(energy_table=dict(HOROWITZ_45NM.__dict__)).energy_table == HOROWITZ_45NM


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_lenet5_mnist_keeps_accuracy_at_half_the_energy(tmp_path: Path) -> None:
    from lightning_compress.demos import LeNet5, MNIST5kDataModule

    pl.seed_everything(0)
    model, dm = LeNet5(), MNIST5kDataModule(batch_size=64)
    cb = EnergyAwarePruning(target_energy_reduction=0.5, end=0.5, frequency=25)
    tr = trainer(tmp_path, [cb], max_epochs=6)
    tr.fit(model, dm)
    acc = tr.test(model, dm, verbose=False)[0]["test_acc"]
    assert acc > 0.9
    layers = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    profile = {e.name: e for e in energy_profile(model, torch.zeros(1, 1, 28, 28))}
    dense = sum(profile[n].energy_pj(1.0) for n in layers)
    assert 1 - sum(profile[n].energy_pj() for n in layers) / dense >= 0.5


def test_masks_and_profile_follow_a_structure_change(tmp_path: Path) -> None:
    from battery import ShrinkHidden

    cb = EnergyAwarePruning(target_energy_reduction=0.5, **SCHED)
    pl.seed_everything(0)
    model = EnergyNet()
    trainer(tmp_path, [cb, ShrinkHidden(at=10, layer="fc1", next_layer="fc2")]).fit(model, data())
    assert model.fc1.weight.shape == (16, 576)
    assert cb.profile is not None
    assert (cb.profile["fc1"].weights, cb.profile["fc1"].macs) == (16 * 576, 16 * 576)
    assert (cb.profile["fc2"].weights, cb.profile["fc2"].macs) == (4 * 16, 4 * 16)
    assert cb.masks["fc1.weight"].shape == (16, 576)
    assert _measured_reduction(model) == pytest.approx(cb.energy_reduction, abs=1e-6)
    assert cb.energy_reduction >= 0.5


def test_bf16_mixed_and_gradient_accumulation(tmp_path: Path) -> None:
    for with_example in (True, False):
        cb = EnergyAwarePruning(target_energy_reduction=0.5, **SCHED)
        model = _fit(
            tmp_path,
            cb,
            lambda w=with_example: EnergyNet(with_example=w),
            precision="bf16-mixed",
            accumulate_grad_batches=2,
            max_epochs=8,
        )
        assert _measured_reduction(model) >= 0.5


class _DumpMasks(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, EnergyAwarePruning))
        state = {n: cb.masks[n].cpu() for n in cb.masks.names}
        state["profile"] = torch.tensor([[e.macs, e.weights, e.input_elems] for e in cb.profile.values()])
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_agree_on_masks(tmp_path: Path) -> None:
    # Each rank sees other batches: the captured input and the output-error statistics differ per
    # rank, so the masks only agree because the profile is broadcast and the statistics reduced.
    pl.seed_everything(0)
    cb = EnergyAwarePruning(target_energy_reduction=0.6, **SCHED)
    tr = trainer(tmp_path, [cb, _DumpMasks(str(tmp_path))], devices=2, strategy="ddp_spawn", max_epochs=8)
    tr.fit(EnergyNet(with_example=False), data(n=96, batch_size=16))  # 3 + 3 batches: uneven ranks
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert list(r0) == [*NAMES, "profile"]
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert any(not bool(m.all()) for k, m in r0.items() if k != "profile")
