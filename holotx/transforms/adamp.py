"""AdamP's projection of the radial component out of scale-invariant weights, as a
building block."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from holotx import _validate, ops, tree
from holotx.base import GradientTransformation, init_counts, own_transform
from holotx.executor import multi_tensor_update
from holotx.flat import _sums_by, channel_sums, check_segments, per_channel, per_row, segment_sums
from holotx.ops import Scalar
from holotx.transforms.adam import (
    ScaleByAdamState,
    adaptive_ratio,
    corrected_denominator,
    moments,
    numbers,
    scalar_dtype,
    step_counts,
)
from holotx.tree import zeros_like

__all__ = ["projection_coefficients", "scale_by_adamp"]

Projection = Literal["official", "holocron"]


def _cosine(dot: torch.Tensor, norm_x: torch.Tensor, norm_y: torch.Tensor, eps: Scalar) -> torch.Tensor:
    """``F.cosine_similarity``'s value from a dot product and two norms: each norm is
    clamped below at ``eps``."""
    return dot / (norm_x.clamp(min=eps) * norm_y.clamp(min=eps))


def projection_coefficients(
    p: torch.Tensor,
    g: torch.Tensor,
    direction: torch.Tensor,
    delta: Scalar,
    eps: Scalar,
    *,
    projection: Projection = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Where and how much AdamP projects one tensor's update: ``(c, projected)`` such
    that the projected update is ``direction - c * p``.

    A weight :math:`\theta` followed by a normalisation layer is scale-invariant; when its
    gradient is nearly orthogonal to it,
    :math:`|\cos(\theta, g)| < \delta/\sqrt{\dim}`, the radial part of the update only
    grows :math:`\lVert\theta\rVert` and is removed:
    :math:`u \leftarrow u - \hat\theta\langle\hat\theta, u\rangle`,
    :math:`\hat\theta = \theta/(\lVert\theta\rVert + \epsilon)`.

    ``"official"`` (clovaai/AdamP): tensors with more than one dimension only; first per
    output channel (rows of ``p.reshape(p.shape[0], -1)``, :math:`\dim` a row's length,
    the test on the largest :math:`|\cos|` of the rows), then for the whole tensor.
    ``"holocron"`` (Holocron 0.3.0): every tensor, whole-tensor view only, and the
    *signed* cosine (an anti-aligned gradient is projected too), its ``eps`` fixed at
    1e-8. ``c`` broadcasts against ``p``; ``projected`` is a 0-d bool tensor.

    Args:
        p: the weight :math:`\theta`.
        g: the incoming gradient, on which the cosine test is made.
        direction: the update to project (Adam's step).
        delta: :math:`\delta`, the cosine threshold is :math:`\delta/\sqrt{\dim}`.
        eps: :math:`\epsilon`, added to the norms.
        projection: ``"official"`` (default) or ``"holocron"``, as above.

    Returns:
        ``(c, projected)``: the coefficient ``c`` (broadcasting against ``p``) and a 0-d bool
        tensor, whether the update was projected.

    Example:
        >>> import torch
        >>> from holotx.transforms import projection_coefficients
        >>> p = torch.eye(2)
        >>> g = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # orthogonal to each row of p
        >>> c, projected = projection_coefficients(p, g, torch.ones(2, 2), 0.1, 1e-8)
        >>> bool(projected), torch.ones(2, 2) - c * p  # the radial part of each row removed
        (True, tensor([[0., 1.],
                [1., 0.]]))

    References:
        Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
        Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217.
    """
    if (projection == "official" and p.ndim <= 1) or p.numel() == 0:
        never = torch.zeros((), dtype=torch.bool, device=p.device)
        return torch.zeros((), dtype=p.dtype, device=p.device), never
    if projection == "holocron":
        # Whole-tensor sums, without a reshape (a DTensor unevenly sharded along its first
        # dimension cannot be flattened).
        norm_p = (p * p).sum().sqrt()
        cos = _cosine((p * g).sum(), norm_p, (g * g).sum().sqrt(), 1e-8)
        coef = (p * direction).sum() / (norm_p + eps) ** 2
        projected = cos < delta / math.sqrt(p.numel())
        return torch.where(projected, coef, torch.zeros_like(coef)), projected
    rows = p.shape[0]
    pr, gr, dr = p.reshape(rows, -1), g.reshape(rows, -1), direction.reshape(rows, -1)
    # Per-row sums; the whole tensor's come from them.
    row_pp = (pr * pr).sum(1)
    row_gg = (gr * gr).sum(1)
    row_pg = (pr * gr).sum(1)
    row_pd = (pr * dr).sum(1)
    layer_norm_p = row_pp.sum().sqrt()
    layer_cos = _cosine(row_pg.sum(), layer_norm_p, row_gg.sum().sqrt(), eps)
    layer_coef = row_pd.sum() / (layer_norm_p + eps) ** 2
    row_norm_p = row_pp.sqrt()
    channel_cos = _cosine(row_pg, row_norm_p, row_gg.sqrt(), eps).abs()
    # One value per output channel, gathered whole for a DTensor: a shard may hold no row
    # (FSDP2's uneven split), and a max has no value over nothing.
    by_channel = ops.realize(channel_cos).max() < delta / math.sqrt(pr.shape[1])
    by_layer = layer_cos.abs() < delta / math.sqrt(p.numel())
    channel_coef = row_pd / (row_norm_p + eps) ** 2
    zero = torch.zeros_like(channel_coef)
    coef = torch.where(by_channel, channel_coef, torch.where(by_layer, layer_coef + zero, zero))
    return coef.reshape(rows, *([1] * (p.ndim - 1))), by_channel | by_layer


