"""The contract every holotx transform keeps, as reusable checks.

Each ``check_*`` function below takes a :class:`Case` (a name, a zero-argument factory
returning a :class:`holotx.GradientTransformation`, and a few flags) and asserts one
clause of the contract (``docs/contract.rst``):

* :func:`check_pure`: ``update`` never mutates grads, state or params; same in, same out.
* :func:`check_structure`: updates keep the grads' structure, shapes and dtypes; the state
  keeps its dtypes; the step count is a 0-d integer tensor.
* :func:`check_none_gradients`: a ``None`` gradient leaf gives a ``None`` update and keeps
  its state.
* :func:`check_params_usage`: only transforms that need params ask for them.
* :func:`check_grad`: ``torch.func.grad`` through several steps is the true derivative.
* :func:`check_vmap`: ``torch.func.vmap`` over a batch equals a Python loop.
* :func:`check_compile`: ``torch.compile(fullgraph=True)`` equals eager, as one graph.
* :func:`check_donated`: the opt-in donated (in-place) path computes what the pure path does,
  also when the state alone is donated (the grads then stay untouched).
* :func:`check_chain_composition`: a transform computes the same inside a chain as alone.
* :func:`check_dtensor`: on ``DTensor`` params (FSDP2, tensor parallel) the same numbers,
  pure and donated, with nothing of the caller's written.
* :func:`check_inject`: ``inject_hyperparams(alias)`` equals ``alias``, and its ``lr`` can be
  changed between steps; :func:`check_inject_no_retrace`: without re-tracing a compiled
  update; :func:`check_inject_grad`: injected hyperparameters can be differentiated.

``tests/test_harness.py`` parametrises these over the registry of cases; registering a
new transform there is one line, ``Case("name", lambda: holotx.thing(...))``.

The parameters are a small pytree that exercises structure (nested dicts, a list, a tuple,
a NamedTuple, a ``(1,)`` tensor, a 4-D conv kernel and a 0-size tensor), see
:func:`make_params` and its variants :data:`TREES`. Everything is kept tiny so that the
whole harness runs in a few minutes on two CPU cores; ``torch.compile`` is the slow part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from torch._dynamo.testing import CompileCounterWithBackend

import holotx

__all__ = [
    "DTYPES",
    "Affine",
    "Case",
    "InjectCase",
    "check_chain_composition",
    "check_compile",
    "check_donated",
    "check_dtensor",
    "check_grad",
    "check_inject",
    "check_inject_grad",
    "check_inject_no_retrace",
    "check_none_gradients",
    "check_params_usage",
    "check_pure",
    "check_structure",
    "check_vmap",
    "make_grads",
    "make_params",
    "smooth_grads",
]


# ---------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One transform under test.

    ``factory`` builds a fresh transform (called once per check, so no state leaks
    between checks). Flags, each only where a transform legitimately needs it:

    * ``needs_params``: ``update`` requires ``params`` (weight decay, anything that reads
      the parameters); without the flag the check asserts that ``params=None`` works and
      gives the same result.
    * ``steps``: how many updates each check runs (default 3). RAdam only rectifies from
      step 6 (``rho_t > 5``), so its cases use 7 to cover both branches.
    * ``nondiff``: a reason string; :func:`check_grad` is skipped with it. Only for a
      transform that is genuinely non-differentiable.
    * ``sync_updates``: at some steps the updates are a difference of param-sized values
      (a wrapper putting the params back on its slow weights: ``phi - theta``). One
      rounding of a param is then a large relative change of a small update, so
      :func:`check_compile` compares eager and compiled where the updates land,
      ``params + updates``, relative to the params.
    * ``none_is_zero_step``: a ``None`` gradient counts as a step that does not move the
      leaf (Holocron's wrappers, reproduced by ``compat="holocron"``): its update is a
      tensor, zero away from a sync, and its count advances, so
      :func:`check_none_gradients` checks that update instead of an untouched state.
    * ``global_rtol``: the compile check's tolerance for every dtype, for a transform that
      computes one quantity from all leaves (Scout's sync rate): on the mixed-dtype tree a
      float64 leaf then inherits the rounding of the float32 leaves, which inductor fuses
      differently from eager.
    * ``inductor``: also run :func:`check_compile` with the default (inductor) backend;
      kept to one or two cases because inductor's C++ code generation and compile take
      seconds per case (tens of seconds on a cold cache).
    """

    name: str
    factory: Callable[[], holotx.GradientTransformation]
    needs_params: bool = False
    steps: int = 3
    nondiff: str | None = None
    sync_updates: bool = False
    none_is_zero_step: bool = False
    global_rtol: float | None = None
    inductor: bool = False

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class InjectCase:
    """An optimizer alias and the keyword arguments it is checked with under
    :func:`holotx.inject_hyperparams`. ``steps`` (8) covers RAdam's rectified steps
    (from step 6) and leaves steps after the ``lr`` switch. ``lr_is_schedule``: the ``lr``
    is a schedule, which is re-evaluated every step, so overriding
    ``state.hyperparams['lr']`` is not checked."""

    name: str
    alias: Callable[..., holotx.GradientTransformation]
    kwargs: Mapping[str, Any]
    steps: int = 8
    lr_is_schedule: bool = False

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------- trees


class Affine(NamedTuple):
    """A NamedTuple node in the params tree (optree flattens it by field)."""

    weight: Any
    bias: Any


DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "float32": (torch.float32,),
    "float64": (torch.float64,),
    "bfloat16": (torch.bfloat16,),
    # Leaves cycle through several dtypes: the multi-tensor path must group them by dtype.
    "mixed": (torch.float32, torch.float64, torch.bfloat16),
}
"""The dtypes every transform is run in (:func:`check_structure`); a name maps to the cycle
of dtypes given to the leaves in flattening order."""
COMPILE_DTYPES = (torch.float32, torch.float64)


