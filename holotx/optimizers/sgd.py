"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, is_zero, maximize_first
from holotx.transforms import scale_by_lr, trace
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["sgd"]


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""SGD with optional (Nesterov) momentum and coupled L2 weight decay.

    .. math::
        g \leftarrow \pm g + \lambda\theta,\quad
        b_t = \mu b_{t-1} + (1-\tau) g \ (b_1 = g),\quad
        \theta \leftarrow \theta - \eta\,(b_t \text{ or } g + \mu b_t)

    Hyperparameter names and defaults are ``torch.optim.SGD``'s, and it matches torch
    step for step: ``chain(add_decayed_weights, trace, scale_by_lr)``.

    Args:
        lr: the learning rate :math:`\eta` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr``.
        momentum: :math:`\mu`, the momentum factor (default ``0``: no momentum buffer).
        dampening: :math:`\tau`, the dampening of the gradient entering the buffer
            (default ``0``).
        weight_decay: :math:`\lambda`, coupled L2 weight decay (default ``0``).
        nesterov: Nesterov momentum, :math:`g + \mu b_t` (default ``False``; needs
            ``momentum > 0`` and ``dampening == 0``).
        maximize: ascend the objective instead of descending it (torch.optim's
            ``maximize``; default ``False``).

    Returns:
        The optimizer, a :class:`~holotx.GradientTransformation` (a ``chain`` of building
        blocks).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.sgd(lr=0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        ...     params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.8550, -2.1450,  3.2900])

    References:
        Sutskever et al., "On the importance of initialization and momentum in deep
        learning", ICML 2013, https://proceedings.mlr.press/v28/sutskever13.html (Nesterov
        momentum as torch.optim.SGD writes it).
    """
    _validate.non_negative("momentum", momentum)
    _validate.non_negative("weight_decay", weight_decay)
    _validate.nesterov(momentum, dampening, nesterov)
    return chain(
        *maximize_first(maximize),
        *decay_or_nothing(weight_decay),
        *([] if is_zero(momentum) else [trace(momentum, dampening, nesterov=nesterov)]),
        scale_by_lr(lr),
    )
