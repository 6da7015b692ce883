"""The ``lightning-compress`` console script and the shipped YAML recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

import lightning_compress as lc
from lightning_compress.cli import CompressionCLI, export, main, report
from lightning_compress.quantization.fake_quant import quantized_layers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
LENET300 = CONFIGS / "lenet300_gradual_pruning.yaml"
LENET5 = CONFIGS / "lenet5_digits_gradual_pruning.yaml"

# Small, quiet runs: one short epoch, two validation batches, no progress bar / model summary.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=20",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _zero_fraction(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


class TinyDigitsModel(pl.LightningModule):
    """A user's own LightningModule, referenced from YAML by its import path."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_help_lists_subcommands():
    script = Path(sys.executable).with_name("lightning-compress")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_compress.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test", "predict", "report"):
        assert sub in proc.stdout


def test_fit_lenet300_yaml_reaches_target_sparsity(tmp_path):
    main(["fit", "--config", str(LENET300), "--trainer.default_root_dir", str(tmp_path), *QUICK])

    run_dir = tmp_path / "lightning_logs" / "version_0"
    # Short names resolved to the package's callbacks; the resolved config is saved with the run.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    paths = [cb["class_path"] for cb in saved["trainer"]["callbacks"]]
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["GradualPruning", "CompressionReport"]
    assert all(p.startswith("lightning_compress.") for p in paths)
    assert (run_dir / "compression_report.png").is_file()

    # The checkpoint is really sparse, at the configured target, under the user's parameter names.
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    target = yaml.safe_load(LENET300.read_text())["trainer"]["callbacks"][0]["init_args"]["target_sparsity"]
    sparsity = _zero_fraction(state[f"fc{i}.weight"] for i in (1, 2, 3))
    assert sparsity == pytest.approx(target, abs=1e-3)

    # `report` rebuilds the recipe's model, loads the checkpoint and summarizes what the run produced.
    out = tmp_path / "summary.json"
    main(["report", "--config", str(LENET300), "--ckpt_path", str(ckpt), "--json", str(out)])
    totals = json.loads(out.read_text())["totals"]
    weights = sum(state[f"fc{i}.weight"].numel() for i in (1, 2, 3))
    biases = sum(state[f"fc{i}.bias"].numel() for i in (1, 2, 3))
    assert totals["params"] == weights + biases
    assert totals["nonzeros"] == int(sum((t != 0).sum() for t in state.values() if t.dtype.is_floating_point))
    assert totals["compression_ratio"] > 5
    assert report(["--config", str(LENET300)]).sparsity < 0.01  # no checkpoint: the fresh, dense model
    with pytest.raises(SystemExit) as exc:
        main(["report", "--config", str(LENET300), "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert exc.value.code == 2


def test_cli_run_false_lenet5_two_four(tmp_path):
    cli = CompressionCLI(
        args=["--config", str(LENET5), "--trainer.default_root_dir", str(tmp_path), *QUICK], run=False
    )
    assert type(cli.model).__name__ == "LeNet5"
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    cli.trainer.fit(cli.model, cli.datamodule)

    model = cli.model
    for name in ("fc1", "fc2", "fc3"):  # 2:4 on every Linear: exactly 2 zeros in each group of 4
        groups = model.get_submodule(name).weight.detach().reshape(-1, 4)
        assert torch.all((groups == 0).sum(dim=1) == 2), name
    for name in ("conv1", "conv2"):  # excluded by `exclude: ["conv*"]`
        assert _zero_fraction([model.get_submodule(name).weight]) == 0.0


def test_users_own_model_by_class_path(tmp_path):
    config = {
        "seed_everything": 0,
        "model": {"class_path": f"{__name__}.TinyDigitsModel", "init_args": {"hidden": 32}},
        "data": {"class_path": "lightning_compress.demos.DigitsDataModule"},
        "trainer": {
            "callbacks": [
                {
                    "class_path": "GradualPruning",
                    "init_args": {"target_sparsity": 0.5, "end": 0.5, "frequency": 5},
                }
            ]
        },
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = CompressionCLI(
        args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path), *QUICK], run=False
    )
    assert isinstance(cli.model, TinyDigitsModel)
    cli.trainer.fit(cli.model, cli.datamodule)
    weights = [m.weight for m in cli.model.modules() if isinstance(m, nn.Linear)]
    assert _zero_fraction(weights) == pytest.approx(0.5, abs=1e-3)


def _fit_edited_recipe(tmp_path, capsys, old: str, new: str) -> str:
    """Run `fit` on the LeNet recipe with ``old`` replaced by ``new``; expect a usage error, return stderr."""
    bad = LENET300.read_text().replace(old, new)
    assert new in bad
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path)])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_callback_argument_names_it(tmp_path, capsys):
    err = _fit_edited_recipe(tmp_path, capsys, "criterion: magnitude", "criterion: foo")
    assert "criterion" in err
    assert "'foo'" in err
    assert "GradualPruning" in err
    assert "magnitude" in err  # says what is accepted


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--trainer.callbacks.help", "GradualPruning"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "{constant,linear,cubic,exponential,polynomial}" in out
    assert "{magnitude,taylor,activation,random,lamp}" in out
    assert "{global,local}" in out


