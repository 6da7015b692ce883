import csv
import io
import json
import math
import sys
import types

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.report import CompressionReport, CompressionSummary, compression_summary, shorten_name


def _half_zeroed_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(0.5)
            layer.bias.fill_(0.1)
            layer.weight[: layer.out_features // 2] = 0.0  # half of each weight matrix
    return model


def test_summary_exact_totals_of_half_zeroed_mlp():
    summary = compression_summary(_half_zeroed_mlp(), torch.randn(2, 8))
    assert isinstance(summary, CompressionSummary)
    assert [layer.name for layer in summary.layers] == ["0", "2"]
    assert summary.params == (8 * 16 + 16) + (16 * 4 + 4) == 212
    assert summary.nonzeros == (64 + 16) + (32 + 4) == 116
    assert summary.sparsity == pytest.approx(1 - 116 / 212)
    assert summary.dense_macs == 128 + 64
    assert summary.effective_macs == 64 + 32
    assert summary.dense_bytes == 212 * 4
    # layer 0: 80 values + bitmap ceil(144/8)=18; layer 2: 36 values + bitmap ceil(68/8)=9
    assert summary.sparse_bytes == (80 * 4 + 18) + (36 * 4 + 9) == 491
    assert summary.compression_ratio == pytest.approx(848 / 491)


def test_summary_uses_example_input_array_attribute():
    model = nn.Sequential(nn.Conv1d(2, 3, 3))
    assert compression_summary(model).dense_macs is None
    model.example_input_array = torch.randn(1, 2, 10)
    assert compression_summary(model).dense_macs == 3 * 8 * 2 * 3


def test_summary_edge_cases():
    empty = compression_summary(nn.ReLU())
    assert (empty.params, empty.sparsity, empty.compression_ratio, empty.dense_macs) == (0, 0.0, 1.0, 0)
    dead = nn.Linear(4, 4)
    nn.init.zeros_(dead.weight)
    nn.init.zeros_(dead.bias)
    summary = compression_summary(dead, torch.randn(1, 4))
    assert summary.compression_ratio == math.inf
    assert summary.to_dict()["totals"]["compression_ratio"] is None  # stays strict JSON


def test_to_dict_is_json_serialisable():
    summary = compression_summary(_half_zeroed_mlp(), torch.randn(1, 8))
    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    assert data["totals"]["params"] == 212
    assert data["totals"]["effective_macs"] == 96
    assert data["layers"][0] == {
        "name": "0",
        "kind": "Linear",
        "params": 144,
        "nonzeros": 80,
        "sparsity": pytest.approx(1 - 80 / 144),
        "dense_macs": 128,
        "effective_macs": 64,
        "dense_bytes": 576,
        "sparse_bytes": 338,
        # New fields (deliberate addition): forward calls seen and why MACs may be 0 / None.
        "calls": 1,
        "macs_note": None,
        # Energy (Yang et al. 2017, Horowitz 45 nm): 128 MACs x (4.6 + 2 x 5) + 128 x 640 + (8 + 16) x 640
        "energy_pj": pytest.approx(128 * 14.6 + 128 * 640 + 24 * 640),
        "compressed_energy_pj": pytest.approx(64 * 14.6 + 64 * 640 + 24 * 640),
        # Best encoding: bitmask 128 + 64 x 32 bits of weight, then 16 x 32 bits of dense bias
        "encoding": "bitmask",
        "encoded_bytes": (128 + 64 * 32 + 16 * 32) // 8,
        # Output width before / after structure ops: None for a layer they did not narrow.
        "channels_original": None,
        "channels_kept": None,
        # Quantized storage: None for a float layer (see tests/test_report_quantized.py).
        "weight_bits": None,
        "quantized_bytes": None,
    }
    assert data["unattributed"] == {}
    assert data["batch_size"] == 1
    assert data["totals"]["total_macs"] == data["totals"]["dense_macs"] == 192


def test_str_and_rich_table():
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(784, 300))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(300, 100))
    model.add_module("out", nn.Linear(100, 10))
    summary = compression_summary(model, torch.randn(1, 784))
    table = summary.to_rich_table()
    assert isinstance(table, Table)
    assert table.row_count == 4  # three layers + TOTAL
    text = str(summary)
    for needle in ("encoder", "head", "out", "TOTAL", "266,610", "266.2 K", "1.07 MB", "Linear"):
        assert needle in text
    assert "\x1b[" not in text  # plain text, no ANSI colour codes
    assert max(len(line) for line in text.splitlines()) <= 120


