"""Scout: Lookahead whose sync rate adapts to how coherent the fast steps were."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from holotx import executor, ops, tree
from holotx.base import GradientTransformation, Params, own_transform
from holotx.executor import multi_tensor_update
from holotx.flat import segment_sums
from holotx.ops import Scalar
from holotx.optimizers._common import holocron_mode
from holotx.transforms.adam import per_leaf, scalar_dtype
from holotx.wrappers._sync import (
    check_inner,
    decide_syncs,
    host_counts,
    host_decided,
    nothing_syncs,
    run_inner,
    slow_copy,
    sync_flags,
    synchronize,
    validate_sync,
)

__all__ = ["ScoutState", "coherence_rate", "scout"]


class ScoutState(NamedTuple):
    """The state of :func:`scout`.

    Args:
        count: fast steps taken by each leaf (see :class:`~holotx.LookaheadState`).
        slow: the slow weights, in the params' dtypes.
        update_mean: the running mean of the leaf's per-step updates over the current window
            (Welford).
        update_m2: the running sum of squared deviations of those updates from their mean.
        update_min: the elementwise minimum of those updates (``+inf`` before the window's first
            step).
        update_max: the elementwise maximum of those updates (``-inf`` before it).
        inner_state: the wrapped transform's state, kept across synchronisations.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.scout(holotx.sgd(0.1)).init({"w": torch.ones(2)})
        >>> state.update_min["w"], state.update_max["w"]
        (tensor([inf, inf]), tensor([-inf, -inf]))
    """

    count: Any
    """Fast steps taken by each leaf (see :class:`~holotx.LookaheadState`)."""
    slow: Params
    """The slow weights, in the params' dtypes."""
    update_mean: Any
    """Running mean of the leaf's per-step updates over the current window (Welford)."""
    update_m2: Any
    """Running sum of squared deviations of those updates from their mean (Welford)."""
    update_min: Any
    """Elementwise minimum of those updates (``+inf`` before the window's first step)."""
    update_max: Any
    """Elementwise maximum of those updates (``-inf`` before the window's first step)."""
    inner_state: Any
    """The wrapped transform's state, kept across synchronisations."""


