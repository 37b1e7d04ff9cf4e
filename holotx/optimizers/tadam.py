"""TAdam: Adam with a Student-t first moment."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, maximize_first
from holotx.transforms import scale_by_lr, scale_by_tadam
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["tadam"]


def tadam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    dof: float | None = None,
    *,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""TAdam (Ilboudo et al., 2020, "TAdam: A Robust Stochastic Gradient Optimizer"), with
    Holocron's names and defaults.

    :math:`g \leftarrow g + \lambda\theta` (coupled L2), the Student-t moments of
    :func:`~holotx.transforms.scale_by_tadam` (``dof`` :math:`\nu`, default ``None``: the
    tensor's number of elements), then :math:`\theta \leftarrow \theta - \alpha u`.
    Defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``,
    ``amsgrad=False``.

    Holocron 0.3.0 computes exactly this (and so does the official implementation);
    ``compat="holocron"`` is accepted and changes nothing. Holocron keeps :math:`W_t` in
    the param's dtype, holotx in float64.

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda`, coupled L2 weight decay: :math:`\lambda\theta` is
            added to the gradient (default ``0``).
        amsgrad: divide by the running maximum of the second moment (AMSGrad; default
            ``False``).
        dof: :math:`\nu`, the degrees of freedom of the Student-t weight (default ``None``:
            each tensor's number of elements).
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
        >>> tx = holotx.tadam(lr=0.1)
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        ...     params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.9999, -2.0001,  3.0001])

    References:
        Ilboudo, Kobayashi & Sugimoto, "TAdam: A Robust Stochastic Gradient Optimizer", 2020,
        https://arxiv.org/abs/2003.00179.
    """
    holocron_mode(compat)
    b1, b2 = _validate.betas("betas", betas)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        *decay_or_nothing(weight_decay),
        scale_by_tadam(b1, b2, eps, amsgrad=amsgrad, dof=dof),
        scale_by_lr(lr),
    )
