"""Quantization benchmark: QAT vs onnxruntime's quantize_static, int8 latency, QAT overhead, low-bit, DFQ.

Sections (``--sections``, default all), each a table in the report:

* ``qat``: LeNet5 and SmallVGG (``--width``, default 16) on MNIST 5k: float vs int8
  ``QuantizationAwareTraining`` (``--qat-start`` 0.3 float warm-up, ``--qat-freeze-bn`` 0.8,
  ``--qat-freeze-observers`` 0.9) vs onnxruntime's own post-training ``quantize_static`` (QDQ,
  per-channel int8 weights, uint8 activations, MinMax calibration on ``--calib`` training images)
  applied to the exported float ONNX model of the float run; plus 4-bit weight / 8-bit activation
  QAT. Our models are evaluated twice: the fake-quantized torch model (``eval()``) and its
  ``export_onnx`` QDQ graph in onnxruntime, with the argmax agreement of the two.
* ``latency``: onnxruntime CPU latency of LeNet5 and SmallVGG (width 16 and 32) at batch 8 and 32,
  ``intra_op_num_threads`` 2 and 1: the float ONNX model vs our int8 export vs ``quantize_static``
  of the same float model, with the integer / float compute ops of each optimized graph.
* ``overhead``: training-step time of QAT vs float (same model, same batches), LeNet5 and SmallVGG,
  torch's default threads and 1 thread.
* ``lowbit``: ``LowBitWeights``: TWN (ternary) and TTQ on LeNet5, BinaryConnect (binary) on
  LeNet300100, each vs float (left out when ``lightning_compress/quantization/lowbit.py`` is missing).
* ``dfq``: ``data_free_quantize`` (Nagel et al., 2019) on SmallMobileNet (ReLU6 replaced by ReLU),
  trained briefly and then made *unbalanced* by a function-preserving per-channel rescaling: int8
  per-tensor without equalization, with cross-layer equalization (CLE), CLE + bias absorption,
  CLE + absorption + bias correction (left out when ``data_free.py`` is missing).
* ``prune_qat``: LeNet5: ``GradualPruning`` 90 % alone, int8 QAT alone and both together: accuracy
  and stored size.

Recipe of every accuracy row (float and compressed alike): Adam lr 1e-3 decayed to 0 along a cosine
over the fit (per step), no weight decay, batch 64, 2-pixel random shifts of the training images,
MNIST 5k (4,000 train / 1,000 test); a seed fixes the initial weights, the data order, the shifts and
the split; one torch thread (and one onnxruntime thread) per fit, ``--jobs`` fits in parallel.
Latency: rounds in which every model runs in alternating (ABBA) order; a ratio is the median over
rounds of the per-round ratio.

Usage::

    python benchmarks/quantization.py --out benchmarks/results/quantization.md   # ~11 min on 2 cores
    python benchmarks/quantization.py --quick                                       # smoke test, < 2 min
    python benchmarks/quantization.py --sections latency --latency-rounds 60
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import logging
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("qat", "latency", "overhead", "lowbit", "dfq", "prune_qat")
BATCH_SIZE = 64
STEPS_PER_EPOCH = math.ceil(4000 / BATCH_SIZE)  # 63
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it
MODEL_LABEL = {"lenet5": "LeNet5", "vgg": "SmallVGG", "mlp": "LeNet300100", "mobilenet": "SmallMobileNet"}
#: Rough seconds per epoch on one thread (to start the longest fits first).
EPOCH_COST = {"lenet5": 1.0, "vgg": 6.0, "mlp": 0.5, "mobilenet": 14.0}
FLOAT_COMPUTE_OPS = frozenset({"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})
KW = tuple[tuple[str, Any], ...]


def lib_file(rel: str) -> bool:
    return (ROOT / "lightning_compress" / rel).is_file()


@dataclass(frozen=True)
class Job:
    """One fit of ``model`` with the callbacks whose keyword arguments are given (none: float)."""

    section: str
    row: str
    model: str  # "lenet5" | "vgg" | "mlp" | "mobilenet"
    seed: int
    epochs: int
    width: int = 16
    qat: KW | None = None  # QuantizationAwareTraining
    lowbit: KW | None = None  # LowBitWeights
    prune: KW | None = None  # GradualPruning
    onnx: bool = False  # evaluate with onnxruntime (float: + quantize_static)
    dfq: bool = False  # after the fit: the data-free quantization study
    sizes: bool = False  # compression_summary storage

    def key(self) -> tuple[Any, ...]:
        """Identical fits of different sections run once (their extra measurements are merged)."""
        return (
            self.model,
            self.seed,
            self.epochs,
            self.width if self.model == "vgg" else 0,
            self.qat,
            self.lowbit,
            self.prune,
        )

    def cost(self) -> float:
        base = self.epochs * EPOCH_COST[self.model] * (1.4 if self.qat else 1.0)
        return base + (6.0 if self.onnx else 0.0) + (25.0 if self.dfq else 0.0)


@dataclass
class Row:
    name: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)

    def mean(self, key: str) -> float:
        return statistics.fmean(r[key] for r in self.results.values())

    def values(self, key: str) -> list[Any]:
        return [r[key] for r in self.results.values() if r.get(key) is not None]


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning_compress"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
    warnings.filterwarnings("ignore")


def with_cosine(cls: type[pl.LightningModule]) -> type[pl.LightningModule]:
    """``cls`` whose optimizer's learning rate decays to 0 along a cosine over the whole fit, per step."""

    class Cosine(cls):  # type: ignore[misc, valid-type]
        def configure_optimizers(self) -> Any:
            optimizer = super().configure_optimizers()
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    Cosine.__name__ = Cosine.__qualname__ = cls.__name__
    return Cosine


def relu6_to_relu(model: nn.Module) -> nn.Module:
    """Replace every ``nn.ReLU6`` by ``nn.ReLU`` (Nagel et al. do so for MobileNetV2), in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, name, nn.ReLU())
    return model


def build(model: str, width: int = 16, cosine: bool = True) -> pl.LightningModule:
    from lightning_compress.demos import LeNet5, LeNet300100, SmallMobileNet, SmallVGG

    cls, extra = {
        "lenet5": (LeNet5, {}),
        "vgg": (SmallVGG, {"width": width}),
        "mlp": (LeNet300100, {}),
        "mobilenet": (SmallMobileNet, {}),
    }[model]
    net = (with_cosine(cls) if cosine else cls)(**extra, lr=1e-3, optimizer="adam", weight_decay=0.0)
    return relu6_to_relu(net) if model == "mobilenet" else net


def trainer_for(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


# ---------------------------------------------------------------------------- onnxruntime helpers
def ort_session(path: Path | str, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if threads > 1:  # on a shared machine a spinning worker thread waits on a core another process holds
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(path: Path | str, x: np.ndarray, threads: int = 1) -> np.ndarray:
    session = ort_session(path, threads)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ort_quantize_static(float_path: Path, out_path: Path, calib: np.ndarray) -> None:
    """onnxruntime's own static int8 quantization of float ONNX (after its pre-processing)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    quant_pre_process(str(float_path), str(pre))
    name = ort_session(pre).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calib[i : i + BATCH_SIZE]} for i in range(0, len(calib), BATCH_SIZE)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(pre),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def op_counts(path: Path | str, every: bool = False) -> dict[str, int]:
    """Compute ops (``every``: all ops) of the graph onnxruntime runs (after its CPU graph optimizations)."""
    from lightning_compress.export.onnx import INTEGER_OPS, optimized_ops

    ops = Counter(optimized_ops(path))
    return {op: n for op, n in sorted(ops.items()) if every or op in INTEGER_OPS or op in FLOAT_COMPUTE_OPS}


def ops_cell(ops: dict[str, int]) -> str:
    from lightning_compress.export.onnx import INTEGER_OPS

    ints = ", ".join(f"{op} {n}" for op, n in ops.items() if op in INTEGER_OPS) or "none"
    floats = ", ".join(f"{op} {n}" for op, n in ops.items() if op not in INTEGER_OPS)
    return f"int: {ints}" + (f"; **float: {floats}**" if floats else "")


