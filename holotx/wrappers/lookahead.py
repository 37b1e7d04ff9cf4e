"""Lookahead: k fast steps forward, one step back, as a higher-order transform."""

from __future__ import annotations

from typing import Any, NamedTuple

from holotx import executor
from holotx.base import GradientTransformation, Params, own_transform
from holotx.ops import Scalar
from holotx.optimizers._common import holocron_mode
from holotx.wrappers._sync import (
    check_inner,
    count_steps,
    decide_syncs,
    host_counts,
    nothing_syncs,
    run_inner,
    scaled,
    slow_copy,
    synchronize,
    validate_sync,
)

__all__ = ["LookaheadState", "lookahead"]


class LookaheadState(NamedTuple):
    r"""The state of :func:`lookahead`.

    Args:
        count: fast steps taken by each leaf, a tree of 0-d int64 tensors on the CPU; a leaf
            is synchronised when its count reaches a multiple of ``sync_period``.
        slow: the slow weights :math:`\phi`, in the params' dtypes (a copy of the params at
            ``init``).
        inner_state: the wrapped transform's state, kept across synchronisations.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.lookahead(holotx.sgd(0.1)).init({"w": torch.ones(2)})
        >>> state.count["w"], state.slow["w"]
        (tensor(0), tensor([1., 1.]))
    """

    count: Any
    """Fast steps taken by each leaf, a tree of 0-d int64 tensors on the CPU (Holocron's
    ``fast_steps``, kept per leaf as torch.optim keeps ``step``): a leaf is synchronised
    when its count reaches a multiple of ``sync_period``."""
    slow: Params
    """The slow weights :math:`\\phi`, in the params' dtypes (a copy of the params at
    ``init``)."""
    inner_state: Any
    """The wrapped transform's state, kept across synchronisations."""


def lookahead(
    inner: GradientTransformation,
    sync_rate: Scalar = 0.5,
    sync_period: int = 6,
    *,
    compat: str | None = None,
) -> GradientTransformation:
    r"""Lookahead (Zhang et al., 2019, "Lookahead Optimizer: k steps forward, 1 step
    back", https://arxiv.org/abs/1907.08610) around any transform ``inner``.

    ``inner`` moves the params (the fast weights :math:`\theta`) as usual; after every
    ``sync_period`` (:math:`k`, default 6) of its steps the slow weights :math:`\phi`
    take a step towards them and the params are put back onto the slow weights:

    .. math::
        \phi \leftarrow \phi + \alpha\,(\theta_k - \phi),\qquad \theta \leftarrow \phi

    with ``sync_rate`` :math:`\alpha \in [0, 1]` (default 0.5; with 0 the params go
    back to where the window started). ``inner``'s state (momentum, moments) carries on
    across synchronisations, as in Holocron's wrapper. The params stay an ordinary tree:
    the slow weights live in the state, and the update of a synchronising step is
    :math:`\phi_{new} - \theta_{k-1}`, so :func:`~holotx.apply_updates` lands on
    :math:`\phi_{new}` (to the rounding of one addition).

    Put the wrapper last in a chain (its updates are meant to be applied as they are);
    it nests (``lookahead(scout(...))``) and works under ``masked``/``partition``. It
    needs ``params``. ``sync_rate`` may be a 0-d tensor (``inject_hyperparams``, vmap,
    meta-gradients; with half-precision params torch's ``lerp`` then rounds it to their
    dtype, where a Python float is used as it is); ``sync_period`` is a Python int.

    Each leaf counts its own fast steps (:class:`LookaheadState`). With a gradient at
    every step, the usual case, all leaves synchronise together at steps
    :math:`k, 2k, \dots`. A leaf whose gradient is ``None`` is not stepped, so neither its
    count nor its slow weights change (torch.optim's rule for a param without ``.grad``).

    ``compat="holocron"``: Holocron 0.3.0's Lookahead computes the same rule
    (``slow += rate * (fast - slow)`` when ``rate > 0``, then ``fast = slow``), but counts
    steps for all params together and synchronises a param that had no gradient too. In
    this mode a leaf whose inner update is ``None`` (its params given) is taken as a step
    that did not move it: its count advances, and its update is a tensor (zero, or the
    move onto the slow weights at a sync), so it needs its params. What Holocron's class
    gets wrong (its ``state_dict``, schedulers) is the adapter's business, not the math's.

    Args:
        inner: the transform that moves the params (the fast weights), a chain included.
        sync_rate: :math:`\alpha \in [0, 1]`, the step of the slow weights towards the fast ones
            (default ``0.5``): a number or a 0-d tensor.
        sync_period: :math:`k`, the fast steps between synchronisations (a positive Python int,
            default ``6``).
        compat: ``None`` (default) or ``"holocron"`` for Holocron 0.3.0's rule, as above.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is a :class:`LookaheadState`;
        it needs ``params``.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.lookahead(holotx.sgd(lr=1.0), sync_rate=0.5, sync_period=2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([-1.0])}, state, params)
        ...     params = holotx.apply_updates(params, updates)
        >>> params["w"], state.slow["w"]  # two fast steps to 2, then halfway back: 1
        (tensor([1.]), tensor([1.]))

    References:
        Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
        NeurIPS 2019, https://arxiv.org/abs/1907.08610.
    """
    holocron = holocron_mode(compat)
    validate_sync(sync_rate, sync_period)
    check_inner("lookahead", inner)

    def init(params):
        return LookaheadState(host_counts(params), slow_copy(params), inner.init(params))

    def update(updates, state, params=None, **extra):
        # A caller that applies the updates itself may ask for the final scaling (the
        # learning rate) to be handed over: a step where nothing synchronises hands over
        # the inner transform's and returns its updates unscaled, which spares a pass; a
        # sync needs the real steps, so there the wrapper scales them itself.
        with executor.scale_request_to(inner) as factor:
            fast, inner_state = run_inner("lookahead", inner, updates, state.inner_state, params, extra,
                                          holocron=holocron)
        count, flags = count_steps(fast, state.count, sync_period)
        if nothing_syncs(flags):
            if factor:
                executor.take_scale(executor.scale_factor(factor))
            return fast, LookaheadState(count, state.slow, inner_state)
        if factor:
            fast = scaled(fast, executor.scale_factor(factor))
        new_u, slow = synchronize(fast, state.slow, params, flags, sync_rate)
        return new_u, LookaheadState(count, slow, inner_state)

    def prepare(state, params):
        decide_syncs(state.count, sync_period)
        executor.prepare(inner, state.inner_state, params)

    return own_transform(init, update, prepare, state_type=LookaheadState)
