"""StructuredPruning and NetworkSlimming beyond the shared battery.

Physical removal preserves the soft-masked function exactly, budgets are met through the cost
model, optimizer state follows the surviving channels, bad input fails before any weight changes,
and the technique works on models we did not write (Lightning's Transformer, BoringModel, a module
with two optimizers under manual optimization).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.loggers.logger import Logger
from test_foreign_models import GAN, VOCAB, OfflineTransformer, real_data, token_data
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_compress as lc
from lightning_compress.core.channel_importance import (
    BNScaleImportance,
    FPGMImportance,
    GroupTaylorImportance,
    NormImportance,
)
from lightning_compress.core.channels import build_channel_groups, channel_masks, removal_ops
from lightning_compress.core.cost import model_costs
from lightning_compress.core.engine import CompressionEngine
from lightning_compress.core.surgery import apply_ops
from lightning_compress.demos import LeNet300100BN, SmallMobileNet, SmallResNet, SmallVGG
from lightning_compress.functional.structured import (
    global_channel_keep,
    keep_lowest_removed,
    local_channel_keep,
    rounded_removal,
    search_removal,
)


def images(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


SMALL = {
    "vgg": lambda: SmallVGG(width=8),
    "resnet": lambda: SmallResNet(width=8),
    "mobilenet": lambda: SmallMobileNet(width=8),
    "mlp-bn": lambda: LeNet300100BN(hidden=(64, 32)),
}


def _total_macs(model: nn.Module) -> int:
    cost = model_costs(model, model.example_input_array)
    return sum(r.dense_macs or 0 for r in cost.layers) + sum(cost.unattributed.values())


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


# ---------------------------------------------------------------------------- kernels
def test_rounded_removal_rounds_the_kept_width_to_a_multiple() -> None:
    assert rounded_removal(20, 5, None) == 5
    assert rounded_removal(20, 5, 8) == 4  # keep 15 -> 16
    assert rounded_removal(16, 5, 8) == 8  # keep 11 -> 8 (nearest), not 16
    assert rounded_removal(20, 13, 8) == 12  # keep 7 -> 8
    assert rounded_removal(20, 20, 8) == 12  # never below one multiple
    assert rounded_removal(20, 30, None) == 19  # at least one channel stays
    assert rounded_removal(16, 3, 8, floor=8) == 0  # keep 13 -> 16


def test_global_keep_honours_previous_floors_and_ties() -> None:
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.6])]
    keep = global_channel_keep(scores, 3)  # 0.5, 1.0, 2.0 are the three lowest
    assert keep[0].tolist() == [False, False, True, True]
    assert keep[1].tolist() == [False, True]
    keep = global_channel_keep(scores, 5)
    assert keep[1].tolist() == [False, True]  # the floor keeps the best channel of every group
    prev = [torch.tensor([True, True, True, False]), torch.ones(2, dtype=torch.bool)]
    keep = global_channel_keep(scores, 2, previous=prev)
    assert keep[0].tolist() == [True, True, True, False]  # previously removed goes first
    assert keep[1].tolist() == [False, True]
    ties = keep_lowest_removed(torch.zeros(4), 2)
    assert ties.tolist() == [False, False, True, True]  # stable: identical on every rank


def test_local_keep_and_search() -> None:
    scores = [torch.arange(8.0), torch.arange(4.0)]
    keep = local_channel_keep(scores, 0.5)
    assert [int(k.sum()) for k in keep] == [4, 2]
    assert search_removal(lambda n: 1.0 - n / 10, 0.35, 0, 10) == 7
    assert search_removal(lambda n: 1.0, 0.5, 0, 10) == 10  # unreachable: the caller checks


# ---------------------------------------------------------------------------- groups and importance
def test_groups_couple_residual_depthwise_and_flatten_and_leave_outputs_alone() -> None:
    model = SmallMobileNet(width=8)
    groups, skipped = build_channel_groups(model, model.example_input_array)
    assert any("its channels are returned by the model's forward" in r for r in skipped.values())
    assert groups
    depthwise = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    touched = {m.tensor for g in groups for m in g.members}
    assert any(f"{n}.weight" in touched for n in depthwise)
    x = torch.randn(3, 1, 28, 28)
    keep = [
        torch.rand(g.size, generator=torch.Generator().manual_seed(i)) > 0.5 for i, g in enumerate(groups)
    ]
    for k in keep:
        k[0] = True
    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, mask in channel_masks(masked, groups, keep).items():
            masked.get_parameter(name).mul_(mask)
    pruned = copy.deepcopy(model).eval()
    apply_ops(pruned, removal_ops(pruned, groups, keep))
    torch.testing.assert_close(_outputs(pruned, x), _outputs(masked, x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_importance_scores_follow_their_definitions() -> None:
    model = SmallVGG(width=8)
    groups, _ = build_channel_groups(model, model.example_input_array)
    first = groups[0]
    conv = model.get_parameter(first.weights("out")[0].tensor)
    l1 = NormImportance(1).scores(model, groups)[0]
    torch.testing.assert_close(l1, conv.detach().double().abs().sum((1, 2, 3)))
    l2 = NormImportance(2).scores(model, groups)[0]
    torch.testing.assert_close(l2, conv.detach().double().flatten(1).norm(dim=1))
    rows = conv.detach().flatten(1).double()
    torch.testing.assert_close(FPGMImportance().scores(model, groups)[0], torch.cdist(rows, rows).sum(1))
    gamma = model.get_parameter(first.norms()[0].tensor)
    torch.testing.assert_close(BNScaleImportance().scores(model, groups)[0], gamma.detach().abs().double())


def test_group_taylor_is_the_squared_sum_of_grad_times_weight() -> None:
    model = SmallVGG(width=8)
    groups, _ = build_channel_groups(model, model.example_input_array)
    (first,) = [i for i, g in enumerate(groups) if "features.0" in g.layers]
    taylor = GroupTaylorImportance()
    taylor.attach(model, groups)
    (constraint,) = taylor.constraints()
    run = constraint.bind(constraint.params)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    run()
    score = taylor.scores(model, groups)[first]

    # Written out by hand for the first block: conv0's filters, BatchNorm 1's scale and shift, and
    # conv3's input channels all belong to channel c.
    def gw(name: str) -> Tensor:
        p = model.get_parameter(name)
        return (p.grad * p).detach().double()

    expected = (
        gw("features.0.weight").sum((1, 2, 3))
        + gw("features.1.weight")
        + gw("features.1.bias")
        + gw("features.3.weight").sum((0, 2, 3))
    ).square()
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------- fits
class _AroundSurgery:
    """Records the eval outputs right before and right after every structure change."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, x: Tensor) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.optimizer_state: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        original = CompressionEngine.change_structure

        def wrapped(engine: CompressionEngine, tr: pl.Trainer, pl_module: Any, *args: Any, **kw: Any) -> Any:
            before = _outputs(pl_module, x)
            state_before = self._momenta(tr, pl_module)
            out = original(engine, tr, pl_module, *args, **kw)
            self.pairs.append((before, _outputs(pl_module, x)))
            self.optimizer_state.append((state_before, self._momenta(tr, pl_module)))
            return out

        monkeypatch.setattr(CompressionEngine, "change_structure", wrapped)

    @staticmethod
    def _momenta(tr: pl.Trainer, pl_module: nn.Module) -> dict[str, Tensor]:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        out = {}
        for opt in tr.optimizers:
            for p, state in opt.state.items():
                if "momentum_buffer" in state and id(p) in names:
                    out[names[id(p)]] = state["momentum_buffer"].clone()
        return out