def test_str_shows_unknown_macs():
    text = str(compression_summary(nn.Sequential(nn.Conv2d(1, 1, 3))))
    assert "n/a" in text


# ---------------------------------------------------------------- the callback in a real Trainer


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.example_input_array = torch.zeros(1, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def on_train_end(self):
        # Stand-in for a compression technique: half of the first layer's weights pruned.
        with torch.no_grad():
            self.net[0].weight[:8] = 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    @staticmethod
    def _loader():
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randn(32, 1, generator=generator))
        return DataLoader(data, batch_size=8)


def _trainer(tmp_path, callback, **kwargs):
    return pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
        **kwargs,
    )


def _read_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(logger.experiment.metrics_file_path, newline="") as f:
        return list(csv.DictReader(f))


def test_callback_fit_writes_plot_logs_totals_and_keeps_summary(tmp_path, capsys):
    torch.manual_seed(0)
    callback = CompressionReport()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = _trainer(tmp_path, callback, logger=logger, log_every_n_steps=1)
    trainer.fit(TinyModule())

    summary = callback.summary
    assert isinstance(summary, CompressionSummary)
    assert summary.params == 8 * 16 + 16 + 16 + 1 == 161
    assert summary.nonzeros == 161 - 64
    assert summary.dense_macs == 128 + 16  # from example_input_array

    assert callback.plot_path == str(tmp_path / "logs" / "version_0" / "compression_report.png")
    with open(callback.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    rows = [row for row in _read_metrics(logger) if row.get("compression/params")]
    assert len(rows) == 1
    row = rows[0]
    assert float(row["compression/params"]) == 161.0
    assert float(row["compression/nonzeros"]) == 97.0
    assert float(row["compression/sparsity"]) == pytest.approx(64 / 161)
    assert float(row["compression/ratio"]) == pytest.approx(summary.compression_ratio)
    assert float(row["compression/effective_macs"]) == 64 + 16
    assert int(row["step"]) == trainer.global_step == 4

    assert "TOTAL" in capsys.readouterr().out


def test_callback_options_shape_no_plot_no_log(tmp_path):
    callback = CompressionReport(example_input_shape=[2, 8], plot=False, log_totals=False)
    logger = CSVLogger(tmp_path, name="logs")
    model = TinyModule()
    model.example_input_array = None
    _trainer(tmp_path, callback, logger=logger, log_every_n_steps=1).fit(model)
    assert callback.summary.dense_macs == 144
    assert callback.plot_path is None
    assert not list(tmp_path.rglob("*.png"))
    rows = _read_metrics(logger)
    assert rows  # train_loss was logged, so the file exists...
    assert not any("compression/params" in row for row in rows)  # ...without the totals


def test_callback_test_without_fit(tmp_path):
    callback = CompressionReport(filename="plots/report.png")
    trainer = _trainer(tmp_path, callback, logger=False)
    trainer.test(TinyModule(), verbose=False)
    assert callback.summary.params == 161
    assert callback.plot_path == str(tmp_path / "plots" / "report.png")
    assert (tmp_path / "plots" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_callback_without_matplotlib_skips_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import -> ImportError
    callback = CompressionReport()
    _trainer(tmp_path, callback, logger=False).fit(TinyModule())
    assert callback.summary is not None
    assert callback.plot_path is None
    assert not list(tmp_path.rglob("*.png"))


def test_callback_does_nothing_off_rank_zero(tmp_path):
    callback = CompressionReport()
    fake_trainer = types.SimpleNamespace(is_global_zero=False)
    callback.on_fit_end(fake_trainer, TinyModule())
    assert callback.summary is None
    assert callback.plot_path is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"example_input_shape": [1, 0]}, r"`example_input_shape` must be .* positive ints .* got \[1, 0\]"),
        ({"example_input_shape": []}, r"`example_input_shape` must be None or a non-empty list.*got \[\]"),
        ({"example_input_shape": [1, 2.5]}, r"`example_input_shape`.*got \[1, 2.5\]"),
        ({"example_input_shape": [True, 3]}, r"`example_input_shape`.*got \[True, 3\]"),
        ({"example_input_shape": "1,784"}, r"`example_input_shape`.*got '1,784'"),
        ({"filename": "report.jpg"}, r"`filename` must be a string ending with '.png', got 'report.jpg'"),
        ({"filename": ".png"}, r"`filename` must be a string ending with '.png', got '.png'"),
        ({"plot": "yes"}, r"`plot`='yes' is not supported; expected true or false"),
        ({"log_totals": 1}, r"`log_totals`=1 is not supported; expected true or false"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionReport(**kwargs)


def test_callback_is_yaml_configurable():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CompressionReport, "report")
    cfg = parser.parse_string("report: {example_input_shape: [1, 8], plot: false, filename: r.png}")
    callback = CompressionReport(**cfg.report.as_dict())
    assert callback.example_input_shape == [1, 8]
    assert callback.plot is False
    assert callback.filename == "r.png"