def scale_by_adamp(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    delta: Scalar = 0.1,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    weight_decay: Scalar = 0.0,
    wd_ratio: Scalar = 0.1,
    projection: Projection = "official",
) -> GradientTransformation:
    r"""Adam whose update of scale-invariant weights is projected onto their tangent space
    (Heo et al., 2021, "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights").

    .. math::
        p_t = \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \quad(\text{nesterov: } \beta_1 m_t + (1-\beta_1) g_t \text{ in the numerator}),\qquad
        u_t = \frac{\Pi(p_t)}{1-\beta_1^t} + \lambda\rho\,\theta

    with Adam's moments (``amsgrad``: the running max of :math:`v`), :math:`\Pi` the
    projection of :func:`projection_coefficients` (tested on the incoming gradient), and
    the decoupled weight decay :math:`\lambda` = ``weight_decay`` (default 0) scaled by
    :math:`\rho` = ``wd_ratio`` (default 0.1) where a tensor was projected, 1 elsewhere,
    as in the official code. ``delta`` (default 0.1) sets the cosine threshold. Coupled L2
    decay is :func:`~holotx.add_decayed_weights` placed before. Needs ``params``. State:
    :class:`~holotx.transforms.ScaleByAdamState`. Either projection runs over aligned flat
    buffers given ``segments=layout.segments()`` (:mod:`holotx.flat`): the official one's
    per-channel sums are :func:`holotx.flat.channel_sums`, the whole tensors' are the sums
    of their channels'.

    Args:
        b1: :math:`\beta_1`, the decay rate of the first moment (default ``0.9``).
        b2: :math:`\beta_2`, the decay rate of the second moment (default ``0.999``).
        eps: :math:`\epsilon`, added to the denominator (default ``1e-8``).
        delta: :math:`\delta`, the cosine threshold :math:`\delta/\sqrt{\dim}` (default ``0.1``).
        nesterov: use :math:`\beta_1 m_t + (1-\beta_1) g_t` in the numerator (default ``False``).
        amsgrad: divide by the running maximum of the second moment (default ``False``).
        weight_decay: :math:`\lambda`, the decoupled weight decay (default ``0``).
        wd_ratio: :math:`\rho`, the weight decay's factor on projected tensors (default ``0.1``).
        projection: ``"official"`` (default: per output channel, then per tensor, tensors of two or
            more dimensions) or ``"holocron"`` (whole tensor, signed cosine); see
            :func:`projection_coefficients`.

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`ScaleByAdamState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.eye(2)}
        >>> tx = holotx.scale_by_adamp()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}, state, params)
        >>> updates["w"]
        tensor([[0.0000, 1.0000],
                [1.0000, 0.0000]])

    References:
        Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
        Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217.
    """
    _validate.in_unit_interval("b1", b1)
    _validate.in_unit_interval("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.non_negative("delta", delta)
    _validate.non_negative("weight_decay", weight_decay)
    _validate.non_negative("wd_ratio", wd_ratio)
    _validate.flag("nesterov", nesterov)
    _validate.flag("amsgrad", amsgrad)
    if projection not in ("official", "holocron"):
        raise ValueError(f"projection must be 'official' or 'holocron', got {projection!r}")
    decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def init(params):
        return ScaleByAdamState(init_counts(params), zeros_like(params), zeros_like(params),
                                zeros_like(params) if amsgrad else None)

    def update(updates, state, params=None, **extra):
        leaves = tree.leaves(updates)
        if params is None and any(g is not None for g in leaves):  # (no tensor: no leaf routed here)
            raise ValueError("scale_by_adamp needs params: call update(updates, state, params)")
        segments = extra.get("segments")
        tree.check_whole_tensors(params, "scale_by_adamp", flat_ok=segments is not None)
        leaf_segments = ([None] * len(leaves) if segments is None
                         else check_segments(segments, leaves, "scale_by_adamp"))
        if projection == "official" and any(s is not None and s.channels is None for s in leaf_segments):
            raise ValueError("scale_by_adamp: the official projection takes cosines per output channel, "
                             "and these segments do not say where the channels lie (Segments.channels): "
                             "pass layout.segments()")

        def kernel(g, count, mu, nu, nu_max, p, segs):
            count, t = step_counts(count, host=numbers(b1, b2, eps))
            scale, shift = corrected_denominator(b1, b2, eps, t)
            mu, nu = moments(g, mu, nu, b1, b2)
            if nu_max is not None:
                nu_max = ops.maximum_(nu_max, nu)
            numerator = ops.lerp(mu, g, 1 - b1) if nesterov else mu
            u = adaptive_ratio(numerator, nu if nu_max is None else nu_max, scale, shift)
            if segs[0] is not None:
                decay = weight_decay if decays else None
                project = _project_segments if projection == "holocron" else _project_channels
                return project(u, p, g, segs, delta, eps, decay, wd_ratio), count, mu, nu, nu_max
            coefs, projected = zip(*(projection_coefficients(pi, gi, ui, delta, eps, projection=projection)
                                     for pi, gi, ui in zip(p, g, u)))
            u = ops.addcmul_(u, p, list(coefs), -1)
            if decays:
                one = torch.ones((), dtype=u[0].dtype, device=u[0].device)
                decay = [weight_decay * torch.where(pr, wd_ratio * one, one) for pr in projected]
                u = ops.addcmul_(u, p, decay)
            return u, count, mu, nu, nu_max

        u, (count, mu, nu, nu_max) = multi_tensor_update(
            kernel, updates, (state.count, state.mu, state.nu, state.nu_max), params, needs_params=True,
            state_names=("state.count", "state.mu", "state.nu", "state.nu_max"), count_states=1,
            leaf_values=[leaf_segments],
        )
        return u, ScaleByAdamState(count, mu, nu, nu_max)

    return own_transform(init, update, state_type=ScaleByAdamState,
                         kept_fields={"nu_max": (amsgrad, f"amsgrad={amsgrad}")})


def _project_segments(u: ops.TensorList, p: ops.TensorList, g: ops.TensorList, segments: list[Any],
                      delta: Scalar, eps: Scalar, weight_decay: Scalar | None,
                      wd_ratio: Scalar) -> ops.TensorList:
    """Holocron's projection (whole tensors, signed cosine) over aligned flat buffers: the
    four sums of each tensor by segments (the zero padding adds nothing), then
    ``u - c p + lambda rho p`` with one factor per tensor, spread over its rows."""
    out = []
    for ui, pi, gi, seg in zip(u, p, g, segments):
        dtype = ops.accumulation_dtype(pi.dtype) or pi.dtype
        pf, gf, uf = (x.to(dtype) for x in (pi, gi, ui))
        pp, gg, pg, pd = (segment_sums(a * b, seg) for a, b in ((pf, pf), (gf, gf), (pf, gf), (pf, uf)))
        norm_p = pp.sqrt()
        cos = _cosine(pg, norm_p, gg.sqrt(), 1e-8)
        numel = seg.numels.to(cos.dtype)
        # An empty tensor is never projected (and its threshold would divide by zero).
        projected = (numel > 0) & (cos < delta / torch.where(numel > 0, numel, 1.0).sqrt())
        coef = torch.where(projected, pd / (norm_p + eps) ** 2, torch.zeros_like(pd))
        factor = -coef
        if weight_decay is not None:
            factor = factor + weight_decay * torch.where(projected, wd_ratio * torch.ones_like(coef),
                                                          torch.ones_like(coef))
        out.append(ui + ops.mul_rows([pi], [per_row(factor.to(ui.dtype), seg)])[0])
    return out


def _project_channels(u: ops.TensorList, p: ops.TensorList, g: ops.TensorList, segments: list[Any],
                      delta: Scalar, eps: Scalar, weight_decay: Scalar | None,
                      wd_ratio: Scalar) -> ops.TensorList:
    """The official projection (:func:`projection_coefficients`) over aligned flat
    buffers: the four sums of each output channel (:func:`holotx.flat.channel_sums`),
    each tensor's as the sum of its channels'; then ``u - c p + lambda rho p`` with one
    factor per channel (the channel's coefficient, its tensor's, or none), spread over
    its values. Tensors of fewer than two dimensions, and empty ones, are one channel
    each and never projected."""
    out = []
    for ui, pi, gi, seg in zip(u, p, g, segments):
        channels = seg.channels
        dtype = ops.accumulation_dtype(pi.dtype) or pi.dtype
        sums_dtype = scalar_dtype(pi.device)
        pf, gf, uf = (x.to(dtype) for x in (pi, gi, ui))
        pp, gg, pg, pd = (channel_sums(a * b, seg, sums_dtype)
                          for a, b in ((pf, pf), (gf, gf), (pf, gf), (pf, uf)))
        split = channels.sizes > 0  # two or more dimensions, not empty
        one = torch.ones((), dtype=sums_dtype, device=pi.device)
        channel_norm_p = pp.sqrt()
        channel_cos = _cosine(pg, channel_norm_p, gg.sqrt(), eps).abs()
        channel_limit = delta / torch.where(split, channels.sizes.to(sums_dtype), one).sqrt()
        # The largest |cos| of a tensor's channels is under its limit when none is at or over
        # it; a NaN counts as over (a NaN maximum fails the test too).
        over = ~(channel_cos < channel_limit[channels.tensor_ids])
        by_channel = split & (_over_tensors(over.to(sums_dtype), seg) == 0)
        layer_pp, layer_gg, layer_pg, layer_pd = (_over_tensors(x, seg) for x in (pp, gg, pg, pd))
        layer_norm_p = layer_pp.sqrt()
        layer_cos = _cosine(layer_pg, layer_norm_p, layer_gg.sqrt(), eps).abs()
        layer_limit = delta / torch.where(split, seg.numels.to(sums_dtype), one).sqrt()
        by_layer = split & (layer_cos < layer_limit)
        layer_coef = layer_pd / (layer_norm_p + eps) ** 2
        channel_coef = pd / (channel_norm_p + eps) ** 2
        zero = torch.zeros_like(channel_coef)
        coef = torch.where(by_channel[channels.tensor_ids], channel_coef,
                           torch.where(by_layer[channels.tensor_ids], layer_coef[channels.tensor_ids], zero))
        factor = -coef
        if weight_decay is not None:
            projected = (by_channel | by_layer)[channels.tensor_ids]
            factor = factor + weight_decay * torch.where(projected, wd_ratio * torch.ones_like(coef),
                                                          torch.ones_like(coef))
        # Flat, as the params the update is applied to: inductor fuses the update and its
        # application into one loop where both are seen alike (seen as rows, the update was
        # stored between two loops).
        out.append(ui + per_channel(factor.to(ui.dtype), seg).reshape(ui.shape) * pi)
    return out


def _over_tensors(x: torch.Tensor, segments: Any) -> torch.Tensor:
    """Per-channel values summed over each tensor's channels (a small scatter-add)."""
    return _sums_by(segments.channels.tensor_ids, x, segments.count)