TREES: dict[str, tuple[tuple[int, ...], bool]] = {
    "small": ((4,), True),
    "big": ((256, 300), True),
    "dense": ((4,), False),
    "dense_big": ((256, 300), False),
}
"""Variants of the params tree: the shape of its ``bulk`` leaf, and whether it has a
0-size leaf.

* ``big`` trees have 76,800 elements in ``bulk``: multi-threaded CPU kernels split work
  above a grain size, so a big leaf exercises that path where tiny ones do not.
* ``dense`` trees have no 0-size leaf, the others one: a 0-size tensor has a null data
  pointer and no memory, an edge for anything that reasons about buffers.
"""


def _build(make: Callable[[tuple[int, ...]], torch.Tensor], tree: str) -> dict[str, Any]:
    bulk, empty = TREES[tree]
    return {
        "encoder": {"conv": make((3, 2, 2, 2)), "norm": Affine(make((2,)), make((1,)))},
        "head": [make((2, 3)), make((3,))],
        "gain": make((1,)),
        "pair": (make((2,)), make((0,) if empty else (2,))),
        "bulk": make(bulk),
    }


def make_params(dtype: str | tuple[torch.dtype, ...] = "float64", seed: int = 0,
                batch: int | None = None, tree: str = "small") -> Any:
    """The params pytree: values with magnitude in [0.5, 1.5] and random signs.

    Structure: a dict with a nested dict, a NamedTuple, a list, a tuple, a ``(1,)``
    tensor, a 4-D conv kernel and (in the default ``small`` tree) a 0-size tensor; see
    :data:`TREES` for the variants. Magnitudes are kept away from zero so that the
    closed loop of :func:`check_grad` (gradients ``p**3/4 + p/2``, same sign as ``p``)
    never meets a gradient of zero, where Adam-like rules are not smooth. ``batch``
    prepends a batch dimension (for vmap). Names are chosen not to collide with any
    hyperparameter name, because :func:`check_none_gradients` finds a leaf's state by its
    path. ``dtype`` is a key of :data:`DTYPES` or a tuple of dtypes that the leaves cycle
    through.
    """
    cycle = DTYPES[dtype] if isinstance(dtype, str) else dtype
    gen = torch.Generator().manual_seed(seed)

    def make(shape: tuple[int, ...]) -> torch.Tensor:
        full = ((batch,) if batch is not None else ()) + shape
        magnitude = torch.rand(full, generator=gen, dtype=torch.float64) + 0.5
        sign = torch.where(torch.rand(full, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        return magnitude * sign

    leaves, spec = optree.tree_flatten(_build(make, tree), none_is_leaf=True)
    return optree.tree_unflatten(spec, [x.to(cycle[i % len(cycle)]) for i, x in enumerate(leaves)])


def make_grads(params: Any, seed: int) -> Any:
    """Standard-normal gradients shaped and typed like ``params``."""
    gen = torch.Generator().manual_seed(seed)
    return holotx.tree.map(
        lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype), params
    )


def smooth_grads(params: Any) -> Any:
    """The closed-loop gradient field of :func:`check_grad`: ``p**3/4 + p/2``.

    A smooth, nonlinear function of the params (so the derivative through a step
    involves the grads' dependence on the params, not only the update rule), with the sign
    of ``p`` and never zero for ``|p| >= 0.5``.
    """
    return holotx.tree.map(lambda p: p**3 / 4 + p / 2, params)


def paths(tree: Any) -> list[tuple[Any, ...]]:
    return optree.tree_paths(tree, none_is_leaf=True)


def flat(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=True)


def structure(tree: Any) -> optree.PyTreeSpec:
    return optree.tree_structure(tree, none_is_leaf=True)


def clone_tree(tree: Any) -> Any:
    return optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree,
                           none_is_leaf=True)


def index_tree(tree: Any, b: int) -> Any:
    return optree.tree_map(lambda x: x[b] if isinstance(x, torch.Tensor) else x, tree, none_is_leaf=True)


def with_leaf(tree: Any, i: int, value: Any) -> Any:
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=True)
    leaves[i] = value
    return optree.tree_unflatten(spec, leaves)


