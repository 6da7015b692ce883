"""The compression summary and report for structured pruning: removed channels and measured latency."""

import copy
import csv
import json
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.cost import measure_latency
from lightning_compress.core.surgery import apply_ops
from lightning_compress.report import CompressionReport, CompressionSummary, compression_summary
from lightning_compress.report.callback import _cpu_copy

KEEP = [0, 2, 5]


class ConvNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _slice_ops(keep: list[int]) -> list[dict]:
    """Remove the output channels of conv1 not in ``keep``, with its BatchNorm and conv2's inputs."""
    ops = [
        {"op": "slice", "tensor": name, "dim": 0, "index": keep}
        for name in (
            "conv1.weight",
            "conv1.bias",
            "bn1.weight",
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
        )
    ]
    ops.append({"op": "slice", "tensor": "conv2.weight", "dim": 1, "index": keep})
    return ops


def _pruned() -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet()
    apply_ops(model, _slice_ops(KEEP))
    return model


def _body_rows(text: str) -> dict[str, list[str]]:
    """Cells of every table body line by layer name."""
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")
    ]
    return {cells[0]: cells for cells in rows}


def _flat(text: str) -> str:
    return " ".join(text.split())  # the caption wraps at the table width


# ---------------------------------------------------------------- removed channels


def test_channels_of_sliced_layers_in_rows_table_and_to_dict():
    summary = compression_summary(_pruned(), torch.randn(2, 3, 8, 8))
    channels = {layer.name: layer.channels for layer in summary.layers}
    # conv2 only lost inputs, so none of its own (output) channels: unchanged.
    assert channels == {"conv1": (8, 3), "bn1": (8, 3), "conv2": None, "fc": None}
    assert (
        summary.channels_removed == 5
    )  # the BatchNorm after conv1 loses the same channels: not counted twice
    assert summary.totals()["channels_removed"] == 5
    assert summary.layers[1].params == 2 * 3  # the rest of the row follows the new shapes
    assert summary.layers[2].dense_macs == 4 * 6 * 6 * 3 * 9

    text = str(summary)
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert "Channels" in header
    rows = _body_rows(text)
    assert "3/8" in rows["conv1"]
    assert "3/8" in rows["bn1"]
    assert rows["conv2"][rows["conv2"].index("Conv2d") + 1] == "-"
    assert "3/8" in rows["TOTAL"]  # Linear / Conv rows only, like channels_removed
    assert "output channels kept/original" in _flat(text)
    assert "5 removed in all" in _flat(text)

    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    layers = {row["name"]: row for row in data["layers"]}
    assert (layers["conv1"]["channels_original"], layers["conv1"]["channels_kept"]) == (8, 3)
    assert (layers["bn1"]["channels_original"], layers["bn1"]["channels_kept"]) == (8, 3)
    assert (layers["conv2"]["channels_original"], layers["conv2"]["channels_kept"]) == (None, None)
    assert all("channels" not in row for row in data["layers"])  # only the two named keys
    assert data["totals"]["channels_removed"] == 5


def test_no_channels_column_without_structure_ops():
    summary = compression_summary(ConvNet(), torch.randn(1, 3, 8, 8))
    assert all(layer.channels is None for layer in summary.layers)
    assert summary.channels_removed == 0
    text = str(summary)
    assert "Channels" not in text
    assert "removed in all" not in text
    assert summary.to_dict()["layers"][0]["channels_kept"] is None


def test_channels_column_is_hidden_on_a_narrow_table_and_named_in_the_caption():
    summary = compression_summary(_pruned(), torch.randn(1, 3, 8, 8))
    header = next(line for line in str(summary).splitlines() if line.startswith("┃"))
    assert "Channels" in header
    table = summary.to_rich_table(width=60)
    headers = [column.header for column in table.columns]
    assert "Channels" not in headers
    assert {"Layer", "Params", "Sparsity"} <= set(headers)
    assert re.search(r"hidden: [^;)]*Channels", _flat(table.caption))


# ---------------------------------------------------------------- latency


