"""AdaBelief: Adam adapting to the belief in the gradient."""

from __future__ import annotations

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.combine import chain
from holotx.ops import Scalar
from holotx.optimizers._common import decay_or_nothing, holocron_mode, maximize_first
from holotx.transforms import scale_by_belief, scale_by_lr
from holotx.transforms.scale import ScalarOrSchedule

__all__ = ["adabelief"]


def adabelief(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    *,
    decoupled_weight_decay: bool = False,
    compat: str | None = None,
    maximize: bool = False,
) -> GradientTransformation:
    r"""AdaBelief (Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the
    Belief in Observed Gradients"), with Holocron's names and defaults.

    :math:`g \leftarrow g + \lambda\theta` (coupled L2; with
    ``decoupled_weight_decay=True``, :math:`\theta \leftarrow \theta - \alpha\lambda\theta`
    instead, as the official code's ``weight_decouple``), then
    :func:`~holotx.transforms.scale_by_belief`:
    :math:`s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon`,
    :math:`\theta \leftarrow \theta - \alpha\,\hat m_t / (\sqrt{\hat s_t} + \epsilon)`.
    Defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``,
    ``amsgrad=False``.

    Differences from Holocron 0.3.0 (``compat="holocron"`` reproduces it): Holocron
    leaves :math:`\epsilon` out of :math:`s_t` (its docstring and the official code put
    it in), ignores ``maximize`` (holotx honours it in both modes), and after
    ``load_state_dict`` turns ``step`` into a float tensor, so its bias corrections drift
    after a resume (holotx's counts stay integers).

    Args:
        lr: the learning rate :math:`\alpha` (default ``1e-3``): a number, a 0-d tensor or a
            schedule ``count -> lr`` (:mod:`holotx.schedules`).
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the first and second moments
            (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon`, added into :math:`s_t` and to the denominator (default
            ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``): coupled L2 decay, or decoupled with
            ``decoupled_weight_decay``.
        amsgrad: divide by the running maximum of the second moment (AMSGrad; default
            ``False``).
        decoupled_weight_decay: decay the weights directly,
            :math:`\theta \leftarrow \theta - \alpha\lambda\theta` (default ``False``).
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
        >>> tx = holotx.adabelief(lr=0.1)
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> params = holotx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.8889, -2.1111,  3.1111])

    References:
        Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
        Gradients", NeurIPS 2020, https://arxiv.org/abs/2010.07468.
    """
    holocron = holocron_mode(compat)
    b1, b2 = _validate.betas("betas", betas)
    _validate.flag("decoupled_weight_decay", decoupled_weight_decay)
    _validate.non_negative("weight_decay", weight_decay)
    decay = decay_or_nothing(weight_decay)
    return chain(
        *maximize_first(maximize),
        *([] if decoupled_weight_decay else decay),
        scale_by_belief(b1, b2, eps, amsgrad=amsgrad, eps_in_variance=not holocron),
        *(decay if decoupled_weight_decay else []),
        scale_by_lr(lr),
    )
