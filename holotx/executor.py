"""How a step runs, decided in one place.

The math layer (``transforms/``, ``optimizers/``, ``wrappers/``, the combinators) says
*what* a rule computes, in the ops of :mod:`holotx.ops`. It says nothing about memory:
where it replaces a value (``mu = ops.lerp_(mu, g, 1 - b1)``: the old ``mu`` is not read
again) or no longer needs one (``ops.sqrt_into(nu, g)``: ``g`` is dead), it says so, and
this module decides whether that value's memory may really be written. Everything else
about execution is decided here too, once per step:

* **The context**: eager, traced by ``torch.compile``, or under a ``torch.func``
  transform (``vmap``, ``grad``, ``jvp``); foreach kernels or one op per leaf (foreach ops
  have no vmap batching rule); Python floats for per-step scalars or 0-d tensors.
* **Which buffers may be written.** A step is given its inputs by a caller: the
  incoming updates, the state and the params. In eager mode, whatever the caller did not
  donate is *outside* the step, named by identity (no storage pointers are read: a
  DTensor has none); so is every state tensor a transform returns (so that no later
  transform writes into a state through updates that alias it), and everything a user's
  transform saw or returned. Every other tensor was made by the step itself and may be
  overwritten by an op that replaces it. Traced by ``torch.compile`` (where an identity
  read would become a guard, and a recompile for every new tensor), the compiler plans
  intermediate buffers itself, and the one write that matters is the one into donated
  state: the state lists :func:`~holotx.multi.multi_tensor_update` hands a rule are
  marked, and only they are written in place. Under ``vmap`` or while autograd records,
  nothing is written in place.
* **Transforms not built by holotx** (a user's, written as optax's, pure) run outside
  the plan: the holotx transforms they call start their own pure plans, so nothing they
  can see is ever written, and no request meant for holotx reaches them.
* **The final scaling.** A caller that applies the updates itself (a donated
  :func:`~holotx.flat.make_step`, the adapter) may ask for the chain's last scaling (the
  learning rate) to be handed over, and then applies ``p += factor * u`` in one pass.
  The request is addressed to one transform; ``chain``, ``inject_hyperparams`` and
  ``lookahead`` pass it to the transform they run last (:func:`redirect_scale`), and
  ``scale``/``scale_by_schedule`` honour it (:func:`take_scale`).

Callers: a holotx transform's ``update`` (pure, or with ``donate=True`` /
``donate_updates``), :func:`holotx.flat.make_step`, and the ``torch.optim`` adapter.

The torch 2.13 gaps that shape dispatch are listed in :data:`TORCH_GAPS`, each pinned by
a test in ``tests/test_torch_workarounds.py`` that fails once torch fixes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch._C._functorch as _functorch

from holotx import tree

__all__ = [
    "TORCH_GAPS",
    "Plan",
    "call",
    "call_pure",
    "current",
    "is_own",
    "owned_step",
    "redirect_scale",
    "register",
    "run",
    "scale_requested",
    "scale_request_to",
    "take_scale",
]

TORCH_GAPS: dict[str, str] = {
    "foreach_under_vmap": "torch._foreach_* ops have no batching rule under torch.func.vmap: under "
                          "vmap every op runs one leaf at a time (holotx.ops).",
    "foreach_tensor_scalar_backward": "the backward of a foreach op with a 0-d tensor scalar that "
                                      "requires grad fails: such a scalar takes the per-leaf path.",
    "foreach_add_tensor_under_compile": "compiled by inductor, _foreach_add(list, 0-d tensor) keeps "
                                        "the first value it saw (later values are silently ignored): "
                                        "the per-leaf form is used under compile.",
    "inplace_under_functorch_grad": "an in-place op after a foreach op under torch.func.grad gives a "
                                    "wrong gradient without an error (_foreach_sqrt then _foreach_div_): "
                                    "nothing is written in place under a functorch transform.",
    "foreach_copy_dtensor": "torch._foreach_copy_ has no DTensor sharding rule: DTensors are "
                            "copied one by one (holotx.ops.copy).",
    "foreach_addcmul_scalarlist_dtensor": "torch._foreach_addcmul with a list of scalars has no "
                                          "DTensor sharding rule: per-leaf for DTensors.",
    "interpreter_stack_under_dynamo": "dynamo cannot trace torch._C._functorch.get_interpreter_stack: "
                                      "under compile, vmap is recognised by a batched leaf instead.",
}
"""The torch 2.13 gaps holotx works around, one entry each (see the module docstring)."""


_local = threading.local()


def _functorch_kinds() -> frozenset[Any]:
    stack = _functorch.get_interpreter_stack()
    return frozenset(i.key() for i in stack) if stack else frozenset()


class Plan:
    """What one step may do, decided when it starts (see the module docstring)."""

    __slots__ = (
        "compiling",
        "everything_outside",
        "marked",
        "outside",
        "recording",
        "running",
        "scale_factors",
        "scale_target",
        "state_donated",
        "transformed",
        "vmap",
    )

    def __init__(self, outside: set[int] | None, state_donated: bool = False) -> None:
        self.state_donated = state_donated
        self.marked: list[list[torch.Tensor]] = []
        self.compiling = torch.compiler.is_compiling()
        # Dynamo cannot call the interpreter-stack query (TORCH_GAPS): compiled, a batched
        # leaf tells vmap apart (see foreach), and compiled code is never differentiated
        # by a functorch transform inside the graph.
        kinds = frozenset() if self.compiling else _functorch_kinds()
        self.vmap = _functorch.TransformType.Vmap in kinds
        self.transformed = bool(kinds - {_functorch.TransformType.Functionalize})
        self.recording = bool(kinds & {_functorch.TransformType.Grad, _functorch.TransformType.Jvp})
        self.everything_outside = outside is None
        self.outside: set[int] = set() if outside is None else outside
        self.running: Callable[..., Any] | None = None
        self.scale_target: Callable[..., Any] | None = None
        self.scale_factors: list[Any] | None = None

    # ---------------------------------------------------------------- dispatch

    def foreach(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether ``torch._foreach_*`` kernels can run on ``xs``: not under vmap."""
        if not xs:
            return False
        if self.compiling:
            return not _functorch.is_batchedtensor(xs[0])
        return not self.vmap

    def differentiated(self, xs: Iterable[Any]) -> bool:
        """Whether autograd records ops on ``xs``: a functorch grad or jvp transform, or
        grad mode with an operand that requires grad."""
        if self.recording:
            return True
        return torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in xs)

    def host_scalars(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether per-step scalars may be read to Python: eager, no functorch transform,
        on the CPU (no device sync), plain tensors (not a DTensor's collective result),
        and no gradient needed."""
        if self.compiling or self.transformed:
            return False
        if any(t.device.type != "cpu" or _is_wrapper(t) for t in tensors):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    # ---------------------------------------------------------------- permission

    def may_write(self, xs: Sequence[torch.Tensor]) -> bool:
        """Whether an op that replaces ``xs`` may write its result into their memory: all
        of them belong to the step (made by it, or donated by its caller), and nothing
        forbids in-place writes here (vmap: a batched result cannot go into an unbatched
        buffer; autograd: an in-place write can destroy a value saved for backward)."""
        if self.everything_outside or not xs:
            return False
        if self.compiling:
            if _functorch.is_batchedtensor(xs[0]) or not any(xs is m for m in self.marked):
                return False
        elif self.transformed:
            return False
        else:
            outside = self.outside
            if any(id(x) in outside for x in xs):
                return False
        return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))

    def mark_state(self, lists: Iterable[list[torch.Tensor] | None]) -> None:
        """Traced by compile, the state lists handed to a rule: written in place (the
        graph mutates its inputs) when the caller donated the state."""
        if self.compiling and self.state_donated:
            self.marked.extend(x for x in lists if x)

    def may_write_into(self, dead: Sequence[torch.Tensor] | None, *inputs: Iterable[Any]) -> bool:
        """Whether an op may put its result into ``dead`` (buffers the math no longer
        needs) with ``out=``: writable, eager (compiled, the compiler plans its buffers and
        a write into an input would be an extra pass), a plain tensor (``out=`` is not a
        DTensor op), and not recorded by autograd (an ``out=`` op has no derivative)."""
        if dead is None or self.compiling or not self.may_write(dead) or _is_wrapper(dead[0]):
            return False
        return not self.differentiated(x for xs in inputs for x in xs)

    def exclude(self, *trees: Any) -> None:
        """Never write into any tensor of ``trees`` during this step."""
        if self.everything_outside or self.compiling:
            return
        for t in trees:
            self.outside.update(id(x) for x in tree.flatten(t)[0] if isinstance(x, torch.Tensor))

    def exclude_leaves(self, xs: Iterable[Any]) -> None:
        """:meth:`exclude` for a list of leaves."""
        if not (self.everything_outside or self.compiling):
            self.outside.update(id(x) for x in xs if x is not None)


def _is_wrapper(x: object) -> bool:
    cls = type(x)
    return cls is not torch.Tensor and hasattr(cls, "__tensor_flatten__")


def current() -> Plan:
    """The plan of the step running on this thread; outside any step, a plan that writes
    nothing (ops used directly are pure)."""
    plan = getattr(_local, "plan", None)
    return Plan(None) if plan is None else plan


def _active() -> Plan | None:
    return getattr(_local, "plan", None)


@contextmanager
def _planned(plan: Plan | None) -> Iterator[Plan | None]:
    previous = getattr(_local, "plan", None)
    _local.plan = plan
    try:
        yield plan
    finally:
        _local.plan = previous


# ------------------------------------------------------------------- entry points

def register(update: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the math of a holotx transform's ``update`` as its entry point.

    Called by a caller outside any step, the entry starts one: a pure step by default,
    ``donate=True`` for one that may overwrite the state and the incoming updates,
    ``donate=True, donate_updates=False`` for the state alone (see :mod:`holotx.base`).
    Called within a step (by :func:`call`), it runs the math in that step."""

    def entry(updates, state, params=None, *, donate: bool = False, donate_updates: bool | None = None,
              **extra):
        plan = _active()
        if plan is None:
            plan = _new_plan(updates, state, params, donate=donate,
                             donate_updates=donate if donate_updates is None else donate_updates)
            with _planned(plan):
                return _running(plan, entry, update, updates, state, params, extra)
        return _running(plan, entry, update, updates, state, params, extra)

    entry.holotx_math = update  # type: ignore[attr-defined]
    entry.__doc__ = update.__doc__
    return entry


def _running(plan: Plan, entry, update, updates, state, params, extra):
    previous, plan.running = plan.running, entry
    try:
        return update(updates, state, params, **extra)
    finally:
        plan.running = previous


def is_own(tx: Any) -> bool:
    """Whether ``tx.update`` is the entry point of a transform holotx built (its math
    runs within the caller's step)."""
    return hasattr(tx.update, "holotx_math")


def _new_plan(updates: Any, state: Any, params: Any, *, donate: bool, donate_updates: bool) -> Plan:
    outside: set[int] = set()
    if torch.compiler.is_compiling():  # no identities read (see the module docstring)
        return Plan(outside, state_donated=donate)
    for t, donated in ((updates, donate_updates), (state, donate), (params, False)):
        if not donated and t is not None:
            outside.update(id(x) for x in tree.flatten(t)[0] if isinstance(x, torch.Tensor))
    return Plan(outside, state_donated=donate)


def call(tx: Any, updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
    """Run ``tx`` as part of the current step (what a combinator does with the transforms
    it wraps). A holotx transform runs its math in the step; any other transform runs
    outside it, pure: the holotx transforms it calls start their own pure steps, and
    every tensor it was given or returned is excluded from writes for the rest of the
    step (it may keep references to them anywhere)."""
    plan = _active()
    if plan is None or is_own(tx):
        return tx.update(updates, state, params, **extra)
    return call_pure(tx, updates, state, params, **extra)


def call_pure(tx: Any, updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
    """Run ``tx`` outside the current step, pure, as :func:`call` runs a user's transform:
    for a combinator that reads its inner transform's inputs again afterwards (the old
    state of a skipped step)."""
    plan = _active()
    if plan is None:
        return tx.update(updates, state, params, **extra)
    with _planned(None):
        new_updates, new_state = tx.update(updates, state, params, **extra)
    plan.exclude(updates, state, new_updates, new_state)
    return new_updates, new_state


def run(tx: Any, updates: Any, state: Any, params: Any, *, donate: bool = False,
        donate_updates: bool = False, hand_over_scale: bool = False,
        **extra: Any) -> tuple[Any, Any, Any, bool]:
    """One update of ``tx`` for a caller that applies it (``make_step``, the adapter).

    Returns ``(updates, state, factor, owned)``: ``factor`` is the final scaling handed
    over (``None`` when none was: the updates are fully scaled), and ``owned`` whether
    the updates are the step's own memory (made by it, or donated to it), which the
    caller may then reuse (e.g. for the new params). ``extra`` reaches ``tx.update``."""
    plan = _new_plan(updates, state, params, donate=donate, donate_updates=donate_updates)
    factors: list[Any] = []
    if hand_over_scale and is_own(tx):
        plan.scale_target, plan.scale_factors = tx.update, factors
    with _planned(plan):
        new_updates, new_state = call(tx, updates, state, params, **extra)
        owned = not plan.compiling and plan.may_write(
            [x for x in tree.flatten(new_updates)[0] if x is not None])
    return new_updates, new_state, (factors[0] if factors else None), owned


@contextmanager
def owned_step(*outside: Any) -> Iterator[Plan]:
    """A step for a caller that owns the buffers it hands the math (the torch.optim
    wrappers of ``holotx.adapters``, whose statistics are their own): every tensor may be
    written by an op that replaces it, except those in the trees ``outside``."""
    plan = Plan(set(), state_donated=True)
    plan.exclude(*outside)
    with _planned(plan):
        yield plan


# -------------------------------------------------------------- the final scaling

def scale_requested() -> bool:
    """Whether the transform running now was asked to hand its final scaling over."""
    plan = _active()
    return plan is not None and plan.scale_target is not None and plan.scale_target is plan.running


def redirect_scale(inner: Any) -> None:
    """If the transform running now was asked for its final scaling, ask ``inner``
    instead (the transform it runs last, whose updates it returns as they are)."""
    if scale_requested():
        _local.plan.scale_target = inner.update


def take_scale(factor: Any) -> bool:
    """For a final scaling: hand ``factor`` over if asked (then return the updates
    unscaled), else return ``False`` (scale them)."""
    if not scale_requested():
        return False
    plan = _local.plan
    plan.scale_factors.append(factor)
    plan.scale_target = None
    return True


@contextmanager
def scale_request_to(inner: Any) -> Iterator[list[Any]]:
    """For a wrapper asked for its final scaling that decides after running ``inner``
    whether to hand it over: ask ``inner`` for its factor into a list of the wrapper's
    own (yielded), then restore the wrapper's request. Not asked, the list stays empty."""
    factors: list[Any] = []
    if not scale_requested():
        yield factors
        return
    plan = _local.plan
    outer = (plan.scale_target, plan.scale_factors)
    plan.scale_target, plan.scale_factors = inner.update, factors
    try:
        yield factors
    finally:
        plan.scale_target, plan.scale_factors = outer
