"""Where each leaf of a group's pytree state lives in ``optimizer.state[param]``.

torch.optim keeps its state per parameter (``state[p] = {"exp_avg": ..., "step": ...}``)
and every tool built on it (checkpoints, ``torch.distributed.checkpoint``, FSDP) expects
that layout. A holotx transform keeps one pytree over the group's list of params. A
:class:`StateLayout` maps one to the other: a leaf inside a list with one entry per
param belongs to that param, under a key made of the field names on its path
(``"mu"``, ``"inner_state.nu"``); any other tensor leaf (a group-wide step count) is the
group's, and is stored, the same tensor, under every param of the group.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import optree
import torch

from holotx import tree

__all__ = ["StateLayout"]


@dataclass(frozen=True)
class StateLayout:
    spec: optree.PyTreeSpec
    """The structure of the group's state (``None`` a leaf, as in :mod:`holotx.tree`)."""
    keys: tuple[str | None, ...]
    """Per leaf: its key in a param's state dict, or ``None`` for a non-tensor leaf."""
    owners: tuple[int | None, ...]
    """Per leaf: the index of its param in the group, or ``None`` for a group-wide leaf."""
    expected: tuple[tuple[torch.Size, torch.dtype, torch.device] | None, ...]
    """Per tensor leaf: the shape, dtype and device a loaded value must have."""
    template: Any
    """The state's containers with each leaf's index in its place: :meth:`build` fills
    them in plain Python, which torch.compile traces (it cannot call ``unflatten`` on a
    structure made outside the graph)."""

    @classmethod
    def of(cls, state: Any, params: list[torch.Tensor]) -> StateLayout:
        """The layout of ``state``, as returned by ``init(params)``. ``params`` are the
        real params: a leaf initialised on the meta device takes its param's device."""
        leaves, spec = tree.flatten(state)
        accessors = spec.accessors()
        n = len(params)
        # A list holding one entry per param: its path, and how many leaves it has.
        lists: dict[tuple[Any, ...], list[int]] = {}
        for a in accessors:
            entries = list(a)
            if entries and entries[-1].type is list:
                lists.setdefault(_path_key(entries[:-1]), []).append(entries[-1].entry)
        per_param = {path for path, idx in lists.items() if idx == list(range(n))}
        names: list[str | None] = []
        owners: list[int | None] = []
        for a, leaf in zip(accessors, leaves):
            entries = list(a)
            owner = None
            if entries and entries[-1].type is list and _path_key(entries[:-1]) in per_param:
                owner = entries[-1].entry
                entries = entries[:-1]
            owners.append(owner)
            names.append(_name(entries, short=True) if isinstance(leaf, torch.Tensor) else None)
        # Chain positions are left out of the names unless two leaves of one param would
        # then share a name (a chain of two momentum traces; Adam's per-param count and a
        # schedule's group-wide one): those take their full paths.
        group_wide = Counter(k for k, o in zip(names, owners) if k is not None and o is None)
        per_param = Counter((k, o) for k, o in zip(names, owners) if k is not None and o is not None)
        clashing = {k for k, n in group_wide.items() if n > 1}
        clashing |= {k for (k, _), n in per_param.items() if n > 1}
        clashing |= {k for k, _ in per_param} & set(group_wide)
        names = [_name(list(a), short=False, drop_last=o is not None) if k in clashing else k
                 for a, k, o in zip(accessors, names, owners)]
        expected = []
        for leaf, owner in zip(leaves, owners):
            if not isinstance(leaf, torch.Tensor):
                expected.append(None)
                continue
            device = leaf.device
            if device.type == "meta":
                device = params[owner if owner is not None else 0].device
            expected.append((leaf.shape, leaf.dtype, device))
        template = optree.tree_unflatten(spec, list(range(len(leaves))))
        return cls(spec, tuple(names), tuple(owners), tuple(expected), template)

    def build(self, leaves: list[Any]) -> Any:
        """The state with these leaves (in flattening order)."""
        if torch.compiler.is_compiling():
            return _fill(self.template, leaves)
        return optree.tree_unflatten(self.spec, leaves)  # (eager: a fourth of the time)

    def leaves(self, state: Any) -> list[Any]:
        """The leaves of a state the group's transform returned, in flattening order.
        Eager, one of this layout's structure whose leaves are tensors and ``None`` (every
        step's) is taken by :func:`holotx.tree.leaves_like` (``flatten_up_to``), a tenth of
        a flatten's time on adamw's state; anything else is flattened (the caller checks
        its leaf count)."""
        leaves = tree.leaves_like(state, self.spec, nested=True)
        return tree.flatten(state)[0] if leaves is None else leaves

    def keys_per_param(self, n: int) -> list[set[str]]:
        """The keys each of the ``n`` params of the group has in its state dict."""
        out: list[set[str]] = [set() for _ in range(n)]
        for key, owner in zip(self.keys, self.owners):
            if key is None:
                continue
            for i in range(n) if owner is None else (owner,):
                out[i].add(key)
        return out


def _fill(node: Any, leaves: list[Any]) -> Any:
    if isinstance(node, int):
        return leaves[node]
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_fill(x, leaves) for x in node))
    if isinstance(node, (tuple, list)):
        return type(node)(_fill(x, leaves) for x in node)
    if isinstance(node, dict):
        return type(node)((k, _fill(v, leaves)) for k, v in node.items())
    raise TypeError(f"cannot rebuild a state holding a {type(node).__name__}: register it as a pytree "
                    "of tuples, lists, dicts or NamedTuples")


def _path_key(entries: list[Any]) -> tuple[Any, ...]:
    return tuple((e.type, e.entry) for e in entries)


def _name(entries: list[Any], *, short: bool, drop_last: bool = False) -> str:
    if drop_last:
        entries = entries[:-1]
    parts = []
    for e in entries:
        fields = getattr(e.type, "_fields", None)
        if fields is not None:
            parts.append(fields[e.entry])
        elif issubclass(e.type, dict):
            parts.append(str(e.entry))
        elif not short:
            parts.append(f"[{e.entry}]")
    return ".".join(parts).replace(".[", "[") or "state"
