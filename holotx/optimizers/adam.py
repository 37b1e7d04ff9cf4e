"""Adam and AdamW, as ``torch.optim.Adam`` and ``torch.optim.AdamW``."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, maximize_first
from holotx.transforms import scale_by_adam, scale_by_lr
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["adam", "adamw"]


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Adam (Kingma & Ba, 2015) with coupled L2 weight decay, as ``torch.optim.Adam``.

    :math:`g \leftarrow g + \lambda\theta`, then :func:`~holotx.transforms.scale_by_adam`,
    then :math:`-\eta`. Names and defaults are torch's.
    """
    b1, b2 = _validate.betas("betas", betas)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        *decay_or_nothing(weight_decay),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        scale_by_lr(lr),
    )


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as
    ``torch.optim.AdamW``.

    :math:`\theta \leftarrow \theta - \eta\,(\mathrm{adam}(g) + \lambda\theta)`, which is
    torch's :math:`\theta(1-\eta\lambda) - \eta\,\mathrm{adam}(g)`. Defaults are torch's
    (``weight_decay=1e-2``).
    """
    b1, b2 = _validate.betas("betas", betas)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        *decay_or_nothing(weight_decay),
        scale_by_lr(lr),
    )
