"""Reference classifiers used by the examples, tests and benchmarks.

Both models are the classic networks the compression literature reports on, so results can be
compared with the papers:

* :class:`LeNet300100` -- the LeNet-300-100 multi-layer perceptron of LeCun et al. (1998), the
  standard MNIST baseline of Han et al. (2015, 2016) "Learning both Weights and Connections" and
  "Deep Compression".
* :class:`LeNet5` -- the LeNet-5 convolutional network of LeCun et al. (1998), in the modern
  variant with ReLU activations and max pooling (6-16-120-84, 61.7k parameters).
* :class:`LeNet5Caffe` -- the wider Caffe "LeNet" (20-50-500, 431k parameters) that Han et al.
  (2015) and Guo et al. (2016, dynamic network surgery) call LeNet-5 and report 12x / 108x on.

References:
    Y. LeCun, L. Bottou, Y. Bengio and P. Haffner, "Gradient-based learning applied to document
    recognition", Proceedings of the IEEE 86(11), 1998.

    S. Han, J. Pool, J. Tran and W. J. Dally, "Learning both Weights and Connections for Efficient
    Neural Networks", NeurIPS 2015.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.core.validation import check_choice, check_int, check_number

__all__ = ["LeNet5", "LeNet5Caffe", "LeNet300100"]

_OPTIMIZERS = ("adam", "adamw", "sgd")


class _DemoClassifier(pl.LightningModule):
    """Shared training / evaluation / optimizer logic of the demo classifiers.

    Subclasses build their layers and implement :meth:`forward` returning logits of shape
    ``(N, num_classes)``. Batches are ``(inputs, targets)`` pairs; for prediction a bare input
    tensor is accepted too.

    Args:
        num_classes: Number of output classes.
        lr: Learning rate.
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If an argument is out of range or ``optimizer`` is not supported.
    """

    def __init__(self, num_classes: int, lr: float, weight_decay: float, optimizer: str) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=1)
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        check_choice("optimizer", optimizer.lower() if isinstance(optimizer, str) else optimizer, _OPTIMIZERS)
        self.num_classes = num_classes
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.optimizer_name = optimizer.lower()
        # Plain (micro-averaged) accuracy: the fraction of correctly classified samples.
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _shared_step(self, batch: Any, metric: MulticlassAccuracy) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits.detach(), y)
        return loss, logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Compute the cross-entropy loss; log ``train_loss`` and ``train_acc``."""
        loss, _ = self._shared_step(batch, self.train_acc)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log epoch-level ``val_loss`` and ``val_acc``."""
        loss, _ = self._shared_step(batch, self.val_acc)
        self.log("val_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Log epoch-level ``test_loss`` and ``test_acc``."""
        loss, _ = self._shared_step(batch, self.test_acc)
        self.log("test_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("test_acc", self.test_acc, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Return the predicted class index of every sample (``argmax`` of the logits)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Build the optimizer selected by ``optimizer`` with ``lr`` and ``weight_decay``."""
        params = self.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


class LeNet300100(_DemoClassifier):
    """LeNet-300-100: a fully connected ``in -> 300 -> 100 -> num_classes`` network with ReLU.

    The multi-layer perceptron of LeCun et al. (1998), used as the MNIST baseline of Han et al.
    (2015) "Learning both Weights and Connections for Efficient Neural Networks" and Han et al.
    (2016) "Deep Compression". Inputs of any shape ``(N, ...)`` are flattened to
    ``(N, in_features)``.

    Args:
        in_features: Number of input features (784 for 28x28 MNIST, 64 for 8x8 digits).
        num_classes: Number of output classes.
        lr: Learning rate.
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If ``in_features``, ``num_classes`` or ``lr`` is not positive,
            ``weight_decay`` is negative, or ``optimizer`` is not supported.

    Example:
        >>> model = LeNet300100()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_features", in_features, minimum=1)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)
        self.example_input_array = torch.zeros(1, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs of shape ``(N, ...)``."""
        x = x.reshape(x.shape[0], -1)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(_DemoClassifier):
    """LeNet-5: two convolutions with max pooling followed by three fully connected layers.

    The convolutional network of LeCun et al. (1998) in its modern form (ReLU, max pooling), as
    used by Han et al. (2015, 2016). For 28x28 inputs the layout is the classic one::

        conv1 (in->6, 5x5, padding 2) -> ReLU -> maxpool 2   # 28x28 -> 14x14
        conv2 (6->16, 5x5)            -> ReLU -> maxpool 2   # 14x14 -> 10x10 -> 5x5
        fc1 (400->120) -> ReLU -> fc2 (120->84) -> ReLU -> fc3 (84->num_classes)

    Smaller images stay valid: when the feature map after the first pooling is smaller than 6x6
    (for example 8x8 digits), ``conv2`` is padded by 2 so it preserves the spatial size, and a
    pooling layer uses ``ceil_mode=True`` whenever its input has an odd size. The input size of
    ``fc1`` is computed with a dummy forward pass at construction time.

    Args:
        in_channels: Number of input channels.
        num_classes: Number of output classes.
        image_size: Height (= width) of the square input images; at least 1.
        lr: Learning rate.
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If ``in_channels``, ``num_classes``, ``image_size`` or ``lr`` is not
            positive, ``weight_decay`` is negative, or ``optimizer`` is not supported.

    Example:
        >>> LeNet5(image_size=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_channels", in_channels, minimum=1)
        check_int("image_size", image_size, minimum=1)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.image_size = image_size

        size = image_size  # conv1 with padding 2 keeps the size
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, ceil_mode=size % 2 == 1)
        size = -(-size // 2)
        conv2_padding = 0 if size >= 6 else 2
        size = size - 4 + 2 * conv2_padding
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=conv2_padding)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, ceil_mode=size % 2 == 1)

        with torch.no_grad():
            dummy = torch.zeros(1, in_channels, image_size, image_size)
            flat = self._features(dummy).shape[1]
        self.fc1 = nn.Linear(flat, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        x = self._features(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class LeNet5Caffe(_DemoClassifier):
    """The Caffe MNIST "LeNet" (20-50-500) that the pruning papers report as LeNet-5.

    Han et al. (2015) prune it 12x and Guo, Yao & Chen (2016, dynamic network surgery) 108x; it
    has 430,500 weights (the LeCun-style :class:`LeNet5` has 61,470)::

        conv1 (in->20, 5x5) -> maxpool 2 -> conv2 (20->50, 5x5) -> maxpool 2    # 28 -> 24 -> 12 -> 8 -> 4
        fc1 (800->500) -> ReLU -> fc2 (500->num_classes)

    As in Caffe's ``lenet_train_test.prototxt`` the convolutions have no ReLU (pooling follows them
    directly). Inputs must be 28x28.

    Args:
        in_channels: Number of input channels.
        num_classes: Number of output classes.
        lr: Learning rate.
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Example:
        >>> LeNet5Caffe()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_channels", in_channels, minimum=1)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs ``(N, C, 28, 28)``."""
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))
