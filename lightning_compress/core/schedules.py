"""Sparsity (or any compression-strength) schedules as pure functions of the optimizer step.

No schedule keeps state: the value at step ``t`` depends only on ``t`` and the arguments, so a run
resumed from a checkpoint at step ``t`` continues on exactly the same curve.

``start`` and ``end`` accept an ``int`` (an optimizer step) or a ``float`` in ``[0, 1]`` (a fraction
of ``trainer.estimated_stepping_batches``); :func:`resolve_step` turns either into a step.
"""

from __future__ import annotations

import math

from lightning_compress.core.validation import check_int

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


def training_length_known(trainer: object) -> bool:
    """False when neither ``max_steps`` nor ``max_epochs`` bounds training (fractions are meaningless)."""
    max_steps = getattr(trainer, "max_steps", -1)
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_steps is not None and max_steps >= 0:
        return True
    return max_epochs is not None and max_epochs >= 0


class StepSchedule:
    """``start`` / ``end`` / ``frequency`` of a technique, resolved against the training length.

    ``start`` and ``end`` are an ``int`` (a training step: one step per stepping batch, the unit of
    ``trainer.estimated_stepping_batches``) or a ``float`` in [0, 1] (a fraction of training).

    Lifecycle (driven by :class:`~lightning_compress.core.callback.CompressionCallback`):

    * construction validates the arguments (errors name the argument);
    * ``setup()`` -> :meth:`check_trainer`: a fraction with an unbounded training length
      (``max_epochs=-1`` and no ``max_steps``) is refused before the sanity check;
    * ``on_fit_start`` -> :meth:`resolve`: fractions become steps of
      ``trainer.estimated_stepping_batches`` (an infinite estimate, e.g. an iterable dataset without
      ``len``, is refused naming the argument), and ``end`` is clamped to the last step actually
      run, so the target is reached even with ``end=1.0`` (step ``total`` never runs: the last one
      is ``total - 1``);
    * the resolved steps are kept in the callback's checkpoint state. A run resumed with a different
      ``max_epochs`` / ``max_steps`` keeps them (the curve does not stretch or shrink mid-way); only
      ``end`` is clamped again when the new run is too short to reach it.

    Args:
        start: First step of the schedule.
        end: Step (or fraction) at which the target is reached.
        frequency: Steps between updates (``None`` for techniques without periodic updates).
        names: Argument names used in error messages.
    """

    def __init__(
        self,
        start: int | float = 0.0,
        end: int | float | None = 0.75,
        frequency: int | None = None,
        names: tuple[str, str] = ("start", "end"),
    ) -> None:
        self.names = names
        self.start = validate_step_arg(names[0], start)
        self.end = None if end is None else validate_step_arg(names[1], end)
        if self.end is not None and type(self.start) is type(self.end) and self.end < self.start:
            raise ValueError(
                f"`{names[1]}`={end!r} is before `{names[0]}`={start!r}; expected {names[1]} >= {names[0]}."
            )
        self.frequency = None if frequency is None else check_int("frequency", frequency, minimum=1)
        self.start_step: int | None = None
        self.end_step: int | None = None
        self.total: float | None = None
        self._fresh = False  # resolved in this run (not restored from a checkpoint)

    @property
    def resolved(self) -> bool:
        """Whether :meth:`resolve` (or a loaded state) fixed the steps."""
        return self.start_step is not None

    def _fractions(self) -> list[tuple[str, float]]:
        points = [(self.names[0], self.start), (self.names[1], self.end)]
        return [(n, v) for n, v in points if isinstance(v, float)]

    def check_trainer(self, trainer: object, owner: str = "") -> None:
        """Refuse fractions when the training length is unbounded (called in ``setup``)."""
        fractions = self._fractions()
        if fractions and not training_length_known(trainer):
            name, value = fractions[0]
            raise ValueError(
                f"{owner + ': ' if owner else ''}`{name}`={value!r} is a fraction of training, but training "
                "has no length (max_epochs=-1 and no max_steps); give an int training step, or set "
                "Trainer(max_epochs=...) or max_steps."
            )

    def resolve(self, total_steps: float | int | None, owner: str = "") -> None:
        """Fix ``start_step`` / ``end_step`` for a run of ``total_steps`` training steps.

        Already-resolved steps (from a checkpoint) are kept; ``end`` is clamped to ``total - 1``.
        """
        # Lightning reports an unknown length as inf (or -1 for an iterable dataset without len).
        finite = total_steps is not None and math.isfinite(total_steps) and total_steps > 0
        if not self.resolved:
            for name, value in self._fractions():
                if not finite:
                    raise ValueError(
                        f"{owner + ': ' if owner else ''}`{name}`={value!r} is a fraction of training, "
                        "but the "
                        "number of training steps is unknown (trainer.estimated_stepping_batches is "
                        f"{total_steps}); give an int training step, or set max_steps."
                    )
            self.start_step = resolve_step(self.start, total_steps, self.names[0])
            self.end_step = None if self.end is None else resolve_step(self.end, total_steps, self.names[1])
            self._fresh = True
        if finite:
            self.total = float(total_steps)
            last = max(int(total_steps) - 1, 0)
            if self.end_step is not None and self.end_step > last:
                self.end_step = max(last, self.start_step)

    def refine(self, total_steps: int, owner: str = "") -> None:
        """Re-resolve against a better estimate of the run's length, measured once training started.

        Used with manual optimization, where Lightning's estimate counts optimizer steps or batches
        rather than training steps. Points restored from a checkpoint are only clamped.
        """
        if self._fresh:
            self.start_step = self.end_step = None
        self.resolve(total_steps, owner)

    def next_update(self, step: int, schedule: str = "linear") -> int | None:
        """First update step ``>= step`` (``start + k * frequency`` up to ``end``, and ``end``)."""
        end = self.start_step if self.end_step is None else self.end_step
        return next_update_step(step, self.start_step, end, self.frequency or 1, schedule)

    def state_dict(self) -> dict[str, int | float | None]:
        """The resolved steps (plain numbers)."""
        return {"start_step": self.start_step, "end_step": self.end_step, "total": self.total}

    def load_state_dict(self, state: dict[str, int | float | None]) -> None:
        """Restore resolved steps saved by :meth:`state_dict`."""
        self._fresh = False
        self.start_step = None if state.get("start_step") is None else int(state["start_step"])
        self.end_step = None if state.get("end_step") is None else int(state["end_step"])
        self.total = state.get("total")