@pytest.mark.parametrize("name", list(SMALL))
def test_hard_prune_keeps_the_function_and_shrinks_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    pl.seed_everything(0)
    model = SMALL[name]()
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = _total_macs(model)
    spy = _AroundSurgery(monkeypatch, torch.randn(4, 1, 28, 28))
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=6, frequency=2, round_to=4)
    trainer(tmp_path, [sp], max_epochs=3).fit(model, images())
    assert sp.hard_pruned
    (before, after), *_ = spy.pairs
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < dense_params
    assert _total_macs(model) < dense_macs
    assert sp.macs_kept == pytest.approx(_total_macs(model) / dense_macs, rel=1e-6)
    for layer, (original, kept) in sp.removed.items():
        assert kept % 4 == 0 or kept == original, (layer, kept)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_round_to_gives_multiples_and_target_ratio_is_met(tmp_path: Path, ratio: float) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=16)
    sp = lc.StructuredPruning(target_ratio=ratio, start=0, end=4, frequency=2, round_to=8)
    trainer(tmp_path, [sp], max_epochs=2).fit(model, images())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert ratio <= sp.channel_ratio <= ratio + 0.05  # met, overshooting by less than a block per layer


@pytest.mark.parametrize(("budget", "scope"), [("target_macs", "global"), ("target_params", "local")])
def test_budget_is_met_through_the_cost_model(tmp_path: Path, budget: str, scope: str) -> None:
    pl.seed_everything(0)
    model = SmallResNet(width=8)
    dense = {"target_macs": _total_macs(model), "target_params": sum(p.numel() for p in model.parameters())}
    sp = lc.StructuredPruning(**{budget: 0.5}, scope=scope, start=0, end=4, frequency=2)
    trainer(tmp_path, [sp], max_epochs=2).fit(model, images())
    now = {"target_macs": _total_macs(model), "target_params": sum(p.numel() for p in model.parameters())}
    kept = now[budget] / dense[budget]
    assert 0.42 < kept <= 0.5 + 1e-9, kept


