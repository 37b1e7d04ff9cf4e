"""Pytree helpers on optree: flatten once, map, compare with errors that name the path.

Every helper treats ``None`` as a leaf (``none_is_leaf=True``): a ``None`` gradient is a
leaf that says "no gradient here", and it lines up with the parameter and state leaves at
the same path. Nothing here broadcasts: two trees that differ in structure, or leaves that
differ in shape, dtype or device, raise a ``ValueError`` naming the offending path.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from optree import PyTreeSpec

__all__ = [
    "PyTreeSpec",
    "batch_dims",
    "check_leaves",
    "detach",
    "find_states",
    "first_device",
    "flatten",
    "leaves",
    "leaves_like",
    "leaves_matching",
    "map",
    "path_strings",
    "structure",
    "unflatten",
    "zeros_like",
]


def flatten(tree: Any) -> tuple[list[Any], PyTreeSpec]:
    """Leaves (``None`` included) and the structure of ``tree``.

    Args:
        tree: a pytree (dicts, lists, tuples, NamedTuples).

    Returns:
        ``(leaves, treespec)``: the leaves in order, ``None`` included, and the structure.

    Example:
        >>> import torch
        >>> import holotx
        >>> leaves, spec = holotx.tree.flatten({"b": torch.zeros(1), "a": None})
        >>> leaves
        [None, tensor([0.])]
        >>> holotx.tree.path_strings(spec)
        ["['a']", "['b']"]
    """
    if torch.compiler.is_compiling() and _needs_boxes(tree) & _NEEDS_BOXES:
        leaves, spec = optree.tree_flatten(_box_constants(tree), none_is_leaf=True)
        return [x.value if isinstance(x, _Boxed) else x for x in leaves], spec
    return optree.tree_flatten(tree, none_is_leaf=True)


def leaves(tree: Any) -> list[Any]:
    """The leaves of ``tree`` (``None`` included), in :func:`flatten`'s order, without its
    structure.

    Traced by ``torch.compile``, a tree of dicts (with string keys), lists, tuples and
    NamedTuples holding tensors, ``None`` and numbers is walked here, where optree's
    flattening would run as Python building a structure that nobody reads.

    Args:
        tree: a pytree.

    Returns:
        Its leaves in order, ``None`` included.

    Example:
        >>> import torch
        >>> import holotx
        >>> holotx.tree.leaves({"b": torch.zeros(1), "a": None})
        [None, tensor([0.])]
    """
    if torch.compiler.is_compiling():
        found: list[Any] = []
        if _traced_leaves(tree, found):
            return found
        return flatten(tree)[0]
    return optree.tree_leaves(tree, none_is_leaf=True)


def _traced_leaves(node: Any, found: list[Any]) -> bool:
    """Append the leaves of ``node`` to ``found`` in optree's order, and return ``True``;
    ``False`` at the first node this walk does not know as optree does (a dict with keys
    other than strings, a subclass of a container, another registered node type)."""
    kind = type(node)
    if kind is dict:
        keys = list(node)
        for key in keys:
            if type(key) is not str:
                return False
        # (optree orders a dict's entries by key; loops, not all() of a generator: see _needs_boxes)
        for key in sorted(keys):  # noqa: SIM110
            if not _traced_leaves(node[key], found):
                return False
        return True
    if kind is list or kind is tuple or (kind.__bases__ == (tuple,) and hasattr(kind, "_fields")):
        for value in node:  # noqa: SIM110
            if not _traced_leaves(value, found):
                return False
        return True
    if node is None or isinstance(node, torch.Tensor) or kind in (bool, int, float, str):
        found.append(node)
        return True
    return False


def structure(tree: Any) -> PyTreeSpec:
    """The structure of ``tree`` (``None`` leaves included), as :func:`flatten` gives it.

    Args:
        tree: a pytree.

    Returns:
        Its :class:`PyTreeSpec`.

    Example:
        >>> import holotx
        >>> holotx.tree.structure({"w": 1, "b": [2, None]}).num_leaves
        3
    """

    return flatten(tree)[1]


def unflatten(treespec: PyTreeSpec, leaves: Sequence[Any]) -> Any:
    """The tree of structure ``treespec`` with the given leaves (the inverse of :func:`flatten`).

    Args:
        treespec: the structure, from :func:`flatten` or :func:`structure`.
        leaves: one value per leaf, in order.

    Returns:
        The tree.

    Example:
        >>> import holotx
        >>> leaves, spec = holotx.tree.flatten({"w": 1, "b": [2, None]})
        >>> holotx.tree.unflatten(spec, [10 * x if x is not None else None for x in leaves])
        {'w': 10, 'b': [20, None]}
    """

    if torch.compiler.is_compiling() and not _all_tensors(leaves) and (
            not _made_in_trace(treespec) or _spec_needs_boxes(treespec, leaves, 0)[0] & _NEEDS_BOXES):
        boxed = [x if isinstance(x, torch.Tensor) else _Boxed(x) for x in leaves]
        return _unbox(optree.tree_unflatten(treespec, boxed))
    return optree.tree_unflatten(treespec, leaves)


class _Boxed:
    """Holds a non-tensor leaf (``None``, a bool, a label) while torch.compile flattens or
    unflattens a tree.

    torch 2.13's dynamo cannot flatten or unflatten a dict whose leaves are all constants
    ("unhashable type: 'list'", "SourcelessBuilder ... DictMetaData"), which masks,
    partitions and frozen submodules produce. A plain object is no constant to dynamo, so
    the tree goes through boxed, then is unboxed, every container keeping its type and
    order."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _map_containers(node: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to every node below dicts, lists, tuples and NamedTuples."""
    if isinstance(node, dict):
        return type(node)((key, _map_containers(value, fn)) for key, value in node.items())
    if isinstance(node, list):
        return [_map_containers(value, fn) for value in node]
    if isinstance(node, tuple):
        values = [_map_containers(value, fn) for value in node]
        return type(node)(*values) if hasattr(node, "_fields") else tuple(values)
    return fn(node)


