"""Lookahead: k fast steps forward, one step back, as a higher-order transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from holotx import _validate, ops, tree
from holotx.base import GradientTransformation, Params, without_final_scale
from holotx.multi import multi_tensor_update
from holotx.ops import Scalar
from holotx.optimizers._common import holocron_mode
from holotx.transforms.adam import per_leaf, step_counts

__all__ = ["LookaheadState", "lookahead"]


class LookaheadState(NamedTuple):
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
    """
    holocron = holocron_mode(compat)
    _validate_sync(sync_rate, sync_period)
    check_inner("lookahead", inner)

    def init(params):
        return LookaheadState(host_counts(params), slow_copy(params), inner.init(params))

    def update(updates, state, params=None, *, donate=False, **extra):
        fast, inner_state = run_inner("lookahead", inner, updates, state.inner_state, params, donate, extra,
                                      holocron=holocron)
        count, flags = count_steps(fast, state.count, sync_period, donate=donate)
        new_u, slow = synchronize(fast, state.slow, params, flags, sync_rate, donate=donate)
        return new_u, LookaheadState(count, slow, inner_state)

    return GradientTransformation(init, update)


def _validate_sync(sync_rate: Any, sync_period: Any) -> None:
    if callable(sync_rate) and not isinstance(sync_rate, torch.Tensor):
        raise ValueError("sync_rate must be a number or a 0-d tensor, not a schedule (to change it "
                         "between steps, use inject_hyperparams and set state.hyperparams['sync_rate'])")
    _validate.in_unit_interval("sync_rate", sync_rate, include_one=True)
    if isinstance(sync_period, torch.Tensor):
        raise ValueError("sync_period must be a Python int, got a tensor (with inject_hyperparams, "
                         "name it in static_args)")
    _validate.positive_int("sync_period", sync_period)


# ------------------------------------------------------------------ shared with Scout

def sync_flags(counts: list[torch.Tensor], sync_period: int, *,
               donate: bool) -> tuple[list[torch.Tensor], torch.Tensor, list[Any]]:
    """Each leaf's count plus one, the new counts stacked, and per leaf whether its
    window ends now: Python bools where they can be read without a device sync or a
    trace (plain eager on the CPU), else 0-d bool tensors."""
    counts, t = step_counts(counts, inplace=donate)
    (flags,) = per_leaf(t % sync_period == 0)
    return counts, t, flags


def host_decided(flags: Sequence[Any]) -> bool:
    return all(isinstance(f, bool) for f in flags)


