"""TAdam's Student-t first moment, as a building block."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from holotx import _validate, ops, tree
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.flat import check_segments, per_row, segment_sums
from holotx.ops import Scalar
from holotx.transforms.adam import (
    adaptive_ratio,
    corrected_denominator,
    numbers,
    per_leaf,
    scalar_dtype,
    step_counts,
)
from holotx.tree import zeros_like

__all__ = ["ScaleByTAdamState", "scale_by_tadam"]


class ScaleByTAdamState(NamedTuple):
    """The state of :func:`scale_by_tadam`.

    Args:
        count: steps taken by each leaf, a tree of 0-d int64 tensors.
        mu: the robust first moment (``exp_avg``).
        nu: the EMA of the squared gradient (``exp_avg_sq``).
        nu_max: the running max of ``nu`` with ``amsgrad`` (``max_exp_avg_sq``), else ``None``.
        weight_sum: :math:`W_t`, the decayed sum of the Student-t weights: one 0-d float64 tensor
            per leaf (one per tensor over an aligned flat buffer).

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_tadam().init({"w": torch.zeros(2)})
        >>> state.weight_sum["w"]
        tensor(9.0000, dtype=torch.float64)
    """

    count: object
    """Steps taken by each leaf, a tree of 0-d int64 tensors."""
    mu: object
    """The robust first moment (``exp_avg``)."""
    nu: object
    """EMA of the squared gradient (``exp_avg_sq``)."""
    nu_max: object
    """Running max of ``nu`` with ``amsgrad`` (``max_exp_avg_sq``), else ``None``."""
    weight_sum: object
    """:math:`W_t`, the decayed sum of the Student-t weights: one 0-d float64 tensor per
    leaf (Holocron's ``W_t``, a ``(1,)`` tensor in the param's dtype); over an aligned flat
    buffer, a float64 vector with one entry per tensor it packs."""


def scale_by_tadam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    amsgrad: bool = False,
    dof: float | None = None,
) -> GradientTransformation:
    r"""Rescale updates by TAdam's moments (Ilboudo et al., 2020, "TAdam: A Robust
    Stochastic Gradient Optimizer"): the first moment is a Student-t weighted mean, so an
    outlier gradient moves it little.

    For each tensor of :math:`d` elements, with :math:`\nu` = ``dof`` (default :math:`d`):

    .. math::
        w_t = \frac{\nu + d}{\nu + \sum_i (g_{t,i} - m_{t-1,i})^2 / (v_{t-1,i} + \epsilon)},\qquad
        m_t = \frac{W_{t-1} m_{t-1} + w_t g_t}{W_{t-1} + w_t},\qquad
        W_t = \frac{2\beta_1 - 1}{\beta_1} W_{t-1} + w_t

        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\qquad
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`W_0 = \beta_1/(1-\beta_1)`, :math:`m_0 = v_0 = 0` and ``amsgrad`` using
    :math:`\max_{s \le t} v_s`. This is the official implementation's rule and Holocron's
    (Holocron's docstring writes :math:`g_t - g_{t-1}` in :math:`v_t`; its code and the
    paper use :math:`g_t^2`). With :math:`v_0 = 0` the first step is tiny
    (:math:`|u_1| \approx \epsilon`-scaled), as in both. :math:`W_t` is kept in float64.
    Defaults ``(0.9, 0.999, 1e-8)``. State: :class:`ScaleByTAdamState`.

    Over aligned flat buffers (:mod:`holotx.flat`) pass ``segments=layout.segments()`` to
    ``update``: the sums are taken per tensor, and ``weight_sum`` holds one value per
    tensor of each buffer (init over the layout's own buffers, which carry their segments).

    Args:
        b1: :math:`\beta_1`, the decay rate of the first moment (default ``0.9``).
        b2: :math:`\beta_2`, the decay rate of the second moment (default ``0.999``).
        eps: :math:`\epsilon`, added to the denominator (default ``1e-8``).
        amsgrad: divide by the running maximum of the second moment (default ``False``).
        dof: :math:`\nu`, the Student-t degrees of freedom (default ``None``: each tensor's
            number of elements).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByTAdamState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, -2.0, 3.0])}
        >>> tx = holotx.scale_by_tadam()
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([0.5, 0.5, -1.0])}, state, params)
        >>> updates["w"]
        tensor([ 0.0013,  0.0013, -0.0013])

    References:
        Ilboudo, Kobayashi & Sugimoto, "TAdam: A Robust Stochastic Gradient Optimizer", 2020,
        https://arxiv.org/abs/2003.00179.
    """
    _validate.in_unit_interval("b1", b1)
    _validate.in_unit_interval("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.flag("amsgrad", amsgrad)
    if dof is not None:
        _validate.positive("dof", dof)
    if not isinstance(b1, torch.Tensor) and b1 == 0:
        raise ValueError("b1 must be > 0 for TAdam (its weight decay factor (2 b1 - 1) / b1), got 0")

    def init(params):
        def initial_weight(p):
            # Over an aligned flat buffer, one weight sum per tensor it packs.
            segments = tree.segments_of(p)
            shape = () if segments is None else (segments.count,)
            return b1 / (1 - b1) * torch.ones(shape, dtype=scalar_dtype(p.device), device=p.device)

        return ScaleByTAdamState(init_counts(params), zeros_like(params), zeros_like(params),
                                 zeros_like(params) if amsgrad else None, tree.map(initial_weight, params))

    def update(updates, state, params=None, **extra):
        segments = extra.get("segments")
        tree.check_whole_tensors(params, "scale_by_tadam", flat_ok=segments is not None)
        leaf_segments = _check_segments(segments, updates, state.weight_sum)

        def kernel(g, count, weight_sum, mu, nu, nu_max, _p, segs):
            count, t = step_counts(count, host=numbers(b1, b2, eps))
            scale, shift = corrected_denominator(b1, b2, eps, t)
            # The Student-t weight, from the previous moments: sum (g - m)^2 / (v + eps), as
            # sum ((g - m) / (v + eps)) (g - m). Dividing before multiplying keeps it finite
            # where (g - m)^2 overflows (|g| > 1e19 in float32) and v, from the same overflow,
            # is inf: inf / inf would be NaN (the quotient is 0 there, and so is its term).
            # It accumulates in the tensors' dtype, as Holocron's, or float32 for half types
            # (a float64 upcast would copy each tensor).
            deviation = ops.add(g, mu, alpha=-1)
            scaled = ops.div_into(deviation, ops.add_scalar(nu, eps))
            dtype = scalar_dtype(count[0].device)
            accumulate = ops.accumulation_dtype(g[0].dtype)
            if segs[0] is None:
                # realize: W stays a plain tensor, as the count, on DTensor leaves too.
                mahalanobis = ops.realize(torch.stack(ops.dots(scaled, deviation, accumulate)))
                numel = torch.tensor([x.numel() for x in g], dtype=dtype, device=count[0].device)
                w = _student_t_weight(mahalanobis.to(dtype), numel, dof)
                weights = torch.stack(weight_sum)
                (mix,) = per_leaf(w / (weights + w))
                mu = ops.lerp_(mu, g, mix)
                new_weights = list((weights * ((2 * b1 - 1) / b1) + w).unbind(0))
            else:
                # Over aligned flat buffers: the sums per tensor (the zero padding adds
                # nothing), and each tensor's weight spread over its rows.
                mix, new_weights = [], []
                for d, q, weights, seg in zip(deviation, scaled, weight_sum, segs):
                    d, q = (d, q) if accumulate is None else (d.to(accumulate), q.to(accumulate))
                    mahalanobis = segment_sums(q * d, seg, out_dtype=dtype)
                    w = _student_t_weight(mahalanobis, seg.numels.to(dtype), dof)
                    # In float32 for half types: their 8 or 11 bits would round the weight
                    # (the per-tensor path keeps it as a float).
                    mix.append(per_row((w / (weights + w)).to(accumulate or g[0].dtype), seg))
                    new_weights.append(weights * ((2 * b1 - 1) / b1) + w)
                mu = ops.lerp_rows_(mu, g, mix)
            nu = ops.mul_(nu, b2)
            nu = ops.addcmul_(nu, g, g, 1 - b2)
            if nu_max is not None:
                nu_max = ops.maximum_(nu_max, nu)
            # The deviation is read (the weight is summed): its memory takes the denominator,
            # which needs no fresh buffer then, whether or not the caller donated g.
            u = adaptive_ratio(mu, nu if nu_max is None else nu_max, scale, shift, dead=deviation)
            return u, count, new_weights, mu, nu, nu_max

        u, (count, weight_sum, mu, nu, nu_max) = multi_tensor_update(
            kernel, updates, (state.count, state.weight_sum, state.mu, state.nu, state.nu_max),
            state_names=("state.count", "state.weight_sum", "state.mu", "state.nu", "state.nu_max"),
            count_states=2, leaf_values=[leaf_segments],
        )
        return u, ScaleByTAdamState(count, mu, nu, nu_max, weight_sum)

    return own_transform(init, update, state_type=ScaleByTAdamState,
                         kept_fields={"nu_max": (amsgrad, f"amsgrad={amsgrad}")})


def _student_t_weight(mahalanobis: torch.Tensor, numel: torch.Tensor, dof: float | None) -> torch.Tensor:
    """:math:`w = (\nu + d) / (\nu + \text{mahalanobis})` per tensor, :math:`\nu` = ``dof``
    or the tensor's size :math:`d`. An empty tensor with the default dof would give 0 / 0:
    its weight is 1 instead, the value at an average deviation (it moves nothing, but its
    W stays finite)."""
    nu_dof = numel if dof is None else dof
    empty = (nu_dof + mahalanobis) == 0
    return torch.where(empty, 1.0, (nu_dof + numel) / torch.where(empty, 1.0, nu_dof + mahalanobis))


def _check_segments(segments: Any, updates: Any, weight_sums: Any) -> list[Any]:
    """Per leaf, its flat-buffer segments (``None`` without), checked against the weight
    sums the state holds: one per tensor of a buffer, or a 0-d one per leaf."""
    leaves = tree.leaves(updates)
    sums = tree.leaves(weight_sums)
    if segments is None:
        if any(isinstance(w, torch.Tensor) and w.dim() > 0 for w in sums):
            raise ValueError("scale_by_tadam: state.weight_sum holds one value per tensor of a flat buffer "
                             "(init over an aligned FlatLayout's buffers): pass segments=layout.segments() "
                             "to update")
        return [None] * len(leaves)
    segments = check_segments(segments, leaves, "scale_by_tadam")
    for i, (seg, w) in enumerate(zip(segments, sums)):
        if isinstance(w, torch.Tensor) and tuple(w.shape) != (seg.count,):
            raise ValueError(f"scale_by_tadam: state.weight_sum[{i}] has shape {tuple(w.shape)} where "
                             f"its flat buffer packs {seg.count} tensors: init the state over the aligned "
                             "layout's buffers (layout.flatten(params)), which carry their segments")
    return segments
