"""The machinery Lookahead and Scout share: counting each leaf's fast steps, deciding
which leaves end their window (on the host in eager mode, or before a compiled donated
step by its caller; with ``torch.where`` when traced otherwise), and moving the slow
weights and the params at a sync."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from holotx import _validate, executor, ops, tree
from holotx.base import GradientTransformation, Params
from holotx.executor import multi_tensor_update
from holotx.transforms.adam import per_leaf, step_counts


def validate_sync(sync_rate: Any, sync_period: Any) -> None:
    if callable(sync_rate) and not isinstance(sync_rate, torch.Tensor):
        raise ValueError("sync_rate must be a number or a 0-d tensor, not a schedule (to change it "
                         "between steps, use inject_hyperparams and set state.hyperparams['sync_rate'])")
    _validate.in_unit_interval("sync_rate", sync_rate, include_one=True)
    if isinstance(sync_period, torch.Tensor):
        raise ValueError("sync_period must be a Python int, got a tensor (with inject_hyperparams, "
                         "name it in static_args)")
    _validate.positive_int("sync_period", sync_period)


def sync_flags(counts: list[torch.Tensor],
               sync_period: int) -> tuple[list[torch.Tensor], torch.Tensor, list[Any]]:
    """Each leaf's count plus one (the counts replaced), the new counts stacked, and per
    leaf whether its window ends now: Python bools where they can be read without a trace
    (plain eager; the counts live on the CPU, so on any device) or where the step's caller
    decided them before a compiled step (:func:`decide_syncs`), else 0-d bool tensors."""
    known = [executor.decided(c) for c in counts]
    counts, t = step_counts(counts)
    (flags,) = per_leaf(t % sync_period == 0)
    # Read on the host, the flags are the counts' own (decisions are for a traced step,
    # which cannot read them; a stale one given to an eager step changes nothing).
    if not host_decided(flags) and known and all(isinstance(k, bool) for k in known):
        return counts, t, known
    return counts, t, flags


def decide_syncs(counts: Any, sync_period: int) -> None:
    """For a wrapper's ``prepare``: each leaf's sync flag for the coming step, read from
    its count on the host (:func:`holotx.executor.decide`), so that a compiled step takes
    the path of the flags it is given (a step that does not synchronise reads no slow
    weights) instead of computing both and selecting with ``torch.where``. Counts that
    cannot be read for free (not plain CPU tensors) are left to the step."""
    executor.decide(lambda: [(c, (int(c) + 1) % sync_period == 0) for c in tree.leaves(counts)
                             if type(c) is torch.Tensor and c.device.type == "cpu" and c.dim() == 0])


def host_decided(flags: Sequence[Any]) -> bool:
    return all(isinstance(f, bool) for f in flags)


def nothing_syncs(flags: Sequence[Any]) -> bool:
    """Known on the host that no leaf ends its window at this step (a step that costs
    the wrapper nothing beyond counting)."""
    return host_decided(flags) and not any(flags)


def select(flags: Sequence[torch.Tensor], new: list[torch.Tensor],
           old: list[torch.Tensor]) -> list[torch.Tensor]:
    """``new`` where the leaf's 0-d bool flag is set, else ``old``."""
    return [torch.where(f, n, o) for f, n, o in zip(flags, new, old)]


