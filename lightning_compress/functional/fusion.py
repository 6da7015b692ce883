"""Fold an inference-mode BatchNorm into the convolution or linear layer before it.

In inference mode BatchNorm (Ioffe and Szegedy, 2015) is a per-channel affine map with fixed
coefficients, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, so when it directly follows a
convolution or linear layer ``x = w * input + b`` it can be absorbed into that layer's weight and
bias (Jacob et al., 2018, Section 3.2 "batch normalization folding")::

    w' = w * gamma / sqrt(var + eps)            (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

Folding removes one memory pass per layer at inference and is the first step of integer
quantization, whose per-channel weight scales must see the folded weights.

References:
    S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015.

    B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam and D. Kalenichenko,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_bn", "is_foldable_layer"]


def is_foldable_layer(module: torch.nn.Module) -> bool:
    """Whether a following BatchNorm can be folded into ``module`` (its output channels scale).

    True for an initialised Linear or a non-transposed Conv of any dimension.
    """
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return False
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed


def fold_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    transposed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fold an inference-mode BatchNorm into the Conv (any dimension) or Linear layer before it.

    Computes ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (Jacob et al., 2018, Section 3.2), so that
    ``layer'(x) == bn(layer(x))`` with the BatchNorm in eval mode. The result has the dtypes of
    ``weight`` and ``bias`` (``weight``'s when ``bias`` is ``None``); the arithmetic runs in the
    promoted dtype of the inputs, which is float32 when the BatchNorm statistics are float32.
    Nothing is modified in place and no autograd history is recorded.

    Args:
        weight: Layer weight: ``(C_out, C_in / groups, *kernel)`` for a convolution, ``(C_out,
            C_in)`` for a linear layer, ``(C_in, C_out, *kernel)`` for a transposed convolution.
        bias: Layer bias of shape ``(C_out,)``, or ``None`` (treated as zeros).
        running_mean: BatchNorm running mean ``mu``, shape ``(C_out,)``.
        running_var: BatchNorm running variance ``sigma^2``, shape ``(C_out,)``.
        eps: BatchNorm epsilon, ``>= 0``.
        gamma: BatchNorm scale (``bn.weight``), or ``None`` for ``affine=False`` (ones).
        beta: BatchNorm shift (``bn.bias``), or ``None`` for ``affine=False`` (zeros).
        transposed: ``weight`` belongs to a transposed convolution (output channels in dimension
            1); only ``groups=1`` transposed convolutions are supported.

    Returns:
        ``(weight', bias')``: new tensors, ``bias'`` of shape ``(C_out,)``.

    Raises:
        ValueError: If a shape does not match the number of output channels or ``eps`` is
            negative.

    Example:
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8).eval()
        >>> w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
        ...                bn.weight, bn.bias)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-6)
        True
    """
    if weight.dim() < 2:
        raise ValueError(
            f"fold_bn: `weight` must have at least 2 dimensions; got shape {tuple(weight.shape)}."
        )
    channels = int(weight.shape[1] if transposed else weight.shape[0])
    named = {
        "running_mean": running_mean,
        "running_var": running_var,
        "bias": bias,
        "gamma": gamma,
        "beta": beta,
    }
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != (channels,):
            raise ValueError(
                f"fold_bn: `{name}` has shape {tuple(tensor.shape)}; expected ({channels},) to match the "
                f"output channels of `weight` {tuple(weight.shape)} (its dim {1 if transposed else 0})"
                f"{' (transposed convolutions must have groups=1)' if transposed else ''}."
            )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"`eps`={eps!r} is not supported; expected a number >= 0.")
    with torch.no_grad():
        # torch's own kernel (what torch.ao and torch.fx fusion use): handles None bias / affine=False
        # and the transposed layout. It returns Parameters; plain detached tensors are what callers
        # copy into their layers.
        fused_w, fused_b = fuse_conv_bn_weights(
            weight, bias, running_mean, running_var, float(eps), gamma, beta, transpose=transposed
        )
    return fused_w.detach(), fused_b.detach()
