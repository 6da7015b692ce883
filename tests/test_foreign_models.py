"""GradualPruning on models we did not write, and on training loops written the way users write them.

* Lightning's own demos: ``LightningTransformer`` (an ``nn.Transformer`` language model: fused
  attention ``in_proj_weight``, an output projection called ``decoder``, a shared embedding) and
  ``BoringModel`` (one ``Linear(32, 2)``, an LR scheduler, a checkpoint round trip).
* Manual optimization: a GAN (two optimizers, discriminator step then generator step in every
  batch), a network frozen for some batches, manual gradient accumulation, ``max_steps``.
* A distillation wrapper whose ``compression_root`` is its student.
* ``nn.MultiheadAttention`` with ``kdim``/``vdim`` (separate q/k/v projection weights).
* The GAN and the distillation wrapper under 2-process CPU DDP (slow).

Every test trains on tiny random data on CPU; nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.demos.transformer import LightningTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning

# ---------------------------------------------------------------------------- helpers


def _pruned_total(cb: GradualPruning) -> tuple[int, int]:
    counts = cb.masks.counts().values()
    return sum(z for z, _ in counts), sum(t for _, t in counts)


def _assert_exact(cb: GradualPruning, sparsity: float) -> None:
    """Exactly round(sparsity * n) weights pruned over all masks, and ``cb.sparsity`` says so."""
    pruned, total = _pruned_total(cb)
    assert pruned == round(sparsity * total)
    assert cb.sparsity == pruned / total


def _assert_masks_hold(cb: GradualPruning) -> None:
    """Every pruned entry is an exact zero in the live parameter."""
    for name in cb.masks.names:
        w = cb.masks.parameter(name).detach()
        assert not w[~cb.masks[name]].any(), name


def _zero_fraction(w: Tensor) -> float:
    return int((w == 0).sum()) / w.numel()


def _check_layer_floor(cb: GradualPruning) -> None:
    """Global scope: no layer keeps fewer than ceil(min_density * n) weights."""
    for name in cb.masks.names:
        mask = cb.masks[name]
        assert int(mask.sum()) >= math.ceil(cb.min_density * mask.numel()), name


# ---------------------------------------------------------------------------- 1. LightningTransformer

VOCAB = 100


class OfflineTransformer(LightningTransformer):
    """Lightning's demo model, unchanged but for ``prepare_data`` (which would download WikiText2)."""

    def prepare_data(self) -> None:
        pass


def token_data(n: int = 48, length: int = 8, batch_size: int = 4) -> DataLoader:
    """Random next-token pairs in the demo's batch format: ``(inputs, target)``, both ``(B, T)`` int64."""
    gen = torch.Generator().manual_seed(7)
    seq = torch.randint(0, VOCAB, (n, length + 1), generator=gen)
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=batch_size, shuffle=False)


def _fit_transformer(tmp_path: Path, cb: GradualPruning, epochs: int = 3) -> OfflineTransformer:
    pl.seed_everything(0)
    model = OfflineTransformer(vocab_size=VOCAB)
    trainer(tmp_path, [cb], max_epochs=epochs).fit(model, token_data())  # 12 steps per epoch
    return model


def _transformer_loss(model: OfflineTransformer) -> Tensor:
    inputs, target = next(iter(token_data()))
    model.eval()
    with torch.no_grad():
        return nn.functional.nll_loss(model(inputs, target), target.reshape(-1))


@pytest.mark.parametrize(
    ("sparsity", "criterion"), [(0.8, "magnitude"), (0.9, "magnitude"), (0.9, "taylor"), (0.9, "activation")]
)
def test_transformer_global_pruning_reaches_attention_and_keeps_the_output_floor(
    tmp_path: Path, sparsity: float, criterion: str
) -> None:
    cb = GradualPruning(target_sparsity=sparsity, end=0.75, frequency=4, criterion=criterion)
    model = _fit_transformer(tmp_path, cb)

    params = dict(model.named_parameters())
    self_attn = [n for n in params if n.endswith("self_attn.in_proj_weight")]
    cross_attn = [n for n in params if n.endswith("multihead_attn.in_proj_weight")]
    assert len(self_attn) == 4
    assert len(cross_attn) == 2
    for name in self_attn + cross_attn:
        assert name in cb.masks.names
        pruned = int((~cb.masks[name]).sum())
        assert pruned > 0.5 * cb.masks[name].numel(), name  # really pruned, not just registered
        assert int((params[name] == 0).sum()) >= pruned
    # The output projection (vocab logits) is pruned but keeps its per-layer floor.
    decoder = params["model.decoder.weight"]
    assert "model.decoder.weight" in cb.masks.names
    assert int((decoder != 0).sum()) >= math.ceil(cb.min_density * decoder.numel())
    _check_layer_floor(cb)
    # Biases, LayerNorms and the (opt-in) embedding are untouched.
    assert "model.embedding.weight" not in cb.masks.names
    assert all(n.endswith("weight") and "norm" not in n for n in cb.masks.names)
    _assert_exact(cb, sparsity)
    _assert_masks_hold(cb)
    assert torch.isfinite(_transformer_loss(model))


