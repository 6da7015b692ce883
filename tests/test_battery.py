"""The shared battery every registered compression callback runs through (see tests/battery.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from battery import REGISTRY, STEPS_PER_EPOCH, DumpState, Entry, TinyNet, tiny_data, trainer
from pytorch_lightning.callbacks import ModelCheckpoint

ENTRIES = [pytest.param(e, id=e.id) for e in REGISTRY]


def _fit(tmp_path: Path, entry: Entry, **trainer_kwargs: Any) -> tuple[pl.Callback, TinyNet]:
    pl.seed_everything(0)
    model = TinyNet()
    cb = entry.make()
    trainer(tmp_path, [cb], **trainer_kwargs).fit(model, tiny_data())
    return cb, model


@pytest.mark.parametrize("entry", ENTRIES)
def test_fit_compresses(tmp_path: Path, entry: Entry) -> None:
    cb, model = _fit(tmp_path, entry)
    entry.check(cb, model)


class _Crash(pl.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == self.epoch and args[-1] == self.batch:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("entry", ENTRIES)
def test_crash_and_resume_equals_uninterrupted(tmp_path: Path, entry: Entry) -> None:
    cb_ref, model_ref = _fit(tmp_path / "ref", entry)

    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1, save_on_train_epoch_end=True
    )
    pl.seed_everything(0)
    crashed = entry.make()
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "a", [crashed, ckpt, _Crash(epoch=2, batch=3)], enable_checkpointing=True).fit(
            TinyNet(), tiny_data()
        )
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()

    pl.seed_everything(0)
    resumed, model = entry.make(), TinyNet()
    trainer(tmp_path / "b", [resumed]).fit(model, tiny_data(), ckpt_path=str(last))
    ref_state, state = entry.state(cb_ref), entry.state(resumed)
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], state[key]), key
    for name, p in model_ref.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), p, rtol=0, atol=0)
    entry.check(resumed, model)


@pytest.mark.parametrize("entry", ENTRIES)
def test_checkpoint_is_compressed_and_loads_without_callback(tmp_path: Path, entry: Entry) -> None:
    pl.seed_everything(0)
    model, cb = TinyNet(), entry.make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [cb, ckpt], enable_checkpointing=True).fit(model, tiny_data())
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)  # callback state is plain tensors
    assert set(raw["state_dict"]) == set(model.state_dict())  # the user's parameter names, no extras
    fresh = TinyNet.load_from_checkpoint(tmp_path / "last.ckpt")  # no callback involved
    entry.check(cb, fresh)
    x = torch.randn(5, 4, 6, 6)
    model.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _ddp_worker_state(tmp_path: Path, entry: Entry) -> list[dict[str, torch.Tensor]]:
    pl.seed_everything(0)
    model = TinyNet()
    tr = trainer(
        tmp_path,
        [entry.make(), DumpState(entry.id, str(tmp_path))],
        devices=2,
        strategy="ddp_spawn",
        max_epochs=8,
    )
    tr.fit(model, tiny_data())
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_ddp_two_processes_agree(tmp_path: Path, entry: Entry) -> None:
    # Each rank sees half the data (DistributedSampler): data-dependent state must be all-reduced.
    state0, state1 = _ddp_worker_state(tmp_path, entry)
    assert state0
    assert state0.keys() == state1.keys()
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key


@pytest.mark.parametrize("entry", ENTRIES)
def test_gradient_accumulation_acts_once_per_optimizer_step(tmp_path: Path, entry: Entry) -> None:
    calls: list[int] = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
            calls.append(trainer.global_step)

    pl.seed_everything(0)
    model, cb = TinyNet(), entry.make()
    # 8 epochs x 8 batches / 2 = 32 optimizer steps: the same schedule as without accumulation.
    trainer(tmp_path, [cb, Spy()], accumulate_grad_batches=2, max_epochs=8).fit(model, tiny_data())
    assert calls == list(range(8 * STEPS_PER_EPOCH // 2))
    entry.check(cb, model)


@pytest.mark.parametrize("entry", ENTRIES)
def test_bf16_mixed_on_cpu(tmp_path: Path, entry: Entry) -> None:
    cb, model = _fit(tmp_path, entry, precision="bf16-mixed")
    entry.check(cb, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("entry", ENTRIES)
def test_cuda_bf16_mixed(tmp_path: Path, entry: Entry) -> None:
    cb, model = _fit(tmp_path, entry, accelerator="gpu", precision="bf16-mixed", deterministic=False)
    entry.check(cb, model.cpu())


@pytest.mark.parametrize(
    ("entry", "kwargs", "match"),
    [pytest.param(e, kw, m, id=f"{e.id}-{next(iter(kw))}") for e in REGISTRY for kw, m in e.bad_args],
)
def test_bad_argument_is_refused_at_construction(entry: Entry, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        entry.make(**kwargs)
