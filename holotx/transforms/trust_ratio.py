"""Layer-wise trust ratios (LARS, LAMB, RaLars), as a building block."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from holotx import _validate, executor, ops, tree
from holotx.base import EmptyState, GradientTransformation, own_transform
from holotx.executor import multi_tensor_update
from holotx.flat import check_segments, per_row, segment_sums
from holotx.ops import Scalar
from holotx.transforms.adam import per_leaf, scalar_dtype

__all__ = ["TrustRatioState", "scale_by_trust_ratio", "trust_ratios"]


class TrustRatioState(NamedTuple):
    """The state of :func:`scale_by_trust_ratio`.

    Args:
        inner: the state of the transform the ratio is applied after (``EmptyState()``
            without one).

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scale_by_trust_ratio(inner=holotx.trace(0.9)).init({"w": torch.zeros(2)})
        >>> state.inner.trace["w"]
        tensor([0., 0.])
    """

    inner: Any
    """The state of the transform the ratio is applied after (``EmptyState()`` without one)."""


def trust_ratios(
    param_norms: torch.Tensor,
    update_norms: torch.Tensor,
    *,
    trust_coefficient: Scalar = 1.0,
    scale_clip: tuple[float, float] | None = None,
    weight_decay: Scalar = 0.0,
) -> torch.Tensor:
    r"""Trust ratios from 1-D vectors of per-tensor norms (float64, elementwise):

    .. math::
        r = \begin{cases}
            \dfrac{\eta\, \phi(\lVert\theta\rVert)}{\lVert u\rVert + \lambda \lVert\theta\rVert}
              & \phi(\lVert\theta\rVert) > 0 \text{ and } \lVert u\rVert + \lambda\lVert\theta\rVert > 0\\
            1 & \text{otherwise}
        \end{cases}

    with :math:`\phi` the clamp to ``scale_clip`` (identity when ``None``). The ratio is
    1 (not :math:`\eta`) where a norm vanishes, as in Holocron and optax, so a zero
    parameter or a zero update is neither blown up nor frozen. The division is guarded so
    that the unused branch puts no NaN into a gradient.

    Args:
        param_norms: :math:`\lVert\theta\rVert`, one per tensor (1-D).
        update_norms: :math:`\lVert u\rVert`, one per tensor (1-D).
        trust_coefficient: :math:`\eta` (default ``1``).
        scale_clip: ``(low, high)``, the clamp :math:`\phi` (default ``None``: no clamp).
        weight_decay: :math:`\lambda` (default ``0``).

    Returns:
        The ratios, a float64 vector with one entry per tensor.

    Example:
        >>> import torch
        >>> from holotx.transforms import trust_ratios
        >>> param_norms, update_norms = torch.tensor([5.0, 0.0, 20.0]), torch.tensor([0.5, 1.0, 1.0])
        >>> trust_ratios(param_norms, update_norms, scale_clip=(0.0, 10.0))
        tensor([10.,  1., 10.], dtype=torch.float64)

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
        https://arxiv.org/abs/1708.03888.

        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
        minutes", ICLR 2020, https://arxiv.org/abs/1904.00962.
    """
    pn = param_norms.to(scalar_dtype(param_norms.device))
    phi = pn if scale_clip is None else pn.clamp(*scale_clip)
    den = update_norms.to(pn.dtype)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        den = den + weight_decay * pn
    degenerate = (phi == 0) | (den == 0)
    safe_den = torch.where(degenerate, torch.ones_like(den), den)
    return torch.where(degenerate, torch.ones_like(den), trust_coefficient * phi / safe_den)


def scale_by_trust_ratio(
    trust_coefficient: Scalar = 1.0,
    scale_clip: tuple[float, float] | None = None,
    *,
    weight_decay: Scalar = 0.0,
    inner: GradientTransformation | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
) -> GradientTransformation:
    r"""Scale each tensor's update by its layer-wise trust ratio (You et al., 2017, "Large
    Batch Training of Convolutional Networks"; 2020, "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes").

    .. math::
        r = \frac{\eta\, \phi(\lVert\theta\rVert)}{\lVert u\rVert + \lambda\lVert\theta\rVert}
        \ \text{(1 where a norm is 0, see } \texttt{trust\_ratios}\text{)},\qquad
        u \leftarrow r \cdot \mathrm{inner}(u + \lambda\theta)

    per tensor, with :math:`\phi` the clamp of the weight norm to ``scale_clip`` (no clamp
    when ``None``). The ratio is measured on the *incoming* updates and applied to the
    output of ``inner`` (default: none), which lets LARS keep its momentum buffer free of
    the ratio (:math:`\theta \leftarrow \theta - \alpha\gamma_t b_t`, Holocron's choice)
    while LAMB measures and scales the same Adam direction:

    - LAMB: ``chain(scale_by_adam(), add_decayed_weights(wd), scale_by_trust_ratio(scale_clip=(0, 10)))``;
    - LARS: ``scale_by_trust_ratio(weight_decay=wd, inner=trace(momentum))``, the
      weight decay then in the ratio's denominator as in the LARS paper.

    ``mask`` (a pytree of bools, a prefix of one, or a function ``params -> mask``) keeps
    the leaves marked ``False`` at ratio 1 (biases and norm weights, usually); ``inner``
    still runs on them. ``trust_coefficient`` :math:`\eta` defaults to 1 (Holocron has
    none). Needs ``params``. State: :class:`TrustRatioState`.

    Args:
        trust_coefficient: :math:`\eta` (default ``1``).
        scale_clip: ``(low, high)``, the clamp :math:`\phi` of the weight norm (default ``None``: no
            clamp).
        weight_decay: :math:`\lambda`, added to the updates and to the ratio's denominator
            (default ``0``).
        inner: a transform run on the decayed updates, whose output the ratio scales (default
            ``None``: none).
        mask: leaves marked ``False`` keep a ratio of 1: a pytree of bools, a prefix of one, or a
            function ``params -> mask`` (default ``None``: every leaf adapts).

    Returns:
        A :class:`~holotx.GradientTransformation`. Its state is a :class:`TrustRatioState`; it
        needs ``params``.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> tx = holotx.scale_by_trust_ratio()
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.0, 0.5])}, state, params)
        >>> updates["w"]
        tensor([0., 5.])

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
        https://arxiv.org/abs/1708.03888.

        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
        minutes", ICLR 2020, https://arxiv.org/abs/1904.00962.
    """
    _validate.non_negative("trust_coefficient", trust_coefficient)
    _validate.non_negative("weight_decay", weight_decay)
    scale_clip = _validate.scale_clip("scale_clip", scale_clip)
    if mask is not None and not (isinstance(mask, (bool, np.bool_)) or callable(mask)
                                 or isinstance(mask, (dict, list, tuple))):
        raise _validate.HyperparameterTypeError(
            f"mask must be a bool, a pytree of bools or a function params -> mask, got {mask!r}")
    if inner is not None and not isinstance(inner, GradientTransformation):
        raise ValueError(f"inner must be a GradientTransformation, got {inner!r}")
    decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def init(params):
        return TrustRatioState(EmptyState() if inner is None else inner.init(params))

    def check_no_inner_state(state):
        # A state with a momentum buffer given to a ratio without inner would pass it
        # through, unused: LARS with momentum resumed as LARS without. (With an inner, its
        # own checks refuse an EmptyState.)
        if inner is None and not isinstance(state.inner, EmptyState):
            raise ValueError(f"scale_by_trust_ratio: state.inner holds a {type(state.inner).__name__}, but "
                             "this transform keeps none (inner=None; LARS: momentum=0): the state of a "
                             "transform made with other options (its inner's buffers would pass through, "
                             "unused)? Make the state with this transform's init")

    def decayed(u, p):
        """The updates plus the weight decay, in the pass that measured them (they are
        still in cache: one read of the updates and the params fewer than a pass of its
        own)."""
        return ops.add_(u, p, alpha=weight_decay) if decays else u

    def ratios_kernel(u, p, keep, at, *, ratios):
        dtype = ops.accumulation_dtype(u[0].dtype)
        # realize: on DTensor leaves the norms become plain values (one collective), so the
        # ratios are read and applied as on plain tensors.
        r = trust_ratios(ops.realize(torch.stack(ops.norms(p, dtype))),
                         ops.realize(torch.stack(ops.norms(u, dtype))),
                         trust_coefficient=trust_coefficient, scale_clip=scale_clip,
                         weight_decay=weight_decay)
        (r,) = per_leaf(r)
        # Masked-out leaves get ratio 1, of the same kind as the others (float or tensor).
        for i, ri, k in zip(at, r, keep):
            ratios[i] = ri if k else (1.0 if isinstance(ri, float) else torch.ones_like(ri))
        return (decayed(u, p),)

    def segment_ratios_kernel(u, p, segments, at, *, ratios):
        """Over aligned flat buffers: one ratio per tensor, kept per row as ``(rows, 1)``
        (ones for a buffer the mask keeps out)."""
        for i, ui, pi, (seg, keep) in zip(at, u, p, segments):
            if not keep:
                ratios[i] = ui.new_ones((ui.numel() // seg.width, 1))
                continue
            dtype = ops.accumulation_dtype(ui.dtype) or ui.dtype
            r = trust_ratios(_segment_norms(pi, seg, dtype), _segment_norms(ui, seg, dtype),
                             trust_coefficient=trust_coefficient, scale_clip=scale_clip,
                             weight_decay=weight_decay)
            ratios[i] = per_row(r.to(ui.dtype), seg)
        return (decayed(u, p),)

    def update(updates, state, params=None, **extra):
        check_no_inner_state(state)
        g_leaves = tree.leaves(updates)
        if params is None and any(g is not None for g in g_leaves):  # (no tensor: no leaf routed here)
            raise ValueError("scale_by_trust_ratio needs params: call update(updates, state, params)")
        segments = extra.get("segments")
        tree.check_whole_tensors(params, "scale_by_trust_ratio", flat_ok=segments is not None)
        if segments is not None:
            # One bool masks every tensor of the buffers alike; a mask per tensor cannot be
            # followed into a buffer that packs them.
            if mask is not None and not isinstance(mask, bool):
                raise ValueError("scale_by_trust_ratio: a per-tensor mask cannot be combined with "
                                 "flat-buffer segments (one bool for every tensor can); mask the tensors "
                                 "out before flattening (their own layout)")
            segments = check_segments(segments, g_leaves, "scale_by_trust_ratio")
            kernel, values = segment_ratios_kernel, [(seg, mask is not False) for seg in segments]
        else:
            from holotx.combine import _resolve

            keep = ([True] * len(g_leaves) if mask is None
                    else [_mask_flag(k) for k in _resolve(mask, params, "trust ratio mask")])
            kernel, values = ratios_kernel, keep
        # One pass measures each leaf's ratio (into ``ratios``, by the leaf's index: None
        # where the update is None) and adds the weight decay; inner runs on its result
        # (with the extras: segments), and the ratio scales inner's updates.
        ratios: list[Any] = [None] * len(g_leaves)
        updates, states = multi_tensor_update(
            functools.partial(kernel, ratios=ratios), updates, params=params, needs_params=True,
            leaf_values=[values, range(len(g_leaves))],
            then=None if inner is None else (inner, state.inner, extra))
        return _scaled_by_ratios(updates, ratios), state if inner is None else TrustRatioState(states[-1])

    def prepare(state, params):
        check_no_inner_state(state)
        if inner is not None:
            executor.prepare(inner, state.inner, params)

    return own_transform(init, update, prepare, state_type=TrustRatioState)


def _mask_flag(value: Any) -> bool:
    """One leaf's mask entry: a bool (a 1-element bool tensor too), never read by
    truthiness (a mask of strings would keep every leaf in)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    return _validate.flag("trust ratio mask", value)


