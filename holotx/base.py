"""The contract every holotx transform keeps.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = holotx.apply_updates(params, updates)

``update`` never mutates its inputs. The one exception is opt-in *donation*: a caller that
will never read ``updates`` (the incoming gradients) or ``state`` again may pass
``donate=True``, and the transform is then free to write its outputs into those buffers,
as JAX does with donated arguments. ``donate_updates`` overrides that for the incoming
updates: ``True`` donates them alone (a :func:`~holotx.chain` passes it on when the
updates it hands to the next transform were freshly made by the previous one), and
``donate=True, donate_updates=False`` donates the state alone (a ``torch.optim`` adapter
must leave the ``.grad`` tensors as they were). A transform given ``donate=True`` never
returns updates that share memory with its state. ``params`` are never donated to
``update``; they are changed only by :func:`apply_updates` with ``inplace=True``. The
pure and donated paths run the same code: each elementwise op is given an ``inplace``
flag, never a second copy of the math.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from holotx import ops, tree

Params = Any
"""A pytree of tensors (dict, list, tuple, NamedTuple, nested)."""
Updates = Any
"""A pytree with the structure of ``Params``; ``None`` leaves mean "no gradient"."""
State = Any
"""A pytree of tensors and containers: everything a transform carries between steps."""


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> State: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: State, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, State]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``.

    Recognised extra keywords: ``donate`` and ``donate_updates`` (see the module
    docstring). Every transform accepts and ignores extras it does not know, so a chain
    can pass them on.
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


_CONTRACT_KEEPERS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def own_transform(init: TransformInitFn, update: TransformUpdateFn,
                  wrapped: tuple[GradientTransformation, ...] = ()) -> GradientTransformation:
    """A transform of holotx's own, registered as keeping the donation contract when every
    transform it wraps keeps it too: given ``donate=True``, its updates never share memory
    with its state, the params, or anything but the donated incoming updates. A chain may
    then let the next transform write into those updates without looking at their memory.
    A transform built elsewhere (a user's, written as optax's) is not registered, and a
    chain checks what its updates share before anything writes into them. (Traced by
    torch.compile, where nothing is written in place between transforms, nothing is
    registered.)"""
    if not torch.compiler.is_compiling() and all(keeps_donation_contract(t) for t in wrapped):
        _CONTRACT_KEEPERS.add(update)
    return GradientTransformation(init, update)


def keeps_donation_contract(tx: GradientTransformation) -> bool:
    """Whether ``tx`` was built by :func:`own_transform` from transforms that all keep the
    donation contract (never, under torch.compile: the compiler plans the buffers)."""
    return not torch.compiler.is_compiling() and tx.update in _CONTRACT_KEEPERS


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del params, extra
        return updates, state

    return own_transform(init, update)


def stateless(
    fn: Callable[[Updates, Params | None], Updates],
) -> GradientTransformation:
    """A transform from a function ``fn(updates, params) -> updates`` that keeps no state.

    ``fn`` must not modify its arguments; ``None`` leaves are its to handle.
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        return fn(updates, params), state

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False,
                  scale: ops.Scalar | None = None) -> Params:
    r"""Return ``params + updates`` (``params + scale * updates`` with ``scale``), each
    result in its parameter's dtype.

    ``None`` updates leave their parameter as it is. With ``inplace=True`` the parameter
    tensors are updated in place (``p += u``, grouped multi-tensor) and ``params`` itself
    is returned; do this only outside autograd, e.g. under ``torch.no_grad()``.
    """
    p_leaves, treespec = tree.flatten(params)
    u_leaves = tree.leaves_matching(updates, treespec, "updates", "params")
    tree.check_leaves(p_leaves, u_leaves, treespec, "params", "updates", dtype=False)
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if p is None and u is not None:
            path = tree.path_strings(treespec)[i]
            raise ValueError(f"params at {path} is None but updates has a tensor there")
    idx = [i for i, (p, u) in enumerate(zip(p_leaves, u_leaves)) if p is not None and u is not None]
    ps = [p_leaves[i] for i in idx]
    us = [u_leaves[i] if u_leaves[i].dtype == p_leaves[i].dtype else u_leaves[i].to(p_leaves[i].dtype)
          for i in idx]
    alpha = 1 if scale is None else scale
    if isinstance(alpha, torch.Tensor) and ops.host_scalars_ok([alpha]):
        alpha = alpha.item()  # eager on a CPU: a Python scalar takes the one-pass kernel
    if inplace:
        if not ps:
            return params
        if ops.foreach_supported(ps) and not isinstance(alpha, torch.Tensor):
            torch._foreach_add_(ps, us, alpha=alpha)
        else:
            for p, u in zip(ps, us):
                if isinstance(alpha, torch.Tensor):
                    p.add_(u * alpha)
                else:
                    p.add_(u, alpha=alpha)
        return params
    out = ops.add(ps, us, alpha=alpha)
    new = list(p_leaves)
    for i, p in zip(idx, out):
        new[i] = p
    return tree.unflatten(treespec, new)


