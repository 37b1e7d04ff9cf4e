"""Weight decay, as a building block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from holotx import _validate, ops
from holotx.base import EmptyState, GradientTransformation, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar

__all__ = ["add_decayed_weights"]


def add_decayed_weights(
    weight_decay: Scalar = 0.0, mask: Any | Callable[[Any], Any] | None = None
) -> GradientTransformation:
    r"""Add :math:`\lambda\,\theta` to the updates: :math:`u \leftarrow u + \lambda\theta`.

    Placed before a rescaling transform this is coupled L2 regularisation (torch's
    ``Adam(weight_decay=...)``); placed after it and before :func:`scale_by_lr` it is
    decoupled decay (AdamW). ``mask`` (a pytree of bools, a prefix of one, or a function
    ``params -> mask``) limits it to some leaves, via :func:`holotx.masked`.
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