# ---------------------------------------------------------------------------- storage
def storage(model: nn.Module) -> dict[str, Any]:
    """Stored sizes: the summary's fields, plus int8 values of the non-zeros + a 1-bit-per-weight bitmap.

    ``int8_sparse_bytes`` (computed here): for every fake-quantized Linear / Conv, the smaller of
    ``ceil(numel * bits / 8)`` (dense) and ``ceil(nnz * bits / 8) + ceil(numel / 8)`` (the non-zero
    integer weights plus a presence bitmap), + 4 bytes per weight scale, 4 per bias entry and 8 for the
    input scale / zero point; other parameters in fp32 (their nonzeros + bitmap when that is smaller).
    """
    from lightning_compress import compression_summary
    from lightning_compress.quantization.fake_quant import QuantizedLayer

    out: dict[str, Any] = {}
    summary = compression_summary(model)
    for key in ("dense_bytes", "sparse_bytes", "encoded_bytes", "quantized_bytes"):
        out[key] = getattr(summary, key, None)
    out["has_quantized_bytes"] = hasattr(summary, "quantized_bytes")
    total, zeros, count = 0, 0, 0
    with torch.no_grad():
        for module in model.modules():
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, QuantizedLayer) and module.weight_quant.enabled:
                w = module.quantized_weight()
                bits = module.weight_quant.bits
                nnz, numel = int((w != 0).sum()), w.numel()
                zeros, count = zeros + numel - nnz, count + numel
                total += min(math.ceil(numel * bits / 8), math.ceil(nnz * bits / 8) + math.ceil(numel / 8))
                total += 4 * (w.shape[0] if module.weight_quant.per_channel else 1) + 8
                if module.bias is not None:
                    total += 4 * module.bias.numel()
                continue
            for _, p in own:
                nnz, numel = int((p != 0).sum()), p.numel()
                total += min(4 * numel, 4 * nnz + math.ceil(numel / 8))
    out["int8_sparse_bytes"] = total if count else None
    out["int8_zero_fraction"] = zeros / count if count else None
    return out


# ---------------------------------------------------------------------------- data-free quantization
def unbalance(model: nn.Module, seed: int, fraction: float, low: float, high: float) -> None:
    """Function-preserving per-channel rescaling of SmallMobileNet (ReLU) that unbalances its ranges.

    In every inverted residual block, for ``expand -> bn1 -> ReLU -> depthwise`` and ``depthwise ->
    bn2 -> ReLU -> project``: ``fraction`` of the BatchNorm's channels get gamma and beta multiplied by
    ``k`` (log-uniform in [low, high]) and the matching input channel of the consumer divided by ``k``
    (ReLU is positively homogeneous, so the network computes the same function).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for bn, consumer in ((block.bn1, block.depthwise), (block.bn2, block.project)):
                n = bn.num_features
                chosen = torch.randperm(n, generator=gen)[: max(1, round(n * fraction))]
                k = torch.ones(n)
                k[chosen] = (
                    torch.empty(len(chosen)).uniform_(math.log(low), math.log(high), generator=gen).exp()
                )
                bn.weight.mul_(k)
                bn.bias.mul_(k)
                if consumer.groups > 1:  # depthwise: input channel c is weight[c]
                    consumer.weight.div_(k.reshape(-1, 1, 1, 1))
                else:
                    consumer.weight.div_(k.reshape(1, -1, 1, 1))


def depthwise_imbalance(model: nn.Module) -> float:
    """Max over the depthwise convs of (largest / median) per-channel range of the BN-folded weight."""
    ratios = []
    with torch.no_grad():
        for block in model.blocks:
            bn = block.bn2
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            ranges = (block.depthwise.weight.flatten(1).abs().amax(1) * factor.abs()).double()
            ratios.append(float(ranges.max() / ranges.median().clamp_min(1e-12)))
    return max(ratios)


DFQ_VARIANTS: tuple[tuple[str, dict[str, bool]], ...] = (
    ("int8 per-tensor, no CLE", {"equalize": False, "absorb_bias": False, "correct_bias": False}),
    ("+ CLE", {"equalize": True, "absorb_bias": False, "correct_bias": False}),
    ("+ CLE + bias absorption", {"equalize": True, "absorb_bias": True, "correct_bias": False}),
    (
        "+ CLE + absorption + bias correction (DFQ)",
        {"equalize": True, "absorb_bias": True, "correct_bias": True},
    ),
    (
        "int8 per-channel, no CLE (reference)",
        {"equalize": False, "absorb_bias": False, "correct_bias": False},
    ),
)


#: The rows also run on the net as trained (is it unbalanced already?).
TRAINED_VARIANTS = (DFQ_VARIANTS[0][0], DFQ_VARIANTS[3][0])


def run_dfq(
    model: nn.Module, job: Job, extra: dict[str, Any], x: torch.Tensor, y: torch.Tensor, calib: torch.Tensor
) -> dict[str, Any]:
    from lightning_compress.quantization.data_free import data_free_quantize

    def acc(net: nn.Module) -> tuple[float, torch.Tensor]:
        net.eval()
        with torch.no_grad():
            logits = net(x)
        return float((logits.argmax(1) == y).float().mean()), logits

    base = copy.deepcopy(model).eval()
    unbalanced = copy.deepcopy(base)
    unbalance(unbalanced, job.seed, extra["fraction"], extra["low"], extra["high"])
    float_acc, ref = acc(base)
    unb_acc, unb = acc(unbalanced)
    out: dict[str, Any] = {
        "float": float_acc,
        "float_unbalanced": unb_acc,
        "unbalance_diff": float((ref - unb).abs().max()),
        "logit_scale": float(ref.abs().max()),
        "imbalance": depthwise_imbalance(base),
        "imbalance_unbalanced": depthwise_imbalance(unbalanced),
    }
    batches = [calib[i : i + BATCH_SIZE] for i in range(0, len(calib), BATCH_SIZE)]
    for net_name, net in (("trained", base), ("unbalanced", unbalanced)):
        for label, flags in DFQ_VARIANTS:
            if net_name == "trained" and label not in TRAINED_VARIANTS:
                continue
            per_channel = label.startswith("int8 per-channel")
            q = data_free_quantize(net, per_channel=per_channel, calibration_data=batches, **flags)
            out[f"{net_name}: {label}"], _ = acc(q)
            if net_name == "unbalanced" and flags["correct_bias"] and job.onnx:
                out.update(onnx_check(q, x, y, "dfq"))
        if extra["distill"]:
            q = data_free_quantize(net, iterations=extra["distill"], num_batches=2, seed=job.seed)
            out[f"{net_name}: DFQ, ZeroQ-distilled calibration"], _ = acc(q)
    return out


# ---------------------------------------------------------------------------- one fit
def onnx_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict[str, Any]:
    """:func:`onnx_eval`, or ``{prefix}_error`` with the exception when the export or the run fails."""
    try:
        return onnx_eval(model, x, y, prefix)
    except Exception as err:
        return {f"{prefix}_error": error_text(err)}


def error_text(err: BaseException) -> str:
    """The exception and the first line of its root cause (the exporter wraps errors several times)."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", (str(root).strip().splitlines() or [""])[0])[:300]
    return f"{type(err).__name__}, root cause {type(root).__name__}: {text}"


def onnx_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prefix: str) -> dict[str, Any]:
    """Export a quantized model, evaluate it with onnxruntime and compare with the torch eval forward."""
    import lightning_compress as lc

    model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.onnx"
        lc.export_onnx(model, model.example_input_array, path)
        logits = ort_logits(path, x.numpy())
        ops = op_counts(path)
        size = path.stat().st_size
    labels = y.numpy()
    return {
        f"{prefix}_onnx_acc": float((logits.argmax(1) == labels).mean()),
        f"{prefix}_agree": float((logits.argmax(1) == ref.argmax(1)).mean()),
        f"{prefix}_max_diff": float(np.abs(logits - ref).max()),
        f"{prefix}_ops": ops,
        f"{prefix}_file_bytes": size,
    }