def test_local_scope_prunes_every_group_alike(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, scope="local", start=0, end=2, frequency=1)
    trainer(tmp_path, [sp], max_epochs=1).fit(model, images())
    assert len(sp.removed) >= 6
    for layer, (original, kept) in sp.removed.items():
        assert kept == original // 2, layer


@pytest.mark.parametrize("carry", [True, False])
def test_optimizer_state_follows_the_surviving_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, carry: bool
) -> None:
    pl.seed_everything(0)
    model = LeNet300100BN(hidden=(32, 16), optimizer="sgd", lr=0.05)
    spy = _AroundSurgery(monkeypatch, torch.randn(4, 1, 28, 28))
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=4, frequency=2, carry_optimizer_state=carry)
    trainer(tmp_path, [sp], max_epochs=2).fit(model, images())
    (before, after), *_ = spy.optimizer_state
    if not carry:
        assert not after
        return
    w_before = before["fc1.weight"]
    w_after = after["fc1.weight"]
    assert w_after.shape[0] == 16
    # every surviving row's momentum is one of the old rows, in order
    kept = [int(torch.where((w_before == row).all(1))[0][0]) for row in w_after]
    assert kept == sorted(kept)
    torch.testing.assert_close(after["bn1.weight"], before["bn1.weight"][kept])
    columns = before["fc2.weight"][:, kept]  # fc2 lost rows too: each kept row, sliced to fc1's survivors
    for row in after["fc2.weight"]:
        assert (columns == row).all(1).any()


def test_lr_scheduler_position_is_kept(tmp_path: Path) -> None:
    class Scheduled(SmallVGG):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    pl.seed_everything(0)
    model = Scheduled(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=5, frequency=2)
    tr = trainer(tmp_path, [sp], max_epochs=2)
    tr.fit(model, images())
    assert sp.hard_pruned
    # 8 steps: lr halves at 3 and 6 whatever the rebuild at step 5
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert tr.lr_scheduler_configs[0].scheduler.last_epoch == 8


def test_example_input_is_taken_from_the_first_batch(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    model.example_input_array = None
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=2, frequency=1)
    trainer(tmp_path, [sp], max_epochs=1).fit(model, images())
    assert sp.hard_pruned
    assert sp.removed


def test_logs_reach_the_loggers(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=2, frequency=1)
    tr = trainer(tmp_path, [sp], max_epochs=1, log_every_n_steps=1)
    tr.fit(model, images())
    assert float(tr.callback_metrics["structured/channel_ratio"]) == pytest.approx(sp.channel_ratio)
    assert float(tr.callback_metrics["structured/macs_kept"]) == pytest.approx(sp.macs_kept)


# ---------------------------------------------------------------------------- bad input
def _unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Untraceable(SmallVGG):
    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # Torch-Pruning traces with autograd: break it there
            raise RuntimeError("custom op without autograd")
        return super().forward(x)