def select(flags: Sequence[Any], new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
    """``new`` where the leaf's flag is set, else ``old`` (flags: bools or 0-d tensors)."""
    if host_decided(flags):
        return [n if f else o for f, n, o in zip(flags, new, old)]
    return [torch.where(f, n, o) for f, n, o in zip(flags, new, old)]


def write_back(buffers: list[torch.Tensor], values: list[torch.Tensor], *,
               inplace: bool) -> list[torch.Tensor]:
    """``values``, written into ``buffers`` when they may be overwritten (donated state)."""
    if inplace and ops.may_overwrite(buffers, True):
        return ops.copy(buffers, values)
    return values


def _synced(u: list[torch.Tensor], slow: list[torch.Tensor], p: list[torch.Tensor], rate: Any, *,
            inplace: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""For leaves that end their window: :math:`\phi_{new} = \phi + \alpha(\theta_k -
    \phi)` (as ``lerp``) with the fast weights :math:`\theta_k = \theta + u`, no outer
    step unless :math:`\alpha > 0` (a NaN rate leaves :math:`\phi`), and the update
    :math:`\phi_{new} - \theta`. With ``inplace`` (donated state and updates) all of it
    is written into ``u`` and ``slow``: three passes, no allocation."""
    fast = ops.add(u, p, inplace=inplace)
    if isinstance(rate, torch.Tensor):
        # A rate that is not > 0 (NaN included) becomes 0 before it weighs anything: the
        # same slow weights, and no NaN in a gradient.
        rate = torch.where(rate > 0, rate, 0.0).to(device=fast[0].device, dtype=fast[0].dtype)
        new_slow = ops.lerp(slow, fast, rate, inplace=inplace)
    elif rate > 0:
        new_slow = ops.lerp(slow, fast, float(rate), inplace=inplace)
    else:
        new_slow = slow
    return ops.sub_into(new_slow, p, out=fast), new_slow


def synchronize(updates: Any, slow: Any, params: Any, flags: list[Any], rate: Any, *,
                donate: bool) -> tuple[Any, Any]:
    """The updates and slow weights after the leaves whose ``flags`` (one per leaf of
    ``updates``, in flattening order) are set have been synchronised at ``rate``."""
    if host_decided(flags) and not any(flags):
        return updates, slow

    def kernel(u, s, p, f):
        if host_decided(f):
            ends = [i for i, fi in enumerate(f) if fi]
            if not ends:
                return u, s
            out, new = _synced([u[i] for i in ends], [s[i] for i in ends], [p[i] for i in ends], rate,
                               inplace=donate)
            u, s = list(u), list(s)
            for j, i in enumerate(ends):
                u[i], s[i] = out[j], new[j]
            return u, s
        # Traced (compile, functorch) or on an accelerator: every leaf computes both, and
        # torch.where keeps one, with no host sync. Donated, the result goes back into the
        # slow weights' buffers: compiled, into the same loop, with no fresh buffer.
        out, new = _synced(u, s, p, rate, inplace=False)
        return select(f, out, u), write_back(s, select(f, new, s), inplace=donate)

    new_u, (new_slow,) = multi_tensor_update(kernel, updates, (slow,), params, state_names=("state.slow",),
                                             needs_params=True, leaf_values=[flags])
    return new_u, new_slow


def host_counts(params: Params) -> Any:
    """One 0-d int64 step count per leaf, on the CPU whatever the leaf's device (as
    torch.optim keeps ``step`` when it is not capturable): in eager mode the sync decision
    is then read on the host without a device sync, and a step that does not synchronise
    costs nothing beyond the inner step on an accelerator too."""
    return tree.map(lambda p: torch.zeros((), dtype=torch.int64), params)


def check_inner(name: str, inner: Any) -> None:
    if not isinstance(inner, GradientTransformation):
        raise ValueError(f"{name} wraps a GradientTransformation, got {inner!r}")


def slow_copy(params: Params) -> Params:
    """The slow weights at ``init``: a copy of the params. Not detached, so that a
    meta-gradient with respect to the initial params also flows through the slow weights
    (call ``init`` under ``torch.no_grad()`` to keep autograd out of the state)."""
    return tree.map(torch.clone, params)


def run_inner(name: str, inner: GradientTransformation, updates: Any, inner_state: Any, params: Any,
              donate: bool, extra: dict[str, Any], *, holocron: bool) -> tuple[Any, Any]:
    """The fast step. The wrapper needs the inner updates as they are, so a request to
    hand the final scaling over (:data:`~holotx.base.FINAL_SCALE`) stops here. In
    Holocron mode a param the inner transform did not step (``None`` update) counts as a
    step that did not move it, as Holocron's wrappers see it."""
    if params is None:
        raise ValueError(f"{name} needs params: call update(updates, state, params)")
    extra = without_final_scale(extra)
    fast, inner_state = inner.update(updates, inner_state, params, donate=donate, **extra)
    if holocron:
        u_leaves, spec = tree.flatten(fast)
        p_leaves = tree.leaves_matching(params, spec, "params", "updates")
        fast = tree.unflatten(spec, [torch.zeros_like(p) if u is None and p is not None else u
                                     for u, p in zip(u_leaves, p_leaves)])
    return fast, inner_state


def count_steps(updates: Any, counts: Any, sync_period: int, *, donate: bool) -> tuple[Any, list[Any]]:
    """The new per-leaf counts, and one flag per leaf of ``updates`` (flattening order;
    ``False`` at ``None`` leaves): whether its window ends at this step."""
    n = len(tree.flatten(updates)[0])
    flags: list[Any] = [False] * n

    def kernel(u, count, _p, index):
        count, _, f = sync_flags(count, sync_period, donate=donate)
        for i, fi in zip(index, f):
            flags[i] = fi
        return u, count

    _, (new_counts,) = multi_tensor_update(kernel, updates, (counts,), state_names=("state.count",),
                                           count_states=1, host_counts=True, leaf_values=[list(range(n))])
    return new_counts, flags