def test_transformer_local_scope_prunes_every_attention_projection_to_the_target(tmp_path: Path) -> None:
    cb = GradualPruning(target_sparsity=0.8, end=0.5, frequency=4, scope="local")
    model = _fit_transformer(tmp_path, cb, epochs=2)
    in_proj = [n for n, _ in model.named_parameters() if n.endswith("in_proj_weight")]
    assert len(in_proj) == 6
    for name in in_proj:
        n = cb.masks[name].numel()
        assert int((~cb.masks[name]).sum()) == round(0.8 * n), name
        assert _zero_fraction(model.get_parameter(name)) == pytest.approx(0.8, abs=1e-4)
    _assert_masks_hold(cb)


def test_transformer_exclude_by_full_name_leaves_the_output_projection_dense(tmp_path: Path) -> None:
    cb = GradualPruning(target_sparsity=0.9, end=0.5, frequency=4, exclude=["model.decoder"])
    model = _fit_transformer(tmp_path, cb, epochs=2)
    assert "model.decoder.weight" not in cb.masks.names
    assert int((model.model.decoder.weight == 0).sum()) == 0
    # the decoder *stack* of nn.Transformer is a different module and still pruned
    assert any(n.startswith("model.transformer.decoder.") for n in cb.masks.names)
    _assert_exact(cb, 0.9)
    _assert_masks_hold(cb)


def test_transformer_exclude_pattern_that_matches_nothing_is_refused(tmp_path: Path) -> None:
    """``exclude=["decoder"]`` matches no module of LightningTransformer (its output projection is
    ``model.decoder``): silently ignoring it would prune the layer the user meant to keep dense."""
    cb = GradualPruning(target_sparsity=0.9, end=0.5, frequency=4, exclude=["decoder"])
    with pytest.raises(ValueError, match=r"`exclude` pattern 'decoder' matches no module.*'\*decoder'"):
        _fit_transformer(tmp_path, cb, epochs=1)


@pytest.mark.parametrize("include", [True, False])
def test_transformer_embedding_is_pruned_only_on_request(tmp_path: Path, include: bool) -> None:
    cb = GradualPruning(target_sparsity=0.5, end=0.5, frequency=4, scope="local", include_embeddings=include)
    model = _fit_transformer(tmp_path, cb, epochs=2)
    emb = model.model.embedding.weight
    if include:
        assert "model.embedding.weight" in cb.masks.names
        assert int((~cb.masks["model.embedding.weight"]).sum()) == round(0.5 * emb.numel())
        assert _zero_fraction(emb) == pytest.approx(0.5, abs=1e-4)
    else:
        assert "model.embedding.weight" not in cb.masks.names
        assert int((emb == 0).sum()) == 0
    _assert_exact(cb, 0.5)
    _assert_masks_hold(cb)
    assert torch.isfinite(_transformer_loss(model))


# ---------------------------------------------------------------------------- 2. BoringModel


def test_boring_model_prunes_exactly_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = BoringModel()
    probe = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    cb = GradualPruning(target_sparsity=0.5, end=0.5, frequency=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True, limit_val_batches=2)
    tr.fit(model)  # BoringModel's own data: 64 samples, batch 1 -> 128 steps

    assert tr.global_step == 128
    assert cb.last_update_step == cb.step_schedule.end_step == 64
    assert cb.masks.names == ["layer.weight"]
    assert int((model.layer.weight == 0).sum()) == 32
    assert cb.sparsity == 0.5
    _assert_masks_hold(cb)
    model.eval()
    with torch.no_grad():
        out = model(probe)
    # (BoringModel's SGD(lr=0.1) on N(0, 1) inputs is not a convergent setup, pruned or not: only
    # check that the run stayed finite.)
    assert torch.isfinite(out).all()

    path = Path(ckpt.last_model_path)
    state = torch.load(path, weights_only=True)
    w = state["state_dict"]["layer.weight"]
    assert torch.equal(w == 0, ~cb.masks["layer.weight"])
    loaded = BoringModel.load_from_checkpoint(path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe), out)
    assert torch.equal(loaded.layer.weight, model.layer.weight)