def test_latency_with_baseline_fields_footer_and_to_dict():
    torch.manual_seed(0)
    baseline = ConvNet()
    model = copy.deepcopy(baseline)
    apply_ops(model, _slice_ops(KEEP))
    model.train()
    model.bn1.eval()  # a part deliberately kept in eval must stay so
    summary = compression_summary(
        model,
        torch.randn(1, 3, 8, 8),
        latency_batch=4,
        baseline=baseline,
        latency_repeats=3,
        latency_warmup=1,
    )
    assert model.training
    assert not model.bn1.training
    assert model.conv1.training
    assert baseline.training  # a fresh module's flag, left as it was
    assert summary.latency_ms > 0
    assert summary.baseline_latency_ms > 0
    assert summary.speedup == pytest.approx(summary.baseline_latency_ms / summary.latency_ms)
    assert (summary.latency_batch, summary.latency_repeats) == (4, 3)
    assert summary.threads == torch.get_num_threads() == 1
    assert summary.latency_device == "cpu"

    text = _flat(str(summary))
    match = re.search(
        r"Latency \(batch 4, 1 thread, median of 3\): ([\d.]+) ms vs ([\d.]+) ms before \(([\d.]+)x\)\.", text
    )
    assert match, text
    assert float(match.group(3)) == pytest.approx(summary.speedup, abs=0.006)

    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    totals = data["totals"]
    assert totals["latency_ms"] == summary.latency_ms
    assert totals["baseline_latency_ms"] == summary.baseline_latency_ms
    assert totals["speedup"] == pytest.approx(summary.speedup)
    assert (totals["latency_batch"], totals["latency_repeats"], totals["threads"]) == (4, 3, 1)
    assert totals["latency_device"] == "cpu"


def test_latency_without_baseline_and_without_latency():
    model = ConvNet()
    model.example_input_array = torch.randn(1, 3, 8, 8)  # used for the latency batch too
    summary = compression_summary(model, latency_batch=2, latency_repeats=1, latency_warmup=0)
    assert summary.latency_ms > 0
    assert summary.baseline_latency_ms is None
    assert summary.speedup is None
    text = _flat(str(summary))
    assert re.search(r"Latency \(batch 2, 1 thread, median of 1\): [\d.]+ ms\.", text)
    assert "before" not in text

    plain = compression_summary(model)
    assert (plain.latency_ms, plain.baseline_latency_ms, plain.speedup, plain.threads) == (None,) * 4
    assert "Latency" not in str(plain)
    totals = plain.to_dict()["totals"]
    assert (totals["latency_ms"], totals["speedup"], totals["latency_batch"]) == (None, None, None)


def test_pruned_wide_conv_net_is_measured_faster_than_its_baseline():
    torch.manual_seed(0)
    baseline = nn.Sequential(
        nn.Conv2d(3, 128, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 8, 3, padding=1),
    )
    model = copy.deepcopy(baseline)
    keep = list(range(0, 128, 4))  # 128 -> 32 channels: the middle conv does 16x fewer MACs
    ops = [
        {"op": "slice", "tensor": t, "dim": 0, "index": keep}
        for t in ("0.weight", "0.bias", "2.weight", "2.bias")
    ]
    ops += [{"op": "slice", "tensor": t, "dim": 1, "index": keep} for t in ("2.weight", "4.weight")]
    apply_ops(model, ops)
    summary = compression_summary(
        model,
        torch.randn(1, 3, 16, 16),
        latency_batch=8,
        baseline=baseline,
        latency_repeats=5,
        latency_warmup=1,
    )
    assert summary.threads == 1
    assert summary.channels_removed == 96 + 96  # two convs narrowed
    assert summary.latency_ms < summary.baseline_latency_ms
    assert summary.speedup > 2.0  # about 8x here; a wide margin against a noisy machine


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.seen: list[tuple] = []

    def forward(self, x, y=None, scale=None):
        self.seen.append(
            (
                tuple(x.shape),
                None if y is None else tuple(y.shape),
                self.training,
                torch.is_inference_mode_enabled(),
            )
        )
        return self.linear(x)


