"""QuantizationAwareTraining and LowBitWeights on models we did not write and on manual-optimization loops.

* Lightning's ``LightningTransformer`` (``nn.Transformer``: attention ``out_proj`` layers are a
  ``Linear`` subclass the attention kernel reads directly, so ``"*"`` skips them) and ``BoringModel``.
* A GAN with two optimizers and manual optimization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytorch_lightning as pl
import torch
from battery import trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel
from test_foreign_models import GAN, VOCAB, OfflineTransformer, real_data, token_data
from torch import nn

import lightning_compress as lc
from lightning_compress.quantization import restore_quantization
from lightning_compress.quantization.fake_quant import QuantizedLayer, quantized_layers


def test_transformer_qat_quantizes_its_linear_layers_and_skips_attention_out_proj(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = OfflineTransformer(vocab_size=VOCAB)
    cb = lc.QuantizationAwareTraining(start=4)
    trainer(tmp_path, [cb], max_epochs=2).fit(model, token_data())
    names = set(cb.layers)
    assert "model.decoder" in names  # the output projection
    assert any(name.endswith("linear1") for name in names)
    assert not any(name.endswith("out_proj") for name in names)
    assert all(layer.input_quant.ready for layer in cb.layers.values())
    inputs, target = next(iter(token_data()))
    model.eval()
    with torch.no_grad():
        out = model(inputs, target)
    assert torch.isfinite(out).all()


def test_boring_model_qat_checkpoint_restores_and_exports(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = BoringModel()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = lc.QuantizationAwareTraining(weight_bits=4, start=8, freeze_observers_at=64)
    tr = trainer(tmp_path, [cb, ckpt], max_epochs=1, enable_checkpointing=True, limit_val_batches=2)
    tr.fit(model)
    assert isinstance(model.layer, QuantizedLayer)
    path = Path(ckpt.last_model_path)
    plain = BoringModel.load_from_checkpoint(path)  # the float weights under the user's keys
    assert type(plain.layer) is nn.Linear
    torch.testing.assert_close(plain.layer.weight, model.layer.weight, rtol=0, atol=0)
    assert set(restore_quantization(plain, str(path))) == {"layer"}
    probe = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(probe), model(probe), rtol=0, atol=0)
    onnx_path = lc.export_onnx(plain, probe[:1], tmp_path / "boring.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(probe).numpy(), atol=1e-4)


def test_gan_two_optimizers_qat_and_ternary_generator(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = GAN()
    qat = lc.QuantizationAwareTraining(targets=["discriminator.*"], start=2)
    lowbit = lc.LowBitWeights(mode="ternary", targets=["generator.*"], exclude_first_last=False)
    trainer(tmp_path, [qat, lowbit], max_epochs=2).fit(model, real_data())
    assert set(quantized_layers(model)) == {"discriminator.0", "discriminator.2"}
    assert all(layer.input_quant.ready for layer in qat.layers.values())
    for name in ("generator.0.weight", "generator.2.weight"):
        assert model.get_parameter(name).unique().numel() <= 3, name
    z = torch.randn(4, 4)
    with torch.no_grad():
        assert torch.isfinite(model.discriminator(model.generator(z))).all()
