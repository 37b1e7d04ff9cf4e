"""Combinators: transforms built from transforms.

``chain`` runs transforms in sequence; ``masked``/``partition``/``freeze`` route subtrees
to different transforms (``partition`` is how per-group hyperparameters are written
functionally); ``apply_if_finite`` skips steps with non-finite gradients; ``multi_steps``
accumulates gradients over micro-steps.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import torch

from holotx import _validate, executor, tree
from holotx.base import GradientTransformation, Params, init_count, own_transform
from holotx.transforms.scale import set_to_zero

__all__ = [
    "ApplyIfFiniteState",
    "MaskedState",
    "MultiStepsState",
    "PartitionState",
    "apply_if_finite",
    "chain",
    "freeze",
    "masked",
    "multi_steps",
    "named_chain",
    "partition",
]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Extra keyword arguments given to ``update`` reach every transform.

    Args:
        *transforms: the transforms, applied first to last.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is the tuple of the
        transforms' states.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.chain(holotx.clip_by_global_norm(1.0),
        ...                   holotx.scale_by_adam(), holotx.scale_by_lr(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> state = tx.init(params)
        >>> len(state), type(state[1]).__name__
        (3, 'ScaleByAdamState')
        >>> updates, state = tx.update({"w": torch.tensor([3.0, -4.0])}, state, params)
        >>> updates["w"]
        tensor([-0.1000,  0.1000])
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise ValueError(f"chain argument {i} is not a GradientTransformation: {t!r}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def check(state):
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of {len(state)}")

    def prepare(state, params):
        check(state)  # (before any transform's math: a chain within a chain runs after others)
        for t, s in zip(transforms, state):
            executor.prepare(t, s, params)

    def update(updates, state, params=None, **extra):
        check(state)
        updates, new_state = _run_in_sequence(transforms, state, updates, params, extra)
        return updates, tuple(new_state)

    return own_transform(init, update, prepare)


def _run_in_sequence(transforms, states, updates, params, extra) -> tuple[Any, list[Any]]:
    """Each transform's update on the previous one's output. A request for the final
    scaling, addressed to the chain, is passed on to its trailing scalings (the learning
    rate) and to the transform before them (a per-tensor trust ratio): each multiplies
    every leaf by one value, so the factors commute and the caller applies their product."""
    first = _first_asked(transforms) if executor.scale_requested() else len(transforms)
    new_states: list[Any] = []
    for i, (t, s) in enumerate(zip(transforms, states)):
        if i >= first:
            executor.ask_scale(t)
        updates, new_s = executor.call(t, updates, s, params, **extra)
        if i >= first:
            executor.release_scale(t)
        new_states.append(new_s)
    return updates, new_states


def _first_asked(transforms) -> int:
    """The index of the first transform asked for its scaling: the one before the
    trailing run of scalings (the last transform when there is none)."""
    first = len(transforms)
    while first > 0 and executor.is_scaling(transforms[first - 1]):
        first -= 1
    return max(first - 1, 0)


def named_chain(*transforms: tuple[str, GradientTransformation]) -> GradientTransformation:
    """:func:`chain` whose state is a dict keyed by the given names, so a piece of the
    state can be found (and logged, or restored) by name.

    Args:
        *transforms: ``(name, transform)`` pairs, applied first to last; the names must be unique.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is ``{name: state}``.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.named_chain(("clip", holotx.clip_by_global_norm(1.0)), ("adam", holotx.adam(0.1)))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> sorted(state), state["adam"][0].count["w"]
        (['adam', 'clip'], tensor(0))
    """
    names = [n for n, _ in transforms]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain names must be unique, got {names}")

    def init(params):
        return {n: t.init(params) for n, t in transforms}

    def check(state):
        if set(state) != set(names):
            raise ValueError(f"named_chain state has keys {sorted(state)}, expected {sorted(names)}")

    def update(updates, state, params=None, **extra):
        check(state)
        updates, new_states = _run_in_sequence([t for _, t in transforms], [state[n] for n in names],
                                               updates, params, extra)
        return updates, dict(zip(names, new_states))

    def prepare(state, params):
        check(state)  # (before any transform's math, as chain's)
        for n, t in transforms:
            executor.prepare(t, state[n], params)

    return own_transform(init, update, prepare)


# ---------------------------------------------------------------- routing subtrees

def _is_container(node: Any) -> bool:
    return isinstance(node, (dict, list, tuple))


def _resolve(labels: Any, like: Any, what: str) -> list[Any]:
    """One label per leaf of ``like``, from ``labels``: a pytree with the structure of
    ``like``, a prefix of it, or a function of ``like`` returning either.

    The prefix is followed along each leaf's path in plain Python (optree's own prefix
    broadcast cannot be traced by torch.compile).
    """
    if callable(labels):
        labels = labels(like)
    spec = tree.structure(like)
    resolved = []
    for path, name in zip(spec.paths(), tree.path_strings(spec)):
        node = labels
        for entry in path:
            if not _is_container(node):
                break
            try:
                node = node[entry]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"{what} has no entry for the params leaf at {name}") from None
        if _is_container(node):
            raise ValueError(f"{what} has a container at {name}, where the params have a leaf")
        resolved.append(node)
    return resolved


def _select_leaves(leaves: list[Any], keep: list[bool]) -> list[Any]:
    return [x if k else None for x, k in zip(leaves, keep)]


def _routed_update(inner: GradientTransformation, keep: list[bool], spec, u_leaves, p_leaves,
                   inner_state, extra):
    sub_u = tree.unflatten(spec, _select_leaves(u_leaves, keep))
    sub_p = None if p_leaves is None else tree.unflatten(spec, _select_leaves(p_leaves, keep))
    new_u, new_state = executor.call(inner, sub_u, inner_state, sub_p, **extra)
    return tree.leaves_matching(new_u, spec, "the inner updates", "updates"), new_state


class MaskedState(NamedTuple):
    """The state of :func:`masked` (and :func:`freeze`).

    Args:
        inner_state: the inner transform's state, over the masked-in leaves only.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.masked(holotx.adam(), {"w": True, "b": False})
        >>> state = tx.init({"w": torch.zeros(2), "b": torch.zeros(1)})
        >>> state.inner_state[0].mu
        {'w': tensor([0., 0.]), 'b': None}
    """

    inner_state: Any


def masked(inner: GradientTransformation, mask: Any | Callable[[Params], Any]) -> GradientTransformation:
    """Apply ``inner`` to the leaves where ``mask`` is True; pass the others through.

    ``mask`` is a pytree of bools with the params' structure, a prefix of it (``{"encoder":
    False, "decoder": True}`` for nested dicts), or a function ``params -> mask`` (given
    the updates instead when ``update`` is called without params). The inner transform
    sees ``None`` at masked-out leaves, so keeps no state for them.

    Args:
        inner: the transform to apply where ``mask`` is True.
        mask: a pytree of bools with the params' structure, a prefix of it, or a function
            ``params -> mask``.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is a :class:`MaskedState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.masked(holotx.scale(10.0), {"w": True, "b": False})
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> updates, _ = tx.update({"w": torch.ones(2), "b": torch.ones(1)}, tx.init(params), params)
        >>> updates
        {'w': tensor([10., 10.]), 'b': tensor([1.])}
    """

    def keep_of(like, leaves):
        values = _resolve(mask, like, "mask")
        for path, m, x in zip(tree.path_strings(tree.structure(like)), values, leaves):
            if not isinstance(m, bool) and not (m is None and x is None):
                raise ValueError(f"mask at {path} must be a bool, got {m!r}")
        return [m is True for m in values]

    def init(params):
        p_leaves, spec = tree.flatten(params)
        keep = keep_of(params, p_leaves)
        return MaskedState(inner.init(tree.unflatten(spec, _select_leaves(p_leaves, keep))))

    def update(updates, state, params=None, **extra):
        u_leaves, spec = tree.flatten(updates)
        p_leaves = None if params is None else tree.leaves_matching(params, spec, "params", "updates")
        keep = keep_of(updates if params is None else params, u_leaves)
        new_leaves, inner_state = _routed_update(inner, keep, spec, u_leaves, p_leaves,
                                                 state.inner_state, extra)
        out = [n if k else u for n, u, k in zip(new_leaves, u_leaves, keep)]
        return tree.unflatten(spec, out), MaskedState(inner_state)

    def prepare(state, params):
        executor.prepare(inner, state.inner_state, params)

    return own_transform(init, update, prepare, state_type=MaskedState)


def freeze(mask: Any | Callable[[Params], Any]) -> GradientTransformation:
    """Zero the updates of the leaves where ``mask`` is True (those params stay fixed).

    Args:
        mask: where to freeze: a pytree of bools with the params' structure, a prefix of it, or a
            function ``params -> mask``.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is a :class:`MaskedState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.chain(holotx.sgd(lr=0.1), holotx.freeze({"encoder": True, "head": False}))
        >>> params = {"encoder": torch.ones(2), "head": torch.ones(1)}
        >>> grads = {"encoder": torch.ones(2), "head": torch.ones(1)}
        >>> updates, _ = tx.update(grads, tx.init(params), params)
        >>> updates
        {'encoder': tensor([0., 0.]), 'head': tensor([-0.1000])}
    """
    return masked(set_to_zero(), mask)


class PartitionState(NamedTuple):
    """The state of :func:`partition`.

    Args:
        inner_states: ``{label: state}``, each transform's state over the leaves of its label.

    Example:
        >>> import torch
        >>> import holotx
        >>> labels = {"w": "fast", "b": "slow"}
        >>> tx = holotx.partition({"fast": holotx.sgd(0.1), "slow": holotx.sgd(0.01)}, labels)
        >>> state = tx.init({"w": torch.zeros(2), "b": torch.zeros(1)})
        >>> sorted(state.inner_states)
        ['fast', 'slow']
    """

    inner_states: dict[Hashable, Any]


def partition(
    transforms: Mapping[Hashable, GradientTransformation], param_labels: Any | Callable[[Params], Any]
) -> GradientTransformation:
    """Route each leaf to the transform of its label.

    ``param_labels`` is a pytree of labels (keys of ``transforms``) with the params'
    structure or a prefix of it, or a function ``params -> labels`` (given the updates
    when ``update`` is called without params). This is the
    functional form of torch's param groups: ``partition({"decay": adamw(1e-3, weight_decay=
    0.1), "no_decay": adamw(1e-3, weight_decay=0.0)}, labels)``.

    Args:
        transforms: ``{label: transform}``.
        param_labels: a pytree of labels with the params' structure, a prefix of it, or a function
            ``params -> labels``.

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is a :class:`PartitionState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> decay, no_decay = holotx.adamw(0.1, weight_decay=0.1), holotx.adamw(0.1, weight_decay=0.0)
        >>> labels = {"weight": "decay", "bias": "no_decay"}
        >>> tx = holotx.partition({"decay": decay, "no_decay": no_decay}, labels)
        >>> params = {"weight": torch.ones(2), "bias": torch.ones(1)}
        >>> updates, _ = tx.update({"weight": torch.ones(2), "bias": torch.ones(1)}, tx.init(params), params)
        >>> updates  # the weight also decays by lr * weight_decay * w
        {'weight': tensor([-0.1100, -0.1100]), 'bias': tensor([-0.1000])}
    """
    transforms = dict(transforms)

    def labels_of(like, leaves):
        labels = _resolve(param_labels, like, "param_labels")
        for path, label, x in zip(tree.path_strings(tree.structure(like)), labels, leaves):
            if label not in transforms and not (label is None and x is None):
                raise ValueError(f"param_labels at {path} is {label!r}, which is not one of "
                                 f"the transforms' labels {sorted(map(repr, transforms))}")
        return labels

    def init(params):
        p_leaves, spec = tree.flatten(params)
        labels = labels_of(params, p_leaves)
        return PartitionState({
            name: t.init(tree.unflatten(spec, _select_leaves(p_leaves, [lb == name for lb in labels])))
            for name, t in transforms.items()
        })

    def check(state):
        if set(state.inner_states) != set(transforms):
            raise ValueError(f"partition state has labels {sorted(map(repr, state.inner_states))}, expected "
                             f"{sorted(map(repr, transforms))}")

    def update(updates, state, params=None, **extra):
        check(state)
        u_leaves, spec = tree.flatten(updates)
        p_leaves = None if params is None else tree.leaves_matching(params, spec, "params", "updates")
        labels = labels_of(updates if params is None else params, u_leaves)
        out = list(u_leaves)
        new_states = {}
        for name, t in transforms.items():
            keep = [lb == name for lb in labels]
            new_leaves, new_states[name] = _routed_update(
                t, keep, spec, u_leaves, p_leaves, state.inner_states[name], extra)
            out = [n if k else o for n, o, k in zip(new_leaves, out, keep)]
        return tree.unflatten(spec, out), PartitionState(new_states)

    def prepare(state, params):
        check(state)  # (before any transform's math, as chain's)
        for name, t in transforms.items():
            executor.prepare(t, state.inner_states[name], params)

    return own_transform(init, update, prepare, state_type=PartitionState)


# ---------------------------------------------------------------- conditional steps

def _select_tree(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``cond`` else ``old``, leafwise over two trees of one structure."""
    new_leaves, spec = tree.flatten(new)
    old_leaves = tree.leaves_matching(old, spec, "the old state", "the new state")
    out = []
    for a, b in zip(new_leaves, old_leaves):
        out.append(torch.where(cond, a, b) if isinstance(a, torch.Tensor) else a)
    return tree.unflatten(spec, out)


def _all_finite(updates: Any) -> torch.Tensor:
    leaves = [x for x in tree.leaves(updates) if x is not None]
    if not leaves:
        return torch.ones((), dtype=torch.bool)
    device = leaves[0].device
    return torch.stack([torch.isfinite(x).all().to(device) for x in leaves]).all()


class ApplyIfFiniteState(NamedTuple):
    """The state of :func:`apply_if_finite`.

    Args:
        notfinite_count: consecutive steps with non-finite updates so far (0-d int64).
        last_finite: whether the last step's updates were all finite (0-d bool).
        total_notfinite: steps with non-finite updates, in all (0-d int64).
        inner_state: the inner transform's state.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.apply_if_finite(holotx.sgd(0.1), 3).init({"w": torch.zeros(2)})
        >>> state.notfinite_count, state.last_finite, state.total_notfinite
        (tensor(0), tensor(True), tensor(0))
    """

    notfinite_count: torch.Tensor
    """Consecutive steps with non-finite updates so far."""
    last_finite: torch.Tensor
    """Whether the last step's updates were all finite."""
    total_notfinite: torch.Tensor
    """Steps with non-finite updates, in all."""
    inner_state: Any


def apply_if_finite(inner: GradientTransformation, max_consecutive_errors: int) -> GradientTransformation:
    """Skip steps whose incoming updates hold a NaN or an infinity.

    A skipped step returns zero updates and leaves the inner state as it was; the
    counters record it. After more than ``max_consecutive_errors`` skips in a row the
    step is applied anyway (as optax's ``apply_if_finite``). The decision is a 0-d tensor
    used by ``torch.where``: no host sync. The old inner state is read after the inner
    update, so the inner update is pure.

    Args:
        inner: the transform to run.
        max_consecutive_errors: skips in a row after which a non-finite step is applied anyway
            (an integer >= 0).

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is an
        :class:`ApplyIfFiniteState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.apply_if_finite(holotx.sgd(lr=0.1), max_consecutive_errors=3)
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = tx.update({"w": torch.tensor([1.0, float("nan")])}, tx.init(params), params)
        >>> updates["w"], state.total_notfinite
        (tensor([0., 0.]), tensor(1))
    """
    if isinstance(max_consecutive_errors, bool) or not isinstance(max_consecutive_errors, int) \
            or max_consecutive_errors < 0:
        raise ValueError(f"max_consecutive_errors must be an integer >= 0, got {max_consecutive_errors!r}")

    def init(params):
        zero = init_count(params)
        return ApplyIfFiniteState(zero, torch.ones_like(zero, dtype=torch.bool), zero.clone(),
                                  inner.init(params))

    def update(updates, state, params=None, **extra):
        finite = _all_finite(updates)
        notfinite_count = torch.where(finite, torch.zeros_like(state.notfinite_count),
                                      state.notfinite_count + 1)
        reject = ~finite & (notfinite_count <= max_consecutive_errors)
        new_u, new_inner = executor.call_pure(inner, updates, state.inner_state, params, **extra)
        new_u = tree.map(lambda u: torch.where(reject, torch.zeros_like(u), u), new_u)
        return new_u, ApplyIfFiniteState(
            notfinite_count, finite, state.total_notfinite + (~finite).to(state.total_notfinite.dtype),
            _select_tree(reject, state.inner_state, new_inner))

    def prepare(state, params):
        executor.prepare(inner, state.inner_state, params)

    return own_transform(init, update, prepare, state_type=ApplyIfFiniteState)


class MultiStepsState(NamedTuple):
    """The state of :func:`multi_steps`.

    Args:
        mini_step: micro-steps accumulated since the last real step (0-d int64).
        gradient_step: real (inner) steps taken (0-d int64).
        inner_state: the inner transform's state.
        acc_grads: the running mean of the micro-steps' gradients.

    Example:
        >>> import torch
        >>> import holotx
        >>> state = holotx.multi_steps(holotx.sgd(0.1), every_k=4).init({"w": torch.zeros(2)})
        >>> state.mini_step, state.gradient_step, state.acc_grads
        (tensor(0), tensor(0), {'w': tensor([0., 0.])})
    """

    mini_step: torch.Tensor
    """Micro-steps accumulated since the last real step."""
    gradient_step: torch.Tensor
    """Real (inner) steps taken."""
    inner_state: Any
    acc_grads: Any
    """Running mean of the micro-steps' gradients."""


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    r"""Accumulate gradients over ``every_k`` micro-steps, then take one inner step.

    Same semantics as optax's ``MultiSteps``: the accumulator is the running mean
    :math:`a \leftarrow a + (g - a)/(n + 1)`; on the ``every_k``-th call the inner transform
    is applied to it and its updates are returned (and the accumulator reset), on the
    other calls the updates are zeros and the inner state does not change. Traceable: the
    inner update runs every micro-step and ``torch.where`` keeps or discards it, which
    costs one inner update per micro-step.

    A ``None`` gradient leaves its leaf out of that micro-step, as everywhere in holotx:
    ``None`` update, state untouched. The window is counted for all leaves together, so a
    leaf that has no gradient at a window's last micro-step is not stepped for that
    window, and the next window's first gradient replaces what it had accumulated. Give
    such a leaf zeros instead of ``None`` to keep its gradients in the window's mean.

    Args:
        inner: the transform applied to the accumulated gradients.
        every_k: micro-steps per real step (a positive int).

    Returns:
        A :class:`~holotx.GradientTransformation` whose state is a :class:`MultiStepsState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.multi_steps(holotx.sgd(lr=1.0), every_k=2)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([1.0])}, state, params)
        >>> updates["w"]  # first micro-step: nothing applied
        tensor([0.])
        >>> updates, state = tx.update({"w": torch.tensor([3.0])}, state, params)
        >>> updates["w"]  # second: the step on the mean gradient, 2
        tensor([-2.])
    """
    _validate.positive_int("every_k", every_k)

    def init(params):
        zero = init_count(params)
        return MultiStepsState(zero, zero.clone(), inner.init(params), tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        n = state.mini_step
        u_leaves, spec = tree.flatten(updates)
        acc_leaves = tree.leaves_matching(state.acc_grads, spec, "state.acc_grads", "updates")
        acc = [a if g is None else a + (g - a) / (n + 1).to(a.dtype) for a, g in zip(acc_leaves, u_leaves)]
        emit = n == every_k - 1
        # A None gradient stays None for the inner transform: no update, no state change.
        inner_in = tree.unflatten(spec, [None if g is None else a for a, g in zip(acc, u_leaves)])
        # The old inner state is read again (a micro-step keeps it): the inner update is pure.
        new_u, new_inner = executor.call_pure(inner, inner_in, state.inner_state, params, **extra)
        new_u = tree.map(lambda u: torch.where(emit, u, torch.zeros_like(u)), new_u)
        new_acc = [a if g is None else torch.where(emit, torch.zeros_like(a), a)
                   for a, g in zip(acc, u_leaves)]
        return new_u, MultiStepsState(
            torch.where(emit, torch.zeros_like(n), n + 1),
            state.gradient_step + emit.to(state.gradient_step.dtype),
            _select_tree(emit, new_inner, state.inner_state),
            tree.unflatten(spec, new_acc),
        )

    def prepare(state, params):
        executor.prepare(inner, state.inner_state, params)

    return own_transform(init, update, prepare, state_type=MultiStepsState)