def test_measure_latency_builds_the_batch_from_the_first_sample_in_eval_and_inference_mode():
    model = _Recorder()
    x, y = torch.randn(3, 4), torch.randn(3, 2, 5)
    assert measure_latency(model, x, 6, repeats=2, warmup=1) > 0
    assert model.seen == [((6, 4), None, False, True)] * 3
    assert model.training  # restored

    model.seen.clear()
    measure_latency(model, (x, y), 2, repeats=1, warmup=0)
    assert model.seen == [((2, 4), (2, 2, 5), False, True)]
    model.seen.clear()
    measure_latency(model, {"x": x, "y": y, "scale": torch.tensor(2.0)}, 5, repeats=1, warmup=0)
    assert model.seen == [((5, 4), (5, 2, 5), False, True)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size`=0 is not supported; expected an int >= 1"),
        ({"batch_size": True}, r"`batch_size`=True is not supported; expected an int >= 1"),
        ({"repeats": 0}, r"`repeats`=0 is not supported; expected an int >= 1"),
        ({"warmup": -1}, r"`warmup`=-1 is not supported; expected an int >= 0"),
        ({"example_input": None}, r"`example_input` must be a tensor, a tuple/list or a dict of tensors"),
        ({"example_input": torch.zeros(0, 4)}, r"`example_input` has an empty batch"),
    ],
)
def test_measure_latency_bad_arguments(kwargs, match):
    arguments = {"example_input": torch.zeros(1, 4), "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        measure_latency(nn.Linear(4, 4), **arguments)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"latency_batch": 0},
            r"`latency_batch`=0 is not supported; expected None \(no latency measured\) or an int >= 1",
        ),
        ({"latency_batch": 2.5}, r"`latency_batch`=2.5 is not supported; expected None .* or an int >= 1"),
        ({"latency_batch": True}, r"`latency_batch`=True is not supported"),
        ({"latency_batch": "8"}, r"`latency_batch`='8' is not supported"),
        (
            {"latency_batch": 2, "latency_repeats": 0},
            r"`latency_repeats`=0 is not supported; expected an int >= 1",
        ),
        (
            {"latency_batch": 2, "latency_warmup": -1},
            r"`latency_warmup`=-1 is not supported; expected an int >= 0",
        ),
        ({"latency_batch": 2, "latency_warmup": 1.0}, r"`latency_warmup`=1.0 is not supported"),
        (
            {"latency_batch": 2, "baseline": "model"},
            r"`baseline`=str is not supported; expected None or an nn.Module",
        ),
        (
            {"baseline": nn.Linear(4, 4)},
            r"`baseline` is only used to measure latency; expected `latency_batch`",
        ),
        ({"latency_batch": 2, "example_input": None}, r"`latency_batch` needs `example_input`"),
    ],
)
def test_summary_bad_latency_arguments(kwargs, match):
    arguments = {"example_input": torch.zeros(1, 4), **kwargs}
    with pytest.raises(ValueError, match=match):
        compression_summary(nn.Linear(4, 4), **arguments)


# ---------------------------------------------------------------- the callback in a real Trainer


class ConvModule(pl.LightningModule):
    def __init__(self, prune_at_end: bool = False):
        super().__init__()
        self.net = ConvNet()
        self.prune_at_end = prune_at_end
        self.example_input_array = torch.zeros(1, 3, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_end(self):
        if self.prune_at_end:  # stand-in for a structured pruning technique
            apply_ops(self, [{**op, "tensor": f"net.{op['tensor']}"} for op in _slice_ops(KEEP)])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(8, 3, 8, 8, generator=generator), torch.randn(8, 2, generator=generator)
        )
        return DataLoader(data, batch_size=4)


def _trainer(tmp_path, callbacks, **kwargs):
    options = {
        "max_steps": 2,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": tmp_path,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        **kwargs,
    }
    return pl.Trainer(callbacks=callbacks, **options)


class _SpyReport(CompressionReport):
    """Records the baseline the report is built with."""

    def build_summary(self, trainer, pl_module):
        self.baseline_seen = self._baseline
        return super().build_summary(trainer, pl_module)


def test_callback_times_the_initial_model_and_logs_latency(tmp_path):
    torch.manual_seed(0)
    callback = _SpyReport(latency_batch=4, plot=False)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = _trainer(tmp_path, [callback], logger=logger, log_every_n_steps=1)
    module = ConvModule(prune_at_end=True)
    trainer.fit(module)

    summary = callback.summary
    assert isinstance(summary, CompressionSummary)
    assert summary.baseline_latency_ms is not None
    assert summary.baseline_latency_ms > 0
    assert summary.latency_ms > 0
    assert summary.latency_batch == 4
    assert summary.speedup == pytest.approx(summary.baseline_latency_ms / summary.latency_ms)
    assert summary.channels_removed == 5  # the report shows the pruned model...
    baseline = callback.baseline_seen
    assert baseline.net.conv1.out_channels == 8  # ...timed against the model fit started with
    assert baseline is not module
    assert baseline._trainer is None  # the copy does not drag the trainer along
    assert callback._baseline is None  # dropped after the report
    assert callback.state_dict() == {}

    with open(logger.experiment.metrics_file_path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("compression/params")]
    assert len(rows) == 1
    assert float(rows[0]["compression/latency_ms"]) == pytest.approx(summary.latency_ms)
    assert float(rows[0]["compression/speedup"]) == pytest.approx(summary.speedup)


def test_callback_without_initial_comparison_and_with_checkpointing(tmp_path):
    callback = _SpyReport(latency_batch=2, compare_to_initial=False, plot=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = _trainer(tmp_path, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(ConvModule())
    assert callback.baseline_seen is None
    assert callback.summary.latency_ms > 0
    assert callback.summary.baseline_latency_ms is None
    assert callback.summary.speedup is None
    # The checkpoint holds tensors and plain data only: no module copy leaked into it.
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    torch.load(path, weights_only=True)


def test_callback_baseline_survives_a_checkpoint_saved_while_it_is_held(tmp_path):
    callback = CompressionReport(latency_batch=2, plot=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = _trainer(tmp_path, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(ConvModule())  # ModelCheckpoint saves at the epoch end, before the report
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(path, weights_only=True)
    assert not any("CompressionReport" in key and value for key, value in state["callbacks"].items())
    assert callback.summary.baseline_latency_ms > 0


def test_callback_needs_an_example_input_for_latency(tmp_path):
    module = ConvModule()
    module.example_input_array = None
    trainer = _trainer(tmp_path, [CompressionReport(latency_batch=2, plot=False)])
    with pytest.raises(ValueError, match=r"`latency_batch` needs an example input"):
        trainer.fit(module)


def test_cpu_copy_is_independent_and_has_no_hooks():
    module = ConvModule()
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    module.net.conv1.register_forward_hook(lambda mod, args, out: calls.append(2))
    duplicate = _cpu_copy(module)
    duplicate(torch.zeros(1, 3, 8, 8))
    assert calls == []
    assert not duplicate._forward_pre_hooks
    assert not duplicate.net.conv1._forward_hooks
    assert torch.equal(duplicate.net.conv1.weight, module.net.conv1.weight)
    assert duplicate.net.conv1.weight.data_ptr() != module.net.conv1.weight.data_ptr()
    module(torch.zeros(1, 3, 8, 8))
    assert calls == [1, 2]  # the original keeps its hooks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"latency_batch": 0},
            r"`latency_batch`=0 is not supported; expected None \(no latency measured\) or an int >= 1",
        ),
        ({"latency_batch": True}, r"`latency_batch`=True is not supported"),
        (
            {"compare_to_initial": "yes"},
            r"`compare_to_initial`='yes' is not supported; expected true or false",
        ),
    ],
)
def test_callback_bad_latency_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionReport(**kwargs)


def test_callback_latency_is_yaml_configurable():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CompressionReport, "report")
    cfg = parser.parse_string("report: {latency_batch: 8, compare_to_initial: false}")
    callback = CompressionReport(**cfg.report.as_dict())
    assert callback.latency_batch == 8
    assert callback.compare_to_initial is False
