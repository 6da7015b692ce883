"""The example script and the ``make demo`` entry point run, with tiny settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_compress.demos import main as demo

ROOT = Path(__file__).resolve().parents[1]


def test_prune_existing_trainer_script(tmp_path):
    script = ROOT / "examples" / "prune_existing_trainer.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--max-epochs", "1", "--sparsity", "0.8", "--root-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Compression summary" in proc.stdout
    assert "TOTAL" in proc.stdout
    assert "net.1.weight:" in proc.stdout
    assert list(tmp_path.rglob("compression_report.png")), "CompressionReport saved no plot"


def test_demo_main_fast():
    result = demo.main(["--fast", "--sparsity", "0.9"])
    assert result["target_sparsity"] == 0.9
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["dense_sparsity"] == 0.0
    assert result["sparse_bytes"] < result["dense_bytes"]
    assert result["compression_ratio"] > 4
    for key in ("dense_acc", "pruned_acc"):
        assert 0.1 < result[key] <= 1.0
    assert result["dense_fit_s"] > 0
    assert result["pruned_fit_s"] > 0


def test_custom_technique_example(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import custom_technique
    finally:
        sys.path.pop(0)
    result = custom_technique.main(["--max-epochs", "3", "--root-dir", str(tmp_path)])
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)  # the custom importance pruned exactly
    assert result["max_abs_weight"] <= 0.3 + 1e-7  # the custom constraint held (float32 0.3)
    assert result["test_acc"] > 0.8


def test_slim_existing_trainer_example(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import slim_existing_trainer
    finally:
        sys.path.pop(0)
    result = slim_existing_trainer.main(
        ["--max-epochs", "6", "--keep-macs", "0.4", "--root-dir", str(tmp_path)]
    )
    assert result["macs_kept"] <= 0.4 + 1e-9
    assert result["params"] < 0.6 * result["dense_params"]  # channels physically gone
    assert result["same_outputs"] == 1.0  # load_checkpoint rebuilt the slim, fused model exactly
    assert result["test_acc"] > 0.9


def test_quantize_existing_trainer_example(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import quantize_existing_trainer
    finally:
        sys.path.pop(0)
    result = quantize_existing_trainer.main(["--max-epochs", "8", "--root-dir", str(tmp_path)])
    assert result["integer_ops"] >= 3  # QLinearConv x2 and a QGemm in onnxruntime's graph
    assert result["agreement"] >= 0.99  # the int8 ONNX model predicts what the QAT model predicts
    assert result["restored_same_outputs"] == 1.0  # checkpoint + restore_quantization: same model
    assert result["zero_fraction"] > 0.8  # pruned weights stay zero under quantization
    assert result["quantized_bytes"] < 0.15 * result["dense_bytes"]  # sparse int8 storage
    assert result["test_acc"] > 0.9


def test_distill_existing_student_example(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import distill_existing_student
    finally:
        sys.path.pop(0)
    result = distill_existing_student.main(
        ["--teacher-epochs", "1", "--max-epochs", "2", "--limit-batches", "0.25", "--root-dir", str(tmp_path)]
    )
    assert result["export_matches"]  # DigitMLP.load_from_checkpoint gives the distilled student
    assert result["student_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert result["distilled_acc"] > 0.25  # tiny settings: well above chance (0.1), not a result
    assert (tmp_path / "distilled_student.ckpt").is_file()
