"""Run a list-level kernel over matched pytrees, one call per device/dtype group.

This is the plumbing every elementwise transform shares: flatten the updates once, check
that state and params line up with them (errors name the path), drop ``None`` gradients
(their state passes through untouched), group the rest by device and dtype (so foreach
kernels see homogeneous lists, as torch.optim's multi-tensor path does), call the kernel,
and put the trees back together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from holotx import tree

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
    elementwise: bool = False,
) -> tuple[Any, list[Any | None]]:
    """Apply ``kernel(g, *state_lists, p) -> (u, *new_state_lists)`` to grouped leaves.

    ``states`` are trees shaped like ``updates`` (or ``None`` for a buffer the transform
    does not keep: its list is ``None`` for the kernel and its result must be ``None``).
    ``p`` is the matching list of params, or ``None`` when ``params`` is ``None``; with
    ``needs_params=True`` a missing ``params`` is an error. Returns the updates tree and
    the list of new state trees.

    ``elementwise=True`` declares that each output element depends only on the input
    elements at the same position (no per-tensor reductions). On the CPU, outside
    autograd, functorch and compile, the kernel is then run over cache-sized blocks of
    the leaves (see :func:`_run_blockwise`), so its chain of ops reads main memory once.
    """
    names = list(state_names) or [f"state[{k}]" for k in range(len(states))]
    g_leaves, spec = tree.flatten(updates)
    state_leaves: list[list[Any] | None] = []
    for name, st in zip(names, states):
        if st is None:
            state_leaves.append(None)
            continue
        leaves = tree.leaves_matching(st, spec, name, "updates")
        tree.check_leaves(g_leaves, leaves, spec, "updates", name)
        state_leaves.append(leaves)
    if params is None:
        if needs_params:
            raise ValueError("this transform needs params: call update(updates, state, params)")
        p_leaves = None
    else:
        p_leaves = tree.leaves_matching(params, spec, "params", "updates")
        tree.check_leaves(g_leaves, p_leaves, spec, "updates", "params")
        for path, g, p in zip(tree.path_strings(spec), g_leaves, p_leaves):
            if g is not None and p is None:
                raise ValueError(f"params at {path} is None but updates has a tensor there")

    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, g in enumerate(g_leaves):
        if g is not None:
            for k, leaves in enumerate(state_leaves):
                if leaves is not None and leaves[i] is None:
                    raise ValueError(f"{names[k]} has no entry at {tree.path_strings(spec)[i]}, "
                                     "where updates has a tensor: was init given this leaf?")
            groups.setdefault((g.device, g.dtype), []).append(i)

    new_u: list[Any] = [None] * len(g_leaves)
    new_states = [None if leaves is None else list(leaves) for leaves in state_leaves]
    for (device, _), idx in groups.items():
        inputs = [
            [g_leaves[i] for i in idx],
            *[None if leaves is None else [leaves[i] for i in idx] for leaves in state_leaves],
            None if p_leaves is None else [p_leaves[i] for i in idx],
        ]
        if elementwise and _blockwise_ok(device, inputs):
            outs = _run_blockwise(kernel, inputs)
        else:
            outs = kernel(*inputs)
        for j, i in enumerate(idx):
            new_u[i] = outs[0][j]
        for k, out in enumerate(outs[1:]):
            if new_states[k] is not None:
                for j, i in enumerate(idx):
                    new_states[k][i] = out[j]
    return tree.unflatten(spec, new_u), [
        None if leaves is None else tree.unflatten(spec, leaves) for leaves in new_states
    ]


BLOCK_ELEMENTS = 1 << 16
"""Elements per tensor in one block of :func:`_run_blockwise`: a kernel's half-dozen
live float32 blocks then take about 2 MB, an L2 cache."""


def _blockwise_ok(device: torch.device, inputs: list[list[torch.Tensor] | None]) -> bool:
    if device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.get_interpreter_stack():
        return False
    tensors = [x for lst in inputs if lst is not None for x in lst]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    if not all(x.is_contiguous() for x in tensors):
        return False
    return sum(x.numel() for x in inputs[0]) > BLOCK_ELEMENTS


def _run_blockwise(kernel: Kernel, inputs: list[list[torch.Tensor] | None]) -> tuple[Any, ...]:
    """Run an elementwise kernel block by block and assemble whole-leaf outputs.

    On a CPU each op of a kernel is a pass over main memory, and foreach ops make one
    pass per op over every tensor. Feeding the kernel blocks of about
    ``BLOCK_ELEMENTS`` elements (slices of big leaves, or runs of small ones) keeps its
    intermediates in cache: main memory sees the reads of the inputs and the writes of
    the outputs. An output block the kernel wrote in place into an input block makes the
    whole output that input tensor; any other output block is copied into a fresh
    whole-leaf output.
    """
    leaves = inputs[0]
    flat = [None if lst is None else [x.view(-1) for x in lst] for lst in inputs]
    blocks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    filled = 0
    for leaf, x in enumerate(leaves):
        start, n = 0, x.numel()
        if n == 0:  # nothing to compute, but the leaf still needs its (empty) outputs
            current.append((leaf, 0, 0))
        while start < n:
            stop = min(n, start + BLOCK_ELEMENTS - filled)
            current.append((leaf, start, stop))
            filled += stop - start
            start = stop
            if filled >= BLOCK_ELEMENTS:
                blocks.append(current)
                current, filled = [], 0
    if current:
        blocks.append(current)

    outputs: list[list[Any] | None] = []
    for block in blocks:
        pieces = [None if lst is None else [lst[leaf][a:b] for leaf, a, b in block] for lst in flat]
        outs = kernel(*pieces)
        if not outputs:
            outputs = [None if out is None else [None] * len(leaves) for out in outs]
        for out, assembled in zip(outs, outputs):
            if out is None:
                continue
            for j, (leaf, a, b) in enumerate(block):
                piece = out[j]
                source = next((i for i, lst in enumerate(pieces) if lst is not None and lst[j] is piece),
                              None)
                if source is not None:  # written in place: the output is that input
                    assembled[leaf] = inputs[source][leaf]
                    continue
                if assembled[leaf] is None:
                    like = leaves[leaf]
                    assembled[leaf] = torch.empty(like.shape, dtype=piece.dtype, device=like.device)
                assembled[leaf].view(-1)[a:b].copy_(piece)
    return tuple(outputs)