_HOLDS_TENSOR, _HOLDS_NON_TENSOR, _NEEDS_BOXES = 1, 2, 4


def _needs_boxes(node: Any) -> int:
    """What ``node`` holds, as flags: ``_NEEDS_BOXES`` where a dict (at any depth) holds
    no tensor, which dynamo cannot flatten unboxed (:class:`_Boxed`). Traced, any other
    tree (of tensors, NamedTuples holding ``None`` among them) goes to optree as it is:
    rebuilding every container boxed costs dynamo as much as the flattening itself."""
    if isinstance(node, dict):
        values: Any = node.values()
    elif isinstance(node, (list, tuple)):
        values = node
    else:
        return _HOLDS_TENSOR if isinstance(node, torch.Tensor) else _HOLDS_NON_TENSOR
    held = 0
    for value in values:  # (a loop: dynamo traces a generator expression at far greater cost)
        held |= _needs_boxes(value)
    if isinstance(node, dict) and held & (_HOLDS_TENSOR | _HOLDS_NON_TENSOR) == _HOLDS_NON_TENSOR:
        held |= _NEEDS_BOXES
    return held


def _made_in_trace(treespec: PyTreeSpec) -> bool:
    """Traced, whether ``treespec`` is dynamo's Python stand-in for a structure, made by a
    flattening within the trace: one made outside it (handed in by the caller) is optree's
    C++ object, whose methods dynamo cannot call without breaking the graph."""
    return type(treespec) is not optree.PyTreeSpec


def _all_tensors(leaves: Sequence[Any]) -> bool:
    for x in leaves:  # noqa: SIM110 (a generator costs dynamo more)
        if not isinstance(x, torch.Tensor):
            return False
    return True


