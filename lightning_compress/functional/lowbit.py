r"""Pure kernels of binary and ternary weight networks (no Lightning import).

* :func:`binarize`: BinaryConnect (Courbariaux et al., 2015) with the XNOR-Net scale of Rastegari et
  al. (2016), :math:`W_b = \alpha_c \operatorname{sign}(W)`, :math:`\alpha_c = \operatorname{mean}|W_c|`.
* :func:`ternarize_twn`: Ternary Weight Networks (Li et al., 2016), threshold
  :math:`\Delta = 0.7\,\operatorname{mean}|W|` and scale :math:`\alpha = \operatorname{mean}_{|W|>\Delta}|W|`.
* :func:`ternarize_ttq`: Trained Ternary Quantization (Zhu et al., 2017), threshold
  :math:`\Delta = t \max|W|` and two learned scales :math:`W^p, W^n`; :func:`ttq_gradients` gives the
  gradients of the scales and of the latent weights (the paper's eqs. 6-8).
* :func:`binary_activation`: the sign of an activation with the hard-tanh straight-through estimator
  (Hubara et al., 2016; Rastegari et al., 2016).

Every function works on one tensor and synchronises nothing with the host (thresholds and scales
stay on the device), so a caller can run them inside every optimizer step.

References:
    M. Courbariaux, Y. Bengio and J.-P. David, "BinaryConnect: Training Deep Neural Networks with
    binary weights during propagations", NeurIPS 2015.

    M. Rastegari, V. Ordonez, J. Redmon and A. Farhadi, "XNOR-Net: ImageNet Classification Using
    Binary Convolutional Neural Networks", ECCV 2016.

    I. Hubara, M. Courbariaux, D. Soudry, R. El-Yaniv and Y. Bengio, "Binarized Neural Networks",
    NeurIPS 2016.

    F. Li, B. Zhang and B. Liu, "Ternary Weight Networks", arXiv:1605.04711, 2016.

    C. Zhu, S. Han, H. Mao and W. J. Dally, "Trained Ternary Quantization", ICLR 2017.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def channel_scale(w: Tensor, per_channel: bool = True) -> Tensor:
    """XNOR-Net scale: ``mean|W|`` per output channel (dim 0, kept for broadcasting) or per tensor.

    Args:
        w: A weight tensor (``out_features x ...`` for Linear and Conv layers).
        per_channel: One scale per output channel (``True``) or one for the whole tensor.

    Returns:
        Shape ``(C, 1, ..., 1)`` per channel, a 0-dim tensor otherwise (or for a 1-d ``w``).
    """
    magnitude = w.abs()
    if per_channel and w.dim() > 1:
        return magnitude.mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return magnitude.mean()


def binarize(w: Tensor, per_channel: bool = True) -> Tensor:
    r"""Binary weights :math:`W_b = \alpha_c \operatorname{sign}(W)` (BinaryConnect + XNOR-Net scale).

    BinaryConnect (Courbariaux et al., NeurIPS 2015) uses the deterministic sign of the real-valued
    weights in the forward and backward passes; XNOR-Net (Rastegari et al., ECCV 2016, eq. 4) scales
    them by :math:`\alpha_c = \lVert W_c \rVert_1 / n`, the mean magnitude of output channel ``c``,
    which minimises :math:`\lVert W_c - \alpha_c B_c \rVert^2` over :math:`\alpha_c` and
    :math:`B_c \in \{-1, +1\}^n`.

    An entry that is exactly zero stays zero (``torch.sign(0) == 0``): a weight removed by pruning is
    not revived as :math:`+\alpha`. Real-valued weights are never exactly zero in practice.

    Args:
        w: The real-valued weights.
        per_channel: One scale per output channel (dim 0), or one for the whole tensor.

    Returns:
        A tensor like ``w`` whose entries are :math:`\pm\alpha_c` (or 0 where ``w`` is 0).
    """
    return torch.sign(w) * channel_scale(w, per_channel)


def twn_scale(w: Tensor, delta_factor: float = 0.7) -> tuple[Tensor, Tensor]:
    r"""Threshold and scale of a Ternary Weight Network layer (Li et al., 2016, eqs. 9 and 11).

    .. math:: \Delta = \text{delta\_factor} \cdot \operatorname{mean}|W|, \qquad
              \alpha = \operatorname{mean}_{i: |W_i| > \Delta} |W_i|

    ``0.7 mean|W|`` is the paper's approximation of the optimal threshold for Gaussian or uniform
    weights. When no entry exceeds :math:`\Delta`, :math:`\alpha = 0`.

    Args:
        w: The real-valued weights of one layer.
        delta_factor: The factor of ``mean|W|`` (0.7 in the paper).

    Returns:
        ``(delta, alpha)`` as 0-dim tensors on ``w``'s device.
    """
    magnitude = w.abs()
    delta = delta_factor * magnitude.mean()
    keep = magnitude > delta
    alpha = (magnitude * keep).sum() / keep.sum().clamp_min(1)
    return delta, alpha


def ternarize_twn(w: Tensor, delta_factor: float = 0.7) -> Tensor:
    r"""Ternary weights of TWN (Li et al., 2016): :math:`\alpha \operatorname{sign}(W) [|W| > \Delta]`.

    See :func:`twn_scale` for :math:`\Delta` and :math:`\alpha` (one of each per layer).

    Args:
        w: The real-valued weights of one layer.
        delta_factor: Threshold factor: :math:`\Delta = \text{delta\_factor} \cdot \operatorname{mean}|W|`.

    Returns:
        A tensor like ``w`` with values in :math:`\{-\alpha, 0, +\alpha\}`.
    """
    delta, alpha = twn_scale(w, delta_factor)
    return torch.where(
        w.abs() > delta, torch.sign(w) * alpha, torch.zeros((), dtype=w.dtype, device=w.device)
    )


def ttq_delta(w: Tensor, threshold: float) -> Tensor:
    r"""TTQ threshold :math:`\Delta = t \max|W|` (Zhu et al., 2017, eq. 9), a 0-dim tensor."""
    return threshold * w.abs().amax()


def ttq_init_scales(w: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    r"""Starting values of the TTQ scales :math:`W^p, W^n` of one layer.

    The mean of :math:`W` over :math:`W > \Delta` and of :math:`-W` over :math:`W < -\Delta`, i.e. the
    TWN scale of each sign at the TTQ threshold.

    Args:
        w: The real-valued weights of one layer.
        threshold: ``t`` of :math:`\Delta = t \max|W|`.

    Returns:
        ``(wp, wn)``: 0-dim tensors, both >= 0.
    """
    delta = ttq_delta(w, threshold)
    pos, neg = w > delta, w < -delta
    wp = (w * pos).sum() / pos.sum().clamp_min(1)
    wn = -(w * neg).sum() / neg.sum().clamp_min(1)
    return wp, wn


def ternarize_ttq(w: Tensor, wp: Tensor | float, wn: Tensor | float, threshold: float) -> Tensor:
    r"""Ternary weights of Trained Ternary Quantization (Zhu et al., ICLR 2017, eq. 1).

    .. math:: w^t = \begin{cases} W^p & w > \Delta \\ 0 & |w| \le \Delta \\ -W^n & w < -\Delta
              \end{cases}, \qquad \Delta = t \max|W|

    with two learned, positive scales :math:`W^p` and :math:`W^n` per layer.

    Args:
        w: The real-valued (latent) weights of one layer.
        wp: The positive scale :math:`W^p`.
        wn: The negative scale's magnitude :math:`W^n` (the negative value is :math:`-W^n`).
        threshold: ``t`` in (0, 1).

    Returns:
        A tensor like ``w`` with values in :math:`\{-W^n, 0, W^p\}`.
    """
    delta = ttq_delta(w, threshold)
    wp = torch.as_tensor(wp, dtype=w.dtype, device=w.device)
    wn = torch.as_tensor(wn, dtype=w.dtype, device=w.device)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.where(w > delta, wp, torch.where(w < -delta, -wn, zero))


def ttq_gradients(
    w: Tensor, grad: Tensor, wp: Tensor | float, wn: Tensor | float, threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of TTQ (Zhu et al., 2017, eqs. 6-8) from the gradient at the ternary weights.

    With :math:`I_p = \{i : w_i > \Delta\}`, :math:`I_n = \{i : w_i < -\Delta\}` and
    :math:`g = \partial L / \partial w^t`:

    .. math:: \frac{\partial L}{\partial W^p} = \sum_{i \in I_p} g_i, \qquad
              \frac{\partial L}{\partial W^n} = -\sum_{i \in I_n} g_i, \qquad
              \frac{\partial L}{\partial \tilde w_i} = g_i \cdot
              \begin{cases} W^p & i \in I_p \\ 1 & \text{otherwise} \\ W^n & i \in I_n \end{cases}

    The paper writes eq. 7 without the minus sign; here :math:`W^n` is the positive magnitude of the
    negative value :math:`-W^n` (as in eq. 1), so the chain rule gives :math:`-\sum_{I_n} g_i`, the
    gradient autograd computes for :func:`ternarize_ttq`.

    Args:
        w: The latent weights the ternary ones were computed from.
        grad: :math:`\partial L / \partial w^t`, shaped like ``w``.
        wp: :math:`W^p`.
        wn: :math:`W^n`.
        threshold: ``t`` of :math:`\Delta = t \max|W|`.

    Returns:
        ``(latent_grad, grad_wp, grad_wn)``; the last two are 0-dim tensors.
    """
    delta = ttq_delta(w, threshold)
    pos, neg = w > delta, w < -delta
    wp = torch.as_tensor(wp, dtype=grad.dtype, device=grad.device)
    wn = torch.as_tensor(wn, dtype=grad.dtype, device=grad.device)
    one = torch.ones((), dtype=grad.dtype, device=grad.device)
    latent = grad * torch.where(pos, wp, torch.where(neg, wn, one))
    return latent, (grad * pos).sum(), -(grad * neg).sum()


