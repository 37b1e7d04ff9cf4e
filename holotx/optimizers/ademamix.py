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
