"""RAdam's rectified adaptive step, as a building block."""

from __future__ import annotations

from typing import Any

import torch

from holotx import _validate, ops
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar
from holotx.transforms.adam import (
    ScaleByAdamState,
    adaptive_ratio,
    bias_correction,
    moments,
    per_leaf,
    step_counts,
)
from holotx.tree import zeros_like

__all__ = ["rectification", "scale_by_radam"]


def rectification(
    b2: Scalar, count: torch.Tensor, bc2: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""RAdam's variance rectification at step ``count`` (elementwise: ``count`` may hold
    one step per leaf), as tensors ``(active, r_t)``.

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t},\quad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    ``active`` is ``rho_t > threshold``. Where inactive, ``r_t`` is evaluated at
    ``rho_inf`` instead so that no NaN enters a gradient through ``torch.where``.

    Args:
        b2: :math:`\beta_2`, the second moment's decay rate.
        count: the step :math:`t`, an integer tensor (any shape: one step per leaf, say).
        bc2: :math:`1-\beta_2^t`, the second moment's bias correction at ``count`` (a float tensor,
            see :func:`bias_correction`).
        threshold: rectify where :math:`\rho_t` exceeds it (torch's RAdam: 5; the paper: 4).

    Returns:
        ``(active, r_t)``: a bool tensor, whether :math:`\rho_t > \text{threshold}`, and the
        rectifier :math:`r_t`, both shaped like ``count``.

    Example:
        >>> import torch
        >>> from holotx.transforms import bias_correction, rectification
        >>> t = torch.tensor([5, 6, 100])
        >>> active, r = rectification(0.999, t, bias_correction(0.999, t), 5.0)
        >>> active, r
        (tensor([False,  True,  True]), tensor([1.0000, 0.0258, 0.2153], dtype=torch.float64))

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020,
        https://arxiv.org/abs/1908.03265.
    """
    t = bc2.new_tensor(0) + count
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * torch.pow(b2, t) / bc2
    active = rho_t > threshold
    rho = torch.where(active, rho_t, rho_inf + torch.zeros_like(rho_t))
    r = torch.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return active, r


def _rectified_or_plain(mu, nu, scale, shift, rectifying, dead):
    r"""Per leaf, :math:`m / (\sqrt{v}\,a + b)` where it rectifies and :math:`m / b` (with
    :math:`b = 1 - \beta_1^t`) where it does not. The plain branch never reads
    :math:`v`: as :math:`\sqrt{v} \cdot 0 + b` it would be :math:`\infty \cdot 0` = NaN
    once :math:`g^2` overflows, where torch.optim.RAdam (and Holocron's RaLars) stay
    finite. On the host (eager, CPU) the leaves are split by branch; traced or on an
    accelerator the branch is a ``torch.where`` per leaf."""
    if not isinstance(rectifying[0], torch.Tensor):
        u: list[Any] = [None] * len(mu)
        rect = [i for i, r in enumerate(rectifying) if r]
        plain = [i for i, r in enumerate(rectifying) if not r]
        if rect:
            ratios = adaptive_ratio(_take(mu, rect), _take(nu, rect), _take(scale, rect), _take(shift, rect),
                                    dead=_take(dead, rect))
            for i, x in zip(rect, ratios):
                u[i] = x
        if plain:
            for i, x in zip(plain, ops.div(_take(mu, plain), _take(shift, plain))):
                u[i] = x
        return u
    ratios = adaptive_ratio(mu, nu, scale, shift, dead=dead)
    return [torch.where(r > 0, x, m / b) for x, m, b, r in zip(ratios, mu, shift, rectifying)]


def _take(xs: list[Any], idx: list[int]) -> list[Any]:
    return [xs[i] for i in idx]


def scale_by_radam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    threshold: float = 5.0,
    force_adaptive: bool = False,
    eps_after_correction: bool = False,
) -> GradientTransformation:
    r"""Rescale updates by Rectified Adam (Liu et al., 2020, "On the Variance of the
    Adaptive Learning Rate and Beyond").

    With Adam's moments :math:`m_t, v_t` and :func:`rectification`'s :math:`r_t`:

    .. math::
        u_t = \begin{cases}
            \frac{m_t}{1-\beta_1^t}\, \frac{r_t \sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}
              & \rho_t > \text{threshold} \\
            \frac{m_t}{1-\beta_1^t} & \text{otherwise}
        \end{cases}

    ``threshold=5`` is torch.optim.RAdam's rule (rectify from step 6 with the default
    betas); the paper's is 4 (RaLars). ``force_adaptive=True`` replaces the unrectified
    branch by the adaptive step without :math:`r_t` (Holocron's RaLars
    ``force_adaptive_momentum``). ``eps`` is added to :math:`\sqrt{v_t}` before the bias
    correction, as in torch; ``eps_after_correction=True`` adds it after, as Adam and
    Holocron's RaLars do: :math:`r_t \hat m_t / (\sqrt{v_t / (1-\beta_2^t)} + \epsilon)`.
    The branch is chosen with ``torch.where`` on 0-d tensors, so the transform traces.
    State: :class:`~holotx.transforms.ScaleByAdamState`.

    Args:
        b1: :math:`\beta_1`, the decay rate of the first moment (default ``0.9``).
        b2: :math:`\beta_2`, the decay rate of the second moment (default ``0.999``).
        eps: :math:`\epsilon`, added to the denominator (default ``1e-8``).
        threshold: rectify where :math:`\rho_t` exceeds it (default ``5``, torch's; the paper's is 4).
        force_adaptive: take the adaptive step without the rectifier where the variance is not
            tractable, instead of the momentum step (default ``False``).
        eps_after_correction: add :math:`\epsilon` after the bias correction of
            :math:`\sqrt{v_t}` (default ``False``: before, as torch).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByAdamState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_radam()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 0.5000,  0.5000, -1.0000])

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020,
        https://arxiv.org/abs/1908.03265.
    """
    _validate.in_unit_interval("b1", b1)
    _validate.in_unit_interval("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.flag("force_adaptive", force_adaptive)
    _validate.flag("eps_after_correction", eps_after_correction)
    if not isinstance(threshold, torch.Tensor) and not threshold >= 4:
        raise ValueError(f"threshold must be >= 4 (the rectifier needs rho_t > 4), got {threshold!r}")

    def init(params):
        return ScaleByAdamState(init_counts(params), zeros_like(params), zeros_like(params), None)

    def update(updates, state, params=None, **extra):
        del params, extra

        def kernel(g, count, mu, nu, _nu_max, _p):
            count, t = step_counts(count)
            bc1, bc2 = bias_correction(b1, t), bias_correction(b2, t)
            active, r = rectification(b2, t, bc2, threshold)
            # u = m / (sqrt(v) * a + b). Rectifying: a = bc1 / (r sqrt(bc2)) and b = eps * a, so
            # u = (m / bc1) * r sqrt(bc2) / (sqrt(v) + eps) (or b = eps bc1 / r: eps after the
            # correction). Otherwise a = 0 and b = bc1 (u = m / bc1), or the same without r when
            # forced adaptive.
            rectified = bc1 / (r * torch.sqrt(bc2))
            rectified_shift = eps * bc1 / r if eps_after_correction else eps * rectified
            if force_adaptive:
                adaptive = bc1 / torch.sqrt(bc2)
                plain, plain_shift = adaptive, eps * bc1 if eps_after_correction else eps * adaptive
            else:
                plain, plain_shift = torch.zeros_like(bc2), bc1
            scale, shift, rectifying = per_leaf(torch.where(active, rectified, plain),
                                                torch.where(active, rectified_shift, plain_shift),
                                                active.to(bc2.dtype))
            mu, nu = moments(g, mu, nu, b1, b2)
            # g is read: its memory may hold the result.
            if force_adaptive:
                return adaptive_ratio(mu, nu, scale, shift, dead=g), count, mu, nu, None
            return _rectified_or_plain(mu, nu, scale, shift, rectifying, g), count, mu, nu, None

        u, (count, mu, nu, _) = multi_tensor_update(
            kernel, updates, (state.count, state.mu, state.nu, None),
            state_names=("state.count", "state.mu", "state.nu", ""), count_states=1,
        )
        return u, ScaleByAdamState(count, mu, nu, None)

    return own_transform(init, update, state_type=ScaleByAdamState,
                         kept_fields={"nu_max": (False, "RAdam has no amsgrad variant")})
