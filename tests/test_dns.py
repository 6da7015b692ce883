"""DynamicNetworkSurgery: the surgery rule, the calibration, straight-through training, state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import MLP, TinyNet, tiny_data
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn

import lightning_compress as lc
from lightning_compress.functional.surgery import (
    critical_c,
    kth_smallest,
    surgery_mask,
    surgery_thresholds,
    threshold_masks,
    update_probability,
)


def _trainer(tmp_path: Path, callbacks: list[Any], epochs: int = 4, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


# ---------------------------------------------------------------------------- the rule
def test_thresholds_follow_the_paper() -> None:
    a, b = surgery_thresholds(mu=0.5, sigma=0.2, c=1.0)
    assert a == pytest.approx(0.9 * 0.7)
    assert b == pytest.approx(1.1 * 0.7)
    assert surgery_thresholds(mu=0.1, sigma=0.2, c=-1.0) == (0.0, 0.0)  # max(mu + c sigma, 0)


def test_surgery_mask_prunes_below_a_splices_above_b_and_keeps_the_band() -> None:
    w = torch.tensor([0.1, 0.1, 0.95, 0.95, 1.5, 1.5])
    old = torch.tensor([True, False, True, False, True, False])
    new = surgery_mask(w, old, a=0.9, b=1.1)
    assert new.tolist() == [False, False, True, False, True, True]


def test_critical_c_orders_entries_exactly_as_the_rule() -> None:
    torch.manual_seed(0)
    w, mask = torch.randn(2000), torch.rand(2000) > 0.3
    mu, sigma = float(w.abs().mean()), float(w.abs().std())
    crit = critical_c(w, mask, mu, sigma)
    for c in (-3.0, -0.5, 0.0, 0.4, 1.3, 2.5):
        a, b = surgery_thresholds(mu, sigma, c)
        expected = surgery_mask(w, mask, a, b)
        # pruned iff c > critical value (ties at the boundary are measure-zero for random weights)
        assert torch.equal(expected, ~(crit < c)), c


def test_kth_smallest_with_a_hint_equals_the_full_selection() -> None:
    torch.manual_seed(0)
    x = torch.rand(50_000)
    for k in (1, 100, 25_000, 49_999, 50_000):
        full = x.kthvalue(k).values
        for hint in (None, float(full), float(full) * 1.02, float(full) * 0.5, 10.0):
            assert kth_smallest(x, k, hint) == full, (k, hint)


def test_threshold_masks_prune_exactly_and_respect_floors() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(300, 100), torch.rand(10, 10) * 0.01]  # the small layer scores low everywhere
    masks, ts = threshold_masks(scores, 0.9, "global")
    assert sum(int((~m).sum()) for m in masks) == 27_090
    assert int(masks[1].sum()) == 0  # without a floor the small layer is emptied
    masks, ts = threshold_masks(scores, 0.9, "global", min_keep=[300, 5])
    assert int(masks[1].sum()) == 5
    assert ts[1] < ts[0]  # the tensor at its floor has its own, lower threshold
    assert sum(int((~m).sum()) for m in masks) == 27_090
    top5 = torch.topk(scores[1].flatten(), 5).indices
    assert bool(masks[1].flatten()[top5].all())
    masks, ts = threshold_masks(scores, 0.5, "local")
    assert [int((~m).sum()) for m in masks] == [15_000, 50]
    assert len(ts) == 2


def test_threshold_masks_with_hints_equal_the_full_water_filling() -> None:
    """Hints from the previous update (a layer at its floor, a shifted threshold) never change the result."""
    torch.manual_seed(0)
    scores = [torch.rand(300, 80) * 0.2, torch.rand(100, 30), torch.rand(10, 10)]
    floors = [240, 30, 10]
    masks, ts = threshold_masks(scores, 0.95, "global", min_keep=floors)
    assert ts[0] < max(ts)  # the first tensor is at its floor
    assert int(masks[0].sum()) == 240
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        scale = [1.0 + 0.6 * step, 1.0, 1.0 - 0.1 * step]  # the first tensor grows out of its floor
        moved = [s * c + 0.01 * torch.rand(s.shape, generator=gen) for s, c in zip(scores, scale)]
        full, full_ts = threshold_masks(moved, 0.95, "global", min_keep=floors)
        hinted, hinted_ts = threshold_masks(moved, 0.95, "global", min_keep=floors, hints=ts)
        assert all(torch.equal(a, b) for a, b in zip(full, hinted)), step
        assert full_ts == hinted_ts
        assert sum(int((~m).sum()) for m in full) == round(0.95 * 27_100)
        for m, f in zip(full, floors):
            assert int(m.sum()) >= f
        ts = hinted_ts


def test_update_probability() -> None:
    assert update_probability(0, 1e-4, 1.0) == 1.0
    assert update_probability(10_000, 1e-4, 1.0) == pytest.approx(0.5)
    assert update_probability(10_000, 1e-4, 2.0) == pytest.approx(0.25)
    assert update_probability(123, 0.0, 1.0) == 1.0


# ---------------------------------------------------------------------------- training
class _Recorder(pl.Callback):
    """Checks, before each optimizer step, that the forward weights were W * T."""

    def __init__(self, dns: lc.DynamicNetworkSurgery) -> None:
        self.dns = dns
        self.checked = 0
        self.pruned_dense_changed = False
        self._last: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.dns.dense or self.dns.frozen:
            return
        for name, dense in self.dns.dense.items():
            p = pl_module.get_parameter(name)
            torch.testing.assert_close(p, dense * self.dns.masks[name], rtol=0, atol=0)
            last = self._last.get(name)
            mask = self.dns.masks[name]
            if last is not None and last.shape == dense.shape:
                both_pruned = ~mask
                if bool((last[both_pruned] != dense[both_pruned]).any()):
                    self.pruned_dense_changed = True
            self._last[name] = dense.clone()
        self.checked += 1


def test_fit_reaches_the_target_and_pruned_weights_keep_training_and_splice_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.8, start=2, end=10, stop=28, gamma=0.01)
    rec = _Recorder(dns)
    model = MLP()
    _trainer(tmp_path, [dns, rec]).fit(model, tiny_data())
    assert rec.checked > 10
    assert rec.pruned_dense_changed  # straight-through: the dense W of pruned entries still moves
    assert dns.spliced_total > 0  # ... and some came back
    assert dns.frozen
    assert dns.dense == {}  # dropped at `stop`
    names = dns.masks.names
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    total = sum(model.get_parameter(n).numel() for n in names)
    assert zeros / total == pytest.approx(0.8, abs=1e-3)
    assert dns.sparsity == pytest.approx(0.8, abs=1e-3)


def test_optimizer_updates_the_dense_weights_with_the_gradient_of_the_masked_ones(tmp_path: Path) -> None:
    """One SGD step (with weight decay) by hand: W <- W - lr * (dL/d(W*T) + wd * W)."""
    torch.manual_seed(0)
    lr, wd = 0.1, 0.01

    class Plain(MLP):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr, weight_decay=wd)

    dns = lc.DynamicNetworkSurgery(
        target_sparsity=0.5, start=0, end=0, stop=100, gamma=0.0, schedule="constant"
    )
    model = Plain()
    captured: dict[str, Any] = {}

    class Capture(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
        ) -> None:
            if trainer.global_step == 1:  # masks exist (set at step 0); weights = W * T
                captured["dense"] = {n: t.clone() for n, t in dns.dense.items()}
                captured["masks"] = {n: dns.masks[n].clone() for n in dns.masks.names}
                captured["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_before_optimizer_step(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any
        ) -> None:
            if trainer.global_step == 1:
                captured["grads"] = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 2:
                captured["after"] = {n: t.clone() for n, t in dns.dense.items()}

    _trainer(tmp_path, [dns, Capture()], epochs=1, max_steps=4).fit(model, tiny_data())
    assert captured["masks"]
    for name, dense in captured["dense"].items():
        grad = captured["grads"][name]
        # The step updated the dense W, pruned entries included, with the gradient taken at W * T
        # and weight decay on the dense W (momentum-free SGD: exact).
        expected = dense - lr * (grad + wd * dense)
        assert bool((grad[~captured["masks"][name]] != 0).any())  # pruned entries do get a gradient
        torch.testing.assert_close(captured["after"][name], expected, rtol=1e-6, atol=1e-7)


def test_saved_weights_are_masked_and_resume_keeps_the_dense_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dns = lc.DynamicNetworkSurgery(
        target_sparsity=0.7, start=0, end=8, stop=1.0, gamma=0.01, calibrate_every=1
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    model = TinyNet()
    _trainer(tmp_path, [dns, ckpt], epochs=2, enable_checkpointing=True).fit(model, tiny_data())
    assert dns.frozen  # stop=1.0 is the last step: the masks are fixed and the dense copy dropped
    raw = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)  # mid-surgery
    state = raw["callbacks"][dns.state_key]
    for name, dense in state["dense"].items():
        mask = state["masks"][name]
        torch.testing.assert_close(raw["state_dict"][name], dense * mask, rtol=0, atol=0)
        assert bool((dense[~mask] != 0).any())  # the dense copy is really dense
    final = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=True)
    assert final["callbacks"][dns.state_key]["dense"] == {}
    plain = TinyNet.load_from_checkpoint(tmp_path / "ckpt" / "epoch=1.ckpt")  # no callback needed
    x = torch.randn(5, 4, 6, 6)
    model.eval()
    plain.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_fixed_c_uses_the_paper_thresholds_per_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dns = lc.DynamicNetworkSurgery(c={"fc1": 0.5, "*": 1.5}, start=0, stop=1, gamma=0.0)
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(tmp_path, [dns], epochs=1, max_steps=1).fit(model, tiny_data())
    for layer, c in (("fc1", 0.5), ("fc2", 1.5), ("fc3", 1.5)):
        w = before[f"{layer}.weight"]
        mu, sigma = float(w.abs().mean()), float(w.abs().std(correction=0))
        a, _ = surgery_thresholds(mu, sigma, c)
        expected = w.abs() >= a  # the first update from an all-kept mask: |w| < a pruned
        assert torch.equal(dns.masks[f"{layer}.weight"], expected), layer
    assert dns.stats["fc1.weight"][0] == pytest.approx(float(before["fc1.weight"].abs().mean()))


@pytest.mark.parametrize(
    ("c", "match"),
    [
        ({"fc1": 1.0}, r"layer 'fc2' matches no pattern of `c`"),
        ({"fc*": 1.0, "conv*": 2.0}, r"`c` pattern\(s\) \['conv\*'\] match no targeted layer"),
    ],
)
def test_c_mapping_must_cover_the_layers_before_training(tmp_path: Path, c: Any, match: str) -> None:
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, [lc.DynamicNetworkSurgery(c=c)], epochs=1).fit(model, tiny_data())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("calibration", ["global", "shared_c", "local"])
def test_calibrations_reach_the_target(tmp_path: Path, calibration: str) -> None:
    torch.manual_seed(0)
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.6, start=0, end=8, stop=16, calibration=calibration)
    model = MLP()
    _trainer(tmp_path, [dns], epochs=3).fit(model, tiny_data())
    if calibration == "local":
        for name in dns.masks.names:
            assert dns.layer_sparsity[name.rpartition(".")[0]] == pytest.approx(0.6, abs=0.01)
    assert dns.sparsity == pytest.approx(0.6, abs=1e-3)
    if calibration == "shared_c":
        assert isinstance(dns.current_c, float)
    else:
        assert set(dns.current_c) == set(dns.masks.names)


def test_logs_sparsity_and_spliced_entries(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dns = lc.DynamicNetworkSurgery(
        target_sparsity=0.7, start=0, end=8, stop=30, gamma=0.01, log_per_layer=True
    )
    logger = CSVLogger(tmp_path, name="logs")
    trainer = _trainer(tmp_path, [dns], epochs=3, logger=logger, log_every_n_steps=2)
    trainer.fit(MLP(), tiny_data())
    metrics = trainer.logged_metrics
    assert float(metrics["sparsity"]) == pytest.approx(0.7, abs=1e-3)
    for key in ("dns/spliced", "dns/updates", "dns/threshold", "sparsity/fc1", "dns/c/fc1"):
        assert key in metrics, key
    import csv

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    spliced = [float(r["dns/spliced"]) for r in rows if r.get("dns/spliced")]
    assert len(spliced) >= 5
    assert sum(spliced) == dns.spliced_total > 0


def test_two_optimizers_with_manual_optimization(tmp_path: Path) -> None:
    """A GAN-style module: the other network's weights are never changed in place mid-step."""

    class TwoNets(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
            self.disc = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> None:
            g_opt, d_opt = self.optimizers()
            fake = self.gen(batch[0])
            d_loss = self.disc(fake.detach()).mean() - self.disc(batch[0]).mean()
            d_opt.zero_grad()
            self.manual_backward(d_loss)
            d_opt.step()
            g_loss = -self.disc(fake).mean()  # reuses the generator graph after the disc step
            g_opt.zero_grad()
            self.manual_backward(g_loss)
            g_opt.step()

        def configure_optimizers(self) -> Any:
            return [
                torch.optim.Adam(self.gen.parameters(), 1e-3),
                torch.optim.SGD(self.disc.parameters(), 1e-2),
            ]

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=8)
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.5, start=0, end=10, stop=20, gamma=0.0)
    model = TwoNets()
    _trainer(tmp_path, [dns], epochs=4).fit(model, data)
    assert dns.frozen
    for name in dns.masks.names:
        assert float((model.get_parameter(name) == 0).float().mean()) > 0.2
    assert dns.sparsity == pytest.approx(0.5, abs=1e-3)