class _NoBN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 32), nn.Linear(32, 10)
        self.example_input_array = torch.zeros(2, 784)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("make_model", "callback", "match"),
    [
        (
            lambda: SmallVGG(width=8),
            lambda: lc.StructuredPruning(target_macs=0.001),
            r"`target_macs`=0.001 cannot be met without emptying a layer: .* expected target_macs >= 0\.0",
        ),
        (
            lambda: SmallVGG(width=8),
            lambda: lc.StructuredPruning(target_ratio=0.999),
            r"`target_ratio`=0.999 cannot be met without emptying a layer",
        ),
        (
            lambda: SmallVGG(width=8),
            lambda: lc.StructuredPruning(target_ratio=0.95, scope="local"),
            r"`target_ratio`=0.95 with scope='local' would empty layer 'features\.\d+'",
        ),
        (
            lambda: SmallVGG(width=8),
            lambda: lc.StructuredPruning(round_to=16),
            r"`round_to`=16 is larger than the width of layer 'features\.\d+' \(8 channels\)",
        ),
        (
            lambda: _Untraceable(width=8),
            lambda: lc.StructuredPruning(),
            r"Torch-Pruning could not trace _Untraceable",
        ),
        (
            _NoBN,
            lambda: lc.NetworkSlimming(),
            r"NetworkSlimming needs BatchNorm layers .* but _NoBN has none",
        ),
        (
            BoringModel,
            lambda: lc.StructuredPruning(),
            r"no channel group of BoringModel can be pruned \('layer': its channels are returned by the model's forward\)",
        ),
        (
            lambda: SmallVGG(width=8),
            lambda: lc.StructuredPruning(exclude=["features.*"]),
            r"no channel group of SmallVGG can be pruned .*is not in `targets` or is in `exclude`",
        ),
    ],
)
def test_bad_input_fails_in_setup_before_any_weight_changes(
    tmp_path: Path, make_model: Any, callback: Any, match: str
) -> None:
    pl.seed_everything(0)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = images() if not isinstance(model, BoringModel) else model.train_dataloader()
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [callback()], max_epochs=1).fit(model, data)
    _unchanged(model, before)


def test_hard_prune_before_end_is_refused(tmp_path: Path) -> None:
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(start=0, end=6, hard_prune_at=3)
    with pytest.raises(ValueError, match=r"`hard_prune_at`=3 \(step 3\) is before `end`=6 \(step 6\)"):
        trainer(tmp_path, [sp], max_epochs=3).fit(model, images())


