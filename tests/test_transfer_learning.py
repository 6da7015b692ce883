"""Transfer learning: Lightning's BackboneFinetuning unfreezes the backbone while GradualPruning prunes.

``BackboneFinetuning`` adds a new param group to the optimizer at the epoch it unfreezes the
backbone. The compression engine must notice and bind the masks to the new group, or the pruned
backbone weights revive after the next optimizer steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8  # 128 samples / batch 16


class BackboneNet(pl.LightningModule):
    """A user-style transfer-learning module: ``backbone`` + ``head``, optimizer over trainable params."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # As BackboneFinetuning requires: only the trainable parameters (the backbone is frozen).
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def _data(n: int = 128, batch_size: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class _ZeroWatch(pl.Callback):
    """After every batch: how many masked entries are nonzero, and the backbone weights per epoch."""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.revived: list[tuple[int, int]] = []  # (global step, nonzero pruned entries)
        self.backbone_at_epoch_start: dict[int, dict[str, Tensor]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.backbone_at_epoch_start[trainer.current_epoch] = {
            k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        masks = self.pruning.masks
        bad = sum(int(pl_module.get_parameter(n)[~masks[n]].count_nonzero()) for n in masks.names)
        if bad:
            self.revived.append((trainer.global_step, bad))


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    opts: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def _nonzero_pruned(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, int]:
    return {n: int(model.get_parameter(n)[~m].count_nonzero()) for n, m in masks.items()}


def test_pruned_backbone_weights_stay_zero_after_param_group_is_added(tmp_path: Path) -> None:
    """The regression: the mask must act on the param group BackboneFinetuning adds at epoch 1.

    Pruning reaches its target while the backbone is still frozen (end at step 6 of 8 in epoch 0),
    so no later mask update re-zeroes what the optimizer revives: only the engine's per-step
    constraints keep the backbone's pruned weights at zero.
    """
    pl.seed_everything(0)
    model = BackboneNet()
    pruning = GradualPruning(target_sparsity=0.7, start=0, end=6, frequency=2)
    watch = _ZeroWatch(pruning)
    trainer = _trainer(tmp_path, [BackboneFinetuning(unfreeze_backbone_at_epoch=1), pruning, watch])
    trainer.fit(model, _data())
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2  # the head's group + the backbone's, added at epoch 1
    backbone = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == backbone
    assert pruning.masks.names == ["backbone.0.weight", "backbone.2.weight", "head.weight"]
    assert watch.revived == []
    assert pruning.sparsity == pytest.approx(0.7, abs=1e-3)
    # The backbone did train after unfreezing (its surviving weights moved).
    before = watch.backbone_at_epoch_start[1]
    for name, value in model.backbone.state_dict().items():
        assert not torch.equal(value, before[name]), name


def test_frozen_backbone_is_pruned_while_frozen(tmp_path: Path) -> None:
    """Masks computed while the backbone is frozen (not in any optimizer) are applied to its weights."""
    pl.seed_everything(0)
    model = BackboneNet()
    pruning = GradualPruning(target_sparsity=0.6, start=0, end=4, frequency=2)
    watch = _ZeroWatch(pruning)
    # Never unfrozen within this run: the backbone is never owned by the optimizer.
    trainer = _trainer(
        tmp_path, [BackboneFinetuning(unfreeze_backbone_at_epoch=5), pruning, watch], max_epochs=2
    )
    trainer.fit(model, _data())
    assert len(trainer.optimizers[0].param_groups) == 1
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert watch.revived == []
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in pruning.masks.names)
    total = sum(model.get_parameter(n).numel() for n in pruning.masks.names)
    assert zeros / total == pytest.approx(0.6, abs=1e-3)
    assert float((model.backbone[0].weight == 0).float().mean()) > 0.3  # the backbone took its share


def test_checkpoint_masks_and_resume_from_frozen_phase(tmp_path: Path) -> None:
    """Checkpoints hold the masks and sparse weights; a resume from the frozen phase keeps zeros zero."""
    pl.seed_everything(0)
    model = BackboneNet()
    # Pruning spans both phases (steps 0..20 of 32), so masks also change after unfreezing.
    pruning = GradualPruning(target_sparsity=0.75, start=0, end=20, frequency=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_last=True)
    watch = _ZeroWatch(pruning)
    trainer = _trainer(
        tmp_path,
        [BackboneFinetuning(unfreeze_backbone_at_epoch=1), pruning, ckpt, watch],
        enable_checkpointing=True,
    )
    trainer.fit(model, _data())
    assert watch.revived == []
    assert len(trainer.optimizers[0].param_groups) == 2

    # The last checkpoint: its masks are the callback's, and its weights are zero wherever pruned.
    last = torch.load(ckpt.last_model_path, weights_only=True)
    saved_masks = last["callbacks"][pruning.state_key]["masks"]
    assert set(saved_masks) == set(pruning.masks.names)
    for name, mask in saved_masks.items():
        assert torch.equal(mask, pruning.masks[name].cpu())
        weight = last["state_dict"][name]
        assert not weight[~mask].any(), name
    assert sum(int((~m).sum()) for m in saved_masks.values()) / sum(
        m.numel() for m in saved_masks.values()
    ) == pytest.approx(0.75, abs=1e-3)
    assert not any(_nonzero_pruned(model, saved_masks).values())
    # BackboneFinetuning stored both param groups in the checkpoint's optimizer state.
    assert len(last["optimizer_states"][0]["param_groups"]) == 2

    # Resume from the end of epoch 0, when the backbone was still frozen.
    first = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))
    assert len(first) == 1
    frozen_ckpt = torch.load(first[0], weights_only=True)
    assert len(frozen_ckpt["optimizer_states"][0]["param_groups"]) == 1
    for name, mask in frozen_ckpt["callbacks"][pruning.state_key]["masks"].items():
        assert not frozen_ckpt["state_dict"][name][~mask].any(), name  # frozen weights pruned too

    pl.seed_everything(0)
    resumed = BackboneNet()
    pruning2 = GradualPruning(target_sparsity=0.75, start=0, end=20, frequency=4)
    watch2 = _ZeroWatch(pruning2)
    trainer2 = _trainer(
        tmp_path / "resumed", [BackboneFinetuning(unfreeze_backbone_at_epoch=1), pruning2, watch2]
    )
    trainer2.fit(resumed, _data(), ckpt_path=str(first[0]))
    assert trainer2.global_step == 4 * STEPS_PER_EPOCH
    assert len(trainer2.optimizers[0].param_groups) == 2
    assert watch2.revived == []
    assert pruning2.sparsity == pytest.approx(0.75, abs=1e-3)
    assert not any(_nonzero_pruned(resumed, {n: pruning2.masks[n] for n in pruning2.masks.names}).values())
    # The backbone trained after unfreezing in the resumed run as well.
    before = watch2.backbone_at_epoch_start[1]
    assert not torch.equal(resumed.backbone[0].weight, before["0.weight"])
    # Same data order, same steps: the resumed run ends where the uninterrupted one did.
    for name in pruning.masks.names:
        assert torch.equal(pruning2.masks[name], pruning.masks[name]), name
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)

    # Resume after the unfreeze too (end of epoch 1): BaseFinetuning restores the second param group
    # when the fit starts (a new param_groups list), and the engine binds the masks to it. No
    # comparison with the uninterrupted run here: Lightning 2.6 restores the group but leaves the
    # backbone's requires_grad False (it re-freezes in setup and only unfreezes at the unfreeze
    # epoch), so the resumed backbone stops training; the same happens without lightning_compress.
    second = sorted((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    assert len(torch.load(second[0], weights_only=True)["optimizer_states"][0]["param_groups"]) == 2
    pl.seed_everything(0)
    resumed3 = BackboneNet()
    pruning3 = GradualPruning(target_sparsity=0.75, start=0, end=20, frequency=4)
    watch3 = _ZeroWatch(pruning3)
    trainer3 = _trainer(
        tmp_path / "resumed3", [BackboneFinetuning(unfreeze_backbone_at_epoch=1), pruning3, watch3]
    )
    trainer3.fit(resumed3, _data(), ckpt_path=str(second[0]))
    assert len(trainer3.optimizers[0].param_groups) == 2
    assert watch3.revived == []
    assert pruning3.sparsity == pytest.approx(0.75, abs=1e-3)
    assert not any(_nonzero_pruned(resumed3, {n: pruning3.masks[n] for n in pruning3.masks.names}).values())


def test_engine_rebinds_when_param_group_is_added_by_hand(tmp_path: Path) -> None:
    """The plain ``optimizer.add_param_group`` case (what BaseFinetuning does), mid-epoch."""

    class AddGroup(pl.Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
        ) -> None:
            if trainer.global_step == 11:
                for p in pl_module.backbone.parameters():
                    p.requires_grad_(True)
                trainer.optimizers[0].add_param_group({"params": list(pl_module.backbone.parameters())})

    class Net(BackboneNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            return torch.optim.Adam(self.head.parameters(), lr=0.01)

    pl.seed_everything(0)
    model = Net()
    pruning = GradualPruning(target_sparsity=0.8, start=0, end=8, frequency=2)
    watch = _ZeroWatch(pruning)
    _trainer(tmp_path, [AddGroup(), pruning, watch], max_epochs=3).fit(model, _data())
    assert watch.revived == []
    assert not any(_nonzero_pruned(model, {n: pruning.masks[n] for n in pruning.masks.names}).values())


def test_transfer_learning_example(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import transfer_learning
    finally:
        sys.path.pop(0)
    argv = ["--pretrain-epochs", "2", "--max-epochs", "6", "--unfreeze-at", "1", "--sparsity", "0.8"]
    argv += ["--finetune-images", "250", "--root-dir", str(tmp_path)]
    result = transfer_learning.main(argv)
    assert result["pretrain_acc"] > 0.9  # digits 0-4 after 2 epochs (0.956 measured)
    # Digits 5-9 from only 250 images, 80 % pruned: the pretrained backbone makes 0.86 possible
    # (measured, seeds 0-1: 0.859, 0.887), well above the same budget from scratch (0.733, 0.818).
    assert result["finetune_acc"] > 0.8
    assert result["finetune_acc"] > result["scratch_acc"]
    assert result["finetune_images"] == 250
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["backbone_sparsity"] > 0.5
    assert result["head_sparsity"] > 0.0
    assert result["zeros_stayed_zero"] is True
    assert result["param_groups"] == 2
    # The checkpoint written at the end of fine-tuning is sparse too.
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    weights = [v for k, v in ckpt["state_dict"].items() if k.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)
