"""LAMB: layer-wise adaptive moments."""

from __future__ import annotations

from typing import Any

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, maximize_first, trust_ratio_leaves
from holotx.optimizers.lars import DEFAULT_SCALE_CLIP
from holotx.transforms import scale_by_adam, scale_by_lr, scale_by_trust_ratio
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["lamb"]


def lamb(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    scale_clip: tuple[float, float] | None = None,
    *,
    trust_ratio_mask: Any = None,
    always_adapt: bool = True,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT
    in 76 minutes"), with Holocron's names and defaults.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        r_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon} + \lambda\theta_t

        \theta_{t+1} = \theta_t - \alpha\,\frac{\phi(\lVert\theta_t\rVert)}{\lVert r_t\rVert}\, r_t
        \quad(\text{ratio } 1 \text{ where a norm is } 0)

    per tensor, :math:`\phi` the clamp to ``scale_clip`` (default ``(0, 10)``). Every
    tensor moves by :math:`\alpha\phi(\lVert\theta\rVert)` per step. The weight decay is
    the paper's: added to the Adam direction, inside the trust ratio.
    ``chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_lr)``.
    Defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``.
    ``trust_ratio_mask`` keeps the leaves marked ``False`` at ratio 1.

    ``always_adapt=False`` takes the convention of apex's ``FusedLAMB`` and timm's
    ``Lamb``: where ``weight_decay`` is 0 (the no-decay group of biases and norm weights that
    the HF Trainer and timm make) the ratio is 1, a plain step. The default, ``True``, is
    Holocron's and the paper's: every tensor adapts, whatever its decay.

    Differences from Holocron 0.3.0 (``compat="holocron"`` reproduces it): Holocron does
    not bias-correct the moments (:math:`r_t = m_t/(\sqrt{v_t}+\epsilon)`, so its first
    step is about :math:`3.16\,\mathrm{sign}(g)`), although its docstring does.

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda`, added to the Adam direction inside the trust ratio
            (default ``0``).
        scale_clip: ``(low, high)``, the clamp :math:`\phi` of the weight norm in the
            trust ratio (default ``None``, meaning ``(0, 10)``).
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
        >>> tx = holotx.lamb(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.7840, -2.2160,  3.2160])

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
        minutes", ICLR 2020, https://arxiv.org/abs/1904.00962.
    """
    holocron = holocron_mode(compat)
    b1, b2 = _validate.betas("betas", betas)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        scale_by_adam(b1, b2, eps, bias_correction=not holocron),
        *decay_or_nothing(weight_decay),
        scale_by_trust_ratio(1.0, DEFAULT_SCALE_CLIP if scale_clip is None else scale_clip,
                             mask=trust_ratio_leaves(trust_ratio_mask, weight_decay, always_adapt)),
        scale_by_lr(lr),
    )