def test_boring_model_resume_keeps_the_masks(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = GradualPruning(target_sparsity=0.5, end=32, frequency=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = BoringModel()
    trainer(tmp_path, [cb, ckpt], max_epochs=1, enable_checkpointing=True, limit_val_batches=0).fit(model)
    masks = cb.masks.state_dict()

    resumed = GradualPruning(target_sparsity=0.5, end=32, frequency=8)
    model2 = BoringModel()
    tr = trainer(tmp_path, [resumed], max_epochs=2, limit_val_batches=0)
    tr.fit(model2, ckpt_path=ckpt.last_model_path)
    assert tr.global_step == 128
    assert resumed.masks.state_dict().keys() == masks.keys()
    assert torch.equal(resumed.masks["layer.weight"], masks["layer.weight"])  # no re-pruning after end
    _assert_masks_hold(resumed)
    assert resumed.sparsity == 0.5


# ---------------------------------------------------------------------------- 3. GAN, manual optimization


class GAN(pl.LightningModule):
    """The usual Lightning GAN: two optimizers, ``automatic_optimization = False``.

    Every batch: one discriminator step, then one generator step. ``reuse_fake=False`` regenerates
    the fake batch for the generator step (Lightning's GAN tutorial); ``reuse_fake=True`` reuses the
    one made before the discriminator step (PyTorch's DCGAN example). ``toggle=True`` wraps each
    step in ``toggle_optimizer``/``untoggle_optimizer`` (other parameters get ``requires_grad=False``).
    """

    def __init__(self, reuse_fake: bool = False, toggle: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.reuse_fake, self.toggle = reuse_fake, toggle
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        z = torch.randn(len(real), 4)
        fake = self.generator(z)

        if self.toggle:
            self.toggle_optimizer(opt_d)
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        if self.toggle:
            self.untoggle_optimizer(opt_d)
            self.toggle_optimizer(opt_g)

        if not self.reuse_fake:
            fake = self.generator(z)
        g_loss = bce(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        if self.toggle:
            self.untoggle_optimizer(opt_g)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
        ]


GAN_WEIGHTS = ["generator.0.weight", "generator.2.weight", "discriminator.0.weight", "discriminator.2.weight"]


def real_data(n: int = 64, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(11)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=gen) + 2.0), batch_size=batch_size)


class Recorder(pl.Callback):
    """After every batch: the batch's step, the reached sparsity, and whether every mask holds."""

    def __init__(self, cb: GradualPruning) -> None:
        self.cb = cb
        self.rows: list[tuple[int, int, float, bool]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        held = all(
            not self.cb.masks.parameter(n).detach()[~self.cb.masks[n]].any() for n in self.cb.masks.names
        )
        self.rows.append((self.cb.engine.step, trainer.global_step, self.cb.sparsity, held))


@pytest.mark.parametrize(
    ("criterion", "frequency", "toggle"),
    [("magnitude", 1, False), ("taylor", 1, False), ("magnitude", 4, False), ("taylor", 4, True)],
)
def test_gan_schedule_counts_batches_not_optimizer_steps(
    tmp_path: Path, criterion: str, frequency: int, toggle: bool
) -> None:
    pl.seed_everything(0)
    model = GAN(toggle=toggle)
    cb = GradualPruning(
        target_sparsity=0.5, schedule="linear", start=0.0, end=0.5, frequency=frequency, criterion=criterion
    )
    calls: list[int] = []
    original = cb.begin_step

    def spy(trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        calls.append(step)
        original(trainer, pl_module, step)

    cb.begin_step = spy  # type: ignore[method-assign]
    rec = Recorder(cb)
    tr = trainer(tmp_path, [cb, rec], max_epochs=2)
    tr.fit(model, real_data())  # 16 batches per epoch, 2 optimizer steps per batch

    assert tr.estimated_stepping_batches == 32
    assert tr.global_step == 64
    assert calls == list(range(32))  # begin_step exactly once per batch
    assert [r[0] for r in rec.rows] == list(range(32))
    assert [r[1] for r in rec.rows] == list(range(2, 66, 2))
    # The ramp ends at 50 % of the batches (step 16), not at 50 % of the optimizer steps (batch 8).
    assert cb.step_schedule.end_step == 16
    assert cb.last_update_step == 16
    sparsity = [r[2] for r in rec.rows]
    assert all(s < 0.5 for s in sparsity[:16])
    assert sparsity[8] == pytest.approx(0.25, abs=0.02)
    assert all(s == sparsity[16] for s in sparsity[16:])
    assert all(r[3] for r in rec.rows)  # masks hold after every batch, for both networks

    assert cb.masks.names == GAN_WEIGHTS
    _assert_exact(cb, 0.5)
    _assert_masks_hold(cb)
    for name in GAN_WEIGHTS:  # no layer emptied
        assert int(cb.masks[name].sum()) >= math.ceil(cb.min_density * cb.masks[name].numel()), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gan_mask_update_in_discriminator_step_keeps_generator_graph_valid(tmp_path: Path) -> None:
    """PyTorch's DCGAN pattern: the fake batch made before the D step is reused for the G step.

    A mask update runs inside the first optimizer step of the batch (the discriminator's). If it
    zeroes the *generator's* weights in place right then, the generator graph built at the top of
    the batch is invalidated and ``manual_backward(g_loss)`` fails with "one of the variables needed
    for gradient computation has been modified by an inplace operation". Without pruning this
    loop trains fine.
    """
    pl.seed_everything(0)
    trainer(tmp_path, [], max_epochs=1).fit(GAN(reuse_fake=True), real_data())  # the loop itself is valid

    pl.seed_everything(0)
    model = GAN(reuse_fake=True)
    cb = GradualPruning(target_sparsity=0.5, schedule="linear", start=0.0, end=0.5, frequency=1)
    trainer(tmp_path, [cb], max_epochs=2).fit(model, real_data())
    _assert_exact(cb, 0.5)
    _assert_masks_hold(cb)


def test_gan_with_max_steps_reaches_the_target_at_end_1(tmp_path: Path) -> None:
    """With ``max_steps`` Lightning counts optimizer steps (2 per GAN batch); the schedule counts batches.

    ``max_steps=32`` stops after 16 batches, but ``estimated_stepping_batches`` says 32, so ``end=1.0``
    resolves to step 31, which never comes: the run ends at about half the target. Refusing the
    configuration up front (a ValueError naming max_steps) would also be acceptable.
    """
    pl.seed_everything(0)
    cb = GradualPruning(target_sparsity=0.5, schedule="linear", start=0.0, end=1.0, frequency=1)
    tr = trainer(tmp_path, [cb], max_epochs=-1, max_steps=32)
    refused: ValueError | None = None
    try:
        tr.fit(GAN(), real_data())
    except ValueError as err:
        refused = err
    if refused is not None:
        assert "max_steps" in str(refused)
        return
    assert tr.global_step == 32
    assert cb.engine.clock == 16
    assert cb.step_schedule.end_step <= 15, (
        f"end resolved to step {cb.step_schedule.end_step}; the last is 15"
    )
    _assert_exact(cb, 0.5)


class ManualAccumulation(pl.LightningModule):
    """Manual optimization with gradient accumulation, as in Lightning's docs: one step every 2 batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        self.manual_backward(nn.functional.mse_loss(self.net(x), y) / 2)
        if (batch_idx + 1) % 2 == 0:
            opt.step()
            opt.zero_grad()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_data(n: int = 64, batch_size: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, generator=gen)
    return DataLoader(TensorDataset(x, x[:, :1] - x[:, 1:2]), batch_size=batch_size)


def test_manual_gradient_accumulation_reaches_the_target_at_end_1(tmp_path: Path) -> None:
    """Only every second batch steps, so the clock ends at 16 while ``end=1.0`` resolved to step 31."""
    pl.seed_everything(0)
    cb = GradualPruning(target_sparsity=0.5, schedule="linear", end=1.0, frequency=1)
    tr = trainer(tmp_path, [cb], max_epochs=2)
    tr.fit(ManualAccumulation(), regression_data())  # 32 batches, 16 optimizer steps
    assert tr.global_step == 16
    _assert_exact(cb, 0.5)


# ---------------------------------------------------------------------------- 4. a network frozen for some batches

FROZEN = range(4, 14)  # batches in which net_b's optimizer does not step


class PartlyFrozen(pl.LightningModule):
    """Two networks, two optimizers; ``net_b`` is frozen (its optimizer not stepped) during ``FROZEN``.

    ``net_a`` feeds ``net_b`` (gradients flow through the frozen network, as when training a head on
    a frozen backbone). Records, on frozen batches, ``net_b``'s weights and version counters right
    before and right after ``opt_a.step()``, and whether ``net_a``'s masks hold after its step.
    """

    def __init__(self, cb: GradualPruning) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cb = cb
        self.net_a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.net_b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.b_touched: list[tuple[int, bool, bool]] = []  # (step, values changed, versions changed)
        self.a_held: list[bool] = []
        self.batches = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        frozen = self.batches in FROZEN
        self.batches += 1
        loss = nn.functional.mse_loss(self.net_b(self.net_a(x)), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        b_params = list(self.net_b.parameters())
        values = [p.detach().clone() for p in b_params]
        versions = [p._version for p in b_params]
        opt_a.step()
        if frozen:
            changed = any(not torch.equal(p, v) for p, v in zip(b_params, values))
            bumped = any(p._version != v for p, v in zip(b_params, versions))
            self.b_touched.append((self.cb.engine.step, changed, bumped))
        a_names = [n for n in self.cb.masks.names if n.startswith("net_a.")]
        self.a_held.append(all(not self.get_parameter(n).detach()[~self.cb.masks[n]].any() for n in a_names))
        if not frozen:
            opt_b.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.net_a.parameters(), lr=0.05, momentum=0.9),
            torch.optim.SGD(self.net_b.parameters(), lr=0.05, momentum=0.9),
        ]


@pytest.fixture(scope="module")
def partly_frozen(tmp_path_factory: pytest.TempPathFactory) -> tuple[PartlyFrozen, GradualPruning]:
    pl.seed_everything(0)
    # updates at steps 2, 5, 8, 11, 14, 17, 20: three of them (5, 8, 11) while net_b is frozen
    cb = GradualPruning(target_sparsity=0.6, schedule="linear", start=2, end=20, frequency=3)
    model = PartlyFrozen(cb)
    trainer(tmp_path_factory.mktemp("frozen"), [cb], max_epochs=2).fit(model, regression_data())
    return model, cb


def test_frozen_network_ends_exact_and_masks_hold(partly_frozen: tuple[PartlyFrozen, GradualPruning]) -> None:
    model, cb = partly_frozen
    assert cb.engine.clock == 32
    assert cb.last_update_step == 20
    assert cb.masks.names == ["net_a.0.weight", "net_a.2.weight", "net_b.0.weight", "net_b.2.weight"]
    assert all(model.a_held)  # net_a's masks hold right after each of its steps
    _assert_exact(cb, 0.6)
    _assert_masks_hold(cb)
    for name in cb.masks.names:
        assert int((~cb.masks[name]).sum()) > 0, name


def test_frozen_network_is_not_touched_by_the_other_optimizers_step(
    partly_frozen: tuple[PartlyFrozen, GradualPruning],
) -> None:
    """While ``net_b`` is frozen, ``opt_a.step()`` must not write into ``net_b``'s weights.

    Holds on plain steps; fails on mask-update steps (5, 8, 11): ``GradualPruning.update_masks``
    zeroes every masked parameter in place from inside the stepping optimizer's hook
    (``MaskSet.update`` zeroing every masked weight at once), whichever optimizer
    owns it. That is what breaks the DCGAN loop above.
    """
    model, _ = partly_frozen
    assert [s for s, _, _ in model.b_touched] == list(FROZEN)
    touched = [s for s, changed, bumped in model.b_touched if changed or bumped]
    assert touched == [], f"net_b written to inside opt_a.step() at steps {touched}"


# ---------------------------------------------------------------------------- 5. distillation wrapper


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DistillationBase(pl.LightningModule):
    """A student learning from a frozen teacher of the same architecture (same layer names)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = MLP().requires_grad_(False)
        self.student = MLP()

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        with torch.no_grad():
            soft = torch.softmax(self.teacher(x) / 2.0, dim=-1)
        log_p = torch.log_softmax(self.student(x) / 2.0, dim=-1)
        return nn.functional.kl_div(log_p, soft, reduction="batchmean")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=1e-2)


class Distillation(DistillationBase):
    """``compression_root`` as a property (the documented form)."""

    @property
    def compression_root(self) -> nn.Module:
        return self.student


def inputs(n: int = 64, batch_size: int = 8) -> DataLoader:
    return DataLoader(
        TensorDataset(torch.randn(n, 8, generator=torch.Generator().manual_seed(2))), batch_size
    )


STUDENT = ["fc1.weight", "fc2.weight", "fc3.weight"]


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "activation"])
def test_distillation_prunes_only_the_student_under_its_own_names(tmp_path: Path, criterion: str) -> None:
    pl.seed_everything(0)
    model = Distillation()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    cb = GradualPruning(target_sparsity=0.7, end=0.5, frequency=2, criterion=criterion, calibration_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [cb, ckpt], max_epochs=3, enable_checkpointing=True).fit(model, inputs())

    assert cb.masks.names == STUDENT
    assert cb.root_prefix == "student."
    assert set(cb.layer_sparsity) == {"fc1", "fc2", "fc3"}
    _assert_exact(cb, 0.7)
    _assert_masks_hold(cb)
    for name in STUDENT:
        assert torch.equal(model.student.get_parameter(name) == 0, ~cb.masks[name])
    for k, v in model.teacher.state_dict().items():  # bit-identical, never masked
        assert torch.equal(v, teacher_before[k]), k

    state = torch.load(ckpt.last_model_path, weights_only=True)
    sd = state["state_dict"]
    for name in STUDENT:
        assert torch.equal(sd[f"student.{name}"] == 0, ~cb.masks[name])
        assert torch.equal(sd[f"teacher.{name}"], teacher_before[name])
    saved_masks = state["callbacks"][cb.state_key]["masks"]
    assert sorted(saved_masks) == STUDENT
    loaded = Distillation.load_from_checkpoint(ckpt.last_model_path)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class DistillationMethod(DistillationBase):
    """``compression_root`` as a plain method."""

    def compression_root(self) -> nn.Module:
        return self.student