# ---------------------------------------------------------------------------- network slimming
class _Histograms(Logger):
    """A logger whose experiment takes histograms (as TensorBoard's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.histograms: list[tuple[str, Tensor, int]] = []
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "histograms"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> Any:
        return self

    def add_histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.histograms.append((tag, values.clone(), step))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_network_slimming_on_the_bn_mlp_shrinks_gammas_and_removes_neurons(tmp_path: Path) -> None:
    def fit(lam: float) -> tuple[lc.NetworkSlimming, nn.Module, _Histograms]:
        pl.seed_everything(0)
        model = LeNet300100BN(hidden=(64, 32), optimizer="sgd", lr=0.05)
        ns = lc.NetworkSlimming(lam=lam, channel_ratio=0.5, prune_at=12)
        logger = _Histograms()
        trainer(tmp_path, [ns], max_epochs=4, logger=logger, log_every_n_steps=1).fit(model, images())
        return ns, model, logger

    plain_ns, _, plain_logger = fit(0.0)
    ns, model, logger = fit(0.5)
    assert ns.hard_pruned
    assert model.fc1.out_features + model.fc2.out_features == 48  # half of 64 + 32, global threshold
    assert model.bn1.num_features == model.fc1.out_features
    assert model.fc2.in_features == model.fc1.out_features
    assert model.fc3.in_features == model.fc2.out_features
    (kept,) = [m for m in logger.metrics if "channels_kept/fc1" in m]  # logged once, at the prune
    assert kept["channels_kept/fc1"] == model.fc1.out_features
    assert kept["channels_kept/fc2"] == model.fc2.out_features
    tags = {t for t, _, _ in logger.histograms}
    assert tags == {"slimming/gamma"}
    first = logger.histograms[0][1]
    assert first.numel() == 96
    assert any("slimming/gamma_mean" in m for m in logger.metrics)

    # the L1 penalty drove gammas down before the prune (plain run: lam = 0)
    def last_mean(lg: _Histograms) -> float:
        return [m["slimming/gamma_mean"] for m in lg.metrics if "slimming/gamma_mean" in m][-1]

    assert last_mean(logger) < last_mean(plain_logger) - 0.15
    assert ns.current_lam == 0.0  # no penalty while fine-tuning
    assert plain_ns.hard_pruned


def test_network_slimming_prunes_the_smallest_gammas(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = LeNet300100BN(hidden=(8, 8), optimizer="sgd", lr=1e-9)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.9, 0.01, 0.8, 0.02, 0.7, 0.6, 0.03, 0.5]))
        model.bn2.weight.copy_(torch.tensor([0.04, 0.9, 0.9, 0.9, 0.05, 0.9, 0.9, 0.9]))
    ns = lc.NetworkSlimming(lam=0.0, channel_ratio=5 / 16, prune_at=0)
    trainer(tmp_path, [ns], max_epochs=1).fit(model, images())
    assert ns.removed == {"fc1": [8, 5], "bn1": [8, 5], "fc2": [8, 6], "bn2": [8, 6]}
    assert model.bn1.weight.detach().min() > 0.1


# ---------------------------------------------------------------------------- models we did not write
def test_structured_pruning_on_lightning_transformer(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = OfflineTransformer(vocab_size=VOCAB)
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=10, frequency=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [sp, ckpt], max_epochs=3, enable_checkpointing=True).fit(model, token_data())
    assert sp.removed
    assert all(name.endswith("linear1") for name in sp.removed)  # the FFN widths
    assert any("LayerNorm" in reason for reason in sp.skipped.values())  # the embedding width stays
    loaded = lc.load_checkpoint(OfflineTransformer, ckpt.last_model_path, vocab_size=VOCAB)
    inputs, target = next(iter(token_data()))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs, target), model(inputs, target), rtol=0, atol=0)


class TwoOptimizers(pl.LightningModule):
    """A user-style module: backbone and head with their own optimizers, manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_b, opt_h = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        opt_b.zero_grad()
        opt_h.zero_grad()
        self.manual_backward(loss)
        opt_b.step()
        opt_h.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.backbone.parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(self.head.parameters(), lr=1e-3),
        ]


def test_two_optimizers_under_manual_optimization(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TwoOptimizers()
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=4, frequency=2)
    tr = trainer(tmp_path, [sp], max_epochs=3)
    tr.fit(model, images())
    assert sp.hard_pruned
    assert model.backbone[0].out_channels + model.backbone[3].out_channels == 12
    assert model.head[3].in_features == model.backbone[3].out_channels
    opt_b, opt_h = tr.optimizers
    assert {id(p) for p in opt_b.param_groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in opt_h.param_groups[0]["params"]} == {id(p) for p in model.head.parameters()}
    assert all(s for s in opt_h.state.values())  # Adam moments carried (and used after the prune)


def test_gan_without_a_forward_is_refused_clearly(tmp_path: Path) -> None:
    model = GAN()
    with pytest.raises(ValueError, match=r"StructuredPruning needs the model's input to trace its channels"):
        trainer(tmp_path, [lc.StructuredPruning()], max_epochs=1).fit(model, real_data())


def test_hard_prune_after_the_last_step_happens_at_the_last_step(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=2, frequency=1, hard_prune_at=1000)
    trainer(tmp_path, [sp], max_epochs=1).fit(model, images())  # 4 steps
    assert sp.hard_pruned


# ---------------------------------------------------------------------------- groups left alone
class _Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.c(x).chunk(2, 1)
        return self.fc(torch.cat([self.a(a), self.b(b)], 1).mean((2, 3)))


class _ReturnsFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = torch.relu(self.bn(self.c(x)))
        return self.fc(features.mean((2, 3))), features


class _ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.c(x).permute(0, 2, 3, 1).flatten(1))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.h = nn.Embedding(20, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.h(self.emb(x))))


class _LayerNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.ln(self.a(x)))


