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
* :class:`LeNet300100BN` -- the 784-500-300-10 MLP with BatchNorm that Liu et al. (2017, network
  slimming) prune on MNIST.

Four small BatchNorm networks for 28x28 single-channel images stand in for the architecture
families the structured pruning and quantization literature works on, at a size that trains in
minutes on a CPU:

* :class:`SmallVGG` -- a VGG-style plain stack of 3x3 Conv-BN-ReLU blocks (Simonyan and Zisserman,
  2015), about 29 MMAC per image at the default width.
* :class:`SmallResNet` -- a ResNet of BasicBlocks (He et al., 2016) with three stages.
* :class:`SmallMobileNet` -- inverted residual blocks with depthwise convolutions (Sandler et al.,
  2018, MobileNetV2).

References:
    Y. LeCun, L. Bottou, Y. Bengio and P. Haffner, "Gradient-based learning applied to document
    recognition", Proceedings of the IEEE 86(11), 1998.

    S. Han, J. Pool, J. Tran and W. J. Dally, "Learning both Weights and Connections for Efficient
    Neural Networks", NeurIPS 2015.

    K. Simonyan and A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
    Recognition", ICLR 2015.

    K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

    M. Sandler, A. Howard, M. Zhu, A. Zhmoginov and L.-C. Chen, "MobileNetV2: Inverted Residuals
    and Linear Bottlenecks", CVPR 2018.

    Z. Liu, J. Li, Z. Shen, G. Huang, S. Yan and C. Zhang, "Learning Efficient Convolutional
    Networks through Network Slimming", ICCV 2017.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.core.validation import check_choice, check_int, check_number

__all__ = [
    "LeNet5",
    "LeNet5Caffe",
    "LeNet300100",
    "LeNet300100BN",
    "SmallMobileNet",
    "SmallResNet",
    "SmallVGG",
]

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


class HintonMLP(_DemoClassifier):
    """The MNIST MLPs of Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``in -> hidden -> hidden -> num_classes`` with ReLU, optional dropout on the input and on each
    hidden layer. The paper's networks: the teacher ``HintonMLP(hidden=1200, dropout=0.5,
    input_dropout=0.2)`` (67 test errors on MNIST), the student ``HintonMLP(hidden=800)`` (146 errors
    trained on hard labels, 74 distilled) and the small ``HintonMLP(hidden=30)``. Inputs of any shape
    ``(N, ...)`` are flattened.

    Args:
        hidden: Width of both hidden layers.
        dropout: Dropout probability after each hidden layer (training only).
        input_dropout: Dropout probability on the input (training only).
        in_features: Number of input features (784 for 28x28 MNIST).
        num_classes: Number of output classes.
        lr: Learning rate.
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If a size is not positive, a dropout probability is outside [0, 1), or another
            argument is out of range.

    Example:
        >>> teacher = HintonMLP(hidden=1200, dropout=0.5, input_dropout=0.2)
        >>> teacher(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        hidden: int = 800,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        in_features: int = 784,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("hidden", hidden, minimum=1)
        check_int("in_features", in_features, minimum=1)
        check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        check_number("input_dropout", input_dropout, low=0.0, high=1.0, high_open=True)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.input_drop = nn.Dropout(input_dropout)
        self.fc1 = nn.Linear(in_features, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.example_input_array = torch.zeros(1, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs of shape ``(N, ...)``."""
        x = self.input_drop(x.reshape(x.shape[0], -1))
        x = self.drop1(F.relu(self.fc1(x)))
        x = self.drop2(F.relu(self.fc2(x)))
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


