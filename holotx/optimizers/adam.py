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

    Args:
        lr: the learning rate :math:`\eta` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr``.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v_t}` (default ``1e-8``).
        weight_decay: :math:`\lambda`, coupled L2 weight decay: :math:`\lambda\theta` is
            added to the gradient (default ``0``).
        amsgrad: divide by the running maximum of the second moment (AMSGrad; default
            ``False``).
        maximize: ascend the objective instead of descending it (torch.optim's
            ``maximize``; default ``False``).

    Returns:
        The optimizer, a :class:`~holotx.GradientTransformation` (a ``chain`` of building
        blocks).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.adam(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.9000, -2.1000,  3.1000])

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
        https://arxiv.org/abs/1412.6980.
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

    Args:
        lr: the learning rate :math:`\eta` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr``.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v_t}` (default ``1e-8``).
        weight_decay: :math:`\lambda`, decoupled weight decay: the step subtracts
            :math:`\eta\lambda\theta` (default ``1e-2``, torch's).
        amsgrad: divide by the running maximum of the second moment (AMSGrad; default
            ``False``).
        maximize: ascend the objective instead of descending it (torch.optim's
            ``maximize``; default ``False``).

    Returns:
        The optimizer, a :class:`~holotx.GradientTransformation` (a ``chain`` of building
        blocks).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.adamw(lr=0.1, weight_decay=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.8900, -2.0800,  3.0700])

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
        https://arxiv.org/abs/1711.05101.

        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
        https://arxiv.org/abs/1412.6980.
    """
    b1, b2 = _validate.betas("betas", betas)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        scale_by_adam(b1, b2, eps, amsgrad=amsgrad),
        *decay_or_nothing(weight_decay),
        scale_by_lr(lr),
    )