@pytest.mark.parametrize(
    ("model", "example", "layer", "reason"),
    [
        (_Chunk(), torch.randn(2, 3, 8, 8), "c", "passes through a split of the channel dimension"),
        (
            _ReturnsFeatures(),
            torch.randn(2, 3, 8, 8),
            "c",
            "its channels are returned by the model's forward",
        ),
        (_ChannelsLast(), torch.randn(2, 3, 8, 8), "c", "removing its channels would change what the model"),
        (_Tied(), torch.randint(0, 20, (2, 5)), "h", "'out.weight' is shared with another layer (tied"),
        (_LayerNormed(), torch.randn(2, 8), "a", "layer 'ln' (LayerNorm), which cannot be sliced exactly"),
    ],
    ids=["chunk", "returned-features", "channels-last-flatten", "tied-weights", "layernorm"],
)
def test_groups_that_cannot_be_removed_exactly_are_left_alone(
    model: nn.Module, example: Tensor, layer: str, reason: str
) -> None:
    groups, skipped = build_channel_groups(model, example)
    assert layer not in [g.name for g in groups]
    assert reason in skipped[layer]
    for g in groups:  # what is left is removed exactly
        assert removal_preserves_function_of(model, example, g)


def removal_preserves_function_of(model: nn.Module, example: Tensor, group: Any) -> bool:
    from lightning_compress.core.channels import removal_preserves_function

    keep = torch.arange(group.size) % 2 == 0
    return removal_preserves_function(model, example, [group], [keep])


def test_fuse_leaves_a_layer_whose_output_is_returned() -> None:
    model = _ReturnsFeatures().eval()

    class Raw(nn.Module):  # returns the conv output itself
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            raw = self.c(x)
            return self.bn(raw), raw

    assert lc.fuse(model, torch.randn(2, 3, 8, 8)).fused_pairs == [("c", "bn")]  # bn output returned: fine
    with pytest.warns(UserWarning, match="no Conv/Linear-BatchNorm pair"):
        assert lc.fuse(Raw().eval(), torch.randn(2, 3, 8, 8)).fused_pairs == []


# ---------------------------------------------------------------------------- stops and checkpoints
class _StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.at = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.at:
            trainer.should_stop = True


def test_a_fit_stopped_early_still_removes_the_masked_channels(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=20, frequency=2)
    with pytest.warns(UserWarning, match=r"training ended at step \d+ before the channels were removed"):
        trainer(tmp_path, [sp, _StopAt(6)], max_epochs=10).fit(model, images())
    assert sp.hard_pruned
    assert 0 < sp.channel_ratio < 0.5
    assert sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) < 8 * (
        1 + 1 + 2 + 2 + 4 + 4
    )


def test_validate_and_test_with_ckpt_path_follow_the_structure(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, start=0, end=6, frequency=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    tr = trainer(tmp_path, [sp, ckpt], max_epochs=3, enable_checkpointing=True)
    tr.fit(model, images(), val_dataloaders=images(n=16))
    before = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    after = tmp_path / "ckpt" / "epoch=2-step=12.ckpt"
    assert before.exists()
    assert after.exists()
    tr.validate(model, images(n=16), ckpt_path=str(after), verbose=False)  # same structure: loads
    fresh = SmallVGG(width=8)  # a fresh model gets the checkpoint's structure first
    tr.validate(fresh, images(n=16), ckpt_path=str(after), verbose=False)
    for name, p in model.named_parameters():
        assert torch.equal(fresh.get_parameter(name), p), name
    with pytest.raises(
        RuntimeError,
        match=r"was saved before this SmallVGG went through \d+ more structure ops .*load_checkpoint\(SmallVGG",
    ):
        tr.test(model, images(n=16), ckpt_path=str(before), verbose=False)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_reduced_precision_fits(tmp_path: Path, precision: str) -> None:
    pl.seed_everything(0)
    model = SmallVGG(width=8)
    sp = lc.StructuredPruning(target_ratio=0.5, criterion="taylor", start=0, end=2, frequency=1)
    trainer(tmp_path, [sp, lc.LayerFusion()], max_epochs=1, precision=precision).fit(model, images())
    assert sp.hard_pruned
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