def _check_int_sequence(name: str, value: Any, minimum: int) -> tuple[int, ...]:
    """``value`` must be a non-empty list / tuple of ints >= ``minimum``; returned as a tuple."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"`{name}`={value!r} is not supported; expected a non-empty sequence of ints >= {minimum}."
        )
    for i, item in enumerate(value):
        check_int(f"{name}[{i}]", item, minimum=minimum)
    return tuple(value)


class LeNet300100BN(_DemoClassifier):
    """The 784-500-300-10 multi-layer perceptron with BatchNorm after every hidden layer.

    The MNIST network of Liu et al. (2017) "Learning Efficient Convolutional Networks through
    Network Slimming": every hidden layer is ``Linear -> BatchNorm1d -> ReLU``, so the BatchNorm
    scales are per-neuron importance scores and each ``Linear -> BatchNorm1d`` pair can be folded
    for inference. Layers are named like :class:`LeNet300100`: ``fc1, bn1, relu1, ..., fcK, bnK,
    reluK`` for the ``K`` hidden layers, then ``fc{K+1}``. Inputs of any shape ``(N, ...)`` are
    flattened to ``(N, in_features)``.

    ``example_input_array`` holds two samples, not one: ``BatchNorm1d`` refuses a batch of one
    sample in training mode, and graph tracers (Torch-Pruning) run the model in whatever mode it is.

    Args:
        num_classes: Number of output classes.
        in_features: Number of input features (784 for 28x28 MNIST).
        hidden: Widths of the hidden layers (500, 300 in the paper).
        lr: Learning rate. The default (1e-3 with Adam, batch 64) plateaus at 94-95 % test accuracy
            on :class:`MNIST5kDataModule` (4,000 training images); with ``random_shift=2`` it
            reaches 95.2 % after 5 epochs and 96 % after 9 (seed 0).
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If ``in_features``, ``num_classes``, a hidden width or ``lr`` is not positive,
            ``hidden`` is empty, ``weight_decay`` is negative, or ``optimizer`` is not supported.

    Example:
        >>> LeNet300100BN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 784,
        hidden: tuple[int, ...] = (500, 300),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_features", in_features, minimum=1)
        widths = _check_int_sequence("hidden", hidden, minimum=1)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.in_features = in_features
        self.hidden = widths
        previous = in_features
        for i, width in enumerate(widths, start=1):
            setattr(self, f"fc{i}", nn.Linear(previous, width))
            setattr(self, f"bn{i}", nn.BatchNorm1d(width))
            setattr(self, f"relu{i}", nn.ReLU())
            previous = width
        setattr(self, f"fc{len(widths) + 1}", nn.Linear(previous, num_classes))
        self.example_input_array = torch.zeros(2, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs of shape ``(N, ...)``."""
        x = x.reshape(x.shape[0], -1)
        for i in range(1, len(self.hidden) + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{len(self.hidden) + 1}")(x)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm that follows removes any per-channel shift anyway.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class SmallVGG(_DemoClassifier):
    """A VGG-style plain network (Simonyan and Zisserman, 2015) for 28x28 images.

    Six 3x3 ``Conv2d (no bias) -> BatchNorm2d -> ReLU`` blocks in three stages of two, each stage
    closed by a 2x2 max pooling, then global average pooling and one linear classifier::

        features: [conv-bn-relu (w), conv-bn-relu (w), maxpool]         # 28x28 -> 14x14
                  [conv-bn-relu (2w), conv-bn-relu (2w), maxpool]       # 14x14 -> 7x7
                  [conv-bn-relu (4w), conv-bn-relu (4w), maxpool]       # 7x7 -> 3x3
        pool (global average) -> flatten -> fc (4w -> num_classes)

    ``features`` is an ``nn.Sequential`` of modules only (indices 0-20), so every layer is a
    module that hooks, pruning and fusion can see. At the default ``width=32`` (channels 32, 64,
    128: multiples of 8, as vector units and tensor cores like) the network has 288,170 parameters
    and costs about 29.1 MMAC per image. It is the usual target of filter pruning (Li et al., 2017)
    and network slimming (Liu et al., 2017) scaled down to MNIST.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input channels.
        width: Channels of the first stage; the second and third have ``2 * width`` and
            ``4 * width``. Keep it a multiple of 8 for efficient kernels.
        lr: Learning rate. The default (1e-3 with Adam, batch 64) reaches 97.5 % test accuracy on
            :class:`MNIST5kDataModule` after 3 epochs (97.1 % at ``width=16``; seed 0).
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If ``num_classes``, ``in_channels``, ``width`` or ``lr`` is not positive,
            ``weight_decay`` is negative, or ``optimizer`` is not supported.

    Example:
        >>> SmallVGG()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_channels", in_channels, minimum=1)
        check_int("width", width, minimum=1)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.width = width
        layers: list[nn.Module] = []
        previous = in_channels
        for channels in (width, 2 * width, 4 * width):
            layers += _conv_bn_relu(previous, channels) + _conv_bn_relu(channels, channels)
            layers.append(nn.MaxPool2d(2))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        return self.fc(self.flatten(self.pool(self.features(x))))


class _BasicBlock(nn.Module):
    """ResNet BasicBlock (He et al., 2016): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity when shape is kept, else a strided 1x1 ``Conv2d -> BatchNorm2d``
    projection (option B of the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        # A second ReLU module (not reusing relu1): a module called twice confuses per-module hooks.
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual add, then ReLU."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(_DemoClassifier):
    """A three-stage ResNet of BasicBlocks (He et al., 2016) for 28x28 images.

    The CIFAR-style layout of the paper (Section 4.2) at MNIST scale::

        conv1 (3x3, w) -> bn1 -> relu                              # 28x28
        layer1: blocks[0] BasicBlocks, w channels                  # 28x28
        layer2: blocks[1] BasicBlocks, 2w channels, first stride 2 # 14x14
        layer3: blocks[2] BasicBlocks, 4w channels, first stride 2 # 7x7
        pool (global average) -> flatten -> fc (4w -> num_classes)

    Each BasicBlock is ``conv-bn-relu-conv-bn``, added to the identity (or, where the shape
    changes, to a strided 1x1 ``conv-bn`` projection), then ReLU. The residual adds couple the
    channels of a whole stage, which is what dependency-aware structured pruning must handle. At
    the default ``width=16, blocks=(2, 2, 2)`` the network has 174,970 parameters and costs about
    20.2 MMAC per image.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input channels.
        width: Channels of the first stage (``2 * width`` and ``4 * width`` in the next two).
        blocks: Number of BasicBlocks in each of the three stages.
        lr: Learning rate. The default (1e-3 with Adam, batch 64) reaches 96.7 % test accuracy on
            :class:`MNIST5kDataModule` after 5 epochs (seed 0), but moves between 94 and 97 % from
            one epoch to the next (epochs 4-8), so evaluate after 5 or more.
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If ``num_classes``, ``in_channels``, ``width``, a block count or ``lr`` is not
            positive, ``blocks`` does not have three entries, ``weight_decay`` is negative, or
            ``optimizer`` is not supported.

    Example:
        >>> SmallResNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        blocks: tuple[int, int, int] = (2, 2, 2),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_channels", in_channels, minimum=1)
        check_int("width", width, minimum=1)
        counts = _check_int_sequence("blocks", blocks, minimum=1)
        if len(counts) != 3:
            raise ValueError(
                f"`blocks`={blocks!r} is not supported; expected three ints >= 1 (one per stage)."
            )
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.width = width
        self.blocks = counts
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        previous = width
        for stage, (channels, count) in enumerate(zip((width, 2 * width, 4 * width), counts), start=1):
            first_stride = 1 if stage == 1 else 2
            layers = [
                _BasicBlock(previous if i == 0 else channels, channels, first_stride if i == 0 else 1)
                for i in range(count)
            ]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            previous = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class _InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block (Sandler et al., 2018).

    ``expand`` (1x1) -> BN -> ReLU6 -> ``depthwise`` (3x3, ``groups`` = channels) -> BN -> ReLU6 ->
    ``project`` (1x1) -> BN (linear bottleneck: no activation), plus the input when the block keeps
    stride 1 and width.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu1 = nn.ReLU6()
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU6()
        self.project = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand, filter depthwise, project; add the input when shapes allow."""
        out = self.relu1(self.bn1(self.expand(x)))
        out = self.relu2(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.use_residual else out


class SmallMobileNet(_DemoClassifier):
    """A MobileNetV2-style network (Sandler et al., 2018) of inverted residual blocks, for 28x28 images.

    Layout for width ``w`` and expansion ``t`` (all convolutions without bias, each followed by
    BatchNorm)::

        conv1 (3x3, w) -> bn1 -> relu (ReLU6)                      # 28x28
        blocks[0]: inverted residual w -> w,   stride 1 (+ residual)
        blocks[1]: inverted residual w -> 2w,  stride 2            # 14x14
        blocks[2]: inverted residual 2w -> 2w, stride 1 (+ residual)
        blocks[3]: inverted residual 2w -> 4w, stride 2            # 7x7
        blocks[4]: inverted residual 4w -> 4w, stride 1 (+ residual)
        conv_last (1x1, 8w) -> bn_last -> relu_last (ReLU6)
        pool (global average) -> flatten -> fc (8w -> num_classes)

    Every inverted residual block is ``1x1 expand (t times wider) -> BN -> ReLU6 -> 3x3 depthwise
    -> BN -> ReLU6 -> 1x1 project -> BN``. Depthwise convolutions tie their input and output
    channels together, which structured pruning and per-channel quantization must respect. At the
    default ``width=16, expansion=4`` the network has 77,018 parameters and costs about 8.7 MMAC
    per image.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input channels.
        width: Channels of the stem and first block (the later blocks have ``2w`` and ``4w``, the
            last 1x1 convolution ``8w``).
        expansion: Expansion factor ``t`` of the inverted residual blocks (MobileNetV2 uses 6).
        lr: Learning rate. The default (1e-3 with Adam, batch 64) reaches 95.5 % test accuracy on
            :class:`MNIST5kDataModule` after 3 epochs and 97.1 % after 5 (seed 0).
        weight_decay: L2 penalty passed to the optimizer.
        optimizer: One of ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD uses momentum 0.9).

    Raises:
        ValueError: If ``num_classes``, ``in_channels``, ``width``, ``expansion`` or ``lr`` is not
            positive, ``weight_decay`` is negative, or ``optimizer`` is not supported.

    Example:
        >>> SmallMobileNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        expansion: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
    ) -> None:
        check_int("in_channels", in_channels, minimum=1)
        check_int("width", width, minimum=1)
        check_int("expansion", expansion, minimum=1)
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, optimizer=optimizer)
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.width = width
        self.expansion = expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU6()
        # (out channels, stride) of each block.
        layout = [(width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)]
        layers = []
        previous = width
        for channels, stride in layout:
            layers.append(_InvertedResidual(previous, channels, stride, expansion))
            previous = channels
        self.blocks = nn.Sequential(*layers)
        self.conv_last = nn.Conv2d(previous, 8 * width, 1, bias=False)
        self.bn_last = nn.BatchNorm2d(8 * width)
        self.relu_last = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(8 * width, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)`` for inputs ``(N, C, H, W)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu_last(self.bn_last(self.conv_last(self.blocks(x))))
        return self.fc(self.flatten(self.pool(x)))