def _segment_norms(x: torch.Tensor, segments: Any, dtype: torch.dtype) -> torch.Tensor:
    """The L2 norm of each tensor in an aligned flat buffer: sums over rows, then over
    each tensor's rows (a small scatter-add), in float64."""
    rows = x.reshape(-1, segments.width).to(dtype)
    return segment_sums(rows * rows, segments, out_dtype=scalar_dtype(x.device)).sqrt()


def _scaled_by_ratios(updates: Any, ratios: list[Any]) -> Any:
    """The updates times their ratios. Ratios read to the host (eager, on a CPU) are
    handed over to a caller that asked for the final scaling: it applies
    ``p += lr * r * u`` in the pass that adds the updates, as Holocron does, where
    scaling here would take a pass of its own (and a fresh buffer when the updates are a
    momentum state, LARS's)."""
    if all(r is None or isinstance(r, float) for r in ratios) and executor.take_scale(ratios):
        return updates
    return _scale_leaves(updates, ratios)


def _scale_leaves(updates: Any, factors: list[Any]) -> Any:
    """Each leaf of ``updates`` (replaced) times its own factor: a float or a 0-d tensor,
    or for an aligned flat buffer a ``(rows, 1)`` tensor, one factor per row."""

    def kernel(u, _p, f):
        if not isinstance(f[0], torch.Tensor) or f[0].dim() < 2:
            return (ops.mul_(u, f),)
        return (ops.mul_rows_(u, f),)

    return multi_tensor_update(kernel, updates, leaf_values=[factors])[0]
