"""AdEMAMix: Adam with a mixture of a fast and a slow momentum."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, maximize_first
from holotx.transforms import scale_by_ademamix, scale_by_lr
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["ademamix"]


def ademamix(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar, Scalar] = (0.9, 0.999, 0.9999),
    alpha: Scalar = 5.0,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    *,
    t_alpha_beta3: int | None = None,
    decoupled_weight_decay: bool = False,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""AdEMAMix (Pagliardini et al., 2024, "The AdEMAMix Optimizer: Better, Faster,
    Older"), with Holocron's names and defaults.

    :math:`g \leftarrow g + \lambda\theta` (coupled L2, Holocron's rule), then
    :func:`~holotx.transforms.scale_by_ademamix`:
    :math:`\theta \leftarrow \theta - \alpha_{lr}\,(\hat m_{1,t} + \alpha\, m_{2,t}) /
    (\sqrt{\hat\nu_t} + \epsilon)`. ``t_alpha_beta3`` warms :math:`\alpha` and
    :math:`\beta_3` up over that many steps (the paper's :math:`T_{\alpha,\beta_3}`;
    default ``None``: no warm-up); ``decoupled_weight_decay=True`` gives the paper's
    decoupled decay :math:`\theta \leftarrow \theta - \alpha_{lr}\lambda\theta`. Defaults:
    ``lr=1e-3``, ``betas=(0.9, 0.999, 0.9999)``, ``alpha=5``, ``eps=1e-8``,
    ``weight_decay=0``.

    Holocron 0.3.0 computes the default (``compat="holocron"`` changes nothing); it has
    neither the warm-up nor the decoupled decay. Its docstring's :math:`s_t` is
    AdaBelief's; its code, the paper and holotx use :math:`\nu_t`, the EMA of
    :math:`g_t^2`.

    Args:
        lr: the learning rate :math:`\alpha_{lr}` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2, \beta_3)`, the decay rates of the fast EMA, the
            second moment and the slow EMA (default ``(0.9, 0.999, 0.9999)``).
        alpha: :math:`\alpha`, the weight of the slow EMA (default ``5``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``): coupled L2 decay (:math:`\lambda\theta`
            added to the gradient), or decoupled with ``decoupled_weight_decay``.
        t_alpha_beta3: :math:`T_{\alpha,\beta_3}`, the length of the warm-up of
            :math:`\alpha` and :math:`\beta_3`, in steps (default ``None``: no warm-up).
        decoupled_weight_decay: the paper's decoupled decay,
            :math:`\theta \leftarrow \theta - \alpha_{lr}\lambda\theta` (default ``False``).
        compat: ``None`` (default) or ``"holocron"``; both compute the same rule.
        maximize: ascend the objective instead of descending it (torch.optim's
            ``maximize``; default ``False``).

    Returns:
        The optimizer, a :class:`~holotx.GradientTransformation` (a ``chain`` of building
        blocks).

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.ademamix(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.9000, -2.1000,  3.1000])

    References:
        Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
        2024, https://arxiv.org/abs/2409.03137.
    """
    holocron_mode(compat)
    b1, b2, b3 = _validate.betas("betas", betas, 3)
    _validate.flag("decoupled_weight_decay", decoupled_weight_decay)
    _validate.non_negative("weight_decay", weight_decay)
    decay = decay_or_nothing(weight_decay)
    return chain(
        *maximize_first(maximize),
        *([] if decoupled_weight_decay else decay),
        scale_by_ademamix(b1, b2, b3, alpha, eps, t_alpha_beta3=t_alpha_beta3),
        *(decay if decoupled_weight_decay else []),
        scale_by_lr(lr),
    )
