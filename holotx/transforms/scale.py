"""Multiplying updates by constants, schedules and learning rates."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Union

import torch

from holotx import _validate, ops
from holotx.base import (
    EmptyState,
    GradientTransformation,
    final_scale_request,
    init_count,
    next_count,
    own_transform,
    stateless,
    updates_donated,
)
from holotx.multi import multi_tensor_update
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


def _scaled(updates, factor: Scalar, donate: bool, deferred: list | None):
    if deferred is not None:  # the caller multiplies as it applies the updates
        deferred.append(factor)
        return updates

    def kernel(g, _p):
        return (ops.mul(g, factor, inplace=donate),)

    return multi_tensor_update(kernel, updates)[0]


def scale(step_size: Scalar) -> GradientTransformation:
    """Multiply every update by ``step_size``."""

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, *, donate=False, **extra):
        del params
        deferred = final_scale_request(update, extra)
        return _scaled(updates, step_size, updates_donated(donate, extra), deferred), state

    return own_transform(init, update)


def scale_by_schedule(schedule: Callable[[torch.Tensor], Scalar]) -> GradientTransformation:
    """Multiply updates by ``schedule(count)``, ``count`` being the updates made so far
    (so the first update uses ``schedule(0)``)."""
    if not callable(schedule):
        raise ValueError(f"schedule must be callable, got {schedule!r}")

    def init(params):
        return ScaleByScheduleState(init_count(params))

    def update(updates, state, params=None, *, donate=False, **extra):
        del params
        factor = schedule(state.count)
        deferred = final_scale_request(update, extra)
        return _scaled(updates, factor, updates_donated(donate, extra), deferred), ScaleByScheduleState(
            next_count(state.count, donate=donate)
        )

    return own_transform(init, update)


def scale_by_lr(lr: ScalarOrSchedule) -> GradientTransformation:
    r"""Turn a descent direction into a step: :math:`u \leftarrow -\eta\, u`.

    ``lr`` (:math:`\eta`, must be >= 0) is a number, a 0-d tensor, or a schedule
    ``count -> lr``; with a schedule the state counts the steps.
    """
    if callable(lr):
        return scale_by_schedule(lambda count: -lr(count))
    _validate.non_negative("lr", lr)
    return scale(-lr)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (used by :func:`holotx.freeze`)."""
    zeros = stateless(lambda updates, params: tree_map(torch.zeros_like, updates))
    return own_transform(zeros.init, zeros.update)  # fresh zeros: nothing shared