def float_onnx(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calib: torch.Tensor) -> dict[str, Any]:
    """Float ONNX accuracy and onnxruntime ``quantize_static`` of it (accuracy, ops, file size)."""
    import lightning_compress as lc

    model.eval()
    labels = y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        fpath, qpath = Path(tmp) / "float.onnx", Path(tmp) / "ort_int8.onnx"
        lc.export_onnx(model, model.example_input_array, fpath)
        float_logits = ort_logits(fpath, x.numpy())
        ort_quantize_static(fpath, qpath, calib.numpy())
        q_logits = ort_logits(qpath, x.numpy())
        return {
            "float_onnx_acc": float((float_logits.argmax(1) == labels).mean()),
            "ort_acc": float((q_logits.argmax(1) == labels).mean()),
            "ort_agree_float": float((q_logits.argmax(1) == float_logits.argmax(1)).mean()),
            "ort_ops": op_counts(qpath),
            "float_ops": op_counts(fpath),
            "ort_file_bytes": qpath.stat().st_size,
            "float_file_bytes": fpath.stat().st_size,
        }


def run_job(args: tuple[Job, dict[str, Any]]) -> dict[str, Any]:
    """Train, test and measure one configuration (runs in a worker process, one torch thread)."""
    import lightning_compress as lc
    from lightning_compress.demos import MNIST5kDataModule

    job, extra = args
    quiet()
    torch.set_num_threads(1)
    pl.seed_everything(job.seed, verbose=False)
    dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=job.seed, random_shift=2)
    dm.setup()
    model = build(job.model, job.width)
    callbacks: list[pl.Callback] = []
    lowbit = None
    if job.prune is not None:
        callbacks.append(lc.GradualPruning(**dict(job.prune)))
    if job.qat is not None:
        callbacks.append(lc.QuantizationAwareTraining(**dict(job.qat)))
    if job.lowbit is not None:
        from lightning_compress.quantization.lowbit import LowBitWeights

        lowbit = LowBitWeights(**dict(job.lowbit))
        callbacks.append(lowbit)
    limit = {} if extra["limit_batches"] is None else {"limit_train_batches": extra["limit_batches"]}
    trainer = trainer_for(callbacks, max_epochs=job.epochs, **limit)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    acc = float(trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"])
    x, y = dm.test_dataset.tensors
    calib = dm.train_dataset.tensors[0][: extra["calib"]]
    out: dict[str, Any] = {
        "acc": acc,
        "fit_s": fit_s,
        "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
    }
    if job.onnx:
        if job.qat is None and job.lowbit is None and job.prune is None:
            out.update(float_onnx(model, x, y, calib))
        elif job.qat is not None:
            out.update(onnx_check(model, x, y, "qat"))
    if job.sizes:
        try:
            out.update(storage(model))
        except Exception as err:  # report it, do not lose the fit
            out["storage_error"] = error_text(err)
    if job.prune is not None:
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        out["sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if lowbit is not None:
        root = model
        values = {}
        for name in lowbit.param_names:
            w = root.get_parameter(name).detach()
            values[name] = max(int(torch.unique(row).numel()) for row in w.flatten(1))
        out["lowbit_values"] = values
        out["lowbit_float_layers"] = list(lowbit.first_last)
        out["zero_fraction"] = float(getattr(lowbit, "zero_fraction", 0.0))
    if job.dfq:
        out.update(run_dfq(model, job, extra, x, y, calib))
    return out


# ---------------------------------------------------------------------------- job lists
def qat_kwargs(args: argparse.Namespace, bits: int = 8) -> KW:
    kw = {
        "weight_bits": bits,
        "activation_bits": 8,
        "start": args.qat_start,
        "freeze_bn_at": args.qat_freeze_bn,
        "freeze_observers_at": args.qat_freeze_observers,
    }
    return tuple(kw.items())


def epochs_of(args: argparse.Namespace, model: str) -> int:
    return {
        "lenet5": args.lenet_epochs,
        "vgg": args.vgg_epochs,
        "mlp": args.mlp_epochs,
        "mobilenet": args.dfq_epochs,
    }[model]


def qat_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for model in ("lenet5", "vgg"):
        for seed in args.seeds:
            ep = epochs_of(args, model)
            jobs.append(Job("qat", "float", model, seed, ep, args.width, onnx=True))
            jobs.append(Job("qat", "int8 QAT", model, seed, ep, args.width, qat=qat_kwargs(args), onnx=True))
            jobs.append(
                Job("qat", "w4a8 QAT", model, seed, ep, args.width, qat=qat_kwargs(args, 4), onnx=True)
            )
    return jobs


def lowbit_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    rows: list[tuple[str, str, dict[str, Any] | None]] = [
        ("float", "lenet5", None),
        ("TWN (ternary)", "lenet5", {"mode": "ternary"}),
        ("TWN (ternary), all layers", "lenet5", {"mode": "ternary", "exclude_first_last": False}),
        ("TTQ", "lenet5", {"mode": "ttq"}),
        ("float", "mlp", None),
        ("BinaryConnect (binary)", "mlp", {"mode": "binary"}),
        ("BinaryConnect (binary), all layers", "mlp", {"mode": "binary", "exclude_first_last": False}),
    ]
    for seed in args.seeds:
        for name, model, kw in rows:
            low = None if kw is None else tuple(kw.items())
            jobs.append(Job("lowbit", name, model, seed, epochs_of(args, model), lowbit=low, sizes=True))
    return jobs


def dfq_jobs(args: argparse.Namespace) -> list[Job]:
    return [
        Job("dfq", "SmallMobileNet (ReLU)", "mobilenet", seed, args.dfq_epochs, dfq=True, onnx=True)
        for seed in args.seeds
    ]


def prune_kwargs(args: argparse.Namespace) -> KW:
    kw = {"target_sparsity": args.prune_sparsity, "start": 0.0, "end": 0.6, "frequency": args.prune_frequency}
    return tuple(kw.items())


def prune_qat_jobs(args: argparse.Namespace) -> list[Job]:
    ep = args.lenet_epochs
    jobs = []
    for seed in args.seeds:
        jobs.append(Job("prune_qat", "float", "lenet5", seed, ep, sizes=True))
        jobs.append(
            Job("prune_qat", "GradualPruning", "lenet5", seed, ep, prune=prune_kwargs(args), sizes=True)
        )
        jobs.append(Job("prune_qat", "int8 QAT", "lenet5", seed, ep, qat=qat_kwargs(args), sizes=True))
        jobs.append(
            Job(
                "prune_qat",
                "GradualPruning + int8 QAT",
                "lenet5",
                seed,
                ep,
                qat=qat_kwargs(args),
                prune=prune_kwargs(args),
                sizes=True,
            )
        )
    return jobs


# ---------------------------------------------------------------------------- latency
def short_fit(model: pl.LightningModule, steps: int, callbacks: list[pl.Callback]) -> None:
    from lightning_compress.demos import MNIST5kDataModule

    trainer_for(callbacks, max_steps=steps).fit(
        model, datamodule=MNIST5kDataModule(batch_size=BATCH_SIZE, seed=0)
    )


def time_sessions(sessions: list[Any], x: np.ndarray, rounds: int, repeats: int) -> list[list[float]]:
    """``times[i][r]``: median ms of ``repeats`` runs of session i in round r; ABBA order."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds):  # warm-up
        for _ in range(5):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = list(range(len(sessions)))
        if r % 2:
            order.reverse()
        for i in order:
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sessions[i].run(None, feeds[i])
                runs.append((time.perf_counter() - t0) * 1e3)
            times[i].append(statistics.median(runs))
    return times


def ratio_median(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def run_latency(args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    import lightning_compress as lc
    from lightning_compress.demos import MNIST5kDataModule

    quiet()
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=0)
    dm.setup()
    calib = dm.train_dataset.tensors[0][: args.calib].numpy()
    test = dm.test_dataset.tensors[0].numpy()
    nets = {f"SmallVGG (width {w})" if m == "vgg" else MODEL_LABEL[m]: (m, w) for m, w in args.latency_models}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model_name, width) in nets.items():
            pl.seed_everything(0, verbose=False)
            float_model = build(model_name, width, cosine=False)
            short_fit(float_model, args.latency_fit_steps, [])
            ours = copy.deepcopy(float_model)
            short_fit(ours, args.latency_fit_steps, [lc.QuantizationAwareTraining(start=0)])
            paths = {k: Path(tmp) / f"{model_name}{width}_{k}.onnx" for k in ("float", "ours", "ort")}
            lc.export_onnx(float_model, float_model.example_input_array, paths["float"])
            lc.export_onnx(ours, ours.example_input_array, paths["ours"])
            ort_quantize_static(paths["float"], paths["ort"], calib)
            ops = {k: op_counts(p) for k, p in paths.items()}
            all_ops = {k: op_counts(p, every=True) for k, p in paths.items()}
            sizes = {k: p.stat().st_size for k, p in paths.items()}
            for threads in args.latency_threads:
                sessions = [ort_session(paths[k], threads) for k in ("float", "ours", "ort")]
                for batch in args.latency_batches:
                    t = time_sessions(sessions, test[:batch], args.latency_rounds, args.latency_repeats)
                    row = {
                        "model": label,
                        "threads": threads,
                        "batch": batch,
                        "float_ms": statistics.median(t[0]),
                        "ours_ms": statistics.median(t[1]),
                        "ort_ms": statistics.median(t[2]),
                        "ours_vs_ort": ratio_median(t[1], t[2]),
                        "speedup_ours": ratio_median(t[0], t[1]),
                        "speedup_ort": ratio_median(t[0], t[2]),
                        "ours_vs_ort_min": min(t[1]) / min(t[2]),
                        "ops": ops,
                        "all_ops": all_ops,
                        "sizes": sizes,
                        "rounds": len(t[0]),
                    }
                    rows.append(row)
                    log(
                        f"[latency] {label} threads {threads} batch {batch}: float {row['float_ms']:.3f} ms, "
                        f"ours {row['ours_ms']:.3f} ms, ORT {row['ort_ms']:.3f} ms; ours/ORT "
                        f"{row['ours_vs_ort']:.2f}x, float/ours {row['speedup_ours']:.2f}x"
                    )
    return rows


# ---------------------------------------------------------------------------- overhead
class StepTimer(pl.Callback):
    """Wall time between consecutive training-batch starts (a whole step: data, forward, backward, update)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())

    def periods(self, skip: int) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.starts[skip:], self.starts[skip + 1 :])]