def _path_str(path: Sequence[Any]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _nodes(obj: Any) -> Iterator[Any]:
    """Every container and leaf of a state, depth first (NamedTuples included)."""
    yield obj
    if isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _nodes(x)
    elif isinstance(obj, Mapping):
        for x in obj.values():
            yield from _nodes(x)


# ----------------------------------------------------------------------------- comparisons


def assert_trees_close(
    actual: Any,
    expected: Any,
    what: str,
    rtol: float | Callable[[torch.dtype], float] = 0.0,
) -> None:
    """Same structure, same ``None`` leaves, same shapes and dtypes, and values within
    ``rtol`` relative to each leaf's largest magnitude (``rtol=0``: bit-identical), with
    an absolute floor of ``rtol * TREE_FLOOR`` times the largest magnitude in the whole
    ``expected`` tree (the data's scale).

    The tolerance is scaled per leaf, not per element: a state entry that is a
    difference of nearly equal numbers has a large *elementwise* relative error even when
    both computations are exact to the last bit of their inputs, so an elementwise test
    would measure cancellation, not the code under test. The floor does the same for a
    whole leaf that is a cancellation (Scout's sum of squared deviations over a window
    where the updates barely vary sits ~1e-7 below the values it is computed from): its
    rounding error is set by the scale of its inputs, and how large it comes out depends
    on the summation order, which inductor picks by the CPU's vector width (AVX2 and
    AVX-512 give different orders).
    """
    s_a, s_e = structure(actual), structure(expected)
    assert s_a == s_e, f"{what}: structure {s_a} != expected {s_e}"
    data_scale = _largest_magnitude(flat(expected))
    for path, a, e in zip(paths(expected), flat(actual), flat(expected)):
        where = f"{what} at {_path_str(path)}"
        if not isinstance(e, torch.Tensor):
            assert a == e, f"{where}: {a!r} != {e!r}"
            continue
        assert isinstance(a, torch.Tensor), f"{where}: got {a!r}, expected a tensor"
        assert a.shape == e.shape, f"{where}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
        tol = rtol(e.dtype) if callable(rtol) else rtol
        if tol == 0 or not e.is_floating_point():  # counts and flags are exact
            assert torch.equal(a, e), f"{where}: not bit-identical, max |diff| = {_maxdiff(a, e)}"
            continue
        if e.numel() == 0:
            continue
        scale = _largest_magnitude([e])
        bound = tol * max(scale, TREE_FLOOR * data_scale)
        err = _maxdiff(a, e)
        assert err <= bound or err == 0, (
            f"{where}: max |diff| {err:.3e} > {tol:.0e} x max(max |expected| {scale:.3e}, "
            f"{TREE_FLOOR:.0e} x the tree's {data_scale:.3e})"
        )


TREE_FLOOR = 1e-3
"""The absolute floor of :func:`assert_trees_close`, as a fraction of the largest magnitude
in the tree compared. 1e-3 keeps a leaf a thousand times smaller than its tree checked at
its own scale's precision to within three digits: a wrong formula (a factor, a sign, a
missing term) still fails, while reordered sums of values at the tree's scale pass on
every CPU."""


def _largest_magnitude(leaves: list[Any]) -> float:
    """The largest finite ``|x|`` over the floating-point tensors among ``leaves`` (0 if none)."""
    largest = 0.0
    for x in leaves:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            m = x.detach().abs().double()
            m = m[m.isfinite()]
            if m.numel():
                largest = max(largest, m.max().item())
    return largest


def _maxdiff(a: torch.Tensor, e: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, e = a.detach().double(), e.detach().double()
    # Equal values are no difference, infinities included (Scout's window minimum starts at +inf).
    return torch.where(a == e, 0.0, a - e).abs().max().item()


# ----------------------------------------------------------------------------------- runs


def run(tx: holotx.GradientTransformation, params: Any, grads_seq: Sequence[Any],
        update: Callable[..., Any] | None = None, **extra: Any) -> list[tuple[Any, Any]]:
    """``init`` then one ``update`` per element of ``grads_seq`` (params held fixed);
    returns ``[(updates, state), ...]``, the state being the one after each step."""
    update = update or tx.update
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        updates, state = update(grads, state, params, **extra)
        out.append((updates, state))
    return out


def grads_seq(params: Any, steps: int, seed: int = 100) -> list[Any]:
    return [make_grads(params, seed + k) for k in range(steps)]


# ------------------------------------------------------------------------- 1. purity


class _Record(NamedTuple):
    where: str
    tensor: torch.Tensor
    copy: torch.Tensor
    data_ptr: int
    version: int


def _record(tree: Any, label: str) -> list[_Record]:
    out = []
    for path, x in zip(paths(tree), flat(tree)):
        if isinstance(x, torch.Tensor):
            out.append(_Record(f"{label} at {_path_str(path)}", x, x.clone(), x.data_ptr(), x._version))
    return out


def check_pure(case: Case, tree: str = "small") -> None:
    """``init`` and ``update`` never write into their inputs, and are deterministic.

    Every tensor handed to ``init`` or to any of the ``update`` calls (params, each
    step's grads, each step's input state) is recorded before the call with a copy, its
    ``data_ptr`` and its version counter (``t._version``, bumped by every in-place op,
    even one that writes the same values back). Afterwards each must be bit-identical
    to its copy (``torch.equal``), still at the same storage, at the same version.
    Re-running the whole sequence must give bit-identical outputs (same inputs, same
    outputs). Run on several :data:`TREES`: small and big leaves, with and
    without a chain's donation of intermediate updates (which must never reach the
    caller's buffers).
    """
    tx = case.factory()
    params = make_params("float32", tree=tree)
    seq = grads_seq(params, case.steps)
    records = _record(params, "params")
    state = tx.init(params)
    outputs = []
    for k, grads in enumerate(seq):
        records += _record(grads, f"step {k + 1} grads") + _record(state, f"step {k + 1} input state")
        updates, state = tx.update(grads, state, params)
        outputs.append((updates, state))
    for r in records:
        assert r.tensor._version == r.version, f"{r.where} was written in place (version counter moved)"
        assert r.tensor.data_ptr() == r.data_ptr, f"{r.where} was moved to new storage"
        assert torch.equal(r.tensor, r.copy), f"{r.where} changed value"
    again = run(case.factory(), params, seq)
    for k, (first, second) in enumerate(zip(outputs, again)):
        assert_trees_close(second[0], first[0], f"re-run step {k + 1} updates")
        assert_trees_close(second[1], first[1], f"re-run step {k + 1} state")


# ------------------------------------------------------------- 2. structure and dtypes


def check_structure(case: Case, dtype: str) -> None:
    """Updates have the grads' optree structure and each leaf its grad's shape and dtype;
    the state keeps its structure, shapes and dtypes from ``init`` across steps (a state
    that silently promotes bfloat16 to float32, or float32 to float64 through a float64
    scalar, fails here); and any state NamedTuple with a ``count`` field holds a 0-d
    integer tensor (a Python int would force a recompile per step under torch.compile;
    a float loses exactness after 2**24 steps in float32).

    Run for float32, float64, bfloat16 and a mixed tree (leaves of all three dtypes,
    which the multi-tensor path must group by dtype).
    """
    tx = case.factory()
    params = make_params(dtype)
    state0 = tx.init(params)
    seq = grads_seq(params, case.steps)
    for k, (grads, (updates, state)) in enumerate(zip(seq, run(tx, params, seq))):
        step = f"step {k + 1}"
        assert structure(updates) == structure(grads), f"{step}: updates structure differs from grads"
        for path, u, g in zip(paths(grads), flat(updates), flat(grads)):
            assert isinstance(u, torch.Tensor), f"{step}: update at {_path_str(path)} is {u!r}"
            assert u.shape == g.shape, f"{step}: update at {_path_str(path)} has shape {tuple(u.shape)}"
            assert u.dtype == g.dtype, (
                f"{step}: update at {_path_str(path)} has dtype {u.dtype} where the grad has {g.dtype}")
        assert structure(state) == structure(state0), f"{step}: state structure changed"
        for path, s, s0 in zip(paths(state0), flat(state), flat(state0)):
            if isinstance(s0, torch.Tensor):
                where = f"{step}: state at {_path_str(path)}"
                assert isinstance(s, torch.Tensor), f"{where} is {s!r}"
                assert s.dtype == s0.dtype, f"{where} changed dtype {s0.dtype} -> {s.dtype}"
                assert s.shape == s0.shape, f"{where} changed shape {tuple(s0.shape)} -> {tuple(s.shape)}"
        for node in _nodes(state):
            if isinstance(node, tuple) and "count" in getattr(node, "_fields", ()):
                # A step count is a 0-d integer tensor: one per transform, or one per leaf
                # (torch's per-parameter ``step``), a tree of them.
                for count in flat(node.count):
                    where = f"{step}: {type(node).__name__}.count"
                    if count is None:
                        continue
                    assert isinstance(count, torch.Tensor), f"{where} is {count!r}, not a tensor"
                    assert count.dim() == 0, f"{where} has shape {tuple(count.shape)}"
                    assert count.dtype in (torch.int32, torch.int64), f"{where} has dtype {count.dtype}"


# ---------------------------------------------------------------- 3. None gradients


def _leaf_state(state: Any, param_path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Any]]:
    """The state leaves that belong to one parameter: those whose path ends with the
    parameter's path (a per-parameter buffer is a tree shaped like the params). Param
    paths start with a top-level key that no transform uses for anything else."""
    n = len(param_path)
    return [(p, x) for p, x in zip(paths(state), flat(state)) if tuple(p[-n:]) == tuple(param_path)]


def check_none_gradients(case: Case) -> None:
    """A ``None`` gradient leaf means "no gradient here" (a frozen or unused parameter):
    its update is ``None`` and its state is left exactly as it was.

    After one warm-up step (so the state is not all zeros and a reset would show), each
    leaf in turn is given a ``None`` gradient; the state leaves belonging to that
    parameter (found by path, see :func:`_leaf_state`) must be bit-identical to the
    previous step's.
    """
    tx = case.factory()
    params = make_params("float64")
    state = tx.init(params)
    _, state = tx.update(make_grads(params, 1), state, params)
    grads = make_grads(params, 2)
    for i, path in enumerate(paths(params)):
        where = f"with grads None at {_path_str(path)}"
        updates, new_state = tx.update(with_leaf(grads, i, None), state, params)
        if case.none_is_zero_step and flat(params)[i] is not None:
            assert torch.equal(flat(updates)[i], torch.zeros_like(flat(params)[i])), f"{where}: not zero"
            continue
        assert structure(updates) == structure(with_leaf(grads, i, None)), f"{where}: updates structure"
        assert flat(updates)[i] is None, f"{where}: the update there is {flat(updates)[i]!r}, not None"
        old = _leaf_state(state, path)
        new = _leaf_state(new_state, path)
        assert [p for p, _ in new] == [p for p, _ in old], f"{where}: the leaf's state changed structure"
        for (spath, o), (_, n) in zip(old, new):
            if o is None or n is None:
                assert o is None, f"{where}: state at {_path_str(spath)} {o!r} -> {n!r}"
                assert n is None, f"{where}: state at {_path_str(spath)} {o!r} -> {n!r}"
            else:
                assert torch.equal(o, n), f"{where}: state at {_path_str(spath)} changed: {o} -> {n}"


# ------------------------------------------------------------------- params required?


def check_params_usage(case: Case) -> None:
    """``update(grads, state)`` without params: a transform that needs them raises a
    ``ValueError`` that says so (never a TypeError from ``None + tensor`` deep inside);
    one that does not gives exactly what it gives with params."""
    tx = case.factory()
    params = make_params("float64")
    state = tx.init(params)
    grads = make_grads(params, 1)
    if case.needs_params:
        with pytest.raises(ValueError, match="params"):
            tx.update(grads, state, None)
    else:
        without = tx.update(grads, state, None)
        with_ = tx.update(grads, state, params)
        assert_trees_close(without[0], with_[0], "updates without params")
        assert_trees_close(without[1], with_[1], "state without params")


# ------------------------------------------------------------- 4. torch.func.grad


GRAD_EPS = 1e-6
GRAD_RTOL = 1e-6


def _unroll(tx: holotx.GradientTransformation, params: Any, steps: int) -> Any:
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(smooth_grads(params), state, params)
        params = holotx.apply_updates(params, updates)
    return params


def check_grad(case: Case) -> None:
    r"""Differentiating through the optimizer (meta-learning) gives the true derivative.

    :math:`L(\theta_0) = \sum w \cdot \theta_K`, where :math:`\theta_{t+1} = \theta_t +
    u_t` and :math:`u_t` is the transform's update for the gradient field
    :func:`smooth_grads` evaluated at :math:`\theta_t` (a closed loop, as in MAML), K =
    ``case.steps``. In float64, ``torch.func.grad(L)`` must equal central finite
    differences :math:`(L(\theta+h e_j) - L(\theta-h e_j))/2h` with :math:`h = 10^{-6}`.

    Tolerance: the central difference errs by :math:`h^2 |L'''|/6 \approx 10^{-13}` times
    the third derivative plus about :math:`\epsilon_{64}|L|/h \approx 10^{-10}|L|` of
    rounding; both are far below :math:`10^{-6}` of the gradient's scale (its largest
    entry), which is the bound used. A wrong or missing derivative term is O(1) off.
    Values are chosen to keep every transform smooth (checked when the cases were
    chosen): |params| start >= 0.5 and no parameter changes sign along any trajectory,
    so gradients never pass through zero; the gradient norm stays above the clipping
    threshold (clipping strictly active); AMSGrad's new and old second moments differ
    by more than 10% relative (the max is never tied).
    """
    if case.nondiff:
        pytest.skip(case.nondiff)
    tx = case.factory()
    params = make_params("float64")
    weights = make_grads(params, 7)
    leaves, spec = optree.tree_flatten(params, none_is_leaf=True)
    sizes = [x.numel() for x in leaves]

    def loss(p: Any) -> torch.Tensor:
        final = _unroll(tx, p, case.steps)
        return sum((w * x).sum() for w, x in zip(flat(weights), flat(final)))

    def loss_vec(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, sizes)
        return loss(optree.tree_unflatten(spec, [t.reshape(x.shape) for t, x in zip(parts, leaves)]))

    auto = torch.cat([g.reshape(-1) for g in flat(torch.func.grad(loss)(params))])
    x0 = torch.cat([x.reshape(-1) for x in leaves])
    fd = torch.empty_like(x0)
    with torch.no_grad():
        assert torch.isfinite(loss_vec(x0)), "the loss is not finite: pick other values"
        for j in range(x0.numel()):
            e = torch.zeros_like(x0)
            e[j] = GRAD_EPS
            fd[j] = (loss_vec(x0 + e) - loss_vec(x0 - e)) / (2 * GRAD_EPS)
    scale = fd.abs().max().item()
    err = (auto - fd).abs().max().item()
    worst = int((auto - fd).abs().argmax())
    assert err <= GRAD_RTOL * scale, (
        f"torch.func.grad differs from finite differences: max |diff| {err:.3e} (element {worst}: "
        f"autograd {auto[worst].item():.9g}, finite diff {fd[worst].item():.9g}) > "
        f"{GRAD_RTOL:.0e} x {scale:.3e}"
    )


# ------------------------------------------------------------------- 5. vmap


VMAP_RTOL = 1e-12
VMAP_BATCH = 3


def _vmapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.func.vmap(fn)`` over every tensor leaf of every argument (batch dim 0).

    vmap only takes tensors (and its own pytrees) in and out, so the trees are flattened
    with optree here and rebuilt inside; ``None`` leaves are carried as structure.
    """

    def wrapper(*args: Any) -> Any:
        leaves, spec = optree.tree_flatten(args)
        tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        out_spec: list[optree.PyTreeSpec] = []

        def flat_fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            full = list(leaves)
            for i, t in zip(tensor_idx, tensors):
                full[i] = t
            out_leaves, s = optree.tree_flatten(fn(*optree.tree_unflatten(spec, full)))
            bad = [x for x in out_leaves if not isinstance(x, torch.Tensor)]
            assert not bad, f"non-tensor leaves in the output cannot be vmapped: {bad!r}"
            out_spec.append(s)
            return tuple(out_leaves)

        outs = torch.func.vmap(flat_fn)(*(leaves[i] for i in tensor_idx))
        return optree.tree_unflatten(out_spec[0], list(outs))

    return wrapper


def check_vmap(case: Case) -> None:
    """``vmap(init)`` and ``vmap(update)`` over a batch of 3 independent problems (params
    and grads batched on dim 0: ensembles, per-task optimizers, hyperparameter sweeps)
    equal a Python loop over the batch, step by step, in updates and state.

    torch's ``_foreach_*`` ops have no batching rule, so under vmap ``holotx.ops`` runs a
    per-leaf loop of ordinary ops computing the same formula; the two differ at most by
    rounding, hence 1e-12 relative in float64 (float64 rounding is ~1e-16). The tree is
    the ``big`` one (:data:`TREES`).
    """
    tx = case.factory()
    params = make_params("float64", batch=VMAP_BATCH, tree="big")
    seq = grads_seq(params, case.steps)
    init_v, update_v = _vmapped(tx.init), _vmapped(tx.update)
    state = init_v(params)
    batched = []
    for grads in seq:
        updates, state = update_v(grads, state, params)
        batched.append((updates, state))
    for b in range(VMAP_BATCH):
        looped = run(case.factory(), index_tree(params, b), [index_tree(g, b) for g in seq])
        for k, ((u_v, s_v), (u_l, s_l)) in enumerate(zip(batched, looped)):
            assert_trees_close(index_tree(u_v, b), u_l, f"batch {b} step {k + 1} updates", VMAP_RTOL)
            assert_trees_close(index_tree(s_v, b), s_l, f"batch {b} step {k + 1} state", VMAP_RTOL)


# ------------------------------------------------------------------ 6. torch.compile


COMPILE_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _compile_rtol(dtype: torch.dtype) -> float:
    return COMPILE_RTOL.get(dtype, 0.0)


class _Compiled(NamedTuple):
    update: Callable[..., Any]
    counter: CompileCounterWithBackend


def _compiled(tx: holotx.GradientTransformation, backend: str) -> _Compiled:
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.utils.counters.clear()
    return _Compiled(torch.compile(tx.update, backend=counter, fullgraph=True), counter)


def _assert_one_graph(compiled: _Compiled, frames_after_first_step: int, what: str) -> None:
    """No graph break and nothing compiled after the first step.

    ``frame_count`` counts backend calls; the first call may take two (dynamo restarts
    its analysis once when it turns a traced Python scalar into a tensor), which is
    compile time, not a second graph. What must never happen is a compile on a later
    step: that means the graph was specialised on a value that changes (a step count or
    hyperparameter baked in as a constant), i.e. a recompile per step or per change.
    """
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, f"graph breaks: {breaks}"
    assert compiled.counter.frame_count == frames_after_first_step, (
        f"{what}: compiled again after the first step ({frames_after_first_step} -> "
        f"{compiled.counter.frame_count} backend calls): a changing value is baked into the graph"
    )


def check_compile(case: Case, backend: str = "aot_eager") -> None:
    """``torch.compile(tx.update, fullgraph=True)`` gives eager's numbers over the steps,
    as one graph: no graph breaks (``fullgraph=True`` raises on one; dynamo's
    ``graph_break`` counter is checked too) and no recompile on later steps (a value that
    changes each step, such as the step count, must be a tensor in the graph, never a
    Python number baked into it).

    One run on a tree whose leaves alternate float32 and float64 covers both dtypes at
    once (and the grouping by dtype). Tolerances, relative to each leaf's largest value:
    float32 1e-6 (about 8 ulps: the compiled graph may reorder or fuse the elementwise
    math), float64 1e-12. bfloat16 is left out: a fused kernel computes a bfloat16 chain
    in float32 and rounds once, eager rounds after every op, so they legitimately differ
    by several bfloat16 ulps. ``aot_eager`` runs the traced graph with eager kernels, so
    it tests tracing at a fraction of inductor's compile time; the ``inductor`` cases run
    the default backend. The tree is ``dense_big`` (:data:`TREES`): eager donates a
    chain's fresh intermediate updates, the compiled graph does not.
    """
    tx = case.factory()
    params = make_params(COMPILE_DTYPES, tree="dense_big")
    seq = grads_seq(params, case.steps)
    compiled = _compiled(tx, backend)
    eager = run(tx, params, seq)
    rtol = _compile_rtol if case.global_rtol is None else case.global_rtol
    state = tx.init(params)
    frames_after_first = 0
    for k, (grads, (u_e, s_e)) in enumerate(zip(seq, eager)):
        u_c, state = compiled.update(grads, state, params)
        if k == 0:
            frames_after_first = compiled.counter.frame_count
        if case.sync_updates:
            assert_trees_close(holotx.apply_updates(params, u_c), holotx.apply_updates(params, u_e),
                               f"compiled step {k + 1} params + updates", rtol)
        else:
            assert_trees_close(u_c, u_e, f"compiled step {k + 1} updates", rtol)
        assert_trees_close(state, s_e, f"compiled step {k + 1} state", rtol)
    _assert_one_graph(compiled, frames_after_first, f"{case.steps} steps")


# ------------------------------------------------------------- chain composition


def check_chain_composition(case: Case, tree: str = "dense") -> None:
    """A transform gives the same numbers on its own and inside a :func:`holotx.chain`.

    The executor lets the next transform write into updates that the previous one freshly
    made. That must never change a result:

    * ``chain(scale(1.0), tx)`` equals ``tx``: ``scale(1.0)`` makes fresh updates equal
      to the grads (multiplying by one is exact), so ``tx`` runs with its incoming
      updates donated; its state must also equal ``tx``'s own.
    * ``chain(tx, scale(2.0))`` equals ``2 * tx`` (exact: a power of two) with ``tx``'s
      state: if ``tx`` returns updates that share memory with its state and the executor
      takes them for fresh, ``scale`` doubles the state in place and this fails.

    Bit-identical: the same ops run on the same values. Run on the ``dense`` and
    ``dense_big`` :data:`TREES`.
    """
    params = make_params("float32", tree=tree)
    seq = grads_seq(params, case.steps)
    alone = run(case.factory(), params, seq)
    before = run(holotx.chain(holotx.scale(1.0), case.factory()), params, seq)
    after = run(holotx.chain(case.factory(), holotx.scale(2.0)), params, seq)
    for k, ((u, s), (u_b, s_b), (u_a, s_a)) in enumerate(zip(alone, before, after)):
        step = f"step {k + 1}"
        assert_trees_close(u_b, u, f"{step}: chain(scale(1.0), tx) updates vs tx")
        assert_trees_close(s_b[1], s, f"{step}: chain(scale(1.0), tx) state vs tx")
        doubled = holotx.tree.map(lambda x: x * 2.0, u)
        assert_trees_close(u_a, doubled, f"{step}: chain(tx, scale(2.0)) updates vs 2 * tx")
        assert_trees_close(s_a[0], s, f"{step}: chain(tx, scale(2.0)) state vs tx")


# ------------------------------------------------------------------ 8. donation


def _storages(tree: Any) -> set[int]:
    return {x.untyped_storage().data_ptr() for x in flat(tree)
            if isinstance(x, torch.Tensor) and x.numel() > 0}


def check_donated(case: Case, dtype: str, tree: str = "small", *, state_only: bool = False) -> None:
    """``update(grads, state, params, donate=True)`` equals the pure call bit for bit.

    The contract says both paths are one implementation of the math (each op takes an
    ``inplace`` flag), and an in-place foreach kernel runs the same arithmetic as its
    out-of-place twin, so the results must be bit-identical, not merely close. The
    donated call gets clones of the grads and of its own previous state (donation allows
    overwriting them); the two trajectories are compared after each step. Also checked:
    ``params`` are never donated (bit-identical, same version counter), and the donated
    updates never share memory with the new state (the caller owns the updates and may
    write into them, e.g. ``apply_updates`` with a donated flat buffer, which would then
    corrupt the optimizer state), and the new state never shares memory with the
    donated grads (an owner such as ``FlatLayout.bind_grads`` refills the same grad
    buffers every step, which would overwrite that state).

    With ``state_only``, the call is ``donate=True, donate_updates=False``: the state
    alone is donated (what a ``torch.optim`` adapter does, whose ``.grad`` tensors must be
    left as they were), and the grads must also come back bit-identical and unwritten.
    """
    tx = case.factory()
    params = make_params(dtype, tree=tree)
    param_records = _record(params, "params")
    pure_state = tx.init(params)
    donated_state = tx.init(params)
    how = {"donate": True, **({"donate_updates": False} if state_only else {})}
    what = "state-donated" if state_only else "donated"
    for k, grads in enumerate(grads_seq(params, case.steps)):
        step = f"step {k + 1}"
        pure_u, pure_state = tx.update(grads, pure_state, params)
        donated_grads = clone_tree(grads)
        grad_records = _record(donated_grads, "grads") if state_only else []
        don_u, donated_state = tx.update(donated_grads, clone_tree(donated_state), params, **how)
        assert_trees_close(don_u, pure_u, f"{step} {what} updates")
        assert_trees_close(donated_state, pure_state, f"{step} {what} state")
        shared = _storages(don_u) & _storages(donated_state)
        assert not shared, f"{step}: {what} updates share memory with the new state"
        shared = _storages(donated_grads) & _storages(donated_state)
        assert not shared, f"{step}: the new state shares memory with the donated grads"
        for r in grad_records:
            assert r.tensor._version == r.version, f"{step}: {r.where} was written in place"
            assert torch.equal(r.tensor, r.copy), f"{step}: {r.where} changed"
    for r in param_records:
        assert r.tensor._version == r.version, f"{r.where} was written in place by a donated update"
        assert torch.equal(r.tensor, r.copy), f"{r.where} changed under a donated update"


# --------------------------------------------------------- 7. inject_hyperparams (and its use
# under compile and autograd)


INJECT_RTOL = 1e-12
INJECT_LR_SWITCH_STEP = 3
INJECT_NEW_LR_FACTOR = 0.25


def check_inject(case: InjectCase) -> None:
    """``inject_hyperparams(alias)(**kw)`` computes what ``alias(**kw)`` computes, and
    its learning rate can be changed between steps through ``state.hyperparams['lr']``.

    float64; injected hyperparameters are float64 0-d tensors, so equality is expected
    up to rounding differences between a tensor scalar and a Python float in a kernel
    (1e-12 relative). The params follow the trajectory (``apply_updates``) so later steps
    see new values. After step ``INJECT_LR_SWITCH_STEP`` the stored ``lr`` is replaced;
    from then on the injected transform must match a fresh ``alias(**kw, lr=new)``
    continuing from the same (un-injected) state, and must differ from the old ``lr``
    (the override is not silently ignored). Not done for a schedule ``lr``, which is
    re-evaluated from the count each step by design.
    """
    kwargs = dict(case.kwargs)
    injected = holotx.inject_hyperparams(case.alias)(**kwargs)
    plain = case.alias(**kwargs)
    params = make_params("float64")
    s_inj, s_plain = injected.init(params), plain.init(params)
    for k in range(case.steps):
        step = f"step {k + 1}"
        grads = make_grads(params, 100 + k)
        switch = k == INJECT_LR_SWITCH_STEP and not case.lr_is_schedule
        if switch:
            old_lr_updates, _ = plain.update(grads, s_plain, params)
            kwargs["lr"] = kwargs["lr"] * INJECT_NEW_LR_FACTOR
            new_lr = torch.tensor(kwargs["lr"], dtype=torch.float64)
            s_inj = s_inj._replace(hyperparams={**s_inj.hyperparams, "lr": new_lr})
            plain = case.alias(**kwargs)
        u_inj, s_inj = injected.update(grads, s_inj, params)
        u_plain, s_plain = plain.update(grads, s_plain, params)
        assert_trees_close(u_inj, u_plain, f"{step} injected updates", INJECT_RTOL)
        if switch:
            changed = [not torch.equal(a, b) for a, b in zip(flat(u_inj), flat(old_lr_updates)) if a.numel()]
            assert any(changed), f"{step}: changing hyperparams['lr'] did not change the update"
            assert torch.equal(s_inj.hyperparams["lr"], new_lr), f"{step}: the new lr is not in the state"
        params = holotx.apply_updates(params, u_plain)
    assert math.isfinite(sum(float(x.abs().sum()) for x in flat(params)))


def _hyperparam_tensors(hyperparams: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, value in hyperparams.items():
        if isinstance(value, tuple):
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            out.append((name, value))
    return out


def _scaled_hyperparams(hyperparams: Mapping[str, Any], factor: float) -> dict[str, Any]:
    return {k: tuple(x * factor for x in v) if isinstance(v, tuple) else v * factor
            for k, v in hyperparams.items()}


def check_inject_no_retrace(case: InjectCase, backend: str = "aot_eager") -> None:
    """Injected hyperparameters change between steps *without re-tracing*: the compiled
    update takes them as graph inputs, never as constants baked into the graph.

    After a first compiled step every injected value (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``momentum``, ...) is halved in ``state.hyperparams``; the next
    steps must not compile again and must equal eager with the same state (tolerances
    as :func:`check_compile`). This is what lets a sweep or a scheduler write new values
    into a compiled training step.
    """
    tx = holotx.inject_hyperparams(case.alias)(**case.kwargs)
    params = make_params(COMPILE_DTYPES, tree="dense")
    compiled = _compiled(tx, backend)
    state = tx.init(params)
    _, state = compiled.update(make_grads(params, 100), state, params)
    frames = compiled.counter.frame_count
    state = state._replace(hyperparams=_scaled_hyperparams(state.hyperparams, 0.5))
    eager_state = state
    for k in range(2):
        grads = make_grads(params, 101 + k)
        u_c, state = compiled.update(grads, state, params)
        u_e, eager_state = tx.update(grads, eager_state, params)
        assert_trees_close(u_c, u_e, f"step {k + 2} updates after the change", _compile_rtol)
        assert_trees_close(state, eager_state, f"step {k + 2} state", _compile_rtol)
    _assert_one_graph(compiled, frames, "changing injected hyperparameters")


def check_inject_grad(case: InjectCase) -> None:
    r"""Injected hyperparameters can be differentiated (meta-learned learning rates).

    :math:`L(h) = \sum w \cdot \theta_3(h)` over 3 closed-loop steps (as
    :func:`check_grad`) of ``inject_hyperparams(alias)(**kw)`` with every numeric
    hyperparameter ``h`` given as a float64 0-d tensor; ``torch.func.grad`` with respect
    to all of them must equal central finite differences (same step and tolerance as
    :func:`check_grad`, relative to the largest derivative; the step is relative to each
    value). A schedule ``lr`` is not a tensor and is left as it is.
    """
    params = make_params("float64")
    weights = make_grads(params, 7)
    numeric = {k: v for k, v in case.kwargs.items()
               if not isinstance(v, bool) and isinstance(v, (int, float, tuple))}

    def as_tensors(values: Mapping[str, Any]) -> dict[str, Any]:
        return {k: tuple(torch.tensor(x, dtype=torch.float64) for x in v) if isinstance(v, tuple)
                else torch.tensor(v, dtype=torch.float64) for k, v in values.items()}

    def loss(hp: Mapping[str, Any]) -> torch.Tensor:
        tx = holotx.inject_hyperparams(case.alias)(**{**case.kwargs, **hp})
        final = _unroll(tx, params, 3)
        return sum((w * x).sum() for w, x in zip(flat(weights), flat(final)))

    hp0 = as_tensors(numeric)
    auto = dict(_hyperparam_tensors(torch.func.grad(loss)(hp0)))
    fd = {}
    with torch.no_grad():
        for name, value in _hyperparam_tensors(hp0):
            def shifted(delta: float, name: str = name) -> torch.Tensor:
                hp = {k: tuple(x + delta if f"{k}[{i}]" == name else x for i, x in enumerate(v))
                      if isinstance(v, tuple) else (v + delta if k == name else v) for k, v in hp0.items()}
                return loss(hp)

            # A step relative to the value (eps=1e-8 must stay positive), but not below 1e-9,
            # where rounding (~1e-16 |L| / h) would swamp the difference.
            h = GRAD_EPS * max(abs(value.item()), 1e-3)
            fd[name] = ((shifted(h) - shifted(-h)) / (2 * h)).item()
    scale = max(abs(v) for v in fd.values())
    for name, expected in fd.items():
        got = auto[name].item()
        assert abs(got - expected) <= GRAD_RTOL * scale, (
            f"d loss / d {name}: torch.func.grad gives {got:.9g}, finite differences {expected:.9g}"
        )


# ------------------------------------------------------------------ 8. DTensor params


def to_dtensor(tree: Any, mesh: Any) -> Any:
    """Each tensor leaf as a ``DTensor`` sharded along its first dimension (replicated if
    it is 0-d), on ``mesh``."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return distribute_tensor(x, mesh, [Shard(0) if x.dim() else Replicate()])

    return optree.tree_map(one, tree, none_is_leaf=True)


def full_tensors(tree: Any) -> Any:
    """Each ``DTensor`` leaf as its whole value, a plain tensor; other leaves as they are."""
    from torch.distributed.tensor import DTensor

    return optree.tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree,
                           none_is_leaf=True)


