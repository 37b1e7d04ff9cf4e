"""The contract every holotx transform keeps.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = holotx.apply_updates(params, updates)

``update`` never mutates its inputs. The one exception is opt-in *donation*: a caller that
will never read ``updates`` (the incoming gradients) or ``state`` again may pass
``donate=True`` to a holotx transform, which may then write its outputs into those
buffers, as JAX does with donated arguments. ``donate_updates`` overrides that for the
incoming updates: ``True`` donates them alone, and ``donate=True, donate_updates=False``
donates the state alone (a ``torch.optim`` adapter must leave the ``.grad`` tensors as
they were). Donated, the updates returned never share memory with the new state.
``params`` are never donated to ``update``; they are changed only by
:func:`apply_updates` with ``inplace=True``.

The pure and donated paths run the same math: a transform states its rule once, and
:mod:`holotx.executor` decides which buffers may be written (see there). A transform
written elsewhere, as optax's are, is always run pure and needs to know none of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from holotx import executor, ops, tree

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

    holotx's transforms take ``donate`` and ``donate_updates`` (see the module docstring).
    Every transform accepts and ignores extra keywords it does not know, so a chain can
    pass them on.

    Args:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params=None, **extra) -> (updates, state)``.

    Example:
        >>> import torch
        >>> import holotx
        >>> def init(params):
        ...     return holotx.EmptyState()
        >>> def update(updates, state, params=None, **extra):
        ...     return holotx.tree.map(lambda u: 2 * u, updates), state
        >>> double = holotx.GradientTransformation(init, update)  # a transform written as in optax
        >>> tx = holotx.chain(double, holotx.sgd(lr=0.1))
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
        >>> updates["w"]
        tensor([-0.2000, -0.2000])
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transform.

    Example:
        >>> import torch
        >>> import holotx
        >>> holotx.scale(2.0).init({"w": torch.zeros(2)})
        EmptyState()
    """


def own_transform(init: TransformInitFn, update: TransformUpdateFn,
                  prepare: Callable[[State, Params], None] | None = None, *,
                  scaling: bool = False, leafwise: bool = False, count_fields: int = 0,
                  kept_fields: dict[str, tuple[bool, str]] | None = None,
                  state_type: type | None = None) -> GradientTransformation:
    """A transform of holotx's own: ``update`` is its math, run by :mod:`holotx.executor`
    (pure by default, or with ``donate=True`` / ``donate_updates``; within the caller's
    step when a combinator runs it). ``prepare(state, params)`` evaluates its schedules
    (and prepares what it wraps) before any transform of the step writes a buffer (see
    :func:`holotx.executor.register`). A transform built elsewhere (a user's, written as
    optax's) is a plain :class:`GradientTransformation` and is always run pure.
    ``scaling=True`` declares that ``update`` multiplies each leaf by one value, and
    ``leafwise=True`` that it may run on a batch of leaves at a time, the first
    ``count_fields`` fields of its state step counts; ``kept_fields`` says which optional
    fields of its state its options keep, ``{field: (kept, "option=value")}``; and
    ``state_type``, the class of the state ``init`` returns, lets a state of another class
    be refused before this transform's ``init`` has run in the process (a checkpoint
    loaded into a fresh one; else the class is recorded when ``init`` first runs). See
    :func:`holotx.executor.register`."""
    recorded: list[type] = [] if state_type is None else [state_type]

    def recording_init(params: Params) -> State:
        state = init(params)
        # (A stateless transform's EmptyState is not checked: it takes what it is given.)
        if not recorded and not isinstance(state, EmptyState):
            recorded.append(type(state))
        return state

    recording_init.__doc__ = init.__doc__
    return GradientTransformation(recording_init,
                                  executor.register(update, prepare, scaling=scaling, leafwise=leafwise,
                                                    count_fields=count_fields, state_type=recorded,
                                                    kept_fields=kept_fields))