def _spec_needs_boxes(treespec: PyTreeSpec, leaves: Sequence[Any], at: int) -> tuple[int, int]:
    """:func:`_needs_boxes` of the tree that ``treespec`` and ``leaves`` (from index
    ``at``) would make, and the index after its leaves."""
    if treespec.type is None:  # (a leaf; a property, where is_leaf() is a call for dynamo)
        return (_HOLDS_TENSOR if isinstance(leaves[at], torch.Tensor) else _HOLDS_NON_TENSOR), at + 1
    held = 0
    for child in treespec.children():
        flags, at = _spec_needs_boxes(child, leaves, at)
        held |= flags
    if issubclass(treespec.type, dict) and held & (_HOLDS_TENSOR | _HOLDS_NON_TENSOR) == _HOLDS_NON_TENSOR:
        held |= _NEEDS_BOXES
    return held, at


def _box_constants(tree: Any) -> Any:
    return _map_containers(tree, lambda x: _Boxed(x) if x is None or isinstance(x, (bool, int, float, str))
                           else x)


def _unbox(tree: Any) -> Any:
    return _map_containers(tree, lambda x: x.value if isinstance(x, _Boxed) else x)


def path_strings(treespec: PyTreeSpec) -> list[str]:
    """Each leaf's path as Python would index it, e.g. ``['layer'][0].weight``.

    Args:
        treespec: a structure.

    Returns:
        One string per leaf, ``<root>`` for a tree that is a single leaf.

    Example:
        >>> import holotx
        >>> holotx.tree.path_strings(holotx.tree.structure({"layer": [{"weight": 0}, 1]}))
        ["['layer'][0]['weight']", "['layer'][1]"]
    """
    return [a.codify("") or "<root>" for a in treespec.accessors()]


def _entry_string(node_type: type, entry: Any) -> str:
    fields = getattr(node_type, "_fields", None)
    if fields is not None and isinstance(entry, int):
        return f".{fields[entry]}"
    return f"[{entry!r}]"


def _first_difference(a: PyTreeSpec, b: PyTreeSpec, path: str = "") -> str | None:
    """The path of the first node where two structures differ (container type, keys,
    or arity), or ``None`` if they are equal."""
    if a.is_leaf() or b.is_leaf():
        if a.is_leaf() and b.is_leaf():
            return None
        return path or "<root>"
    if a.type != b.type or a.entries() != b.entries():
        return path or "<root>"
    for entry, ca, cb in zip(a.entries(), a.children(), b.children()):
        found = _first_difference(ca, cb, path + _entry_string(a.type, entry))
        if found is not None:
            return found
    return None


def _describe_mismatch(ref: PyTreeSpec, other_tree: Any, ref_name: str, other_name: str) -> str:
    ref_paths = set(ref.paths())
    try:
        other = structure(other_tree)
        other_paths = set(other.paths())
        other_names = dict(zip(other.paths(), path_strings(other)))
    except Exception:
        return f"{other_name} is not a pytree like {ref_name} ({ref})"
    names = dict(zip(ref.paths(), path_strings(ref)))
    missing = sorted(names[p] for p in ref_paths - other_paths)
    extra = sorted(other_names[p] for p in other_paths - ref_paths)
    parts = []
    if missing:
        parts.append(f"{other_name} lacks {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        parts.append(f"{other_name} has {', '.join(extra[:5])} that {ref_name} lacks"
                     + (" ..." if len(extra) > 5 else ""))
    if not parts:
        where = _first_difference(ref, other)
        parts.append(f"the containers differ at {where}: {ref_name} is {ref}, {other_name} is {other}")
    return f"{other_name} does not match the structure of {ref_name}: " + "; ".join(parts)


_ONE_LEVEL_NODES = frozenset({dict, list, tuple})
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
"""The tensor classes that are certainly leaves of a plain tensor (no subclass, no DTensor)."""
_TENSOR_LEAVES = _PLAIN_TENSORS | {type(None)}


