"""The linear steps an optimizer ends with: multiplying updates by constants, schedules and
learning rates, and adding decayed weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

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
    "add_decayed_weights",
    "scale",
    "scale_by_lr",
    "scale_by_schedule",
    "set_to_zero",
]

ScalarOrSchedule = Union[Scalar, Callable[[torch.Tensor], Scalar]]


class ScaleByScheduleState(NamedTuple):
    """The state of :func:`scale_by_schedule` (and of :func:`scale_by_lr` given a schedule).

    Args:
        count: updates made so far (a 0-d int64 tensor); the schedule is evaluated at
            this value before it is incremented.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_schedule(holotx.linear_schedule(1.0, 0.0, 10)).init({"w": torch.zeros(2)})
        >>> state
        ScaleByScheduleState(count=tensor(0))
    """

    count: torch.Tensor
    """Updates made so far; the schedule is evaluated at this value before incrementing."""


def _scaled(updates, factor: Scalar):
    if executor.take_scale(factor):  # the caller multiplies as it applies the updates
        return updates

    def kernel(g, _p):
        return (ops.mul_(g, factor),)

    return multi_tensor_update(kernel, updates)[0]


def scale(step_size: Scalar) -> GradientTransformation:
    """Multiply every update by ``step_size``.

    Args:
        step_size: the factor: a number or a 0-d tensor.

    Returns:
        A :class:`~holotx.GradientTransformation`. It keeps no state (:class:`~holotx.EmptyState`).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale(0.5)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 0.2500,  0.2500, -0.5000])
    """

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del params, extra
        return _scaled(updates, step_size), state

    return own_transform(init, update, scaling=True)


def scale_by_schedule(schedule: Callable[[torch.Tensor], Scalar]) -> GradientTransformation:
    """Multiply updates by ``schedule(count)``, ``count`` being the updates made so far
    (so the first update uses ``schedule(0)``).

    Args:
        schedule: a function of the step count (see :mod:`holotx.schedules`).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByScheduleState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_schedule(holotx.linear_schedule(1.0, 0.0, 4))
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 0.3750,  0.3750, -0.7500])
    """
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

    return own_transform(init, update, prepare, scaling=True, state_type=ScaleByScheduleState)


def scale_by_lr(lr: ScalarOrSchedule) -> GradientTransformation:
    r"""Turn a descent direction into a step: :math:`u \leftarrow -\eta\, u`.

    ``lr`` (:math:`\eta`, must be >= 0) is a number, a 0-d tensor, or a schedule
    ``count -> lr``; with a schedule the state counts the steps.

    Args:
        lr: :math:`\eta`: a number, a 0-d tensor or a schedule ``count -> lr``.

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByScheduleState`
        with a schedule, else :class:`~holotx.EmptyState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_lr(0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([-0.0500, -0.0500,  0.1000])
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
    """Replace every update by zeros (used by :func:`holotx.freeze`).

    Returns:
        A :class:`~holotx.GradientTransformation`. It keeps no state.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.set_to_zero()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([0., 0., 0.])
    """
    zeros = stateless(lambda updates, params: tree_map(torch.zeros_like, updates))
    return own_transform(zeros.init, zeros.update)  # fresh zeros: nothing shared


def add_decayed_weights(
    weight_decay: Scalar = 0.0, mask: Any | Callable[[Any], Any] | None = None
) -> GradientTransformation:
    r"""Add :math:`\lambda\,\theta` to the updates: :math:`u \leftarrow u + \lambda\theta`.

    Placed before a rescaling transform this is coupled L2 regularisation (torch's
    ``Adam(weight_decay=...)``); placed after it and before :func:`scale_by_lr` it is
    decoupled decay (AdamW). ``mask`` (a pytree of bools, a prefix of one, or a function
    ``params -> mask``) limits it to some leaves, via :func:`holotx.masked`.

    Args:
        weight_decay: :math:`\lambda`: a number or a 0-d tensor (default ``0``).
        mask: where to decay: a pytree of bools, a prefix of one, or a function ``params -> mask``
            (default ``None``: every leaf).

    Returns:
        A :class:`~holotx.GradientTransformation`. It needs ``params``.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.add_decayed_weights(0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 0.6000,  0.3000, -0.7000])
    """
    _validate.non_negative("weight_decay", weight_decay)

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return updates, state

        def kernel(g, p):
            return (ops.add_(g, p, alpha=weight_decay),)

        new_updates, _ = multi_tensor_update(kernel, updates, params=params, needs_params=True)
        return new_updates, state

    tx = own_transform(init, update)
    if mask is not None:
        from holotx.combine import masked

        return masked(tx, mask)
    return tx