def identity() -> GradientTransformation:
    """The transform that returns its updates unchanged.

    Returns:
        A :class:`GradientTransformation` that keeps no state.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.identity()
        >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init({"w": torch.zeros(2)}))
        >>> updates
        {'w': tensor([1., 1.])}
    """

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

    Args:
        fn: ``fn(updates, params) -> updates``; ``params`` is ``None`` when ``update`` is
            called without them.

    Returns:
        A :class:`GradientTransformation` whose state is :class:`EmptyState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> def clamp(updates, params):
        ...     return holotx.tree.map(lambda u: u.clamp(-1.0, 1.0), updates)
        >>> clip_each = holotx.stateless(clamp)
        >>> updates, _ = clip_each.update({"w": torch.tensor([-3.0, 0.5])}, clip_each.init(None))
        >>> updates["w"]
        tensor([-1.0000,  0.5000])
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        return fn(updates, params), state

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates, *, inplace: bool = False,
                  scale: ops.Scalar | list[ops.Scalar | None] | None = None) -> Params:
    r"""Return ``params + updates`` (``params + scale * updates`` with ``scale``), each
    result in its parameter's dtype.

    ``scale`` is one number or 0-d tensor, or a list with one for each leaf in flattening
    order (a final scaling per tensor handed over: see
    :func:`holotx.executor.scale_factor`).
    ``None`` updates leave their parameter as it is. With ``inplace=True`` the parameter
    tensors are updated in place (``p += u``, grouped multi-tensor) and ``params`` itself
    is returned; do this only outside autograd, e.g. under ``torch.no_grad()``.

    Args:
        params: the parameters, a pytree of tensors.
        updates: the updates, with the structure of ``params``; a ``None`` update leaves its
            parameter as it is.
        inplace: add the updates into the parameter tensors themselves (``p += u``) and return
            ``params`` (default ``False``: new tensors).
        scale: a factor applied to the updates as they are added (default ``None``: 1).

    Returns:
        The new parameters (``params`` itself with ``inplace=True``), each in its
        parameter's dtype.

    Example:
        >>> import torch
        >>> import holotx
        >>> params = {"w": torch.tensor([1.0, 2.0]), "frozen": torch.tensor([5.0])}
        >>> holotx.apply_updates(params, {"w": torch.tensor([0.5, -0.5]), "frozen": None})
        {'w': tensor([1.5000, 1.5000]), 'frozen': tensor([5.])}
        >>> holotx.apply_updates(params, {"w": torch.tensor([0.5, -0.5]), "frozen": None}, scale=2.0)["w"]
        tensor([2., 1.])
    """
    p_leaves, treespec = tree.flatten(params)
    u_leaves = tree.leaves_matching(updates, treespec, "updates", "params")
    tree.check_leaves(p_leaves, u_leaves, treespec, "params", "updates", dtype=False)
    for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
        if p is None and u is not None:
            path = tree.path_strings(treespec)[i]
            raise ValueError(f"params at {path} is None but updates has a tensor there")
    if isinstance(scale, list) and len(scale) != len(p_leaves):
        raise ValueError(f"scale has {len(scale)} entries for {len(p_leaves)} leaves")
    idx = [i for i, (p, u) in enumerate(zip(p_leaves, u_leaves)) if p is not None and u is not None]
    if inplace and len({id(p_leaves[i]) for i in idx}) != len(idx):
        paths = tree.path_strings(treespec)
        seen: dict[int, int] = {}
        for i in idx:
            j = seen.setdefault(id(p_leaves[i]), i)
            if j != i:
                raise ValueError(f"params at {paths[j]} and at {paths[i]} are the same tensor: "
                                 "updated in place, it would take both steps")
    new = _add_leaves(p_leaves, u_leaves, idx, inplace, scale)
    return params if inplace else tree.unflatten(treespec, new)


def apply_step_updates(params: list[torch.Tensor], updates: Any,
                       scale: ops.Scalar | list[ops.Scalar | None] | None = None) -> None:
    """``apply_updates(params, updates, inplace=True, scale=scale)`` for a caller whose
    ``updates`` a step made from these very ``params`` (the torch.optim adapter's): when
    the params are distinct tensors and the updates a list of tensors (or ``None``) with
    each param's shape and device, as a step's are, the rest of :func:`apply_updates`'
    checks (which on a small model cost as much as a foreach kernel) are not repeated;
    anything else (a param listed twice, a user's transform in the chain that returned
    other updates) goes through them, and is refused by name."""
    fits = type(updates) is list and len(updates) == len(params) == len(set(map(id, params))) and all(
        u is None or (isinstance(u, torch.Tensor) and u.shape == p.shape and u.device == p.device)
        for p, u in zip(params, updates))
    if not fits:
        apply_updates(params, updates, inplace=True, scale=scale)
        return
    if isinstance(scale, list) and len(scale) != len(params):
        raise ValueError(f"scale has {len(scale)} entries for {len(params)} leaves")
    _add_leaves(params, updates, [i for i, u in enumerate(updates) if u is not None], True, scale)


def _add_leaves(p_leaves: list[Any], u_leaves: list[Any], idx: list[int], inplace: bool,
                scale: ops.Scalar | list[ops.Scalar | None] | None) -> list[Any]:
    """``p + scale * u`` at the leaves ``idx``: in place (``p_leaves`` returned), or a new
    list of leaves."""
    if len({executor.is_wrapper_type(type(p_leaves[i])) for i in idx}) > 1:
        # DTensors (FSDP2's sharded params) among plain tensors: a foreach kernel takes one
        # kind or the other, so each kind is added apart (as multi_tensor_update groups them).
        new = list(p_leaves)
        for wrapped in (False, True):
            part = [i for i in idx if executor.is_wrapper_type(type(p_leaves[i])) is wrapped]
            out = _add_leaves(p_leaves, u_leaves, part, inplace, scale)
            for i in part:
                new[i] = out[i]
        return p_leaves if inplace else new
    ps = [p_leaves[i] for i in idx]
    us = [u_leaves[i] if u_leaves[i].dtype == p_leaves[i].dtype else u_leaves[i].to(p_leaves[i].dtype)
          for i in idx]
    # Complex params are added to as their real views, as torch.optim does (one rounding
    # per real number, where complex arithmetic would round a product and then the sum).
    complex_idx = [j for j, p in enumerate(ps) if p.is_complex()]
    for j in complex_idx:
        ps[j], us[j] = torch.view_as_real(ps[j]), torch.view_as_real(us[j])
    if isinstance(scale, list):
        alphas = [_host_alpha(executor.leaf_factor(scale[i], p_leaves[i].dtype)) for i in idx]
    else:
        alpha = _host_alpha(1 if scale is None else scale)
        alphas = [alpha] * len(ps)
    if inplace:
        if not isinstance(scale, list) and ps and ops.foreach_supported(ps) \
                and not isinstance(alpha, torch.Tensor):
            torch._foreach_add_(ps, us, alpha=alpha)  # one factor for every leaf: one kernel
            return p_leaves
        for p, u, a in zip(ps, us, alphas):
            if isinstance(a, torch.Tensor):
                p.add_(u * a)
            else:
                p.add_(u, alpha=a)
        return p_leaves
    if isinstance(scale, list):
        out = [p + u * a if isinstance(a, torch.Tensor) else p.add(u, alpha=a)
               for p, u, a in zip(ps, us, alphas)]
    else:
        out = ops.add(ps, us, alpha=alpha)
    for j in complex_idx:
        out[j] = torch.view_as_complex(out[j])
    new = list(p_leaves)
    for i, p in zip(idx, out):
        new[i] = p
    return new


def _host_alpha(alpha: ops.Scalar) -> ops.Scalar:
    """A 0-d tensor factor read to a Python number where that costs no device sync
    (eager, on a CPU): the add then takes it as ``alpha``, one pass."""
    if isinstance(alpha, torch.Tensor) and ops.host_scalars_ok([alpha]):
        return alpha.item()
    return alpha


def init_counts(params: Params) -> Any:
    """One 0-d int64 step counter per tensor leaf, at zero, on the leaf's device: torch's
    per-parameter ``step``. A leaf without a gradient keeps its count, as torch.optim skips
    a parameter whose ``.grad`` is None."""
    return tree.map(lambda p: torch.zeros((), dtype=torch.int64, device=p.device), params)


def init_count(params: Params) -> torch.Tensor:
    """A 0-d int64 step counter at zero, on the device of the first parameter."""
    return torch.zeros((), dtype=torch.int64, device=tree.first_device(params))


def next_count(count: torch.Tensor) -> torch.Tensor:
    """``count + 1``, the count replaced (in place where the executor allows)."""
    return ops.add_scalar_([count], 1)[0]