def leaves_like(tree: Any, treespec: PyTreeSpec, *, nested: bool = False) -> list[Any] | None:
    """The leaves of ``tree`` if it is, without doubt, of structure ``treespec`` and one
    ``dict``, ``list`` or ``tuple`` of plain tensors and ``None`` (the usual params, grads
    and per-leaf state); else ``None``, and the caller flattens it (:func:`leaves_matching`
    names any difference). A quarter of :func:`flatten`'s time on a small model:
    ``treespec.flatten_up_to`` checks the keys (or the length) without reading every
    leaf's type against optree's registry, and the leaves' types are checked here.
    Traced by ``torch.compile``, a walk of ``treespec`` that requires every container of
    the same class, at every depth (see :func:`_traced_leaves_in`).

    Args:
        tree: the tree whose leaves are wanted.
        treespec: the structure it is expected to have (from :func:`flatten`).
        nested: take a tree of any depth too, each container matched as
            ``flatten_up_to`` matches it (a dict's values by key, whatever kind of dict:
            for a reader that needs the leaves in ``treespec``'s order, not the same
            containers). Default ``False``.

    Returns:
        Its leaves in ``treespec``'s order (dict values by key), or ``None`` when this quick
        path cannot tell (another structure, a nested tree in eager mode, a leaf that is not
        a plain tensor or ``None``).

    Example:
        >>> import torch
        >>> import holotx
        >>> spec = holotx.tree.structure({"w": torch.zeros(1), "b": None})
        >>> holotx.tree.leaves_like({"w": torch.ones(1), "b": None}, spec)
        [None, tensor([1.])]
        >>> holotx.tree.leaves_like({"w": [torch.ones(1)], "b": None}, spec) is None
        True
    """
    if not treespec.none_is_leaf:
        return None
    if torch.compiler.is_compiling():
        if not _made_in_trace(treespec):
            return None
        leaves: list[Any] = []
        return leaves if _traced_leaves_in(tree, treespec, leaves) else None
    kind = type(tree)
    if not nested and (kind not in _ONE_LEVEL_NODES or treespec.type is not kind
                       or treespec.num_nodes != treespec.num_leaves + 1):
        return None
    try:
        leaves = treespec.flatten_up_to(tree)
    except ValueError:  # (other keys or length: flatten names the difference)
        return None
    return leaves if _TENSOR_LEAVES.issuperset(builtins.map(type, leaves)) else None


def _traced_leaves_in(node: Any, treespec: PyTreeSpec, leaves: list[Any]) -> bool:
    """Traced by ``torch.compile``: append the leaves of ``node`` to ``leaves`` and return
    ``True`` if it has exactly the structure ``treespec`` (every container of the same
    class: dicts with the same keys, lists, tuples, NamedTuples of the same length) and
    its leaves are plain tensors or ``None``; ``False`` where it cannot tell (the caller
    flattens, and names any difference). Dynamo runs optree's flattening as Python, a
    new structure built node by node, at about twenty times the cost of this walk, and a
    step flattens each of its states."""
    if treespec.type is None:  # (a leaf)
        if node is None or type(node) is torch.Tensor or type(node) is torch.nn.Parameter:
            leaves.append(node)
            return True
        return False
    kind = treespec.type
    if type(node) is not kind:
        return False
    children = treespec.children()
    if kind is dict:
        keys = treespec.entries()
        if len(node) != len(keys):
            return False
        for key, child in zip(keys, children):
            if key not in node or not _traced_leaves_in(node[key], child, leaves):
                return False
        return True
    if kind is list or kind is tuple or (issubclass(kind, tuple) and hasattr(kind, "_fields")):
        if len(node) != len(children):
            return False
        for value, child in zip(node, children):  # noqa: SIM110 (a generator costs dynamo more)
            if not _traced_leaves_in(value, child, leaves):
                return False
        return True
    return False  # (another node type: optree's own rules)