def scout(
    inner: GradientTransformation,
    sync_rate: Scalar = 0.5,
    sync_period: int = 6,
    *,
    compat: str | None = None,
) -> GradientTransformation:
    r"""Holocron's Scout: :func:`~holotx.lookahead` whose sync rate is raised when the
    fast steps of the window were incoherent.

    Over a window of :math:`k` = ``sync_period`` fast steps (default 6), each element
    of each tensor sees the updates :math:`u_1, \dots, u_k`. Its spread ratio is

    .. math::
        \rho = \frac{\operatorname{std}(u)}{\max_j |u_j - \bar u|}, \qquad
        \operatorname{std}(u) = \sqrt{\tfrac{1}{k-1}\textstyle\sum_j (u_j - \bar u)^2},

    :math:`c_t` is the mean of :math:`\rho` over tensor :math:`t`'s elements, :math:`C`
    the unweighted mean of the :math:`c_t` over the tensors that synchronise, and the
    synchronisation is Lookahead's with the rate

    .. math:: \alpha = \max(1 - C,\ \text{sync\_rate}).

    Since :math:`\rho \ge \sqrt{k}/(k-1)` whenever it is defined (equality for one
    outlying step), :math:`\alpha \le \max(\text{sync\_rate}, 1 - \sqrt{k}/(k-1))`: with the
    defaults the rate lies in :math:`[0.5, 0.51]`, and for :math:`k = 2`, where
    :math:`\rho = \sqrt 2` always, it is ``sync_rate``.

    **Memory.** Holocron stacks the :math:`k + 1` snapshots of every tensor; this keeps
    four running statistics per element instead (Welford's mean and sum of squared
    deviations, the minimum and the maximum: ``max |u_j - ū| = max(max u - ū, ū - min
    u)``), which give the same :math:`\rho` in :math:`O(1)` memory whatever :math:`k`.

    **Where Holocron's formula is 0/0** (an element whose updates are all equal over
    the window: a frozen or zero-gradient element, a constant step, and every element
    when :math:`k = 1`), the element carries no information about coherence and is left
    out of its tensor's mean; a tensor none of whose elements varied is left out of
    :math:`C`; and when no tensor varied, :math:`C` is undefined and the rate is
    ``sync_rate`` (so ``sync_period=1`` is Lookahead's). Wherever Holocron's rate is
    defined, this one equals it (to rounding: it is taken over the inner updates rather
    than the realised changes, which in bfloat16 differ visibly). Holocron 0.3.0 instead
    gets NaN, and ``max(NaN, r)`` is NaN, which skips the outer step and puts the params
    back on the slow weights: the window's k steps are thrown away.

    The per-step updates are the inner transform's (in float32 for half-precision
    params). Over flat buffers (:mod:`holotx.flat`) pass the layout's ``segments`` as an
    extra of ``update`` so that :math:`c_t` is taken per tensor; the zero padding
    between tensors is constant, hence left out.

    ``compat="holocron"`` reproduces pylocron 0.3.0's ``Scout``, NaN included: the
    statistics are those of the realised param changes :math:`\theta_j - \theta_{j-1}`
    in the params' dtype, any 0/0 makes the rate NaN, and a NaN rate synchronises
    without an outer step; and, as in :func:`~holotx.lookahead`'s Holocron mode, a param
    without a gradient still counts a step, with a change of zero (so a param that never
    gets one makes every rate NaN, as in Holocron). Everything else (per-leaf counts,
    ``sync_rate`` as a tensor) is as in :func:`~holotx.lookahead`.

    Args:
        inner: the transform that moves the params (the fast weights), a chain included.
        sync_rate: :math:`\alpha \in [0, 1]`, the step of the slow weights towards the fast ones
            (default ``0.5``): a number or a 0-d tensor.
        sync_period: :math:`k`, the fast steps between synchronisations (a positive Python int,
            default ``6``).
        compat: ``None`` (default) or ``"holocron"`` for pylocron 0.3.0's Scout, NaN included.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is a :class:`ScoutState`; it
        needs ``params``.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.scout(holotx.sgd(lr=1.0), sync_rate=0.0, sync_period=3)
        >>> params = {"w": torch.zeros(2)}
        >>> state = tx.init(params)
        >>> for g in ([-1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]):  # one element steady, one erratic
        ...     updates, state = tx.update({"w": torch.tensor(g)}, state, params)
        ...     params = holotx.apply_updates(params, updates)
        >>> params["w"]  # rate 1 - C, C = 0.866: the erratic element's ratio (the steady one left out)
        tensor([0.4019, 0.1340])

    References:
        Scout is Holocron's own wrapper (no paper): https://github.com/frgfm/Holocron
        (``holocron.optim.wrapper.Scout``). It extends Lookahead:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
        NeurIPS 2019, https://arxiv.org/abs/1907.08610.
    """
    holocron = holocron_mode(compat)
    validate_sync(sync_rate, sync_period)
    check_inner("scout", inner)

    def stats_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype if holocron else ops.accumulation_dtype(dtype) or dtype

    def init(params):
        def stats(fill):
            return tree.map(lambda p: torch.full_like(p, fill, dtype=stats_dtype(p.dtype),
                                                      memory_format=torch.preserve_format), params)
        return ScoutState(host_counts(params), slow_copy(params), stats(0.0), stats(0.0),
                          stats(math.inf), stats(-math.inf), inner.init(params))

    def update(updates, state, params=None, **extra):
        # With segments (not in Holocron mode, which refuses them below) each tensor of a
        # flat buffer gets its own statistics.
        tree.check_whole_tensors(params, "scout", flat_ok=extra.get("segments") is not None and not holocron)
        fast, inner_state = run_inner("scout", inner, updates, state.inner_state, params, extra,
                                      holocron=holocron)
        leaves = tree.leaves(fast)
        segments = _check_segments(extra.get("segments"), len(leaves), holocron)
        flags: list[Any] = [False] * len(leaves)
        sums: list[Any] = [None] * len(leaves)

        def kernel(u, count, mean, m2, low, high, p, index, segs):
            count, t, ends = sync_flags(count, sync_period)
            (weight,) = per_leaf(1.0 / ((t - 1) % sync_period + 1).to(mean[0].dtype))
            if holocron:  # the realised change theta_j - theta_{j-1}
                x = ops.add_(ops.add(p, u), p, alpha=-1)
            else:
                x = [ui.to(mi.dtype) for ui, mi in zip(u, mean)]
            mean, m2, low, high = _accumulate(x, mean, m2, low, high, weight)
            for j, i in enumerate(index):
                flags[i] = ends[j]
                if ends[j] is not False:  # traced: every leaf, the flag decides later
                    sums[i] = _spread_ratio_sums(mean[j], m2[j], low[j], high[j], sync_period, holocron,
                                                 segs[j])
            return (u, count, *_fresh_window(ends, mean, m2, low, high))

        names = ("count", "update_mean", "update_m2", "update_min", "update_max")
        _, (count, mean, m2, low, high) = multi_tensor_update(
            kernel, fast, [getattr(state, n) for n in names], params,
            state_names=[f"state.{n}" for n in names],
            needs_params=True, count_states=1, host_counts=True,
            state_dtypes=dict.fromkeys((1, 2, 3, 4), stats_dtype),
            leaf_values=[list(range(len(leaves))), segments])
        rate = coherence_rate(sums, flags, sync_rate, holocron=holocron, device=tree.first_device(params))
        if nothing_syncs(flags):  # the rate is None then: no leaf took part
            return fast, ScoutState(count, state.slow, mean, m2, low, high, inner_state)
        new_u, slow = synchronize(fast, state.slow, params, flags, rate)
        return new_u, ScoutState(count, slow, mean, m2, low, high, inner_state)

    def prepare(state, params):
        decide_syncs(state.count, sync_period)
        executor.prepare(inner, state.inner_state, params)

    return own_transform(init, update, prepare, state_type=ScoutState)