class DistillationAttribute(DistillationBase):
    """``compression_root`` as an attribute set in ``__init__`` (nn.Module registers it a second time)."""

    def __init__(self) -> None:
        super().__init__()
        self.compression_root = self.student


@pytest.mark.parametrize("build", [DistillationMethod, DistillationAttribute], ids=["method", "attribute"])
def test_compression_root_as_method_or_attribute(tmp_path: Path, build: type[DistillationBase]) -> None:
    pl.seed_everything(0)
    model = build()
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    cb = GradualPruning(target_sparsity=0.5, end=0.5, frequency=2)
    trainer(tmp_path, [cb], max_epochs=2).fit(model, inputs())
    assert cb.masks.names == STUDENT
    assert cb.root_prefix == "student."
    _assert_exact(cb, 0.5)
    _assert_masks_hold(cb)
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k


def test_distillation_targets_and_exclude_are_relative_to_the_student(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = Distillation()
    cb = GradualPruning(target_sparsity=0.5, end=0.5, frequency=2, exclude=["fc3"])
    trainer(tmp_path, [cb], max_epochs=2).fit(model, inputs())
    assert cb.masks.names == ["fc1.weight", "fc2.weight"]
    assert int((model.student.fc3.weight == 0).sum()) == 0
    _assert_exact(cb, 0.5)
    # the wrapper's own names are not visible through the root
    with pytest.raises(ValueError, match="no layer matches"):
        trainer(tmp_path, [GradualPruning(targets=["teacher.*"])], max_epochs=1).fit(Distillation(), inputs())


def test_distillation_resume_rebinds_masks_to_the_student(tmp_path: Path) -> None:
    path = tmp_path / "mid.ckpt"
    pl.seed_everything(0)
    cb = GradualPruning(target_sparsity=0.6, end=12, frequency=3)
    model = Distillation()
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}

    class StopAfterOneEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True

    tr = trainer(tmp_path, [cb, StopAfterOneEpoch()], max_epochs=3)  # 24 steps planned, 8 run
    tr.fit(model, inputs())
    tr.save_checkpoint(path)
    assert tr.global_step == 8
    assert cb.step_schedule.end_step == 12
    assert 0 < cb.sparsity < 0.6
    masks = cb.masks.state_dict()

    resumed = GradualPruning(target_sparsity=0.6, end=12, frequency=3)
    model2 = Distillation()
    trainer(tmp_path, [resumed], max_epochs=3).fit(model2, inputs(), ckpt_path=path)
    assert resumed.masks.names == STUDENT
    assert resumed.last_update_step == 12
    for name in STUDENT:  # masks only shrink across the resume
        assert not (resumed.masks[name] & ~masks[name]).any()
    _assert_exact(resumed, 0.6)
    _assert_masks_hold(resumed)
    for k, v in model2.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k