def _same_key_order(tree: Any, other: Any) -> bool:
    """Whether every dict of ``tree`` lists its keys in the order of ``other``'s dict at the
    same place (the two of one structure): a structure rebuilds its dicts in the order of
    the tree it was made from."""
    if type(tree) is dict:
        if list(tree) != list(other):
            return False
        pairs: Any = zip(tree.values(), other.values())
    elif isinstance(tree, (list, tuple)):
        pairs = zip(tree, other)
    else:
        return True
    for a, b in pairs:  # noqa: SIM110 (a generator costs dynamo more)
        if not _same_key_order(a, b):
            return False
    return True


def leaves_matching(tree: Any, treespec: PyTreeSpec, name: str, ref_name: str) -> list[Any]:
    """Leaves of ``tree``, which must have exactly the structure ``treespec``.

    Args:
        tree: the tree whose leaves are wanted.
        treespec: the structure it must have.
        name: what ``tree`` is, for the error message.
        ref_name: what ``treespec`` describes, for the error message.

    Returns:
        The leaves of ``tree``; ``ValueError`` naming the first differing path if the
        structure differs.

    Example:
        >>> import holotx
        >>> spec = holotx.tree.structure({"w": 0, "b": 0})
        >>> holotx.tree.leaves_matching({"w": 1, "b": 2}, spec, "grads", "params")
        [2, 1]
        >>> holotx.tree.leaves_matching({"w": 1}, spec, "grads", "params")
        Traceback (most recent call last):
            ...
        ValueError: grads does not match the structure of params: grads lacks ...
    """
    leaves = leaves_like(tree, treespec)
    if leaves is not None:
        return leaves
    leaves, spec = flatten(tree)
    if spec != treespec:
        raise ValueError(_describe_mismatch(treespec, tree, ref_name, name))
    return leaves


def check_leaves(
    ref: Sequence[Any],
    other: Sequence[Any],
    treespec: PyTreeSpec,
    ref_name: str,
    other_name: str,
    *,
    dtype: bool = True,
    shape: bool = True,
    device: bool = True,
) -> None:
    """Raise ``ValueError`` naming the first path whose leaves differ in shape (with
    ``shape=True``), device (with ``device=True``) or dtype (with ``dtype=True``). ``None``
    on either side is not compared.

    Args:
        ref: the reference leaves.
        other: the leaves to check, one per reference leaf.
        treespec: their common structure (for the paths in the message).
        ref_name: what ``ref`` is, for the message.
        other_name: what ``other`` is, for the message.
        dtype: compare dtypes (default ``True``).
        shape: compare shapes (default ``True``).
        device: compare devices (default ``True``).

    Returns:
        ``None``; raises ``ValueError`` at the first difference.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.zeros(3)}
        >>> leaves, spec = holotx.tree.flatten(params)
        >>> holotx.tree.check_leaves(leaves, [torch.zeros(4)], spec, "params", "grads")
        Traceback (most recent call last):
            ...
        ValueError: grads at ['w'] has shape (4,) where params has (3,)
    """
    for i, (a, b) in enumerate(zip(ref, other)):
        if a is None or b is None:
            continue
        if not isinstance(b, torch.Tensor):
            raise ValueError(f"{other_name} at {path_strings(treespec)[i]} is a {type(b).__name__}, "
                             "not a tensor")
        what = None
        if shape and a.shape != b.shape:
            what = f"shape {tuple(b.shape)} where {ref_name} has {tuple(a.shape)}"
        elif device and a.device != b.device:
            what = f"device {b.device} where {ref_name} has {a.device}"
        elif dtype and a.dtype != b.dtype:
            what = f"dtype {b.dtype} where {ref_name} has {a.dtype}"
        if what is not None:
            raise ValueError(f"{other_name} at {path_strings(treespec)[i]} has {what}")


FLAT_BUFFER_MARK = "_holotx_flat_buffer"
"""The attribute :class:`holotx.flat.FlatLayout` sets on the buffers it binds params to:
many tensors packed into one, which a per-tensor rule must not take for one tensor."""

_SEGMENTS: Any = None