def test_out_of_range_value_is_a_usage_error_naming_it(tmp_path, capsys):
    err = _fit_edited_recipe(tmp_path, capsys, "target_sparsity: 0.92", "target_sparsity: 1.5")
    assert "`target_sparsity`=1.5 is not supported; expected a number in [0, 1)" in err


def _callback_args(config: Path) -> list[tuple[str, dict]]:
    cfg = yaml.safe_load(config.read_text())
    return [(cb["class_path"], cb.get("init_args", {})) for cb in cfg["trainer"]["callbacks"]]


TEACHER = CONFIGS / "hinton_teacher.yaml"
DISTILL = CONFIGS / "hinton_distillation.yaml"


def _quick_teacher(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the teacher recipe briefly in ``folder`` (its checkpoint path is relative to the cwd)."""
    monkeypatch.chdir(folder)
    cli = CompressionCLI(
        args=[
            "--config",
            str(TEACHER),
            "--trainer.default_root_dir",
            str(folder),
            "--trainer.logger=false",
            *QUICK,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    path = folder / "checkpoints" / "hinton_teacher.ckpt"
    assert path.is_file()
    return path


@pytest.mark.parametrize("config", sorted(set(CONFIGS.glob("*.yaml")) - {TEACHER}), ids=lambda p: p.stem)
def test_every_shipped_recipe_runs_and_compresses(tmp_path, config, monkeypatch):
    """Each YAML recipe resolves its short class names and compresses during a short fit."""
    if config == DISTILL:  # step 2 of 2: needs the teacher recipe's checkpoint
        _quick_teacher(tmp_path, monkeypatch)
    cli = CompressionCLI(
        args=[
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger=false",
            *QUICK,
        ],
        run=False,
    )
    wanted = [path for path, _ in _callback_args(config)]
    got = [type(cb).__name__ for cb in cli.trainer.callbacks]
    for name in wanted:
        assert name in got, (name, got)
    dense_params = sum(p.numel() for p in cli.model.parameters())
    cli.trainer.fit(cli.model, cli.datamodule)
    structured = [cb for cb in cli.trainer.callbacks if isinstance(cb, lc.StructuredPruning)]
    if structured:  # channels removed physically: a smaller model
        assert all(cb.hard_pruned for cb in structured)
        assert sum(p.numel() for p in cli.model.parameters()) < 0.7 * dense_params
        return
    qat = [cb for cb in cli.trainer.callbacks if isinstance(cb, lc.QuantizationAwareTraining)]
    lowbit = [cb for cb in cli.trainer.callbacks if isinstance(cb, lc.LowBitWeights)]
    weights = [m.weight for m in cli.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    dfq = [cb for cb in cli.trainer.callbacks if isinstance(cb, lc.DataFreeQuantization)]
    if dfq:  # equalized pairs and an int8 copy calibrated without data
        assert dfq[0].pairs
        assert quantized_layers(dfq[0].quantized_model)
    elif qat:  # quantization: every targeted layer fake-quantized with an observed range
        layers = quantized_layers(cli.model)
        assert layers
        assert all(layer.weight_quant.enabled and layer.input_quant.ready for layer in layers.values())
    elif lowbit:  # binary / ternary: at most 3 distinct values per quantized weight
        for name in lowbit[0].param_names:
            assert cli.model.get_parameter(name).unique().numel() <= 3, name
    else:
        assert _zero_fraction(weights) > 0.3  # every other recipe prunes
    if config == DISTILL:  # the pruned student, exported without the wrapper, loads into its class
        from lightning_compress.demos import HintonMLP

        student = HintonMLP.load_from_checkpoint(tmp_path / "checkpoints" / "hinton_student.ckpt")
        assert student.hparams.hidden == 800
        assert _zero_fraction([student.fc1.weight, student.fc2.weight, student.fc3.weight]) > 0.85
        x = torch.randn(3, 784)
        torch.testing.assert_close(student.eval()(x), cli.model.student.eval()(x), rtol=0, atol=0)
        assert cli.model.cache is None or cli.model.cache.n_filled == 0  # closed at teardown
        # the wrapper's own checkpoint rebuilds through LightningCLI's stored configuration
        wrapper_ckpt = next(
            p for p in (tmp_path / "checkpoints").glob("*.ckpt") if p.name.startswith("epoch=")
        )
        rebuilt = lc.load_checkpoint(lc.DistillationModule, wrapper_ckpt)
        torch.testing.assert_close(rebuilt.eval()(x), student(x), rtol=0, atol=0)
        onnx_path = export(["--ckpt_path", str(wrapper_ckpt), "--output", str(tmp_path / "student.onnx")])
        import onnxruntime as ort

        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), student(x), rtol=1e-4, atol=1e-4)


def test_fit_and_report_a_structured_recipe_rebuild_the_slim_model(tmp_path):
    config = CONFIGS / "mlp_bn_network_slimming.yaml"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *QUICK])
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state["fc1.weight"].shape[0] + state["fc2.weight"].shape[0] == round(0.2 * 800)
    # `report` replays the checkpoint's structure recipe before loading its weights
    summary = report(["--config", str(config), "--ckpt_path", str(ckpt)])
    assert summary.params == sum(
        t.numel()
        for k, t in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def test_fit_then_export_a_qat_recipe_gives_an_integer_onnx_model(tmp_path):
    import onnxruntime as ort

    from lightning_compress.demos import SmallVGG
    from lightning_compress.export.onnx import optimized_ops
    from lightning_compress.quantization import restore_quantization

    config = CONFIGS / "vgg_qat_int8.yaml"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *QUICK])
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    out = tmp_path / "model.onnx"
    # the class comes from the checkpoint (LightningCLI stores its class path): no --config needed
    assert export(["--ckpt_path", str(ckpt), "--format", "onnx", "--output", str(out)]) == str(out)
    assert "QLinearConv" in optimized_ops(out)
    # the ONNX model computes what the restored fake-quantized model computes
    model = SmallVGG.load_from_checkpoint(ckpt)
    assert restore_quantization(model, str(ckpt))
    model.eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert abs(got - expected).max() < 0.05 * abs(expected).max()


def test_export_refuses_a_missing_checkpoint_and_an_unknown_class(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export(["--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert "--ckpt_path=" in capsys.readouterr().err
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(SystemExit):
        export(["--ckpt_path", str(path)])
    assert "give --config RECIPE.yaml or --model_class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export(["--ckpt_path", str(path), "--model_class", "torch.nn.Linear"])
    assert "is not a LightningModule subclass" in capsys.readouterr().err