def _synced_leaves(u: list[torch.Tensor], slow: list[torch.Tensor], p: list[torch.Tensor],
                   rate: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""For leaves that end their window, ``u`` and ``slow`` replaced:
    :math:`\phi_{new} = \phi + \alpha(\theta_k - \phi)` (as ``lerp``) with the fast
    weights :math:`\theta_k = \theta + u`, no outer step unless :math:`\alpha > 0` (a NaN
    rate leaves :math:`\phi`), and the update :math:`\phi_{new} - \theta`. Where the
    executor allows, all of it is written into ``u`` and ``slow``: three passes, no
    allocation."""
    fast = ops.add_(u, p)
    new_slow = _outer_step(slow, fast, rate, ops.lerp_)
    return ops.sub_into(new_slow, p, fast), new_slow


def _outer_step(slow, fast, rate, lerp):
    if isinstance(rate, torch.Tensor):
        # A rate that is not > 0 (NaN included) becomes 0 before it weighs anything: the
        # same slow weights, and no NaN in a gradient.
        rate = torch.where(rate > 0, rate, 0.0).to(device=fast[0].device, dtype=fast[0].dtype)
        return lerp(slow, fast, rate)
    if rate > 0:
        return lerp(slow, fast, float(rate))
    return slow


def synchronize(updates: Any, slow: Any, params: Any, flags: list[Any], rate: Any) -> tuple[Any, Any]:
    """The updates and slow weights (both replaced) after the leaves whose ``flags`` (one
    per leaf of ``updates``, in flattening order) are set have been synchronised at
    ``rate``. Callers skip it when :func:`nothing_syncs`."""

    def kernel(u, s, p, f):
        if host_decided(f):
            ends = [i for i, fi in enumerate(f) if fi]
            if not ends:
                return u, s
            if len(ends) == len(f):
                # Every leaf (the usual case): the state list as given, whose buffers the step
                # may write (a compiled donated step knows them by that list).
                return _synced_leaves(u, s, p, rate)
            out, new = _synced_leaves([u[i] for i in ends], [s[i] for i in ends], [p[i] for i in ends], rate)
            u, s = list(u), list(s)
            for j, i in enumerate(ends):
                u[i], s[i] = out[j], new[j]
            return u, s
        # Traced (compile, functorch), undecided: every leaf computes both, and torch.where keeps
        # one, with no host sync. The slow weights go back into their own buffers where
        # the executor allows: compiled, into the same loop, with no fresh buffer.
        fast = ops.add(u, p)
        new_slow = _outer_step(s, fast, rate, ops.lerp)
        out = ops.sub_into(new_slow, p, fast)
        return select(f, out, u), ops.store(select(f, new_slow, s), s)

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
              extra: dict[str, Any], *, holocron: bool) -> tuple[Any, Any]:
    """The fast step. In Holocron mode a param the inner transform did not step
    (``None`` update) counts as a step that did not move it, as Holocron's wrappers see it."""
    if params is None:
        raise ValueError(f"{name} needs params: call update(updates, state, params)")
    fast, inner_state = executor.call(inner, updates, inner_state, params, **extra)
    if holocron:
        u_leaves, spec = tree.flatten(fast)
        p_leaves = tree.leaves_matching(params, spec, "params", "updates")
        fast = tree.unflatten(spec, [torch.zeros_like(p) if u is None and p is not None else u
                                     for u, p in zip(u_leaves, p_leaves)])
    return fast, inner_state


def count_steps(updates: Any, counts: Any, sync_period: int) -> tuple[Any, list[Any]]:
    """The new per-leaf counts, and one flag per leaf of ``updates`` (flattening order;
    ``False`` at ``None`` leaves): whether its window ends at this step."""
    n = len(tree.leaves(updates))
    flags: list[Any] = [False] * n

    def kernel(u, count, _p, index):
        count, _, f = sync_flags(count, sync_period)
        for i, fi in zip(index, f):
            flags[i] = fi
        return u, count

    _, (new_counts,) = multi_tensor_update(kernel, updates, (counts,), state_names=("state.count",),
                                           count_states=1, host_counts=True, leaf_values=[list(range(n))])
    return new_counts, flags


def scaled(updates: Any, factor: Any) -> Any:
    """``factor * updates`` (replaced): a final scaling the inner transform handed over,
    applied after all because the wrapper synchronises. ``factor`` is one scalar, or a
    list with one per leaf (see :func:`holotx.executor.take_scale`)."""
    if isinstance(factor, list):
        def kernel(u, _p, f):
            return (ops.mul_(u, [executor.leaf_factor(x, y.dtype) for x, y in zip(f, u)]),)

        return multi_tensor_update(kernel, updates, leaf_values=[factor])[0]
    return multi_tensor_update(lambda u, _p: (ops.mul_(u, factor),), updates)[0]