def _segments_registry() -> Any:
    global _SEGMENTS
    if _SEGMENTS is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _SEGMENTS = WeakTensorKeyDictionary()
    return _SEGMENTS


def set_segments(x: Any, segments: Any) -> None:
    """Remember that ``x``, a buffer made by an aligned :class:`holotx.flat.FlatLayout`,
    packs tensors as ``segments`` say: a rule that keeps a value per tensor in its state
    (TAdam's weight sum) sizes it from them at ``init``. Kept beside the tensor (a weak
    key), not on it: an attribute would be pickled with the tensor, and
    ``torch.load(weights_only=True)`` refuses it."""
    _segments_registry()[x] = segments


def segments_of(x: Any) -> Any:
    """The :class:`holotx.flat.Segments` of a buffer made by an aligned layout, else ``None``."""
    if not isinstance(x, torch.Tensor):
        return None
    return _segments_registry().get(x)


def _path_of(tree: Any, i: int) -> str:
    """The path of ``tree``'s leaf ``i``, for a message."""
    return path_strings(flatten(tree)[1])[i]


def check_whole_tensors(params: Any, rule: str, *, flat_ok: bool = False) -> None:
    """Refuse params that pack several tensors into one for ``rule``, which reduces over
    whole tensors.

    ``FullyShardedDataParallel`` (FSDP1) concatenates a module's tensors into one flat
    parameter and gives each rank a slice of it, so a norm, sum or cosine per tensor
    would silently be taken over a slice that mixes tensors. FSDP2's ``fully_shard``
    keeps each parameter a ``DTensor``, over which holotx reduces the whole tensor.
    The flat buffers that :meth:`holotx.flat.FlatLayout.bind` makes are refused too,
    unless ``flat_ok`` (the rule was told where the tensors lie, or its reduction is
    over everything anyway).
    """
    if params is None:
        return
    for i, p in enumerate(leaves(params)):
        if not flat_ok and getattr(p, FLAT_BUFFER_MARK, False):
            raise ValueError(
                f"{rule} computes per-tensor norms, sums or cosines, but params at {_path_of(params, i)} "
                "is a flat buffer packing several tensors (FlatLayout.bind): this rule has no flat path "
                "(pass segments= where it takes them), run it on the tensors themselves")
        # FSDP1 marks its flat parameters (_is_flat_param) and, with use_orig_params=True,
        # the per-tensor views into their shards (_fsdp_flattened).
        if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
            raise ValueError(
                f"{rule} computes per-tensor norms, sums or cosines, but params at "
                f"{_path_of(params, i)} is sharded by FSDP1 (FullyShardedDataParallel), whose "
                "flat shards hide the tensors' boundaries: use FSDP2 "
                "(torch.distributed.fsdp.fully_shard), whose DTensor params holotx reduces whole; "
                "elementwise rules (sgd, adam, adamw, adabelief, adan, ademamix) run under FSDP1")


