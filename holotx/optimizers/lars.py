"""LARS: layer-wise adaptive rate scaling."""

from __future__ import annotations

from typing import Any

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import holocron_mode, is_zero, maximize_first, trust_ratio_leaves
from holotx.transforms import scale_by_lr, scale_by_trust_ratio, trace
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["lars"]

DEFAULT_SCALE_CLIP = (0.0, 10.0)


def lars(
    lr: ScalarOrSchedule = 1e-3,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
    scale_clip: tuple[float, float] | None = None,
    *,
    trust_coefficient: Scalar = 1.0,
    trust_ratio_mask: Any = None,
    always_adapt: bool = True,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks"), with
    Holocron's names and defaults.

    Per tensor, with :math:`\phi` the clamp of the weight norm to ``scale_clip``:

    .. math::
        \gamma_t = \frac{\eta\,\phi(\lVert\theta_t\rVert)}{\lVert g_t\rVert + \lambda\lVert\theta_t\rVert}
        \ (1 \text{ where a norm is } 0),\qquad d_t = g_t + \lambda\theta_t

        b_1 = d_1,\quad b_t = \mu b_{t-1} + (1-\tau) d_t,\qquad
        \theta_{t+1} = \theta_t - \alpha\,\gamma_t\,(b_t \text{, or } d_t + \mu b_t \text{ with nesterov})

    (without momentum, :math:`\theta_{t+1} = \theta_t - \alpha\gamma_t d_t`). As in
    Holocron's code, the trust ratio multiplies the momentum buffer when it is applied,
    not the gradient entering it, and the first buffer is the first direction.

    Defaults: ``lr=1e-3``, ``momentum=0``, ``dampening=0``, ``weight_decay=0``,
    ``nesterov=False``, ``scale_clip=None`` meaning ``(0, 10)``, ``trust_coefficient``
    :math:`\eta = 1`. ``trust_ratio_mask`` (pytree of bools, prefix, or callable) keeps
    the leaves marked ``False`` (biases, norm weights) at ratio 1.

    ``always_adapt=False`` takes the convention of apex's ``FusedLAMB`` and timm's
    ``Lars``: where ``weight_decay`` is 0 (the no-decay group of biases and norm weights that
    the HF Trainer and timm make) the ratio is 1, a plain step. The default, ``True``, is
    Holocron's and the paper's: every tensor adapts, whatever its decay.

    Differences from Holocron 0.3.0 (``compat="holocron"`` reproduces it): Holocron never
    applies ``scale_clip`` (:math:`\phi` is the identity there); Holocron also writes the
    weight decay into ``p.grad``, which holotx never does in either mode. Holocron's
    docstring schedule :math:`\alpha(1-t/T)^2` is
    ``lr=holotx.polynomial_schedule(lr, 0, 2, T)``.

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        momentum: :math:`\mu`, the momentum factor (default ``0``: no momentum buffer).
        dampening: :math:`\tau`, the dampening of the direction entering the buffer
            (default ``0``).
        weight_decay: :math:`\lambda`, added to the gradient and to the trust ratio's
            denominator (default ``0``).
        nesterov: Nesterov momentum (default ``False``).
        scale_clip: ``(low, high)``, the clamp :math:`\phi` of the weight norm in the
            trust ratio (default ``None``, meaning ``(0, 10)``).
        trust_coefficient: :math:`\eta`, the trust ratio's coefficient (default ``1``;
            Holocron has none).
        trust_ratio_mask: a pytree of bools with the params' structure, a prefix of it,
            or a function ``params -> mask``; leaves marked ``False`` keep a trust ratio of 1
            (default ``None``: every leaf adapts).
        always_adapt: ``True`` (default) adapts every tensor; ``False`` gives a trust
            ratio of 1 wherever ``weight_decay`` is a Python 0 (apex's and timm's convention).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron
            0.3.0's numerics (see the differences above).
        maximize: ascend the objective instead of descending it (torch.optim's
            ``maximize``; default ``False``).

    Returns:
        The optimizer, a :class:`~holotx.GradientTransformation` (a ``chain`` of building
        blocks).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.lars(lr=0.1, momentum=0.9)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.8472, -2.1528,  3.3055])

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
        https://arxiv.org/abs/1708.03888.
    """
    holocron = holocron_mode(compat)
    _validate.scale_clip("scale_clip", scale_clip)  # checked in both modes, though Holocron ignores it
    _validate.non_negative("momentum", momentum)
    _validate.non_negative("weight_decay", weight_decay)
    _validate.nesterov(momentum, dampening, nesterov)
    ratio = scale_by_trust_ratio(
        trust_coefficient,
        None if holocron else (DEFAULT_SCALE_CLIP if scale_clip is None else scale_clip),
        weight_decay=weight_decay,
        inner=None if is_zero(momentum) else trace(momentum, dampening, nesterov=nesterov),
        mask=trust_ratio_leaves(trust_ratio_mask, weight_decay, always_adapt),
    )
    return chain(*maximize_first(maximize), ratio, scale_by_lr(lr))