FINAL_SCALE = "final_scale"
"""The extra keyword by which a caller that applies the updates itself (a donated
:func:`holotx.flat.make_step`, the adapter) asks the transform it calls, if that is a plain
scaling (:func:`~holotx.scale`, :func:`~holotx.scale_by_lr`,
:func:`~holotx.scale_by_schedule`) or a chain ending in one, to hand over its factor
instead of multiplying. The value is a :class:`FinalScale` addressed to one transform's
``update``; the factor is appended to its list, and the updates come back unscaled.
Applying ``p += factor * u`` then takes one pass over memory instead of two. Only
``chain`` (to its last transform), ``inject_hyperparams`` and ``lookahead`` (at steps where
nothing synchronises) readdress it to the transform they run; any other transform, a
user's own included, passes on a request that is not addressed to what it calls, so a
wrapper that forwards ``**extra`` and post-processes its inner updates gets them scaled."""


class FinalScale(NamedTuple):
    """A request to hand over the final scaling (see :data:`FINAL_SCALE`)."""

    target: Callable[..., Any]
    """The ``update`` function the request is addressed to."""
    factors: list[Any]
    """Where that transform appends its factor."""


def final_scale_request(update: Callable[..., Any], extra: dict[str, Any]) -> list[Any] | None:
    """The factor list of a :class:`FinalScale` in ``extra`` addressed to ``update``, else
    ``None``. A bare list is a request its caller handed straight to this transform
    (``tx.update(..., final_scale=factors)``); holotx's combinators never pass one on."""
    request = extra.get(FINAL_SCALE)
    if isinstance(request, FinalScale):
        return request.factors if request.target is update else None
    return request


def without_final_scale(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` without :data:`FINAL_SCALE`, for a transform that must not be deferred."""
    return {k: v for k, v in extra.items() if k != FINAL_SCALE}


def readdressed(extra: dict[str, Any], factors: list[Any] | None,
                inner: GradientTransformation) -> dict[str, Any]:
    """``extra`` for calling ``inner``: any request removed and, with ``factors``, a
    request addressed to ``inner`` in its place."""
    if factors is None and FINAL_SCALE not in extra:
        return extra
    extra = without_final_scale(extra)
    if factors is not None:
        extra[FINAL_SCALE] = FinalScale(inner.update, factors)
    return extra


def updates_donated(donate: bool, extra: dict[str, Any]) -> bool:
    """Whether ``update`` may overwrite its incoming updates: ``donate_updates`` when given
    (``donate=True, donate_updates=False`` donates the state alone), else ``donate``."""
    return bool(extra.get("donate_updates", donate))


def owns_memory(updates: Any, others: tuple[Any, ...]) -> bool:
    """Whether the updates own their memory: no leaf shares storage with another leaf or
    with any tensor in ``others`` (the caller's grads, params, old and new states). Then
    the next transform of a chain may write into them, saving an allocation and a pass.

    Decided only in plain eager mode; under autograd, functorch or compile the answer is
    False (there the cost is fused away, or in-place writes are not wanted).
    """
    if torch.compiler.is_compiling() or torch._C._functorch.get_interpreter_stack():
        return False
    leaves = [x for x in tree.flatten(updates)[0] if x is not None]
    held = [x for x in tree.flatten(others)[0] if isinstance(x, torch.Tensor)]
    # A DTensor has no storage of its own (its data pointer reads 0, as a fresh tensor's
    # would): nothing can be told about what it shares, so it is never taken as owned.
    # (Asked once per class: this runs between the transforms of every eager chain.)
    if any(map(ops.is_wrapper_type, {type(x) for x in leaves} | {type(x) for x in held})):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in leaves):
        return False
    # A view may share its base's memory at any offset: never taken for fresh. The others
    # are whole storages, named by their start (cheaper to read than a storage object).
    if any(x._base is not None or x.storage_offset() for x in leaves):
        return False
    # A 0-size tensor has a null data pointer and no memory to share: it is left out.
    pointers = [p for p in (x.data_ptr() for x in leaves) if p]
    if len(set(pointers)) != len(pointers):
        return False
    # Memory shared with the updates would be seen through a tensor of their dtype (step
    # counts and other integer state are skipped: that is most of the leaves of a state).
    dtypes = {x.dtype for x in leaves}
    taken = {_storage_start(x) for x in held if x.dtype in dtypes}
    return taken.isdisjoint(pointers)


def _storage_start(x: torch.Tensor) -> int:
    if x._base is None and not x.storage_offset():
        return x.data_ptr()
    return x.untyped_storage().data_ptr()


def init_counts(params: Params) -> Any:
    """One 0-d int64 step counter per tensor leaf, at zero, on the leaf's device: torch's
    per-parameter ``step``. A leaf without a gradient keeps its count, as torch.optim skips
    a parameter whose ``.grad`` is None."""
    return tree.map(lambda p: torch.zeros((), dtype=torch.int64, device=p.device), params)


def init_count(params: Params) -> torch.Tensor:
    """A 0-d int64 step counter at zero, on the device of the first parameter."""
    return torch.zeros((), dtype=torch.int64, device=tree.first_device(params))


def next_count(count: torch.Tensor, *, donate: bool = False) -> torch.Tensor:
    """``count + 1``; in place when the state is donated."""
    return count.add_(1) if donate else count + 1
