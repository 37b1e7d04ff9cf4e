"""Rectified Adam, as ``torch.optim.RAdam``."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, maximize_first
from holotx.transforms import scale_by_lr, scale_by_radam
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["radam"]


def radam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""RAdam (Liu et al., 2020), as ``torch.optim.RAdam``: coupled L2 weight decay, or
    decoupled (:math:`\theta(1-\eta\lambda)`) with ``decoupled_weight_decay=True``; the
    rectified step of :func:`~holotx.transforms.scale_by_radam` with torch's threshold
    :math:`\rho_t > 5`. Names and defaults are torch's.
    """
    b1, b2 = _validate.betas("betas", betas)
    _validate.flag("decoupled_weight_decay", decoupled_weight_decay)
    _validate.non_negative("weight_decay", weight_decay)
    decay = decay_or_nothing(weight_decay)
    return chain(
        *maximize_first(maximize),
        *([] if decoupled_weight_decay else decay),
        scale_by_radam(b1, b2, eps),
        *(decay if decoupled_weight_decay else []),
        scale_by_lr(lr),
    )
