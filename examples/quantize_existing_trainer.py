"""Prune and quantize your CNN inside the Trainer you already have, then run it as int8 in onnxruntime.

Your LightningModule and Trainer stay as they are. Add ``GradualPruning`` (90 % of the weights set
to zero on a cubic schedule) and ``QuantizationAwareTraining`` (int8 weights and activations
simulated while training, each BatchNorm folded into the convolution before it). After ``fit``,
``export_onnx`` writes a QDQ graph that onnxruntime runs with integer kernels (``QLinearConv``,
``QGemm``), and ``compression_summary`` reports the stored size of the int8 weights. The checkpoint
holds the float weights under your keys (it loads into the plain module), and
``restore_quantization`` re-applies the quantizers from the callback state it also holds.

    python examples/quantize_existing_trainer.py                   # ~1 min on a 2-core CPU
    python examples/quantize_existing_trainer.py --sparsity 0 --max-epochs 20
"""

from __future__ import annotations

import argparse
import os
import tempfile

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining, compression_summary, export_onnx
from lightning_compress.demos import DigitsDataModule
from lightning_compress.export.onnx import INTEGER_OPS, optimized_ops
from lightning_compress.quantization import restore_quantization


class DigitCNN(pl.LightningModule):
    """Your own model: a small Conv-BN-ReLU network for scikit-learn's 8x8 digits."""

    def __init__(self, width: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        self.example_input_array = torch.zeros(2, 1, 8, 8)  # traced to find the BatchNorms to fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights pruned (0: none)")
    parser.add_argument("--root-dir", default=None, help="where logs, checkpoints and the ONNX file go")
    args = parser.parse_args(argv)
    root = args.root_dir or tempfile.mkdtemp(prefix="quantize_example_")

    pl.seed_everything(0)
    model = DigitCNN()
    datamodule = DigitsDataModule(batch_size=64, seed=0)
    callbacks: list[pl.Callback] = [
        QuantizationAwareTraining(weight_bits=8, activation_bits=8, start=0.2, freeze_bn_at=0.8),
        ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True),
    ]
    if args.sparsity > 0:
        callbacks.insert(0, GradualPruning(target_sparsity=args.sparsity, start=0.1, end=0.6, frequency=10))
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule)
    test_acc = trainer.test(model, datamodule, verbose=False)[0]["test_acc"]

    path = export_onnx(model, model.example_input_array, os.path.join(root, "digits_int8.onnx"))
    ops = optimized_ops(path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs, ys = map(torch.cat, zip(*datamodule.test_dataloader()))
    logits = session.run(None, {session.get_inputs()[0].name: xs.numpy()})[0]
    onnx_acc = float((logits.argmax(1) == ys.numpy()).mean())
    model.eval()
    with torch.no_grad():
        agree = float((model(xs).argmax(1).numpy() == logits.argmax(1)).mean())

    summary = compression_summary(model)
    weights = [m.quantized_weight() for m in model.modules() if hasattr(m, "quantized_weight")]
    print(summary)
    # The checkpoint: float weights under the user's keys, quantizer state in the callback section.
    restored = DigitCNN.load_from_checkpoint(os.path.join(root, "checkpoints", "last.ckpt"))
    restore_quantization(restored, os.path.join(root, "checkpoints", "last.ckpt"))
    restored.eval()
    with torch.no_grad():
        same = float(torch.equal(restored(xs), model(xs)))
    result = {
        "test_acc": float(test_acc),
        "onnx_acc": onnx_acc,
        "agreement": agree,
        "integer_ops": float(sum(op in INTEGER_OPS for op in ops)),
        "dense_bytes": float(summary.dense_bytes),
        "quantized_bytes": float(summary.quantized_bytes or 0),
        "restored_same_outputs": same,
        "zero_fraction": float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)),
    }
    print(
        f"test accuracy {test_acc:.3f} (fake-quant torch), {onnx_acc:.3f} (int8 onnxruntime), agreement "
        f"{agree:.3f}; integer kernels: {sorted({op for op in ops if op in INTEGER_OPS})}; int8 weights "
        f"{result['quantized_bytes'] / 1024:.1f} KiB vs fp32 {result['dense_bytes'] / 1024:.1f} KiB"
    )
    return result


if __name__ == "__main__":
    main()
