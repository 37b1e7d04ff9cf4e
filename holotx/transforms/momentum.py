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

    return own_transform(init, update)
