"""AdEMAMix's mixture of a fast and a slow gradient EMA, as a building block."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.transforms.adam import (
    adaptive_ratio,
    bias_correction,
    moments,
    per_leaf,
    scalar_dtype,
    step_counts,
)
from holotx.tree import zeros_like

__all__ = ["ScaleByAdEMAMixState", "ademamix_warmup", "scale_by_ademamix"]


class ScaleByAdEMAMixState(NamedTuple):
    r"""The state of :func:`scale_by_ademamix`.

    Args:
        count: steps taken by each leaf, a tree of 0-d int64 tensors.
        mu: the fast EMA of the gradient, :math:`m_1` (``exp_avg``).
        nu: the EMA of the squared gradient, :math:`\nu` (``exp_avg_sq``).
        mu_slow: the slow EMA of the gradient, :math:`m_2` (``exp_avg_slow``).

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_ademamix().init({"w": torch.zeros(2)})
        >>> state.mu_slow["w"]
        tensor([0., 0.])
    """

    count: object
    """Steps taken by each leaf, a tree of 0-d int64 tensors."""
    mu: object
    """The fast EMA of the gradient, :math:`m_1` (``exp_avg``)."""
    nu: object
    """EMA of the squared gradient, :math:`\\nu` (``exp_avg_sq``)."""
    mu_slow: object
    """The slow EMA of the gradient, :math:`m_2` (``exp_avg_slow``)."""


def _half_life(beta: Scalar | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Steps for an EMA of rate ``beta`` to halve an old value, minus one (the official
    code's ``f``, with its 1e-8 guard)."""
    beta = torch.as_tensor(beta, dtype=like.dtype, device=like.device)
    return math.log(0.5) / torch.log(beta + 1e-8) - 1