# ---------------------------------------------------------------- readable tables, complete data


def _body_rows(text: str) -> list[list[str]]:
    """Cells of every table body line (those between vertical borders)."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")
    ]


def _forty_layer_model() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 40, enable_nested_tensor=False)
    # Names like "text_backbone.encoder.layers.39.self_attn.out_proj" (50 characters).
    return nn.ModuleDict({"text_backbone": nn.ModuleDict({"encoder": encoder})})


class _Forty(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _forty_layer_model()

    def forward(self, x):
        return self.body["text_backbone"]["encoder"](x)


def test_forty_layer_model_fits_100_columns_and_to_dict_keeps_full_names():
    torch.manual_seed(0)
    model = _Forty()
    with torch.no_grad():
        model.body.text_backbone.encoder.layers[7].linear1.weight[:4] = 0.0
    summary = compression_summary(model, torch.randn(2, 3, 8))
    assert len(summary.layers) == 40 * 6
    text = str(summary)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    header = next(line for line in lines if line.startswith("┃"))
    assert "Params" in header
    assert "Sparsity" in header
    assert "Eff. MACs" in header
    rows = _body_rows(text)
    assert rows[-1][0] == "TOTAL"
    assert all(cell.strip("…") for row in rows for cell in row)  # no cell cut down to a bare "…"
    names = [row[0] for row in rows[: len(summary.layers)]]
    assert len(set(names)) == len(names)  # still tells the 240 rows apart
    for cells, layer in zip(rows, summary.layers):
        name = cells[0]
        assert layer.name.endswith(name.rsplit("…", 1)[-1])  # the end of the name is kept...
        assert name.rsplit(".", 1)[-1] == layer.name.rsplit(".", 1)[-1]  # ...with the last component
        index = layer.name.split(".")[4]
        assert f"{index}." in name  # and the layer index
        assert f"{layer.params:,}" in cells
        assert f"{layer.sparsity:.2%}" in cells
    assert any("…" in name for name in names)
    assert "names shortened" in text

    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    full = [name for name, module in model.named_modules() if list(module.parameters(recurse=False))]
    assert [row["name"] for row in data["layers"]] == full
    assert "body.text_backbone.encoder.layers.39.self_attn.out_proj" in full
    assert set(data["layers"][0]) >= {"name", "kind", "params", "dense_macs", "macs_note", "calls"}
    layer7 = next(row for row in data["layers"] if row["name"].endswith("layers.7.linear1"))
    assert layer7["nonzeros"] == 16 * 8 - 4 * 8 + 16
    assert data["totals"]["total_macs"] == summary.total_macs


def test_table_fits_the_console_it_is_printed_to():
    summary = compression_summary(_Forty(), torch.randn(1, 3, 8))
    table = summary.to_rich_table()
    assert isinstance(table, Table)
    assert table.row_count == 40 * 6 + 1  # every row and TOTAL; full names until it is printed

    def render(width: int) -> str:
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(table)
        return console.file.getvalue()

    narrow, wide = render(80), render(260)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "Params" in narrow
    assert "Sparsity" in narrow
    assert max(len(line) for line in wide.splitlines()) <= 260
    for needle in ("Type", "Dense MACs", "Non-zeros", "NonDynamicallyQua…", "layers.39.self_attn.out_proj"):
        assert needle in wide
    assert "body.text_backbone.encoder.layers.0.linear1" in wide  # whole names when there is room
    fitted = summary.to_rich_table(width=120)
    assert not isinstance(fitted, type(table))  # a plain, already-fitted table
    with pytest.raises(ValueError, match=r"`width` must be None or a positive int, got 0"):
        summary.to_rich_table(width=0)


def test_unattributed_and_counted_in_parent_rows_in_table_and_totals():
    class Mix(nn.Module):
        def forward(self, x):
            return torch.bmm(torch.bmm(x, x.transpose(1, 2)).softmax(-1), x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mix = Mix()
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.mix(self.attn(x, x, x)[0])

    summary = compression_summary(Model(), torch.randn(2, 4, 8))
    assert summary.batch_size == 2
    assert summary.unattributed == {"mix": 2 * 4 * 4 * 8}
    assert summary.unattributed_macs == 256
    assert summary.total_macs == summary.dense_macs + 256
    assert summary.total_effective_macs == summary.effective_macs + 256
    notes = {layer.name: layer.macs_note for layer in summary.layers}
    assert notes == {"attn": None, "attn.out_proj": "counted in parent 'attn'", "unused": "not run"}

    rows = {row[0]: row for row in _body_rows(str(summary))}
    assert "in parent" in rows["attn.out_proj"]
    assert "not run" in rows["unused"]
    assert rows["mix"][rows["mix"].index("(no params)") + 1 :][:2] == ["-", "-"]  # params, non-zeros
    assert "256" in rows["mix"]
    assert "'in parent'" in str(summary)

    data = summary.to_dict()
    assert data["unattributed"] == {"mix": 256}
    assert data["batch_size"] == 2
    assert data["totals"]["unattributed_macs"] == 256
    assert data["totals"]["total_macs"] == data["totals"]["dense_macs"] + 256


def test_without_example_input_caption_and_no_unattributed():
    summary = compression_summary(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert summary.batch_size is None
    assert summary.unattributed == {}
    assert summary.dense_macs is None  # the LayerNorm row has no shape formula
    assert summary.layers[1].macs_note == "needs example_input"
    assert "no example input" in str(summary)


@pytest.mark.parametrize(
    ("name", "width", "expected"),
    [
        ("encoder.layers.11.self_attn.out_proj", 40, "encoder.layers.11.self_attn.out_proj"),
        ("encoder.layers.11.self_attn.out_proj", 24, "en…11.self_attn.out_proj"),
        ("encoder.layers.11.self_attn.out_proj", 12, "enc…out_proj"),
        ("a_very_long_single_component", 9, "a_ve…nent"),
        ("abc", 1, "…"),
    ],
)
def test_shorten_name(name, width, expected):
    result = shorten_name(name, width)
    assert result == expected
    assert len(result) <= width


def test_shorten_name_validates_width():
    with pytest.raises(ValueError, match=r"`width` must be a positive int, got 0"):
        shorten_name("a.b", 0)


def test_missing_macs_are_marked_in_the_table_and_kept_in_to_dict():
    summary = compression_summary(nn.Bilinear(4, 5, 3), (torch.randn(2, 4), torch.randn(2, 5)))
    assert summary.uncounted == {"": ["aten._trilinear"]}
    text = str(summary)
    (row,) = (cells for cells in _body_rows(text) if cells[0] == "(root)")
    assert "0?" in row
    assert "torch has no flop formula for aten._trilinear (in '(root)')" in " ".join(text.split())
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["uncounted"] == {"": ["aten._trilinear"]}
    assert "missing MACs of aten._trilinear" in data["layers"][0]["macs_note"]
