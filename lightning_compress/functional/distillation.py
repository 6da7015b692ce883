"""Knowledge-distillation losses (pure tensor kernels, no Lightning import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": ``T^2 KL(p_t || p_s)``.

    ``p = softmax(z / T)`` over the last dimension; every other dimension is a sample (a sequence
    model's ``(N, L, V)`` logits give ``N * L`` distributions). The KL divergence is averaged over
    samples. The ``T^2`` factor keeps the gradient magnitude of the soft targets independent of
    ``T`` (the gradient of the cross-entropy with soft targets scales as ``1 / T^2``), so ``alpha``
    means the same at every temperature. Computed in float32 whatever the input dtype.

    Args:
        student_logits: ``(..., C)`` logits of the student (with autograd).
        teacher_logits: ``(..., C)`` logits of the teacher, the same shape.
        temperature: ``T > 0``.

    Returns:
        A scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"soft_target_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape."
        )
    classes = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * (temperature * temperature)


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets (Romero et al., 2015) hint loss: mean squared error between features.

    ``student_features`` is the (adapted) student feature map; when its spatial size differs from the
    teacher's, the larger one is average-pooled to the smaller size first.

    Returns:
        A scalar tensor (float32).
    """
    s, t = student_features.float(), teacher_features.detach().float()
    if s.dim() != t.dim() or s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"hint_loss: adapted student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
            "differ in batch or channel size."
        )
    if s.shape != t.shape and s.dim() in (3, 4):
        size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:], strict=True))
        pool = F.adaptive_avg_pool1d if s.dim() == 3 else F.adaptive_avg_pool2d
        s, t = pool(s, size), pool(t, size)
    if s.shape != t.shape:
        raise ValueError(
            f"hint_loss: adapted student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
            "differ in shape."
        )
    return F.mse_loss(s, t)


def soft_targets(teacher_logits: Tensor, temperature: float) -> Tensor:
    """``softmax(teacher_logits / T)`` over the last dimension, in float32."""
    return torch.softmax(teacher_logits.float() / temperature, dim=-1)


__all__ = ["hint_loss", "soft_target_loss", "soft_targets"]
