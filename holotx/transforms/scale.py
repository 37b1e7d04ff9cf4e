"""Multiplying updates by constants, schedules and learning rates."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Union

import torch

from holotx import _validate, executor, ops
from holotx.base import (
    EmptyState,
    GradientTransformation,
    init_count,
    next_count,
    own_transform,
    stateless,
)
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.tree import map as tree_map

__all__ = [
    "ScaleByScheduleState",
    "scale",
    "scale_by_lr",
    "scale_by_schedule",
    "set_to_zero",
]

ScalarOrSchedule = Union[Scalar, Callable[[torch.Tensor], Scalar]]


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor
    """Updates made so far; the schedule is evaluated at this value before incrementing."""


def _scaled(updates, factor: Scalar):
    if executor.take_scale(factor):  # the caller multiplies as it applies the updates
        return updates

    def kernel(g, _p):
        return (ops.mul_(g, factor),)

    return multi_tensor_update(kernel, updates)[0]


def scale(step_size: Scalar) -> GradientTransformation:
    """Multiply every update by ``step_size``."""

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del params, extra
        return _scaled(updates, step_size), state

    return own_transform(init, update, scaling=True)


def scale_by_schedule(schedule: Callable[[torch.Tensor], Scalar]) -> GradientTransformation:
    """Multiply updates by ``schedule(count)``, ``count`` being the updates made so far
    (so the first update uses ``schedule(0)``)."""
    if not callable(schedule):
        raise ValueError(f"schedule must be callable, got {schedule!r}")

    def init(params):
        return ScaleByScheduleState(init_count(params))

    def prepare(state, params):
        executor.evaluate(schedule, state.count)

    def update(updates, state, params=None, **extra):
        del params, extra
        factor = executor.evaluate(schedule, state.count)
        return _scaled(updates, factor), ScaleByScheduleState(next_count(state.count))

    return own_transform(init, update, prepare, scaling=True)


def scale_by_lr(lr: ScalarOrSchedule) -> GradientTransformation:
    r"""Turn a descent direction into a step: :math:`u \leftarrow -\eta\, u`.

    ``lr`` (:math:`\eta`, must be >= 0) is a number, a 0-d tensor, or a schedule
    ``count -> lr``; with a schedule the state counts the steps.
    """
    if callable(lr):
        def negated(count):
            value = lr(count)
            _validate.schedule_value("lr", value)  # before any buffer is written (prepare)
            return -value

        return scale_by_schedule(negated)
    _validate.non_negative("lr", lr)
    return scale(-lr)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (used by :func:`holotx.freeze`)."""
    zeros = stateless(lambda updates, params: tree_map(torch.zeros_like, updates))
    return own_transform(zeros.init, zeros.update)  # fresh zeros: nothing shared