def check_dtensor(case: Case, mesh: Any) -> None:
    """On ``DTensor`` params and grads (every leaf sharded along its first dimension on
    ``mesh``, a one-process mesh in the harness), the pure update and the donated step
    give, bit for bit, what they give on plain tensors; updates come back as DTensors; the
    pure update leaves the grads, params and state as they were.

    On one process every DTensor op runs the same local kernel as on the plain tensor, so
    any difference is a code path that reads a DTensor's storage, calls ``.tolist()`` on
    it, mixes it with plain tensors, or reduces over a shard: the machinery failures a
    sharded run would meet. The sharded reductions themselves are checked on two
    processes in ``tests/test_distributed.py``.
    """
    from torch.distributed.tensor import DTensor

    from holotx.flat import make_step

    params = make_params(COMPILE_DTYPES, tree="small")
    seq = grads_seq(params, case.steps)
    d_params = to_dtensor(params, mesh)
    d_seq = [to_dtensor(g, mesh) for g in seq]
    expected = run(case.factory(), params, seq)
    tx = case.factory()
    state = tx.init(d_params)
    records = _record_local(d_params, "params")
    for k, (grads, (u_e, s_e)) in enumerate(zip(d_seq, expected)):
        records += _record_local(grads, f"step {k + 1} grads") + _record_local(state, f"step {k + 1} state")
        updates, state = tx.update(grads, state, d_params)
        for path, u, g in zip(paths(updates), flat(updates), flat(grads)):
            if g is not None:
                assert isinstance(u, DTensor), f"step {k + 1} updates at {_path_str(path)}: not a DTensor"
        assert_trees_close(full_tensors(updates), u_e, f"DTensor step {k + 1} updates")
        assert_trees_close(full_tensors(state), s_e, f"DTensor step {k + 1} state")
    for r in records:
        assert r.tensor._version == r.version, f"{r.where} was written in place"
        assert torch.equal(r.tensor, r.copy), f"{r.where} changed value"

    step = make_step(case.factory(), donate=True)
    plain = make_step(case.factory(), donate=True)
    tx = case.factory()
    p_plain, s_plain = clone_tree(params), tx.init(params)
    p_dist, s_dist = to_dtensor(params, mesh), tx.init(d_params)
    for k, (grads, d_grads) in enumerate(zip(seq, d_seq)):
        p_plain, s_plain = plain(p_plain, clone_tree(grads), s_plain)
        p_dist, s_dist = step(p_dist, clone_tree(d_grads), s_dist)
        assert_trees_close(full_tensors(p_dist), p_plain, f"DTensor donated step {k + 1} params")
        assert_trees_close(full_tensors(s_dist), s_plain, f"DTensor donated step {k + 1} state")


def _record_local(tree: Any, label: str) -> list[_Record]:
    """:func:`_record` of each ``DTensor``'s local shard (a DTensor has no storage of its own)."""
    from torch.distributed.tensor import DTensor

    return _record(optree.tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, tree,
                                   none_is_leaf=True), label)
