"""Heavy-ball and Nesterov momentum, as a building block."""

from __future__ import annotations

from typing import NamedTuple

import torch

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.transforms.adam import per_leaf, scalar_dtype, step_counts
from holotx.tree import zeros_like

__all__ = ["TraceState", "trace"]


class TraceState(NamedTuple):
    """The state of :func:`trace`.

    Args:
        count: steps taken by each leaf, a tree of 0-d int64 tensors (its first step seeds
            its buffer undampened); ``None`` without dampening, where it is not needed.
        trace: the momentum buffer (``momentum_buffer`` in torch.optim.SGD).

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.trace(0.9).init({"w": torch.zeros(2)})
        >>> state.trace["w"], state.count
        (tensor([0., 0.]), None)
    """

    count: object
    """Steps taken by each leaf, a tree of 0-d int64 tensors (its first step seeds its
    buffer undampened); ``None`` without dampening, where it is not needed."""
    trace: object
    """The momentum buffer (``momentum_buffer`` in torch.optim.SGD)."""


def trace(
    momentum: Scalar = 0.9, dampening: Scalar = 0.0, *, nesterov: bool = False
) -> GradientTransformation:
    r"""Momentum as in ``torch.optim.SGD``.

    .. math::
        b_1 = g_1,\qquad b_t = \mu\, b_{t-1} + (1-\tau)\, g_t,\qquad
        u_t = \begin{cases} g_t + \mu b_t & \text{nesterov}\\ b_t & \text{otherwise}\end{cases}

    The first buffer is the first gradient itself, undampened (torch's SGD; Holocron's
    LARS does the same). ``momentum`` :math:`\mu` (default 0.9), ``dampening``
    :math:`\tau` (default 0). Nesterov needs ``momentum > 0`` and ``dampening == 0``.

    Args:
        momentum: :math:`\mu`, the momentum factor (default ``0.9``).
        dampening: :math:`\tau`, the dampening of the gradient entering the buffer (default ``0``).
        nesterov: return :math:`g_t + \mu b_t` instead of :math:`b_t` (default ``False``).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`TraceState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.trace(0.9)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 0.9500,  0.9500, -1.9000])

    References:
        Sutskever et al., "On the importance of initialization and momentum in deep
        learning", ICML 2013, https://proceedings.mlr.press/v28/sutskever13.html (Nesterov
        momentum as torch.optim.SGD writes it).
    """
    _validate.non_negative("momentum", momentum)
    _validate.in_unit_interval("dampening", dampening, include_one=True)
    _validate.nesterov(momentum, dampening, nesterov)

    # Without dampening the first buffer needs no special case (0 * m + g = g), so no
    # step count is kept.
    undampened = isinstance(dampening, (int, float)) and dampening == 0

    def init(params):
        return TraceState(None if undampened else init_counts(params), zeros_like(params))

    def update(updates, state, params=None, **extra):
        del params, extra

        def kernel(g, count, buf, _p):
            buf = ops.mul_(buf, momentum)
            if undampened:
                buf = ops.add_(buf, g)
            else:  # each leaf's first buffer is its undampened gradient
                count, t = step_counts(count)
                one = torch.ones_like(t, dtype=scalar_dtype(t.device))
                (grad_weight,) = per_leaf(torch.where(t == 1, one, (1 - dampening) * one))
                buf = ops.add_(buf, ops.mul(g, grad_weight))
            # Nesterov: g + momentum * buf; else the buffer's value (g is read: its memory
            # may hold a copy).
            u = ops.add_(g, buf, alpha=momentum) if nesterov else ops.state_as_updates(buf, g)
            return u, count, buf

        u, (count, buf) = multi_tensor_update(kernel, updates, (state.count, state.trace),
                                              state_names=("state.count", "state.trace"), count_states=1)
        return u, TraceState(count, buf)

    return own_transform(init, update, state_type=TraceState, leafwise=True, count_fields=1,
                         # (A tensor's value is not formatted: traced by dynamo under
                         # inject_hyperparams, repr would break the graph.)
                         kept_fields={"count": (not undampened, f"dampening={dampening!r}" if isinstance(
                             dampening, (int, float)) else "dampening given as a tensor")})