def test_optimizer_state_of_pruned_entries_is_clean_after_stop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.7, start=0, end=4, stop=8, gamma=0.0)
    model = MLP(optimizer="adam")
    trainer = _trainer(tmp_path, [dns], epochs=4)
    trainer.fit(model, tiny_data())
    opt = trainer.optimizers[0]
    for name in dns.masks.names:
        p, mask = model.get_parameter(name), dns.masks[name]
        state = opt.state[p]
        assert torch.all(state["exp_avg"][~mask] == 0)
        assert not bool((model.get_parameter(name)[~mask] != 0).any())
    assert math.isclose(dns.sparsity, 0.7, abs_tol=1e-3)


@pytest.mark.parametrize("every", [1, 5])
def test_calibrate_every_lands_exactly_and_resumes_exactly(tmp_path: Path, every: int) -> None:
    sched = {"target_sparsity": 0.7, "start": 0, "end": 8, "stop": 28, "gamma": 0.0, "calibrate_every": every}

    def run(callbacks: list[Any], epochs: int, ckpt_path: str | None = None, **kw: Any) -> nn.Module:
        pl.seed_everything(0)
        model = MLP()
        _trainer(tmp_path, callbacks, epochs=epochs, **kw).fit(model, tiny_data(), ckpt_path=ckpt_path)
        return model

    ref_cb = lc.DynamicNetworkSurgery(**sched)
    ref = run([ref_cb], epochs=4)
    assert ref_cb.updates == 28  # gamma=0: every step until stop
    names = ref_cb.masks.names
    assert _sparsity_of(ref, names) == pytest.approx(0.7, abs=1e-3)  # calibrated right before stop
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    with pytest.raises(RuntimeError, match="simulated crash"):  # the same run, stopped mid-surgery
        run(
            [lc.DynamicNetworkSurgery(**sched), ckpt, _Crash(at_step=19)], epochs=4, enable_checkpointing=True
        )
    resumed_cb = lc.DynamicNetworkSurgery(**sched)
    resumed = run([resumed_cb], epochs=4, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    for name in names:
        assert torch.equal(resumed_cb.masks[name], ref_cb.masks[name])
    for name, p in ref.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), p, rtol=0, atol=0)


