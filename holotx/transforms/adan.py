"""Adan's Nesterov-style moments, as a building block."""

from __future__ import annotations

from typing import NamedTuple

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.transforms.adam import (
    adaptive_ratio,
    bias_correction,
    numbers,
    per_leaf,
    scalar_dtype,
    square_root,
    step_counts,
)
from holotx.tree import zeros_like

__all__ = ["ScaleByAdanState", "scale_by_adan"]


class ScaleByAdanState(NamedTuple):
    r"""The state of :func:`scale_by_adan`.

    Args:
        count: steps taken by each leaf, a tree of 0-d int64 tensors.
        mu: the EMA of the gradient, :math:`m_t` (Holocron's ``exp_avg``).
        diff_avg: the EMA of the gradient difference, :math:`v_t` (Holocron's ``exp_avg_sq``).
        nu: the EMA of :math:`(g_t + \beta_2 \Delta_t)^2`, :math:`n_t` (Holocron's ``exp_avg_delta``).
        nu_max: the running max of ``nu`` with ``amsgrad``, else ``None``.
        prev_grad: the previous gradient, or ``None`` when it is not tracked (Holocron mode).

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_adan().init({"w": torch.zeros(2)})
        >>> state.prev_grad["w"], state.nu_max
        (tensor([0., 0.]), None)
    """

    count: object
    """Steps taken by each leaf, a tree of 0-d int64 tensors."""
    mu: object
    """EMA of the gradient, :math:`m_t` (Holocron's ``exp_avg``)."""
    diff_avg: object
    """EMA of the gradient difference, :math:`v_t` (Holocron's ``exp_avg_sq``)."""
    nu: object
    """EMA of :math:`(g_t + \\beta_2 \\Delta_t)^2`, :math:`n_t` (Holocron's ``exp_avg_delta``)."""
    nu_max: object
    """Running max of ``nu`` with ``amsgrad`` (Holocron's ``max_exp_avg_delta``), else ``None``."""
    prev_grad: object
    """The previous gradient, or ``None`` when it is not tracked (Holocron mode)."""


def scale_by_adan(
    b1: Scalar = 0.98,
    b2: Scalar = 0.92,
    b3: Scalar = 0.99,
    eps: Scalar = 1e-8,
    *,
    amsgrad: bool = False,
    track_previous_grad: bool = True,
) -> GradientTransformation:
    r"""Rescale updates by Adan's moments (Xie et al., 2022, "Adan: Adaptive Nesterov
    Momentum Algorithm for Faster Optimizing Deep Models").

    .. math::
        \Delta_t = g_t - g_{t-1}\ (\Delta_1 = 0),\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \Delta_t

        n_t = \beta_3 n_{t-1} + (1-\beta_3)(g_t + \beta_2\Delta_t)^2,\qquad
        u_t = \frac{m_t/(1-\beta_1^t) + \beta_2 v_t/(1-\beta_2^t)}{\sqrt{n_t}/\sqrt{1-\beta_3^t} + \epsilon}

    with the betas as decay rates (the official code's convention; the paper writes
    :math:`1-\beta`), ``amsgrad`` using :math:`\max_{s\le t} n_s`. The first step's
    difference is 0, as in the official code (which stores :math:`g_1` as the previous
    gradient). ``track_previous_grad=False`` reproduces Holocron 0.3.0, which never
    stores the previous gradient, so that :math:`\Delta_t = g_t` at every step. Weight
    decay is not part of this block (Adan's is proximal, see :func:`holotx.adan`).
    Defaults ``(0.98, 0.92, 0.99, 1e-8)``. State: :class:`ScaleByAdanState`.

    Args:
        b1: :math:`\beta_1`, the decay rate of the gradient's EMA (default ``0.98``).
        b2: :math:`\beta_2`, the decay rate of the gradient difference's EMA (default ``0.92``).
        b3: :math:`\beta_3`, the decay rate of the squared moment's EMA (default ``0.99``).
        eps: :math:`\epsilon`, added to the denominator (default ``1e-8``).
        amsgrad: divide by :math:`\max_{s\le t} n_s` (default ``False``).
        track_previous_grad: store :math:`g_{t-1}` (default ``True``); ``False`` takes
            :math:`\Delta_t = g_t` (Holocron 0.3.0).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByAdanState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_adan()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 1.0000,  1.0000, -1.0000])

    References:
        Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
        Models", 2022, https://arxiv.org/abs/2208.06677.
    """
    for name, beta in (("b1", b1), ("b2", b2), ("b3", b3)):
        _validate.in_unit_interval(name, beta)
    _validate.non_negative("eps", eps)
    _validate.flag("amsgrad", amsgrad)
    _validate.flag("track_previous_grad", track_previous_grad)

    def init(params):
        return ScaleByAdanState(init_counts(params), zeros_like(params), zeros_like(params),
                                zeros_like(params), zeros_like(params) if amsgrad else None,
                                zeros_like(params) if track_previous_grad else None)

    def update(updates, state, params=None, **extra):
        del params, extra

        def kernel(g, count, mu, diff_avg, nu, nu_max, prev_grad, _p):
            count, t = step_counts(count, host=numbers(b1, b2, b3, eps))
            bc1, bc2, bc3 = (bias_correction(b, t) for b in (b1, b2, b3))
            # u = (m + v b2 bc1 / bc2) / (sqrt(n) bc1 / sqrt(bc3) + eps bc1): bc1 folded in.
            diff_weight, scale, shift = per_leaf(b2 * bc1 / bc2, bc1 / square_root(bc3), eps * bc1)
            if prev_grad is None:
                diff = g
            else:
                # g_{t-1} is 0 before the first step: weighting g by 0 there makes Delta_1 = 0.
                (seen,) = per_leaf(float(t > 1) if isinstance(t, int) else (t > 1).to(scalar_dtype(t.device)))
                diff = ops.add_(ops.mul(g, seen), prev_grad, alpha=-1)
            mu = ops.lerp_(mu, g, 1 - b1)
            diff_avg = ops.lerp_(diff_avg, diff, 1 - b2)
            lookahead = ops.add(g, diff, alpha=b2)
            nu = ops.mul_(nu, b3)
            nu = ops.addcmul_(nu, lookahead, lookahead, 1 - b3)
            if nu_max is not None:
                nu_max = ops.maximum_(nu_max, nu)
            numerator = ops.add_(ops.mul(diff_avg, diff_weight), mu)
            u = adaptive_ratio(numerator, nu if nu_max is None else nu_max, scale, shift)
            if prev_grad is not None:
                prev_grad = ops.copy_into(g, prev_grad)  # state never shares the caller's grads
            return u, count, mu, diff_avg, nu, nu_max, prev_grad

        u, new = multi_tensor_update(
            kernel, updates, (state.count, state.mu, state.diff_avg, state.nu, state.nu_max, state.prev_grad),
            state_names=("state.count", "state.mu", "state.diff_avg", "state.nu", "state.nu_max",
                         "state.prev_grad"),
            count_states=1,
        )
        return u, ScaleByAdanState(*new)

    return own_transform(init, update, state_type=ScaleByAdanState, kept_fields={
        "nu_max": (amsgrad, f"amsgrad={amsgrad}"),
        "prev_grad": (track_previous_grad, f"track_previous_grad={track_previous_grad}")})