def _check_segments(segments: Any, n: int, holocron: bool) -> list[Any]:
    if segments is None:
        return [None] * n
    if holocron:
        raise ValueError("scout(compat='holocron') cannot take flat-buffer segments: the padding between "
                         "tensors would read as frozen elements, which are NaN in Holocron's formula")
    if len(segments) != n:
        raise ValueError(f"segments has {len(segments)} entries for {n} flat buffers: "
                         "pass layout.segments() with the layout's buffers")
    return list(segments)


def _accumulate(x, mean, m2, low, high, weight):
    r"""One more value into each element's window statistics, by Welford's update: with
    :math:`w = 1/n` for the n-th value of the window and :math:`\delta = x - \bar u`,
    :math:`\bar u \leftarrow \bar u + w\delta` and :math:`M_2 \leftarrow M_2 + (1 - w)\delta^2`
    (the same as :math:`\delta\,(x - \bar u_{new})`, one temporary fewer)."""
    delta = ops.add(x, mean, alpha=-1)
    mean = ops.lerp_(mean, x, weight)
    m2 = ops.addcmul_(m2, delta, delta, [1 - w for w in weight])
    return mean, m2, ops.minimum_(low, x), ops.maximum_(high, x)


def _fresh_window(ends, mean, m2, low, high):
    """The statistics (replaced) of the leaves whose window ends, reset for the next window."""
    out = []
    for stats, fill in ((mean, 0.0), (m2, 0.0), (low, math.inf), (high, -math.inf)):
        if host_decided(ends):
            ending = [i for i, e in enumerate(ends) if e]
            if len(ending) == len(stats):
                # Every leaf (the usual case): the state list as given, whose buffers the
                # step may write (a compiled donated step knows them by that list).
                stats = ops.fill_(stats, fill)
            else:
                stats = list(stats)
                for i, reset in zip(ending, ops.fill_([stats[i] for i in ending], fill)):
                    stats[i] = reset
        else:
            stats = ops.store([torch.where(e, fill, s) for e, s in zip(ends, stats)], stats)
        out.append(stats)
    return out