class _Crash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _sparsity_of(model: nn.Module, names: list[str]) -> float:
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / sum(model.get_parameter(n).numel() for n in names)


def test_resume_after_stop_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """A checkpoint taken once the masks are fixed (dense copy dropped) resumes into masked training."""

    def run(callbacks: list[Any], epochs: int, ckpt_path: str | None = None, **kw: Any) -> nn.Module:
        pl.seed_everything(0)
        model = MLP()
        _trainer(tmp_path, callbacks, epochs=epochs, **kw).fit(model, tiny_data(), ckpt_path=ckpt_path)
        return model

    sched = {"target_sparsity": 0.7, "start": 0, "end": 6, "stop": 12, "gamma": 0.01}
    ref_cb = lc.DynamicNetworkSurgery(**sched)
    ref = run([ref_cb], epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    first = lc.DynamicNetworkSurgery(**sched)
    run([first, ckpt], epochs=2, enable_checkpointing=True)  # 16 steps: frozen at 12
    assert first.frozen
    resumed_cb = lc.DynamicNetworkSurgery(**sched)
    resumed = run([resumed_cb], epochs=4, ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert resumed_cb.frozen
    assert resumed_cb.dense == {}
    for name in ref_cb.masks.names:
        assert torch.equal(resumed_cb.masks[name], ref_cb.masks[name])
    for name, p in ref.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), p, rtol=0, atol=0)


def test_a_step_the_optimizer_skips_leaves_the_weights_masked(tmp_path: Path) -> None:
    """``on_before_optimizer_step`` without ``optimizer.step()`` (as Lightning's fp16 AMP plugin does when
    ``training_step`` returns ``None``): the dense W that went in before the step is taken out at batch end."""
    from pytorch_lightning.plugins.precision import Precision

    class SkipsLikeAmp(Precision):
        def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
            result = self._wrap_closure(model, optimizer, closure)  # backward + on_before_optimizer_step
            return None if result is None else optimizer.step(**kwargs)

    class SometimesNone(MLP):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            if batch_idx % 3 == 0:
                loss.backward()  # gradients exist, but the step is skipped
                return None
            return loss

    torch.manual_seed(0)
    # schedule="constant", huge gamma: one update at the start, none later that would reset the weights
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.7, schedule="constant", stop=1.0, gamma=1e6)
    rec = _Recorder(dns)  # asserts weights == dense * mask at every batch start
    trainer = _trainer(tmp_path, [dns, rec], epochs=2, plugins=[SkipsLikeAmp()])
    trainer.fit(SometimesNone(), tiny_data())
    assert rec.checked > 10
