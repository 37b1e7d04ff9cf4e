"""AdaBelief's belief in the gradient, as a building block."""

from __future__ import annotations

from typing import NamedTuple

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.transforms.adam import adaptive_ratio, corrected_denominator, numbers, step_counts
from holotx.tree import zeros_like

__all__ = ["ScaleByBeliefState", "scale_by_belief"]


class ScaleByBeliefState(NamedTuple):
    """The state of :func:`scale_by_belief`.

    Args:
        count: steps taken by each leaf, a tree of 0-d int64 tensors.
        mu: the EMA of the gradient (``exp_avg``).
        nu: the EMA of the squared deviation of the gradient from ``mu``, :math:`s_t` (``exp_avg_sq``).
        nu_max: the running max of ``nu`` with ``amsgrad`` (``max_exp_avg_sq``), else ``None``.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_belief(amsgrad=True).init({"w": torch.zeros(2)})
        >>> state.nu_max["w"]
        tensor([0., 0.])
    """

    count: object
    """Steps taken by each leaf, a tree of 0-d int64 tensors."""
    mu: object
    """EMA of the gradient (``exp_avg``)."""
    nu: object
    """EMA of the squared deviation of the gradient from ``mu``, :math:`s_t` (``exp_avg_sq``)."""
    nu_max: object
    """Running max of ``nu`` with ``amsgrad`` (``max_exp_avg_sq``), else ``None``."""


def scale_by_belief(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    amsgrad: bool = False,
    eps_in_variance: bool = True,
) -> GradientTransformation:
    r"""Rescale updates by AdaBelief's "belief" (Zhuang et al., 2020, "AdaBelief Optimizer:
    Adapting Stepsizes by the Belief in Observed Gradients").

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon,\quad
        \hat s_t = \max(\hat s_{t-1}, s_t)\ \text{(amsgrad)}

        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Adam with the variance of the gradient around its EMA in place of its raw second
    moment. :math:`\epsilon` is added into :math:`s_t` at every step, as in the paper's
    Algorithm 2 and the official code; ``eps_in_variance=False`` leaves it out (Holocron
    0.3.0). Defaults ``(0.9, 0.999, 1e-8)``. State: :class:`ScaleByBeliefState`.

    Args:
        b1: :math:`\beta_1`, the decay rate of the first moment (default ``0.9``).
        b2: :math:`\beta_2`, the decay rate of the second moment (default ``0.999``).
        eps: :math:`\epsilon`, added into :math:`s_t` and to the denominator (default ``1e-8``).
        amsgrad: use :math:`\hat s_t`, the running maximum of :math:`s_t` (default ``False``).
        eps_in_variance: add :math:`\epsilon` into :math:`s_t` at every step (default ``True``;
            ``False`` is Holocron 0.3.0).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByBeliefState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_belief()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 1.1111,  1.1111, -1.1111])

    References:
        Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
        Gradients", NeurIPS 2020, https://arxiv.org/abs/2010.07468.
    """
    _validate.in_unit_interval("b1", b1)
    _validate.in_unit_interval("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.flag("amsgrad", amsgrad)
    _validate.flag("eps_in_variance", eps_in_variance)

    def init(params):
        return ScaleByBeliefState(init_counts(params), zeros_like(params), zeros_like(params),
                                  zeros_like(params) if amsgrad else None)

    def update(updates, state, params=None, **extra):
        del params, extra

        def kernel(g, count, mu, nu, nu_max, _p):
            count, t = step_counts(count, host=numbers(b1, b2, eps))
            scale, shift = corrected_denominator(b1, b2, eps, t)
            mu = ops.lerp_(mu, g, 1 - b1)
            residual = ops.sub_into(g, mu, g)  # g is not read again
            nu = ops.mul_(nu, b2)
            nu = ops.addcmul_(nu, residual, residual, 1 - b2)
            if eps_in_variance:
                # Its own pass: folded into a lerp toward eps / (1 - b2), an s that has
                # overflowed would give inf - inf = NaN where b2 s + eps is inf.
                nu = ops.add_scalar_(nu, eps)
            if nu_max is not None:
                nu_max = ops.maximum_(nu_max, nu)
            u = adaptive_ratio(mu, nu if nu_max is None else nu_max, scale, shift, dead=residual)
            return u, count, mu, nu, nu_max

        u, (count, mu, nu, nu_max) = multi_tensor_update(
            kernel, updates, (state.count, state.mu, state.nu, state.nu_max),
            state_names=("state.count", "state.mu", "state.nu", "state.nu_max"), count_states=1,
        )
        return u, ScaleByBeliefState(count, mu, nu, nu_max)

    return own_transform(init, update, state_type=ScaleByBeliefState,
                         kept_fields={"nu_max": (amsgrad, f"amsgrad={amsgrad}")})
