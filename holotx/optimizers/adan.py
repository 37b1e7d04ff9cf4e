"""Adan: adaptive Nesterov momentum."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, is_zero, maximize_first
from holotx.transforms import scale_by_adan, scale_by_lr
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["adan", "proximal_lr"]


def proximal_lr(lr: ScalarOrSchedule, weight_decay: Scalar) -> ScalarOrSchedule:
    r"""The step size :math:`\alpha/(1+\alpha\lambda)` that turns a decoupled decay into
    Adan's proximal one: :math:`\theta \leftarrow (\theta - \alpha u)/(1 + \alpha\lambda)`
    is :math:`\theta - \frac{\alpha}{1+\alpha\lambda}(u + \lambda\theta)`. A schedule
    gives a schedule."""
    if not callable(lr):
        _validate.non_negative("lr", lr)
    lr, weight_decay = _validate.python_number(lr), _validate.python_number(weight_decay)
    if is_zero(weight_decay):
        return lr
    if callable(lr):
        return lambda count: lr(count) / (1 + lr(count) * weight_decay)
    return lr / (1 + lr * weight_decay)


def adan(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar, Scalar] = (0.98, 0.92, 0.99),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    *,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""Adan (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models"), with Holocron's names and defaults.

    :func:`~holotx.transforms.scale_by_adan`'s direction :math:`u_t` (moments of the
    gradient, of its difference :math:`g_t - g_{t-1}`, and of the Nesterov-corrected
    gradient), then the paper's proximal weight decay:

    .. math:: \theta_{t+1} = \frac{\theta_t - \alpha u_t}{1 + \alpha\lambda}

    written as the additive update :math:`-\frac{\alpha}{1+\alpha\lambda}(u_t +
    \lambda\theta_t)` (:func:`proximal_lr`). Defaults: ``lr=1e-3``,
    ``betas=(0.98, 0.92, 0.99)`` (decay rates, the official code's convention),
    ``eps=1e-8``, ``weight_decay=0``, ``amsgrad=False`` (a running max of :math:`n_t`,
    Holocron's extension).

    Differences from Holocron 0.3.0 (``compat="holocron"`` reproduces it): Holocron never
    stores the previous gradient, so its difference is :math:`g_t` itself at every step,
    and it applies the weight decay twice, as coupled L2 (:math:`g \leftarrow g +
    \lambda\theta`) and then proximally. Its docstring's :math:`m_0 = g_0`,
    :math:`n_0 = g_0^2` and :math:`\sqrt{\hat n + \epsilon}` are in neither its code nor
    the official one.

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2, \beta_3)`, the decay rates of the gradient's, the
            gradient difference's and the squared moments (default ``(0.98, 0.92, 0.99)``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda`, the proximal weight decay (default ``0``).
        amsgrad: divide by the running maximum of :math:`n_t` (default ``False``).
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
        >>> tx = holotx.adan(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.9000, -2.1000,  3.1000])

    References:
        Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
        Models", 2022, https://arxiv.org/abs/2208.06677.
    """
    holocron = holocron_mode(compat)
    b1, b2, b3 = _validate.betas("betas", betas, 3)
    _validate.non_negative("weight_decay", weight_decay)
    decay = decay_or_nothing(weight_decay)
    return chain(
        *maximize_first(maximize),
        *(decay if holocron else []),
        scale_by_adan(b1, b2, b3, eps, amsgrad=amsgrad, track_previous_grad=not holocron),
        *decay,
        scale_by_lr(proximal_lr(lr, weight_decay)),
    )
