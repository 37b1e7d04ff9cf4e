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