def ademamix_warmup(
    alpha: Scalar, b1: Scalar, b3: Scalar, count: torch.Tensor, t_alpha_beta3: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""AdEMAMix's warm-up of :math:`\alpha` and :math:`\beta_3` at step ``count``
    (elementwise; float64), the paper's schedulers with :math:`T` = ``t_alpha_beta3``:

    .. math::
        \alpha_t = \alpha \min(t/T, 1),\qquad
        \beta_{3,t} = \begin{cases} f^{-1}\big((1-t/T)\, f(\beta_1) + (t/T)\, f(\beta_3)\big) & t < T\\
        \beta_3 & t \ge T\end{cases}

    with :math:`f(\beta) = \ln 0.5 / \ln \beta - 1` (a half-life) and
    :math:`f^{-1}(x) = 0.5^{1/(x+1)}`: :math:`\beta_3` grows from :math:`\beta_1` with a
    half-life linear in :math:`t`, so the slow EMA starts as fast as the fast one.

    Args:
        alpha: :math:`\alpha`, the final weight of the slow EMA.
        b1: :math:`\beta_1`, where :math:`\beta_3` starts.
        b3: :math:`\beta_3`, its final value.
        count: the step :math:`t`, an integer tensor (any shape: one step per leaf, say).
        t_alpha_beta3: :math:`T`, the length of the warm-up in steps (a Python int).

    Returns:
        ``(alpha_t, beta3_t)``, float64 tensors shaped like ``count``.

    Example:
        >>> import torch
        >>> from holotx.transforms import ademamix_warmup
        >>> alpha_t, beta3_t = ademamix_warmup(5.0, 0.9, 0.9999, torch.tensor([0, 50, 100]), 100)
        >>> alpha_t
        tensor([0.0000, 2.5000, 5.0000], dtype=torch.float64)
        >>> beta3_t
        tensor([0.9000, 0.9998, 0.9999], dtype=torch.float64)

    References:
        Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
        2024, https://arxiv.org/abs/2409.03137 (its warm-up of alpha and beta_3).
    """
    t = count.to(scalar_dtype(count.device))
    frac = t / t_alpha_beta3
    warming = t < t_alpha_beta3
    alpha_t = torch.where(warming, alpha * frac, alpha * torch.ones_like(frac))
    mixed = (1 - frac) * _half_life(b1, t) + frac * _half_life(b3, t)
    b3_t = torch.where(warming, torch.pow(0.5, 1 / (mixed + 1)), b3 * torch.ones_like(frac))
    return alpha_t, b3_t


def scale_by_ademamix(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    b3: Scalar = 0.9999,
    alpha: Scalar = 5.0,
    eps: Scalar = 1e-8,
    *,
    t_alpha_beta3: int | None = None,
) -> GradientTransformation:
    r"""Rescale updates by AdEMAMix's moments (Pagliardini et al., 2024, "The AdEMAMix
    Optimizer: Better, Faster, Older").

    .. math::
        m_{1,t} = \beta_1 m_{1,t-1} + (1-\beta_1) g_t,\quad
        \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) g_t^2,\quad
        m_{2,t} = \beta_{3,t} m_{2,t-1} + (1-\beta_{3,t}) g_t

        u_t = \frac{m_{1,t}/(1-\beta_1^t) + \alpha_t\, m_{2,t}}{\sqrt{\nu_t}/\sqrt{1-\beta_2^t} + \epsilon}

    The slow EMA :math:`m_2` is not bias-corrected (the paper's choice). Without
    ``t_alpha_beta3`` (the default, and Holocron's only behaviour), :math:`\alpha_t =
    \alpha` and :math:`\beta_{3,t} = \beta_3`; with it, both are warmed up over that many
    steps by :func:`ademamix_warmup`, which the paper recommends for large
    :math:`\beta_3`. Defaults ``(0.9, 0.999, 0.9999)``, ``alpha=5`` (Holocron's; the
    paper's experiments use 5 to 8, the official code's default is 2), ``eps=1e-8``.
    State: :class:`ScaleByAdEMAMixState`.

    Args:
        b1: :math:`\beta_1`, the decay rate of the fast EMA (default ``0.9``).
        b2: :math:`\beta_2`, the decay rate of the second moment (default ``0.999``).
        b3: :math:`\beta_3`, the decay rate of the slow EMA (default ``0.9999``).
        alpha: :math:`\alpha`, the slow EMA's weight (default ``5``).
        eps: :math:`\epsilon`, added to the denominator (default ``1e-8``).
        t_alpha_beta3: :math:`T`, the warm-up of :math:`\alpha` and :math:`\beta_3` in steps
            (default ``None``: no warm-up).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByAdEMAMixState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_ademamix()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 1.0005,  1.0005, -1.0005])

    References:
        Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
        2024, https://arxiv.org/abs/2409.03137.
    """
    for name, beta in (("b1", b1), ("b2", b2), ("b3", b3)):
        _validate.in_unit_interval(name, beta)
    _validate.non_negative("alpha", alpha)
    _validate.non_negative("eps", eps)
    if t_alpha_beta3 is not None:
        _validate.positive_int("t_alpha_beta3", t_alpha_beta3)

    def init(params):
        return ScaleByAdEMAMixState(init_counts(params), zeros_like(params), zeros_like(params),
                                    zeros_like(params))

    def update(updates, state, params=None, **extra):
        del params, extra

        def kernel(g, count, mu, nu, mu_slow, _p):
            count, t = step_counts(count)
            bc1 = bias_correction(b1, t)
            if t_alpha_beta3 is None:
                alpha_t, slow_rate = alpha, 1 - b3
            else:
                alpha_t, b3_t = ademamix_warmup(alpha, b1, b3, t, t_alpha_beta3)
                (slow_rate,) = per_leaf(1 - b3_t)
            # u = (m1 + alpha bc1 m2) / (sqrt(nu) bc1 / sqrt(bc2) + eps bc1): bc1 folded in.
            slow_weight, scale, shift = per_leaf(alpha_t * bc1, bc1 / torch.sqrt(bias_correction(b2, t)),
                                                 eps * bc1)
            mu, nu = moments(g, mu, nu, b1, b2)
            mu_slow = ops.lerp_(mu_slow, g, slow_rate)
            numerator = ops.add_(ops.mul_into(mu_slow, slow_weight, g), mu)  # g is not read again
            u = adaptive_ratio(numerator, nu, scale, shift)
            return u, count, mu, nu, mu_slow

        u, (count, mu, nu, mu_slow) = multi_tensor_update(
            kernel, updates, (state.count, state.mu, state.nu, state.mu_slow),
            state_names=("state.count", "state.mu", "state.nu", "state.mu_slow"), count_states=1,
        )
        return u, ScaleByAdEMAMixState(count, mu, nu, mu_slow)

    return own_transform(init, update, state_type=ScaleByAdEMAMixState)