# ---------------------------------------------------------------------------- nn.MultiheadAttention with kdim/vdim


class CrossAttention(pl.LightningModule):
    """``nn.MultiheadAttention(kdim=8, vdim=4)``: separate ``q/k/v_proj_weight`` of different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=4, batch_first=True)
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        q, k, v, y = batch
        out, _ = self.attn(q, k, v)
        return nn.functional.mse_loss(self.head(out).mean(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_cross_attention_layer_sparsity_counts_all_projections(tmp_path: Path) -> None:
    """``layer_sparsity`` (and ``sparsity/<layer>`` logs) must describe every masked parameter.

    ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` share the module name ``attn``; a
    per-module entry has to aggregate them (a per-parameter one has to name them apart). Today the
    dict comprehension keeps whichever comes last (``v_proj_weight``).
    """
    gen = torch.Generator().manual_seed(0)
    n = 32
    data = TensorDataset(
        torch.randn(n, 5, 16, generator=gen),
        torch.randn(n, 6, 8, generator=gen),
        torch.randn(n, 6, 4, generator=gen),
        torch.randn(n, 1, generator=gen),
    )
    pl.seed_everything(0)
    model = CrossAttention()
    cb = GradualPruning(target_sparsity=0.6, end=0.5, frequency=2)
    trainer(tmp_path, [cb], max_epochs=2).fit(model, DataLoader(data, batch_size=4))
    assert cb.masks.names[:3] == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"]
    _assert_exact(cb, 0.6)
    _assert_masks_hold(cb)
    counts = cb.masks.counts()
    covered: set[str] = set()
    for key, value in cb.layer_sparsity.items():
        members = [p for p in counts if p == key or p.rsplit(".", 1)[0] == key]
        covered.update(members)
        expected = sum(counts[p][0] for p in members) / sum(counts[p][1] for p in members)
        assert value == pytest.approx(expected), (key, members)
    assert covered == set(counts)


# ---------------------------------------------------------------------------- DDP


class DumpState(pl.Callback):
    """Each rank saves its masks, clock and weights at the end of training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, GradualPruning))
        state = {
            "masks": cb.masks.state_dict(),
            "clock": torch.tensor(cb.engine.clock),
            "sparsity": torch.tensor(cb.sparsity),
            **{f"param.{k}": v.detach().clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "criterion", "names"),
    [(GAN, "taylor", GAN_WEIGHTS), (Distillation, "activation", STUDENT)],
    ids=["gan-taylor", "distillation-activation"],
)
def test_foreign_models_under_ddp_agree_across_ranks(
    tmp_path: Path, build: type[pl.LightningModule], criterion: str, names: list[str]
) -> None:
    pl.seed_everything(0)
    cb = GradualPruning(
        target_sparsity=0.5, schedule="linear", end=0.5, frequency=2, criterion=criterion, calibration_steps=2
    )
    data = real_data() if build is GAN else inputs()
    tr = trainer(
        tmp_path,
        [cb, DumpState(str(tmp_path))],
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        max_epochs=4,
    )
    tr.fit(build(), data)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert sorted(r0["masks"]) == sorted(names)
    assert r0.keys() == r1.keys()
    for key in r0:
        if key == "masks":
            for n in names:
                assert torch.equal(r0["masks"][n], r1["masks"][n]), n
        else:
            assert torch.equal(r0[key], r1[key]), key
    prefix = "param.student." if build is Distillation else "param."
    for n in names:
        assert torch.equal(r0[prefix + n] == 0, ~r0["masks"][n]), n
    pruned = sum(int((~m).sum()) for m in r0["masks"].values())
    total = sum(m.numel() for m in r0["masks"].values())
    assert pruned == round(0.5 * total)