def _spread_ratio_sums(mean, m2, low, high, k, holocron, segments):
    r"""For one tensor (or, with ``segments``, each tensor of a flat buffer), from its
    window statistics: the sum of :math:`\rho` over the elements where it is defined and
    their number (float64, so the mean is taken once all are known). In Holocron mode
    the mean of :math:`\rho` over all elements, NaN for any 0/0, and ``None``."""
    # Each temporary is dead once the next is computed from it: its memory may take the
    # result, as the executor allows (two scratch tensors instead of ten, which on a CPU
    # spares the page faults of eight fresh ones).
    into = ops.into
    spread = high - mean
    other = mean - low
    spread = into(torch.maximum, spread, other, dead=spread)
    if holocron:
        # torch.std of one value is NaN (k = 1): so is m2 / 0 here
        ratio = into(torch.div, m2, k - 1 if k > 1 else 0.0, dead=other).sqrt()
        ratio = into(torch.div, ratio, spread, dead=ratio)
        return ops.realize(ratio.mean()).to(scalar_dtype(ratio.device)), None
    varied = high > low
    # Guarded so that the elements left out put no NaN into a gradient either.
    one = torch.ones((), dtype=m2.dtype, device=m2.device)
    ratio = into(torch.where, varied, m2, one, dead=other)
    ratio = into(torch.div, ratio, max(k - 1, 1), dead=ratio)
    ratio = into(torch.sqrt, ratio, dead=ratio)
    ratio = into(torch.div, ratio, into(torch.where, varied, spread, one, dead=spread), dead=ratio)
    ratio = into(torch.where, varied, ratio, one.new_zeros(()), dead=ratio)
    # Summed in the statistics' dtype (float32 at least; a dtype= argument would first copy
    # the whole tensor), counted without turning the mask into integers.
    dtype = scalar_dtype(ratio.device)
    if segments is None:
        return ops.realize(ratio.sum()).to(dtype), ops.realize(torch.count_nonzero(varied))
    return (segment_sums(ratio, segments, out_dtype=dtype),
            segment_sums(varied, segments, out_dtype=torch.int64))


def coherence_rate(sums: list[Any], flags: list[Any], sync_rate: Scalar, *, holocron: bool,
                   device: torch.device) -> Any:
    r"""Scout's rate :math:`\max(1 - C, \text{sync\_rate})`.

    ``sums`` has one entry per leaf: ``None`` for a leaf that takes no part, else a pair
    ``(ratio_sums, counts)`` of 0-d tensors (or 1-D, one entry per tensor of a flat
    buffer): the sum of :math:`\rho` over the elements where it is defined and their
    number; in Holocron mode ``(mean of rho over all elements, None)``. ``flags`` says,
    per leaf, whether its window ends (a bool or a 0-d bool tensor); only those leaves
    count. A Python float in plain eager mode on the CPU, else a 0-d tensor (no host
    sync); ``None`` when no leaf takes part.

    Args:
        sums: per leaf, ``None`` or ``(ratio_sums, counts)`` as above.
        flags: per leaf, whether its window ends (a bool or a 0-d bool tensor).
        sync_rate: the lower bound of the rate.
        holocron: Holocron mode (``sums`` hold ``(mean, None)``; a 0/0 gives NaN).
        device: where to make the rate when it is a tensor.

    Returns:
        The rate :math:`\max(1 - C, \text{sync\_rate})`: a float or a 0-d tensor, ``None``
        when no leaf takes part.

    Example:
        >>> import torch
        >>> from holotx.wrappers import coherence_rate
        >>> sums = [(torch.tensor(1.2, dtype=torch.float64), torch.tensor(4)), None]  # mean rho 0.3
        >>> coherence_rate(sums, [True, True], 0.5, holocron=False, device=torch.device("cpu"))
        0.7
    """
    taking_part = [i for i, s in enumerate(sums) if s is not None]
    if not taking_part:
        return None
    dtype = scalar_dtype(device)
    ends = torch.cat([torch.as_tensor(flags[i], device=device).expand(sums[i][0].numel())
                      for i in taking_part])
    ratio_sums = torch.cat([sums[i][0].reshape(-1).to(device) for i in taking_part])
    floor = torch.as_tensor(sync_rate, dtype=dtype, device=device)
    if holocron:
        coherence = torch.where(ends, ratio_sums, 0.0).sum() / ends.sum()
        rate = torch.maximum(1 - coherence, floor)
    else:
        counts = torch.cat([sums[i][1].reshape(-1).to(device) for i in taking_part])
        defined = ends & (counts > 0)
        per_tensor = ratio_sums / counts.clamp(min=1)
        n = defined.sum()
        coherence = torch.where(defined, per_tensor, 0.0).sum() / n.clamp(min=1)
        rate = torch.where(n > 0, torch.maximum(1 - coherence, floor), floor)
    if holocron:
        rate = rate.detach()  # Holocron's rate is a Python float: no gradient flows through it
    if ops.host_scalars_ok([rate]):
        return rate.item()
    return rate
