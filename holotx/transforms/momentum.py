"""Heavy-ball and Nesterov momentum, as a building block."""

from __future__ import annotations

from typing import NamedTuple

import torch

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_count, next_count, updates_donated
from holotx.multi import multi_tensor_update
from holotx.ops import Scalar
from holotx.transforms.adam import per_step_scalars
from holotx.tree import zeros_like

__all__ = ["TraceState", "trace"]


class TraceState(NamedTuple):
    count: torch.Tensor
    """Steps taken, a 0-d int64 tensor (the first step seeds the buffer)."""
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
    if nesterov and not isinstance(momentum, torch.Tensor) and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0, "
                         f"got momentum={momentum!r}, dampening={dampening!r}")

    def init(params):
        return TraceState(init_count(params), zeros_like(params))

    def update(updates, state, params=None, *, donate=False, **extra):
        del params
        inplace = updates_donated(donate, extra)
        count = next_count(state.count, donate=donate)
        if isinstance(dampening, (int, float)) and dampening == 0:
            grad_weight: Scalar = 1.0
        else:  # the first buffer is the undampened gradient
            one = torch.ones((), dtype=torch.float64, device=count.device)
            (grad_weight,) = per_step_scalars(torch.where(count == 1, one, 1 - dampening + 0 * one))

        def kernel(g, buf, _p):
            buf = ops.mul(buf, momentum, inplace=donate)
            buf = ops.add(buf, g, alpha=grad_weight, inplace=True)
            if nesterov:
                u = ops.add(g, buf, alpha=momentum, inplace=inplace)
            elif donate:  # the caller may write into the updates: they must not alias state
                u = ops.copy(g, buf)
            else:
                u = buf
            return u, buf

        u, (buf,) = multi_tensor_update(kernel, updates, (state.trace,), state_names=("state.trace",))
        return u, TraceState(count, buf)

    return GradientTransformation(init, update)
