"""RaLars: rectified Adam moments with LARS's trust ratio."""

from __future__ import annotations

from typing import Any

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, maximize_first, trust_ratio_leaves
from holotx.optimizers.lars import DEFAULT_SCALE_CLIP
from holotx.transforms import scale_by_lr, scale_by_radam, scale_by_trust_ratio
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["ralars"]


def ralars(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    force_adaptive_momentum: bool = False,
    scale_clip: tuple[float, float] | None = None,
    *,
    trust_ratio_mask: Any = None,
    always_adapt: bool = True,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""RaLars: RAdam's rectified step (Liu et al., 2020, "On the Variance of the Adaptive
    Learning Rate and Beyond") under LAMB's trust ratio, as in Holocron.

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\quad
        r_t = \begin{cases}
          \tilde r_t\, \dfrac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} & \rho_t > 4\\[1ex]
          \dfrac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} & \text{else, forced adaptive}\\[1ex]
          m_t/(1-\beta_1^t) & \text{otherwise}
        \end{cases}

    with :math:`\tilde r_t` RAdam's rectifier (:func:`~holotx.transforms.rectification`),
    then :math:`r_t \mathrel{+}= \lambda\theta_t` and the trust ratio of :func:`lamb`
    (clamp to ``scale_clip``, default ``(0, 10)``). The rectification starts when
    :math:`\rho_t > 4` (the paper's rule: step 5 with the default betas; torch's RAdam
    waits for :math:`\rho_t > 5`). Defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``,
    ``eps=1e-8``, ``weight_decay=0``, ``force_adaptive_momentum=False``.

    ``always_adapt=False`` takes the convention of apex's ``FusedLAMB`` and timm's
    ``Lamb``: where ``weight_decay`` is 0 (the no-decay group of biases and norm weights that
    the HF Trainer and timm make) the ratio is 1, a plain step. The default, ``True``, is
    Holocron's: every tensor adapts, whatever its decay.

    Holocron 0.3.0 computes exactly this; ``compat="holocron"`` is accepted and changes
    nothing. After the trust ratio, :math:`\tilde r_t` only matters relative to the weight
    decay term.

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added to the denominator for numerical stability (default
            ``1e-8``).
        weight_decay: :math:`\lambda`, added to the rectified direction inside the trust
            ratio (default ``0``).
        force_adaptive_momentum: take the adaptive step (without the rectifier) where
            :math:`\rho_t \le 4`, instead of the momentum step (default ``False``).
        scale_clip: ``(low, high)``, the clamp :math:`\phi` of the weight norm in the
            trust ratio (default ``None``, meaning ``(0, 10)``).
        trust_ratio_mask: a pytree of bools with the params' structure, a prefix of it,
            or a function ``params -> mask``; leaves marked ``False`` keep a trust ratio of 1
            (default ``None``: every leaf adapts).
        always_adapt: ``True`` (default) adapts every tensor; ``False`` gives a trust
            ratio of 1 wherever ``weight_decay`` is a Python 0 (apex's and timm's convention).
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
        >>> tx = holotx.ralars(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.8472, -2.1528,  3.3055])

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020,
        https://arxiv.org/abs/1908.03265.

        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
        minutes", ICLR 2020, https://arxiv.org/abs/1904.00962.
    """
    holocron_mode(compat)
    b1, b2 = _validate.betas("betas", betas)
    _validate.flag("force_adaptive_momentum", force_adaptive_momentum)
    _validate.non_negative("weight_decay", weight_decay)
    return chain(
        *maximize_first(maximize),
        scale_by_radam(b1, b2, eps, threshold=4.0, force_adaptive=force_adaptive_momentum,
                       eps_after_correction=True),
        *decay_or_nothing(weight_decay),
        scale_by_trust_ratio(1.0, DEFAULT_SCALE_CLIP if scale_clip is None else scale_clip,
                             mask=trust_ratio_leaves(trust_ratio_mask, weight_decay, always_adapt)),
        scale_by_lr(lr),
    )
