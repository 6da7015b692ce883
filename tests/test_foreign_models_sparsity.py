"""DynamicNetworkSurgery, SparsityRegularizer and EnergyAwarePruning on models we did not write.

Lightning's ``LightningTransformer`` (fused attention projections, a two-argument forward) and
``BoringModel``, and a GAN with manual optimization that reuses the generator's graph after the
discriminator's step (PyTorch's DCGAN example), with and without ``toggle_optimizer``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from battery import trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel
from test_foreign_models import GAN, GAN_WEIGHTS, OfflineTransformer, real_data, token_data
from torch import nn

import lightning_compress as lc


def _sparsity(model: nn.Module, names: list[str]) -> float:
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / sum(model.get_parameter(n).numel() for n in names)


def _loss(model: OfflineTransformer) -> float:
    inputs, target = next(iter(token_data()))
    model.eval()
    with torch.no_grad():
        return float(nn.functional.nll_loss(model(inputs, target), target.reshape(-1)))


# ---------------------------------------------------------------------------- LightningTransformer
def test_dns_on_lightning_transformer_reaches_the_target_and_loads_without_callback(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = OfflineTransformer(vocab_size=100)
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.8, end=0.4, stop=0.8, gamma=0.01)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [dns, ckpt], max_epochs=3, enable_checkpointing=True).fit(model, token_data())
    assert any(n.endswith("in_proj_weight") for n in dns.masks.names)  # attention is in the surgery
    assert _sparsity(model, dns.masks.names) == pytest.approx(0.8, abs=1e-3)
    assert dns.updates > 5
    assert dns.spliced_total > 0
    assert torch.isfinite(torch.tensor(_loss(model)))
    loaded = OfflineTransformer.load_from_checkpoint(ckpt.last_model_path, vocab_size=100)
    assert _loss(loaded) == _loss(model)


def test_regularizer_on_lightning_transformer_shrinks_the_attention_weights(tmp_path: Path) -> None:
    def fit(callbacks: list[pl.Callback]) -> OfflineTransformer:
        pl.seed_everything(0)
        model = OfflineTransformer(vocab_size=100)
        trainer(tmp_path, callbacks, max_epochs=2).fit(model, token_data())
        return model

    plain = fit([])
    reg = lc.SparsityRegularizer(l1=2e-3, group_lasso=2e-3)
    regularized = fit([reg])
    name = "model.transformer.encoder.layers.0.self_attn.in_proj_weight"
    assert regularized.get_parameter(name).abs().mean() < 0.9 * plain.get_parameter(name).abs().mean()
    assert torch.isfinite(torch.tensor(_loss(regularized)))


def test_energy_aware_pruning_on_lightning_transformer(tmp_path: Path) -> None:
    """A two-argument forward and no example_input_array: the energy profile comes from a real batch."""
    pl.seed_everything(0)
    model = OfflineTransformer(vocab_size=100)
    eap = lc.EnergyAwarePruning(target_energy_reduction=0.5, end=0.6, frequency=4)
    trainer(tmp_path, [eap], max_epochs=3).fit(model, token_data())
    assert eap.energy_reduction == pytest.approx(0.5, abs=0.02)
    assert 0.0 < eap.sparsity < 1.0
    for name in eap.masks.names:
        assert not bool(model.get_parameter(name)[~eap.masks[name]].any())


# ---------------------------------------------------------------------------- BoringModel
@pytest.mark.parametrize(
    "make",
    [
        lambda: lc.DynamicNetworkSurgery(target_sparsity=0.5, end=32, stop=96),
        lambda: lc.EnergyAwarePruning(target_energy_reduction=0.3, end=32, frequency=8),
    ],
    ids=["dns", "energy-aware"],
)
def test_boring_model_checkpoint_is_compressed(tmp_path: Path, make) -> None:
    pl.seed_everything(0)
    model = BoringModel()
    cb = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [cb, ckpt], max_epochs=2, enable_checkpointing=True, limit_val_batches=2).fit(model)
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert torch.equal(state["layer.weight"] == 0, ~cb.masks["layer.weight"])
    assert 0.2 < float((state["layer.weight"] == 0).float().mean()) < 0.8


# ---------------------------------------------------------------------------- GAN
@pytest.mark.parametrize("toggle", [False, True])
def test_dns_and_regularizer_on_a_gan_that_reuses_the_generator_graph(tmp_path: Path, toggle: bool) -> None:
    pl.seed_everything(0)
    model = GAN(reuse_fake=True, toggle=toggle)
    dns = lc.DynamicNetworkSurgery(target_sparsity=0.6, schedule="linear", end=0.5, stop=0.75, gamma=0.0)
    reg = lc.SparsityRegularizer(l1=1e-3, targets=["discriminator.*"])
    tr = trainer(tmp_path, [dns, reg], max_epochs=2)
    tr.fit(model, real_data())  # 16 batches per epoch, two optimizer steps each
    assert tr.global_step == 64
    assert dns.masks.names == GAN_WEIGHTS
    assert dns.frozen
    assert dns.updates == dns.window.end_step  # gamma=0: an update at every training step before stop
    assert _sparsity(model, GAN_WEIGHTS) == round(0.6 * 336) / 336  # exactly round(s * n) pruned
    for name in GAN_WEIGHTS:
        assert not bool(model.get_parameter(name)[~dns.masks[name]].any())
