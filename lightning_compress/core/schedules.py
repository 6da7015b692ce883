"""Sparsity (or any compression-strength) schedules as pure functions of the optimizer step.

No schedule keeps state: the value at step ``t`` depends only on ``t`` and the arguments, so a run
resumed from a checkpoint at step ``t`` continues on exactly the same curve.

``start`` and ``end`` accept an ``int`` (an optimizer step) or a ``float`` in ``[0, 1]`` (a fraction
of ``trainer.estimated_stepping_batches``); :func:`resolve_step` turns either into a step.
"""

from __future__ import annotations

import math

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cubic", "exponential", "polynomial")


def validate_step_arg(name: str, value: object) -> int | float:
    """Validate a ``start``/``end`` argument: an int >= 0 (step) or a float in [0, 1] (fraction).

    Raises:
        ValueError: naming the argument, the value and what is accepted.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"`{name}`={value!r} is not supported; expected an int >= 0 (optimizer step) or a float in "
            "[0, 1] (fraction of trainer.estimated_stepping_batches)."
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"`{name}`={value!r} is a negative step; expected an int >= 0.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}`={value!r} is a float outside [0, 1]; floats are fractions of training, "
            "use an int for an absolute optimizer step."
        )
    return value


def resolve_step(value: int | float, total_steps: float | int | None, name: str = "step") -> int:
    """Turn a ``start``/``end`` argument into an optimizer step.

    Args:
        value: An int (already a step) or a float fraction of ``total_steps``.
        total_steps: ``trainer.estimated_stepping_batches``; may be ``inf`` or ``None`` when
            training length is unknown, which is only an error for fractions.
        name: The argument's name for the error message.

    Raises:
        ValueError: A fraction was given but the length of training is unknown.
    """
    if isinstance(value, int):
        return value
    if total_steps is None or not math.isfinite(total_steps):
        raise ValueError(
            f"`{name}`={value!r} is a fraction of training, but the number of optimizer steps is unknown "
            "(set Trainer max_epochs or max_steps), or give an int optimizer step instead."
        )
    return round(value * total_steps)


def progress(step: int, start: int, end: int) -> float:
    """Fraction of the way from ``start`` to ``end`` at ``step``, clamped to [0, 1]."""
    if step < start:
        return 0.0
    if end <= start or step >= end:
        return 1.0
    return (step - start) / (end - start)


def sparsity_at(
    step: int,
    *,
    schedule: str,
    start: int,
    end: int,
    final: float,
    initial: float = 0.0,
    power: float = 3.0,
) -> float:
    """Target sparsity at optimizer ``step``.

    With ``p`` the progress from ``start`` to ``end`` (0 before ``start``, 1 after ``end``):

    * ``constant`` (one-shot): ``s_f`` from ``start`` on, ``s_i`` before.
    * ``linear``: ``s_i + (s_f - s_i) p``.
    * ``cubic`` (Zhu & Gupta, 2017, "To prune, or not to prune"):
      ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n dt))^3``.
    * ``polynomial``: the same with exponent ``power``.
    * ``exponential``: the density ``d = 1 - s`` decays geometrically,
      ``d_t = d_i (d_f / d_i)^p`` (a constant fraction of the survivors pruned per unit of
      progress, as in iterative pruning, Han et al. 2015).

    Args:
        step: The optimizer step.
        schedule: One of :data:`SCHEDULES`.
        start: First step of the ramp.
        end: Step at which ``final`` is reached.
        final: ``s_f``.
        initial: ``s_i``.
        power: Exponent of ``polynomial``.
    """
    if step < start:
        return initial
    p = progress(step, start, end)
    if schedule == "constant":
        return final
    if schedule == "linear":
        return initial + (final - initial) * p
    if schedule in ("cubic", "polynomial"):
        k = 3.0 if schedule == "cubic" else power
        return final + (initial - final) * (1.0 - p) ** k
    if schedule == "exponential":
        d_i, d_f = 1.0 - initial, 1.0 - final
        return 1.0 - d_i * (d_f / d_i) ** p
    raise ValueError(f"`schedule`={schedule!r} is not supported; expected one of {list(SCHEDULES)}.")


def is_update_step(step: int, start: int, end: int, frequency: int, schedule: str = "cubic") -> bool:
    """Whether the mask is recomputed at ``step``: ``start + k * frequency`` up to ``end``, and ``end``.

    A ``constant`` schedule updates only at ``start``.
    """
    if step < start:
        return False
    if schedule == "constant":
        return step == start
    if step > end:
        return False
    return step == end or (step - start) % frequency == 0


def next_update_step(step: int, start: int, end: int, frequency: int, schedule: str = "cubic") -> int | None:
    """The first update step ``>= step`` (see :func:`is_update_step`), or ``None`` if there is none."""
    if step <= start:
        return start
    if schedule == "constant" or step > end:
        return None
    k = -(-(step - start) // frequency)  # ceil division
    return min(start + k * frequency, end)
