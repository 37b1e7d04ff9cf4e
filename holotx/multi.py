"""Run a list-level kernel over matched pytrees, one call per device/dtype group.

This is the plumbing every elementwise transform shares: flatten the updates once, check
that state and params line up with them (errors name the path), drop ``None`` gradients
(their state passes through untouched), group the rest by device and dtype (so foreach
kernels see homogeneous lists, as torch.optim's multi-tensor path does), call the kernel,
and put the trees back together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from holotx import executor, ops, tree

Kernel = Callable[..., tuple[list[Any], ...]]

__all__ = ["multi_tensor_update"]


def multi_tensor_update(
    kernel: Kernel,
    updates: Any,
    states: Sequence[Any | None] = (),
    params: Any | None = None,
    *,
    state_names: Sequence[str] = (),
    needs_params: bool = False,
    count_states: int = 0,
    host_counts: bool = False,
    state_dtypes: Mapping[int, Callable[[Any], Any]] | None = None,
    leaf_values: Sequence[Sequence[Any]] = (),
) -> tuple[Any, list[Any | None]]:
    """Apply ``kernel(g, *state_lists, p, *value_lists) -> (u, *new_state_lists)`` to grouped leaves.

    ``states`` are trees shaped like ``updates`` (or ``None`` for a buffer the transform
    does not keep: its list is ``None`` for the kernel and its result must be ``None``).
    ``p`` is the matching list of params, or ``None`` when ``params`` is ``None``; with
    ``needs_params=True`` a missing ``params`` is an error. The first ``count_states``
    states hold one 0-d tensor per leaf (step counts): their structure and devices are
    checked, not their shapes or dtypes (nor their devices with ``host_counts``: counts
    kept on the CPU whatever the leaves' device). ``state_dtypes`` maps the index of a state
    whose dtype is not the updates' (statistics kept in float32 for bfloat16 leaves) to a
    function giving its dtype from the update's. ``leaf_values`` are lists with one value per
    leaf of ``updates`` in flattening order (per-leaf scalars, flags): the kernel gets
    each as one more list argument after ``p``, sliced like the tensors. Returns the
    updates tree and the list of new state trees.
    """
    names = list(state_names) or [f"state[{k}]" for k in range(len(states))]
    g_leaves, spec = tree.flatten(updates)
    for values in leaf_values:
        if len(values) != len(g_leaves):
            raise ValueError(f"leaf_values has {len(values)} entries for {len(g_leaves)} leaves")
    state_leaves: list[list[Any] | None] = []
    for k, (name, st) in enumerate(zip(names, states)):
        if st is None:
            state_leaves.append(None)
            continue
        leaves = tree.leaves_matching(st, spec, name, "updates")
        per_leaf = k >= count_states
        dtype_of = (state_dtypes or {}).get(k)
        tree.check_leaves(g_leaves, leaves, spec, "updates", name, shape=per_leaf,
                          dtype=per_leaf and dtype_of is None, device=per_leaf or not host_counts)
        if dtype_of is not None:
            for i, (g, x) in enumerate(zip(g_leaves, leaves)):
                if g is not None and x is not None and x.dtype != dtype_of(g.dtype):
                    raise ValueError(f"{name} at {tree.path_strings(spec)[i]} has dtype {x.dtype}, "
                                     f"expected {dtype_of(g.dtype)} for updates of {g.dtype}")
        state_leaves.append(leaves)
    if params is None:
        if needs_params:
            raise ValueError("this transform needs params: call update(updates, state, params)")
        p_leaves = None
    else:
        p_leaves = tree.leaves_matching(params, spec, "params", "updates")
        tree.check_leaves(g_leaves, p_leaves, spec, "updates", "params")
        for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
            if g is not None and p is None:
                path = tree.path_strings(spec)[i]
                raise ValueError(f"params at {path} is None but updates has a tensor there")

    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, g in enumerate(g_leaves):
        if g is not None:
            for k, leaves in enumerate(state_leaves):
                if leaves is not None and leaves[i] is None:
                    raise ValueError(f"{names[k]} has no entry at {tree.path_strings(spec)[i]}, "
                                     "where updates has a tensor: was init given this leaf?")
            # DTensors apart from plain tensors: a foreach kernel takes one kind or the other.
            wrapped = ops.is_wrapper(g)
            groups.setdefault((g.device, g.dtype, wrapped), []).append(i)

    plan = executor.current()
    new_u: list[Any] = [None] * len(g_leaves)
    new_states = [None if leaves is None else list(leaves) for leaves in state_leaves]
    for (_, _, wrapped), idx in groups.items():
        inputs = [
            [g_leaves[i] for i in idx],
            *[None if leaves is None else [leaves[i] for i in idx] for leaves in state_leaves],
            None if p_leaves is None else [p_leaves[i] for i in idx],
            *[[values[i] for i in idx] for values in leaf_values],
        ]
        plan.mark_state(inputs[1:1 + len(state_leaves)])
        if wrapped:
            with _replicating():
                outs = kernel(*inputs)
        else:
            outs = kernel(*inputs)
        for j, i in enumerate(idx):
            new_u[i] = outs[0][j]
        for k, out in enumerate(outs[1:]):
            if new_states[k] is not None:
                for j, i in enumerate(idx):
                    new_states[k][i] = out[j]
                # A state is never written through the updates of a later transform (a
                # momentum buffer may be the updates of a pure step).
                plan.exclude_leaves(out)
    return tree.unflatten(spec, new_u), [
        None if leaves is None else tree.unflatten(spec, leaves) for leaves in new_states
    ]


def _replicating() -> contextlib.AbstractContextManager[Any]:
    """For a group of ``DTensor`` leaves: a context in which plain tensors (step counts,
    bias corrections, per-tensor scalars kept as plain state) take part in their math as
    replicated values."""
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()
