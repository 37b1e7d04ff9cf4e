"""AdamP: Adam slowing the norm growth of scale-invariant weights."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, maximize_first
from holotx.transforms import scale_by_adamp, scale_by_lr
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["adamp"]


def adamp(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    delta: Scalar = 0.1,
    *,
    wd_ratio: Scalar = 0.1,
    nesterov: bool = False,
    decoupled_weight_decay: bool = False,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""AdamP (Heo et al., 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers
    on Scale-invariant Weights"), with Holocron's names and defaults.

    :math:`g \leftarrow g + \lambda\theta` (coupled L2, Holocron's documented rule), then
    :func:`~holotx.transforms.scale_by_adamp`: Adam's step, projected onto the tangent
    space of a weight whose gradient is nearly orthogonal to it
    (:math:`|\cos(\theta, g)| < \delta/\sqrt{\dim}`), tested per output channel then per
    tensor, for tensors of two or more dimensions, as the official implementation.
    With ``decoupled_weight_decay=True`` the decay is the official one instead:
    :math:`\theta \leftarrow \theta - \alpha\lambda\rho\,\theta`, :math:`\rho` =
    ``wd_ratio`` where the tensor was projected and 1 elsewhere. ``nesterov=True`` uses
    :math:`\beta_1 m_t + (1-\beta_1) g_t` in the numerator. Defaults: ``lr=1e-3``,
    ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``, ``amsgrad=False``,
    ``delta=0.1``, ``wd_ratio=0.1``, ``nesterov=False``.

    Differences from Holocron 0.3.0 (``compat="holocron"`` reproduces it): Holocron tests
    the *signed* cosine (every anti-aligned gradient is projected), over the whole tensor
    only, and projects 1-D parameters too; its docstring's :math:`m_0 = g_0` and
    :math:`\sqrt{\hat v + \epsilon}` are not in its code (nor here). Holocron's ``step``
    becomes a float tensor after ``load_state_dict``; holotx's stays an integer.

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``): coupled L2 decay, or the official
            decoupled decay with ``decoupled_weight_decay``.
        amsgrad: divide by the running maximum of the second moment (AMSGrad; default
            ``False``).
        delta: :math:`\delta`, the cosine threshold :math:`\delta/\sqrt{\dim}` below which
            a weight counts as scale-invariant (default ``0.1``).
        wd_ratio: :math:`\rho`, the factor of the decoupled weight decay on projected
            tensors (default ``0.1``).
        nesterov: use :math:`\beta_1 m_t + (1-\beta_1) g_t` in the numerator (default
            ``False``).
        decoupled_weight_decay: the official decoupled decay instead of coupled L2
            (default ``False``).
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
        >>> params = {"w": torch.eye(2)}
        >>> tx = holotx.adamp(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([[ 1.0000, -0.1000],
                [-0.1000,  1.0000]])

    References:
        Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
        Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217.
    """
    holocron = holocron_mode(compat)
    b1, b2 = _validate.betas("betas", betas)
    _validate.flag("decoupled_weight_decay", decoupled_weight_decay)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        *([] if decoupled_weight_decay else decay_or_nothing(weight_decay)),
        scale_by_adamp(b1, b2, eps, delta, nesterov=nesterov, amsgrad=amsgrad,
                       weight_decay=weight_decay if decoupled_weight_decay else 0.0, wd_ratio=wd_ratio,
                       projection="holocron" if holocron else "official"),
        scale_by_lr(lr),
    )
