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