def run_overhead(args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    import lightning_compress as lc
    from lightning_compress.demos import MNIST5kDataModule

    quiet()
    rows = []
    warm = args.overhead_warmup
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("float", None),
        ("QAT, observers on", {"start": 0}),
        (
            "QAT, observers and BN frozen",
            {"start": 0, "freeze_observers_at": warm // 2, "freeze_bn_at": warm // 2},
        ),
    ]
    for model_name in args.overhead_models:
        label = f"SmallVGG (width {args.width})" if model_name == "vgg" else MODEL_LABEL[model_name]
        for threads in args.overhead_threads:
            torch.set_num_threads(threads)

            def fit(kw: dict[str, Any] | None, steps: int, model_name: str = model_name) -> StepTimer:
                pl.seed_everything(0, verbose=False)
                model = build(model_name, args.width)
                timer = StepTimer()
                cbs: list[pl.Callback] = [timer]
                if kw is not None:
                    cbs.insert(0, lc.QuantizationAwareTraining(**kw))
                dm = MNIST5kDataModule(batch_size=BATCH_SIZE, seed=0, random_shift=2)
                trainer_for(cbs, max_steps=steps).fit(model, datamodule=dm)
                return timer

            for _, kw in configs:  # untimed warm-up fit of every config
                fit(kw, warm + 2)
            per_round: list[list[float]] = [[] for _ in configs]
            for r in range(args.overhead_rounds):
                order = list(range(len(configs)))
                if r % 2:
                    order.reverse()
                for i in order:
                    per_round[i].append(
                        statistics.median(fit(configs[i][1], args.overhead_steps).periods(warm))
                    )
            for (name, _), t in zip(configs[1:], per_round[1:]):
                row = {
                    "model": label,
                    "threads": threads,
                    "config": name,
                    "float_ms": statistics.median(per_round[0]),
                    "qat_ms": statistics.median(t),
                    "ratio": ratio_median(t, per_round[0]),
                    "ratio_min": min(t) / min(per_round[0]),
                    # max / min of the per-fit step times over the rounds (1.0: every round alike)
                    "spread": max(max(x) / min(x) for x in (t, per_round[0])),
                    "rounds": len(t),
                }
                rows.append(row)
                log(
                    f"[overhead] {label} threads {threads} {name}: float {row['float_ms']:.1f} ms/step, QAT "
                    f"{row['qat_ms']:.1f} ms/step, {row['ratio']:.2f}x"
                )
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
    return rows


def thread_settings() -> list[int]:
    return sorted({TORCH_DEFAULT_THREADS, 1}, reverse=True)


# ---------------------------------------------------------------------------- report
def md_table(columns: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def rows_of(results: list[tuple[Job, dict[str, Any]]], section: str, model: str | None = None) -> list[Row]:
    rows: dict[str, Row] = {}
    for job, res in results:
        if job.section != section or (model is not None and job.model != model):
            continue
        rows.setdefault(job.row, Row(job.row)).results[job.seed] = res
    return list(rows.values())


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def kb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e3:.1f} kB"


def seeds_cells(row: Row, seeds: list[int], key: str = "acc") -> list[str]:
    return [pct(row.results[s].get(key)) if s in row.results else "-" for s in seeds]


def mean_of(row: Row, key: str) -> float | None:
    vals = row.values(key)
    return statistics.fmean(vals) if vals else None


def qat_md(
    results: list[tuple[Job, dict[str, Any]]], args: argparse.Namespace, targets: list[list[str]]
) -> list[str]:
    lines = [
        "## QAT vs onnxruntime `quantize_static` (MNIST 5k)",
        "",
        f"Float: plain training. int8 QAT: `QuantizationAwareTraining(weight_bits=8, activation_bits=8, "
        f"start={args.qat_start}, freeze_bn_at={args.qat_freeze_bn}, freeze_observers_at="
        f"{args.qat_freeze_observers})` (defaults otherwise: per-channel symmetric weights, per-tensor uint8 "
        "inputs with an EMA observer, BatchNorm folded while training); w4a8: the same with `weight_bits=4`. "
        "ORT quantize_static: the float run's `export_onnx` graph, `quant_pre_process`, then "
        "`quantize_static("
        "quant_format=QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8, "
        "calibrate_method=MinMax)` "
        f"with the first {args.calib} (unshifted) training images as calibration data. *torch* = the "
        "LightningModule after `trainer.fit` in eval mode (`trainer.test`); *ONNX* = onnxruntime (1 "
        "thread) on "
        "our `export_onnx` QDQ graph; *agree* = fraction of the 1,000 test images where the argmax of the "
        f"two is the same. LeNet5 {args.lenet_epochs} epochs, SmallVGG (width {args.width}) "
        f"{args.vgg_epochs} epochs.",
        "",
    ]
    seeds = args.seeds
    cols = [
        "Model",
        "Row",
        *[f"seed {s}" for s in seeds],
        "mean (torch)",
        "vs float",
        "ONNX (mean)",
        "agree (min)",
    ]
    body = []
    for model in ("lenet5", "vgg"):
        rows = {r.name: r for r in rows_of(results, "qat", model)}
        if "float" not in rows:
            continue
        label = MODEL_LABEL[model] + (f" (width {args.width})" if model == "vgg" else "")
        fl = rows["float"]
        f_acc = fl.mean("acc")
        ort_acc = mean_of(fl, "ort_acc")
        body.append(
            [
                label,
                "float",
                *seeds_cells(fl, seeds),
                f"**{pct(f_acc)}**",
                "",
                pct(mean_of(fl, "float_onnx_acc")),
                "",
            ]
        )
        body.append(
            [
                label,
                "ORT quantize_static (of the float run)",
                *seeds_cells(fl, seeds, "ort_acc"),
                f"**{pct(ort_acc)}**",
                f"{((ort_acc or 0) - f_acc) * 100:+.2f}",
                pct(ort_acc),
                "",
            ]
        )
        for name in ("int8 QAT", "w4a8 QAT"):
            if name not in rows:
                continue
            r = rows[name]
            agree = min(r.values("qat_agree"), default=None)
            body.append(
                [
                    label,
                    name,
                    *seeds_cells(r, seeds),
                    f"**{pct(r.mean('acc'))}**",
                    f"{(r.mean('acc') - f_acc) * 100:+.2f}",
                    pct(mean_of(r, "qat_onnx_acc")),
                    pct(agree),
                ]
            )
        q = rows.get("int8 QAT")
        if q is None:
            continue
        gap = (q.mean("acc") - f_acc) * 100
        ok_gap = gap >= -0.3
        q_onnx = mean_of(q, "qat_onnx_acc")
        ok_ort = q_onnx is not None and ort_acc is not None and q_onnx >= ort_acc
        agree = min(q.values("qat_agree") + rows.get("w4a8 QAT", Row("")).values("qat_agree"), default=0.0)
        targets.append(
            [f"{label}: int8 QAT within 0.3 points of float", f"{gap:+.2f} pt", "yes" if ok_gap else "**no**"]
        )
        targets.append(
            [
                f"{label}: int8 QAT (ONNX) >= ORT quantize_static",
                f"{pct(q_onnx)} vs {pct(ort_acc)} (torch {pct(q.mean('acc'))})",
                "yes" if ok_ort else "**no**",
            ]
        )
        targets.append(
            [
                f"{label}: torch fake-quant vs ONNX argmax agreement >= 99 %",
                f"min {pct(agree)}",
                "yes" if agree >= 0.99 else "**no**",
            ]
        )
    lines += md_table(cols, body)
    lines.append("")
    for model in ("lenet5", "vgg"):
        rows = {r.name: r for r in rows_of(results, "qat", model)}
        if "float" not in rows or "int8 QAT" not in rows:
            continue
        fl, q = (
            rows["float"].results[min(rows["float"].results)],
            rows["int8 QAT"].results[min(rows["int8 QAT"].results)],
        )
        diffs = ", ".join(
            f"{r.name} {max(r.values('qat_max_diff')):.2e}" for r in rows.values() if r.values("qat_max_diff")
        )
        for r in rows.values():
            errors = sorted(set(r.values("qat_error")))
            lines += [f"- **{MODEL_LABEL[model]} {r.name}: `export_onnx` failed**: `{e}`" for e in errors]
        if "qat_ops" in q and "ort_ops" in fl:
            lines.append(
                f"- {MODEL_LABEL[model]}: optimized graph of ours: {ops_cell(q['qat_ops'])}; of ORT "
                f"quantize_static: {ops_cell(fl['ort_ops'])}. File size float {kb(fl['float_file_bytes'])}, "
                f"ours {kb(q['qat_file_bytes'])}, ORT {kb(fl['ort_file_bytes'])}. Largest |logit| difference "
                f"torch vs ONNX: {diffs}."
            )
        w4 = rows.get("w4a8 QAT")
        if w4 is not None:
            lines.append(
                f"- {MODEL_LABEL[model]} w4a8: "
                f"{(w4.mean('acc') - rows['float'].mean('acc')) * 100:+.2f} points vs "
                f"float, {(w4.mean('acc') - rows['int8 QAT'].mean('acc')) * 100:+.2f} vs int8 QAT."
            )
    return [*lines, ""]


def latency_md(rows: list[dict[str, Any]], args: argparse.Namespace, targets: list[list[str]]) -> list[str]:
    lines = [
        "## int8 latency in onnxruntime (CPU)",
        "",
        f"Per model: the float net after a {args.latency_fit_steps}-step float fit (seed 0, real batches: "
        "sensible BatchNorm statistics and calibration ranges); *ours* = a copy of it after "
        f"{args.latency_fit_steps} more steps with `QuantizationAwareTraining(start=0)`, `export_onnx`; "
        "*ORT* = "
        f"`quantize_static` of the float ONNX model (as in the `qat` section, {args.calib} calibration "
        "images). "
        "Latency does not depend on the weights' values. onnxruntime "
        "`CPUExecutionProvider`, default graph optimizations, `intra_op_num_threads` = threads (with more "
        "than one, `session.intra_op.allow_spinning=0`: on a shared machine a spinning worker waits on "
        "a core "
        "another process holds), sequential "
        f"execution; {args.latency_rounds} rounds in ABBA order, each the median of "
        f"{args.latency_repeats} runs "
        "(after 5 warm-up runs); latency = median over rounds; ratios = median over rounds of the per-round "
        "ratio; *ours / ORT (fastest)* = min(ours) / min(ORT), the figure least disturbed by other work.",
        "",
    ]
    body = [
        [
            r["model"],
            str(r["threads"]),
            str(r["batch"]),
            f"{r['float_ms']:.3f}",
            f"{r['ours_ms']:.3f}",
            f"{r['ort_ms']:.3f}",
            f"**{r['ours_vs_ort']:.2f}x**",
            f"{r['ours_vs_ort_min']:.2f}x",
            f"**{r['speedup_ours']:.2f}x**",
            f"{r['speedup_ort']:.2f}x",
        ]
        for r in rows
    ]
    lines += md_table(
        [
            "Model",
            "threads",
            "batch",
            "float ms",
            "ours ms",
            "ORT ms",
            "ours / ORT",
            "ours / ORT (fastest)",
            "float / ours",
            "float / ORT",
        ],
        body,
    )
    lines += [
        "",
        "Compute ops of each graph after onnxruntime's optimizations (`optimized_ops`), and file sizes:",
        "",
    ]
    seen = set()
    ops_body = []
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        for key, name in (("float", "float"), ("ours", "ours (export_onnx)"), ("ort", "ORT quantize_static")):
            ops_body.append([r["model"], name, ops_cell(r["ops"][key]), kb(r["sizes"][key])])
    lines += md_table(["Model", "Graph", "ops", "file"], ops_body)
    notes: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        r = next(x for x in rows if x["model"] == model)
        ours = {k: v for k, v in r["ops"]["ours"].items() if k in FLOAT_COMPUTE_OPS}
        theirs = {k: v for k, v in r["ops"]["ort"].items() if k in FLOAT_COMPUTE_OPS}
        if sum(ours.values()) > sum(theirs.values()):
            notes.append(
                f"- {model}: our graph runs {sum(ours.values())} compute op(s) in float "
                f"({', '.join(f'{k} {v}' for k, v in ours.items())}), quantize_static's "
                f"{sum(theirs.values())}."
            )
        a, b = Counter(r["all_ops"]["ours"]), Counter(r["all_ops"]["ort"])
        more, fewer = a - b, b - a
        if more or fewer:
            notes.append(
                f"- {model}: other ops of our optimized graph vs quantize_static's: "
                + ", ".join(
                    [f"+{n} {k}" for k, n in sorted(more.items())]
                    + [f"-{n} {k}" for k, n in sorted(fewer.items())]
                )
                + "."
            )
    if notes:
        lines += ["", *notes]
    if rows:
        ok_ort = [r for r in rows if r["ours_vs_ort"] <= 1.05]
        ok_fast = [r for r in rows if r["speedup_ours"] >= 1.8]

        def cells(rs: list[dict[str, Any]], key: str) -> str:
            return "; ".join(f"{r['model']} b{r['batch']} t{r['threads']}: {r[key]:.2f}x" for r in rs)

        targets.append(
            [
                "Latency: ours <= 1.05x ORT quantize_static",
                f"{len(ok_ort)} / {len(rows)} settings ({cells(rows, 'ours_vs_ort')})",
                "yes" if len(ok_ort) == len(rows) else "**no**",
            ]
        )
        targets.append(
            [
                "Latency: ours >= 1.8x faster than float",
                f"{len(ok_fast)} / {len(rows)} settings ({cells(rows, 'speedup_ours')})",
                "yes" if len(ok_fast) == len(rows) else "**no**",
            ]
        )
        lines += [
            "",
            f"**Target ours <= 1.05x ORT: {'met' if len(ok_ort) == len(rows) else 'missed'}** (met in "
            f"{len(ok_ort)} of {len(rows)} settings); **target >= 1.8x faster than float: "
            f"{'met' if len(ok_fast) == len(rows) else 'missed'}** (met in {len(ok_fast)} of {len(rows)}; "
            f"ORT quantize_static itself reaches 1.8x in {sum(r['speedup_ort'] >= 1.8 for r in rows)}).",
        ]
    return [*lines, ""]


def overhead_md(rows: list[dict[str, Any]], args: argparse.Namespace, targets: list[list[str]]) -> list[str]:
    lines = [
        "## QAT training-step overhead (CPU)",
        "",
        f"Fits of {args.overhead_steps} steps (batch {BATCH_SIZE}, same seed, so the same batches), one "
        "untimed warm-up fit per configuration, then "
        f"{args.overhead_rounds} rounds in ABBA order. Step time = median over the steps after the first "
        f"{args.overhead_warmup} of the wall time between consecutive training-batch starts (data, forward, "
        "backward, optimizer, every callback hook); ratio = median over rounds of QAT / float of the same "
        "round. *observers on*: `QuantizationAwareTraining(start=0)` (the observed, BatchNorm-folding phase "
        "that most of a fit spends); *frozen*: observers and BatchNorm frozen at step "
        f"{args.overhead_warmup // 2} (the phase after `freeze_*_at`). *spread* = the larger, over float "
        "and QAT, of max / min of the per-fit step times over the rounds: above 1.5 other work on the "
        "machine slowed some fits (a 2-thread fit waits for a core another process holds), the paired "
        "ratio is then unreliable and the verdict uses the fastest rounds' ratio, min(QAT) / min(float).",
        "",
    ]
    body = [
        [
            r["model"],
            str(r["threads"]),
            r["config"],
            f"{r['float_ms']:.1f}",
            f"{r['qat_ms']:.1f}",
            f"**{r['ratio']:.2f}x**",
            f"{r['ratio_min']:.2f}x",
            f"{r['spread']:.2f}" + (" (contended)" if r["spread"] > 1.5 else ""),
        ]
        for r in rows
    ]
    lines += md_table(
        [
            "Model",
            "threads",
            "QAT phase",
            "float ms/step",
            "QAT ms/step",
            "QAT / float",
            "fastest rounds",
            "spread",
        ],
        body,
    )

    def verdict(r: dict[str, Any]) -> float:
        return r["ratio_min"] if r["spread"] > 1.5 else r["ratio"]

    if rows:
        ok = all(verdict(r) <= 1.5 for r in rows)
        shown = "; ".join(
            f"{r['model']} t{r['threads']} {r['config'].split(',')[1].strip()}: {verdict(r):.2f}x"
            + (" (fastest rounds, contended)" if r["spread"] > 1.5 else "")
            for r in rows
        )
        targets.append(["QAT step time <= 1.5x float", shown, "yes" if ok else "**no**"])
        lines += ["", f"**Target (<= 1.5x): {'met' if ok else 'missed'}** ({shown})."]
    return [*lines, ""]


def lowbit_md(
    results: list[tuple[Job, dict[str, Any]]], args: argparse.Namespace, targets: list[list[str]]
) -> list[str]:
    lines = [
        "## Binary and ternary weights (`LowBitWeights`)",
        "",
        f"LeNet5 ({args.lenet_epochs} epochs): `LowBitWeights(mode='ternary')` (TWN, delta 0.7 mean|W|, one "
        "scale per layer) and `mode='ttq'` (learned scales W^p, W^n, threshold 0.05 max|W|); LeNet300100 "
        f"({args.mlp_epochs} epochs): `mode='binary'` (BinaryConnect with XNOR-Net per-output-channel "
        "scales). "
        "By default the first and last layers stay float (`exclude_first_last=True`, as in the papers); the "
        "*all layers* rows quantize every layer. *stored* = "
        "`compression_summary(model).quantized_bytes` (low-bit "
        "rows at their bit width in their smallest encoding + scales, the float rows in fp32); *values* = "
        "distinct weight values in an "
        "output channel of each quantized layer (the most over its channels, seed 0).",
        "",
    ]
    seeds = args.seeds
    body = []
    checks = {}
    for model in ("lenet5", "mlp"):
        rows = rows_of(results, "lowbit", model)
        fl = next((r for r in rows if r.name == "float"), None)
        if fl is None:
            continue
        for r in rows:
            res0 = r.results[min(r.results)]
            values = res0.get("lowbit_values") or {}
            body.append(
                [
                    MODEL_LABEL[model],
                    r.name,
                    *seeds_cells(r, seeds),
                    f"**{pct(r.mean('acc'))}**",
                    "" if r is fl else f"{(r.mean('acc') - fl.mean('acc')) * 100:+.2f}",
                    ", ".join(f"{k.removesuffix('.weight')} {v}" for k, v in values.items()) or "-",
                    "-" if r is fl else pct(mean_of(r, "zero_fraction")),
                    kb(mean_of(r, "quantized_bytes")) if r is not fl else kb(mean_of(r, "dense_bytes")),
                ]
            )
            checks[(model, r.name)] = (r.mean("acc") - fl.mean("acc")) * 100
    lines += md_table(
        ["Model", "Row", *[f"seed {s}" for s in seeds], "mean", "vs float", "values", "zeros", "stored"], body
    )
    twn = checks.get(("lenet5", "TWN (ternary)"))
    if twn is not None:
        targets.append(
            ["TWN on LeNet5 within 0.5 points of float", f"{twn:+.2f} pt", "yes" if twn >= -0.5 else "**no**"]
        )
        lines += [
            "",
            "**Target (TWN within 0.5 points of float on LeNet5): "
            f"{'met' if twn >= -0.5 else 'missed'}** ({twn:+.2f} pt).",
        ]
    shown = "; ".join(f"{MODEL_LABEL[m]} {n}: {d:+.2f} pt" for (m, n), d in checks.items() if n != "float")
    lines += ["", f"Differences to float: {shown}."]
    return [*lines, ""]


def dfq_md(
    results: list[tuple[Job, dict[str, Any]]], args: argparse.Namespace, targets: list[list[str]]
) -> list[str]:
    rows = rows_of(results, "dfq")
    if not rows:
        return []
    r = rows[0]
    seeds = sorted(r.results)
    lines = [
        "## Data-free quantization (`data_free_quantize`) on SmallMobileNet",
        "",
        "SmallMobileNet (width 16, expansion 4) with every ReLU6 replaced by ReLU before training "
        "(Nagel et al. "
        f"replace ReLU6 for MobileNetV2; ReLU keeps the rescaling below exact), {args.dfq_epochs} epochs. "
        "*Unbalanced*: in every block, for `expand -> bn1 -> ReLU -> depthwise` and `depthwise -> bn2 "
        "-> ReLU -> "
        f"project`, {args.dfq_fraction:.0%} of the BatchNorm's channels get gamma and beta multiplied by k "
        f"(log-uniform in [{args.dfq_low:g}, {args.dfq_high:g}]) and the consumer's matching input "
        "channel divided "
        "by k: the same function (float accuracy unchanged), badly unbalanced per-channel ranges (the "
        "situation "
        "of MobileNetV2 in the paper). Rows: `data_free_quantize(net, weight_bits=8, activation_bits=8, "
        "per_channel=False, equalize=..., absorb_bias=..., correct_bias=..., calibration_data=<the first "
        f"{args.calib} training images>)` (activation ranges from those images; CLE, absorption and the "
        "analytic bias correction use no data), evaluated in torch on the 1,000 test images. The per-channel "
        "row is a reference (per-channel weights sidestep the weight imbalance, not the activation one). "
        "*imbalance*: largest ratio, over the depthwise layers, of the largest to the median "
        "per-channel range "
        "of the BN-folded weight.",
        "",
    ]
    keys = ["float"] + [f"trained: {label}" for label in TRAINED_VARIANTS]
    keys += ["float_unbalanced"] + [f"unbalanced: {label}" for label, _ in DFQ_VARIANTS]
    if args.dfq_distill:
        keys.insert(keys.index("float_unbalanced"), "trained: DFQ, ZeroQ-distilled calibration")
        keys.append("unbalanced: DFQ, ZeroQ-distilled calibration")
    names = {"float": "trained: float", "float_unbalanced": "unbalanced: float"}
    body = []
    means: dict[str, float] = {}
    for key in keys:
        vals = [r.results[s][key] for s in seeds]
        means[key] = statistics.fmean(vals)
        body.append([names.get(key, key), *[pct(v) for v in vals], f"**{pct(means[key])}**"])
    lines += md_table(["Net: row", *[f"seed {s}" for s in seeds], "mean"], body)
    imb = statistics.fmean(r.results[s]["imbalance"] for s in seeds)
    imb_u = statistics.fmean(r.results[s]["imbalance_unbalanced"] for s in seeds)
    diff = max(r.results[s]["unbalance_diff"] / max(r.results[s]["logit_scale"], 1e-12) for s in seeds)
    lines += [
        "",
        f"- Imbalance of the depthwise weights: trained {imb:.1f}, unbalanced {imb_u:.1f}; the "
        "rescaling changed the "
        f"logits by at most {diff:.1e} of the largest logit (float rounding).",
    ]
    if "dfq_onnx_acc" in r.results[seeds[0]]:
        lines.append(
            f"- The unbalanced net's full-DFQ model exported with `export_onnx`: onnxruntime accuracy "
            f"{pct(statistics.fmean(r.results[s]['dfq_onnx_acc'] for s in seeds))}, argmax agreement "
            "with torch "
            f"min {pct(min(r.results[s]['dfq_agree'] for s in seeds))}; ops "
            f"{ops_cell(r.results[seeds[0]]['dfq_ops'])}."
        )
    t_base = means["trained: int8 per-tensor, no CLE"]
    lines.append(
        f"- The net as trained is {'not ' if t_base >= means['float'] - 0.01 else ''}unbalanced enough to "
        f"break per-tensor int8: {pct(t_base)} without CLE vs float {pct(means['float'])}."
    )
    errors = sorted({r.results[s]["dfq_error"] for s in seeds if "dfq_error" in r.results[s]})
    lines += [f"- **`export_onnx` of the full-DFQ model failed**: `{e}`" for e in errors]
    base = means["unbalanced: int8 per-tensor, no CLE"]
    cle = means["unbalanced: + CLE"]
    full = means["unbalanced: + CLE + absorption + bias correction (DFQ)"]
    fl = means["float_unbalanced"]
    shape = base < fl - 0.05 and cle > base and full >= fl - 0.01
    lines += [
        "- Paper (MobileNetV2, ImageNet): 0.1 % per-tensor int8 -> 69.9 % with CLE -> 70.9 % with CLE "
        "+ bias "
        f"absorption + correction (float 71.7 %). Here, unbalanced: {pct(base)} -> {pct(cle)} -> {pct(full)} "
        f"(float {pct(fl)}): the paper's pattern (collapse without CLE, recovery to within 1 point of float) "
        f"{'is reproduced' if shape else 'is not reproduced'}.",
        "",
    ]
    targets.append(
        [
            "DFQ: unbalanced SmallMobileNet collapses without CLE, full DFQ within 1 point of float",
            f"{pct(base)} -> {pct(cle)} -> {pct(full)} (float {pct(fl)})",
            "yes" if shape else "**no**",
        ]
    )
    return lines


def prune_qat_md(
    results: list[tuple[Job, dict[str, Any]]], args: argparse.Namespace, targets: list[list[str]]
) -> list[str]:
    rows = rows_of(results, "prune_qat")
    if not rows:
        return []
    seeds = args.seeds
    fl = next(r for r in rows if r.name == "float")
    has_q = any(res.get("has_quantized_bytes") for r in rows for res in r.results.values())
    lines = [
        "## Pruning + QAT on LeNet5",
        "",
        f"LeNet5, {args.lenet_epochs} epochs. GradualPruning: "
        f"`GradualPruning(target_sparsity={args.prune_sparsity}, "
        f"start=0.0, end=0.6, frequency={args.prune_frequency})` (cubic, global magnitude, every Linear "
        "/ Conv); "
        "int8 QAT: as in the `qat` section; both: the two callbacks in one fit (pruning first in the "
        "callback "
        "list). Sizes from `compression_summary(model)`: *fp32 dense* = `dense_bytes`, *fp32 sparse* = "
        "`sparse_bytes` (non-zero values + the cheaper index), *int8* = `quantized_bytes` (quantized rows at "
        "their bit width in their smallest encoding - dense, bitmask, CSR or Deep Compression's relative "
        "index - + scales, biases and input scale / zero point)"
        + (
            ""
            if has_q
            else " **(not available in this library version: the summary has no `quantized_bytes`)**"
        )
        + "; *int8 sparse* (computed by this script) = per quantized layer the smaller of the dense int8 "
        "weights and the non-zero int8 weights + a 1-bit-per-weight presence bitmap, + fp32 scales, biases "
        "and the input scale / zero point. *zeros* = fraction of zero weights in the (quantized) Linear "
        "/ Conv "
        "weights.",
        "",
    ]
    body = []
    for r in rows:
        err = r.values("storage_error")
        body.append(
            [
                r.name,
                *seeds_cells(r, seeds),
                f"**{pct(r.mean('acc'))}**",
                "" if r is fl else f"{(r.mean('acc') - fl.mean('acc')) * 100:+.2f}",
                pct(
                    mean_of(r, "sparsity")
                    if mean_of(r, "int8_zero_fraction") is None
                    else mean_of(r, "int8_zero_fraction")
                ),
                kb(mean_of(r, "dense_bytes")),
                kb(mean_of(r, "sparse_bytes")),
                kb(mean_of(r, "quantized_bytes")),
                kb(mean_of(r, "int8_sparse_bytes")) if not err else f"error: {err[0]}",
            ]
        )
    lines += md_table(
        [
            "Row",
            *[f"seed {s}" for s in seeds],
            "mean",
            "vs float",
            "zeros",
            "fp32 dense",
            "fp32 sparse",
            "int8",
            "int8 sparse",
        ],
        body,
    )
    both = next((r for r in rows if r.name == "GradualPruning + int8 QAT"), None)
    if both is not None:
        dense = mean_of(fl, "dense_bytes")
        small = mean_of(both, "int8_sparse_bytes")
        ratio = f"{dense / small:.1f}x smaller than fp32 dense" if dense and small else "size unknown"
        zeros = mean_of(both, "int8_zero_fraction") or 0.0
        lines += [
            "",
            f"Pruning + int8 QAT: {(both.mean('acc') - fl.mean('acc')) * 100:+.2f} points vs float, "
            f"{zeros:.1%} zero int8 weights (the pruned weights stay exactly zero on the symmetric grid), "
            f"{ratio}.",
        ]
        targets.append(
            [
                "Pruning + QAT: pruned weights stay zero in the int8 model",
                f"{zeros:.1%} zero int8 weights at {args.prune_sparsity:.0%} target",
                "yes" if zeros >= args.prune_sparsity - 1e-3 else "**no**",
            ]
        )
    return [*lines, ""]


def stamp(mtime: tuple[float, str]) -> str:
    return f"`{mtime[1]}` modified {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(mtime[0]))}"


def report(
    args: argparse.Namespace,
    results: list[tuple[Job, dict[str, Any]]],
    latency: list[dict[str, Any]],
    overhead: list[dict[str, Any]],
    wall: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    import onnx
    import onnxruntime

    cmd = " ".join(shlex.quote(a) for a in ["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    head = ["# Quantization benchmark: QAT vs quantize_static, int8 latency, QAT overhead, low-bit, DFQ", ""]
    if args.quick:
        head += [
            "**`--quick` smoke run: tiny epochs, 1 seed, few rounds. These numbers are not results.**",
            "",
        ]
    head += [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; whole run {wall / 60:.1f} min",
        f"- Command: `{cmd}`",
        f"- Machine: {os.cpu_count()} logical cores ({platform.machine()}, torch CPU capability "
        f"{capability}); "
        f"torch's default thread count {TORCH_DEFAULT_THREADS}; load average (1/5/15 min) at start "
        + "/".join(f"{x:.2f}" for x in load[0])
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load[1])
        + " (the machine is shared: latency numbers are noisy, ratios are measured side by side)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, pytorch-lightning "
        f"{pl.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}",
        f"- Training sections: {args.jobs} fits in parallel, one torch thread each; Adam lr 1e-3 with "
        "cosine decay "
        f"to 0 over the fit (per step), no weight decay, batch {BATCH_SIZE} ({STEPS_PER_EPOCH} steps "
        "per epoch), "
        f"2-px random shifts, MNIST 5k (4,000 train / 1,000 test); seeds {', '.join(map(str, args.seeds))}; "
        f"epochs: LeNet5 {args.lenet_epochs}, SmallVGG {args.vgg_epochs}, LeNet300100 {args.mlp_epochs}, "
        f"SmallMobileNet {args.dfq_epochs}"
        + (
            ""
            if args.limit_batches is None
            else f" (only the first {args.limit_batches} batches of each epoch)"
        ),
        f"- Code: newest library source at the start {stamp(args.lib_start)}"
        + (
            ""
            if args.lib_end[0] <= args.lib_start[0]
            else f"; **changed during the run** (newest at the end {stamp(args.lib_end)}: the workers "
            "import the "
            "library when they start, so fits may mix versions)"
        ),
        "",
    ]
    lines: list[str] = []
    targets: list[list[str]] = []
    if "qat" in args.sections:
        lines += qat_md(results, args, targets)
    if "latency" in args.sections:
        lines += latency_md(latency, args, targets)
    if "overhead" in args.sections:
        lines += overhead_md(overhead, args, targets)
    if "lowbit" in args.sections:
        lines += lowbit_md(results, args, targets)
    if "dfq" in args.sections:
        lines += dfq_md(results, args, targets)
    if "prune_qat" in args.sections:
        lines += prune_qat_md(results, args, targets)
    for note in args.notes:
        lines += [f"- Note: {note}", ""]
    summary = ["## Targets", "", *md_table(["Target", "Measured", "Met"], targets), ""] if targets else []
    return "\n".join(head + summary + lines).rstrip() + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2, help="fits in parallel (default 2)")
    p.add_argument("--width", type=int, default=16, help="SmallVGG width of the training sections")
    p.add_argument("--lenet-epochs", type=int, default=8)
    p.add_argument("--vgg-epochs", type=int, default=5)
    p.add_argument("--mlp-epochs", type=int, default=20, help="LeNet300100 epochs (lowbit)")
    p.add_argument("--dfq-epochs", type=int, default=3, help="SmallMobileNet epochs (dfq)")
    p.add_argument("--qat-start", type=float, default=0.3)
    p.add_argument("--qat-freeze-bn", type=float, default=0.8)
    p.add_argument("--qat-freeze-observers", type=float, default=0.9)
    p.add_argument("--calib", type=int, default=512, help="calibration images (quantize_static, DFQ ranges)")
    p.add_argument("--prune-sparsity", type=float, default=0.9)
    p.add_argument("--prune-frequency", type=int, default=25)
    p.add_argument("--dfq-fraction", type=float, default=0.25, help="fraction of channels rescaled (dfq)")
    p.add_argument("--dfq-low", type=float, default=10.0)
    p.add_argument("--dfq-high", type=float, default=100.0)
    p.add_argument(
        "--dfq-distill", type=int, default=0, help="also a ZeroQ-distilled row with this many iterations"
    )
    p.add_argument("--latency-models", default="lenet5,vgg16,vgg32", help="lenet5 and vgg<width>")
    p.add_argument("--latency-threads", default="2,1")
    p.add_argument("--latency-batches", default="8,32")
    p.add_argument("--latency-rounds", type=int, default=30)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--latency-fit-steps", type=int, default=20)
    p.add_argument("--overhead-models", default="lenet5,vgg", help="lenet5, vgg (at --width)")
    p.add_argument("--overhead-steps", type=int, default=25)
    p.add_argument("--overhead-warmup", type=int, default=8)
    p.add_argument("--overhead-rounds", type=int, default=5)
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default all)")
    p.add_argument("--overhead-threads", default=None, help="default: torch's default and 1")
    p.add_argument("--quick", action="store_true", help="smoke test: numbers are not results")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.latency_threads = [int(t) for t in args.latency_threads.split(",") if t]
    args.latency_batches = [int(b) for b in args.latency_batches.split(",") if b]
    args.latency_models = [
        ("lenet5", 0) if m == "lenet5" else ("vgg", int(m.removeprefix("vgg") or 16))
        for m in args.latency_models.split(",")
        if m
    ]
    args.overhead_models = [m for m in args.overhead_models.split(",") if m]
    args.overhead_threads = (
        thread_settings()
        if args.overhead_threads is None
        else [int(t) for t in args.overhead_threads.split(",")]
    )
    if set(args.sections) - set(SECTIONS) or set(args.overhead_models) - {"lenet5", "vgg"}:
        p.error(f"--sections takes {SECTIONS}; --overhead-models takes lenet5, vgg")
    if args.quick:
        args.seeds, args.lenet_epochs, args.vgg_epochs, args.mlp_epochs, args.dfq_epochs = [0], 1, 1, 2, 1
        args.latency_rounds, args.latency_repeats, args.latency_fit_steps = 4, 3, 4
        args.overhead_steps, args.overhead_warmup, args.overhead_rounds = 12, 4, 2
        args.latency_models, args.overhead_models, args.latency_batches = [("lenet5", 0)], ["lenet5"], [8]
        args.latency_threads, args.overhead_threads, args.limit_batches = [1], [1], 20
        args.calib = 128
    return args


def library_mtime() -> tuple[float, str]:
    """Newest modification time of the library's sources (the code under test; no git here)."""
    newest = max((ROOT / "lightning_compress").rglob("*.py"), key=lambda f: f.stat().st_mtime)
    return newest.stat().st_mtime, newest.relative_to(ROOT).as_posix()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    import lightning_compress.demos
    import lightning_compress.quantization  # noqa: F401

    args.notes = []
    for section, rel in (("lowbit", "quantization/lowbit.py"), ("dfq", "quantization/data_free.py")):
        if section in args.sections and not lib_file(rel):
            args.sections.remove(section)
            args.notes.append(f"section `{section}` left out: `lightning_compress/{rel}` does not exist yet.")
    for module in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"quantization.py needs {module} (pip install {module})")
    args.lib_start = library_mtime()
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    jobs: list[Job] = []
    makers = {"qat": qat_jobs, "lowbit": lowbit_jobs, "dfq": dfq_jobs, "prune_qat": prune_qat_jobs}
    for section, make in makers.items():
        if section in args.sections:
            jobs += make(args)
    unique: dict[tuple[Any, ...], Job] = {}
    for job in jobs:
        have = unique.get(job.key())
        if have is None:
            unique[job.key()] = job
        else:  # the same fit measured for several sections: do every measurement once
            unique[job.key()] = dataclasses.replace(
                have, onnx=have.onnx or job.onnx, sizes=have.sizes or job.sizes, dfq=have.dfq or job.dfq
            )
    extra = {
        "calib": args.calib,
        "fraction": args.dfq_fraction,
        "low": args.dfq_low,
        "high": args.dfq_high,
        "distill": args.dfq_distill,
        "limit_batches": args.limit_batches,
    }
    order = sorted(unique.values(), key=lambda j: -j.cost())  # longest first: the workers finish together
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    if order:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for job, res in zip(order, pool.imap(run_job, [(j, extra) for j in order])):
                done[job.key()] = res
                print(
                    f"[{job.section}] {job.model} seed {job.seed} {job.row:<28} acc {res['acc']:.4f} "
                    f"fit {res['fit_s']:.1f} s ({(time.perf_counter() - t0) / 60:.1f} min)",
                    flush=True,
                )
    results = [(job, done[job.key()]) for job in jobs]
    log = lambda m: print(m, flush=True)  # noqa: E731
    latency = run_latency(args, log) if "latency" in args.sections else []
    overhead = run_overhead(args, log) if "overhead" in args.sections else []
    args.lib_end = library_mtime()
    text = report(args, results, latency, overhead, time.perf_counter() - t0, (load_start, os.getloadavg()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
