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

    Args:
        lr: the learning rate :math:`\eta` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr``.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``): coupled L2 decay, or decoupled with
            ``decoupled_weight_decay``.
        decoupled_weight_decay: decay the weights as AdamW does,
            :math:`\theta(1-\eta\lambda)` (default ``False``).
        maximize: ascend the objective instead of descending it (torch.optim's
            ``maximize``; default ``False``).

    Returns:
        The optimizer, a :class:`~holotx.GradientTransformation` (a ``chain`` of building
        blocks).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.radam(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.9500, -2.0500,  3.1000])

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020,
        https://arxiv.org/abs/1908.03265.
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
