"""Reference models and small datamodules on embedded data, like ``lightning.pytorch.demos``.

The datamodules need the ``demos`` extra (``pip install 'lightning-compress[demos]'``); it is only
imported when their ``setup()`` runs, so importing this package always works.
"""

from lightning_compress.demos.data import DigitsDataModule, MNIST5kDataModule
from lightning_compress.demos.models import (
    HintonMLP,
    LeNet5,
    LeNet5Caffe,
    LeNet300100,
    LeNet300100BN,
    SmallMobileNet,
    SmallResNet,
    SmallVGG,
)

__all__ = [
    "DigitsDataModule",
    "HintonMLP",
    "LeNet5",
    "LeNet5Caffe",
    "LeNet300100",
    "LeNet300100BN",
    "MNIST5kDataModule",
    "SmallMobileNet",
    "SmallResNet",
    "SmallVGG",
]