class _SignSTE(torch.autograd.Function):
    """``+1`` where ``x > 0``, ``-1`` elsewhere; backward: the hard-tanh STE ``grad * (|x| <= 1)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return torch.where(x > 0, one, -one)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binary_activation(x: Tensor) -> Tensor:
    r"""Binary activation :math:`\operatorname{sign}(x) \in \{-1, +1\}` with the straight-through estimator.

    The forward value is ``+1`` where ``x > 0`` and ``-1`` elsewhere (zero maps to ``-1``, so the
    binarised output of a ReLU still tells active from inactive units). The backward pass is the
    hard-tanh straight-through estimator of Hubara et al. (2016) and XNOR-Net (Rastegari et al.,
    2016): :math:`\partial L / \partial x = \partial L / \partial \operatorname{sign}(x) \cdot
    1_{|x| \le 1}`.

    Args:
        x: Any floating-point tensor.

    Returns:
        A tensor like ``x`` holding ``-1.0`` and ``+1.0``.
    """
    return _SignSTE.apply(x)


__all__ = [
    "binarize",
    "binary_activation",
    "channel_scale",
    "ternarize_ttq",
    "ternarize_twn",
    "ttq_delta",
    "ttq_gradients",
    "ttq_init_scales",
    "twn_scale",
]