def map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` applied leafwise; a ``None`` leaf in ``tree`` stays ``None``.

    Args:
        fn: the function, called with one leaf of ``tree`` and the matching leaves of ``rest``.
        tree: the tree whose structure the result takes.
        *rest: more trees of the same structure.

    Returns:
        The tree of ``fn``'s results.

    Example:
        >>> import torch
        >>> import holotx
        >>> params, grads = {"w": torch.ones(2), "b": None}, {"w": torch.ones(2), "b": None}
        >>> holotx.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        {'w': tensor([0.5000, 0.5000]), 'b': None}
    """
    leaves, spec = flatten(tree)
    others = [leaves_matching(r, spec, f"tree {k + 1}", "tree 0") for k, r in enumerate(rest)]
    out = [None if x is None else fn(x, *(o[i] for o in others)) for i, x in enumerate(leaves)]
    return unflatten(spec, out)


def batch_dims(tree: Any, dim: int = 0) -> Any:
    """``dim`` at every tensor leaf of ``tree``, ``None`` elsewhere: the ``in_dims`` or
    ``out_dims`` for a batch of optimizer states under ``torch.func.vmap``, e.g.
    ``vmap(tx.init, out_dims=batch_dims(tx.init(one_member)))``. vmap refuses a plain
    ``0`` for a state holding ``None`` (Adam's ``nu_max`` without AMSGrad).

    Args:
        tree: a tree (an optimizer state).
        dim: the batch dimension (default ``0``).

    Returns:
        A tree of ``dim`` and ``None``, for ``in_dims``/``out_dims``.

    Example:
        >>> import torch
        >>> from torch.func import vmap
        >>> import holotx
        >>> tx = holotx.adam(lr=0.1)
        >>> one = tx.init({"w": torch.zeros(3)})
        >>> holotx.tree.batch_dims(one)[0]
        ScaleByAdamState(count={'w': 0}, mu={'w': 0}, nu={'w': 0}, nu_max=None)
        >>> states = vmap(tx.init, out_dims=holotx.tree.batch_dims(one))({"w": torch.zeros(4, 3)})
        >>> states[0].mu["w"].shape
        torch.Size([4, 3])
    """
    return map(lambda x: dim if isinstance(x, torch.Tensor) else None, tree)


def detach(tree: Any) -> Any:
    """``tree`` with every tensor leaf detached (non-tensor leaves as they are): between
    steps of a differentiated loop, ``state = holotx.tree.detach(state)`` stops gradients
    through the optimizer's history (first-order MAML), while the step itself stays
    differentiable. Works under ``torch.func`` transforms too.

    Args:
        tree: the tree (a state, say).

    Returns:
        The tree, tensors detached.

    Example:
        >>> import torch
        >>> import holotx
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> state = {"mu": lr * torch.ones(2), "count": 3}
        >>> holotx.tree.detach(state)["mu"].requires_grad
        False
    """
    return map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def zeros_like(tree: Any, dtype: torch.dtype | None = None) -> Any:
    """Zeros shaped like each tensor leaf (``None`` stays ``None``).

    Args:
        tree: the tree.
        dtype: the zeros' dtype (default ``None``: each leaf's own).

    Returns:
        The tree of zeros.

    Example:
        >>> import torch
        >>> import holotx
        >>> holotx.tree.zeros_like({"w": torch.ones(2), "b": None}, dtype=torch.float64)
        {'w': tensor([0., 0.], dtype=torch.float64), 'b': None}
    """
    return map(lambda x: torch.zeros_like(x, dtype=dtype, memory_format=torch.preserve_format), tree)


def first_device(tree: Any) -> torch.device:
    """The device of the first tensor leaf, CPU if there is none.

    Args:
        tree: the tree.

    Returns:
        A ``torch.device``.

    Example:
        >>> import torch
        >>> import holotx
        >>> holotx.tree.first_device({"a": None, "b": torch.zeros(1)}), holotx.tree.first_device({})
        (device(type='cpu'), device(type='cpu'))
    """
    for x in leaves(tree):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")




def find_states(state: Any, cls: type) -> list[Any]:
    """Every sub-state of type ``cls`` inside a (nested) state: the states of one kind of
    block in a chain, e.g. ``find_states(state, holotx.ScaleByAdamState)`` to read or log
    the moments of an optimizer built by ``chain``. Searches tuples (NamedTuples included),
    lists and dicts, depth first, in order.

    Args:
        state: the state to search.
        cls: the state type to find (a NamedTuple class).

    Returns:
        The sub-states of type ``cls``, in order.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.chain(holotx.clip_by_global_norm(1.0), holotx.adamw(1e-3))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> [s.mu["w"] for s in holotx.tree.find_states(state, holotx.ScaleByAdamState)]
        [tensor([0., 0.])]
    """
    if isinstance(state, cls):
        return [state]
    if isinstance(state, dict):
        return [s for v in state.values() for s in find_states(v, cls)]
    if isinstance(state, (tuple, list)):
        return [s for v in state for s in find_states(v, cls)]
    return []
