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
* **Grouping and the order of work** (:func:`multi_tensor_update`, which lifts a rule
  written over lists of tensors to trees): leaves grouped by device and dtype (DTensors
  apart, run under ``implicit_replication``), and each group run at once or, in eager mode
  on a CPU, in batches of leaves that stay in cache (:meth:`Plan.batches`); decided once
  for each description of the leaves and kept (:func:`_layout`). Each tree a step sees is
  flattened, and its leaves' shapes, devices and dtypes read, once
  (:meth:`Plan.leaves_of`): a state or params that matches the updates is not checked leaf
  by leaf, which on a small model is most of a step.
* **Which buffers may be written.** A step is given its inputs by a caller: the
  incoming updates, the state and the params. In eager mode, whatever the caller did not
  donate is *outside* the step, named by identity (no storage pointers are read: a
  DTensor has none); so is every state tensor a transform returns (so that no later
  transform writes into a state through updates that alias it), and everything a user's
  transform saw or returned. Every other tensor was made by the step itself and may be
  overwritten by an op that replaces it. Traced by ``torch.compile`` (where an identity
  read would become a guard, and a recompile for every new tensor), the compiler plans
  intermediate buffers itself, and the one write that matters is the one into donated
  state: the state lists :func:`multi_tensor_update` hands a rule are
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

* **Host decisions.** What a transform can know on the host before its math runs (a
  wrapper's sync flags, from step counts kept on the CPU) it records in its ``prepare``
  (:func:`decide`). An eager step reads such values itself; a caller that compiles a
  donated step runs a deciding pass first (:func:`decisions`) and passes the values in,
  so that the graph takes them as constants and each value gets a graph of its own.

Callers: a holotx transform's ``update`` (pure, or with ``donate=True`` /
``donate_updates``), :func:`holotx.flat.make_step`, and the ``torch.optim`` adapter.

The torch 2.13 gaps that shape dispatch are listed in :data:`TORCH_GAPS`, each pinned by
a test in ``tests/test_torch_workarounds.py`` that fails once torch fixes it.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import optree
import torch
import torch._C._functorch as _functorch

from holotx import tree

__all__ = [
    "TORCH_GAPS",
    "Plan",
    "Step",
    "begin",
    "call",
    "call_pure",
    "current",
    "decide",
    "decided",
    "decisions",
    "evaluate",
    "finish",
    "is_own",
    "is_wrapper",
    "is_wrapper_type",
    "multi_tensor_update",
    "owned_step",
    "prepare",
    "redirect_scale",
    "register",
    "run",
    "ask_scale",
    "is_scaling",
    "release_scale",
    "scale_factor",
    "leaf_factor",
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
    "foreach_python_scalar_cpu": "on the CPU a foreach op given a Python scalar converts it to a "
                                 "tensor of the list's dtype once per tensor (three times as slow on "
                                 "small tensors as a 0-d tensor scalar): holotx.ops passes float32 "
                                 "and float64 lists (and int64 lists an int) a cached 0-d tensor in "
                                 "plain eager mode.",
    "interpreter_stack_under_dynamo": "dynamo cannot trace torch._C._functorch.get_interpreter_stack: "
                                      "under compile, vmap is recognised by a batched leaf instead.",
}
"""The torch 2.13 gaps holotx works around, one entry each (see the module docstring)."""


class _Local(threading.local):
    def __init__(self) -> None:
        # Set in each thread as it first looks (threading.local runs __init__ there): were
        # ``plan`` only set by a first step, a compiled step would guard on its absence
        # and compile again at the second call.
        self.plan: Plan | None = None
        # How many times user code has run within a step on this thread: a tree a step
        # flattened before is flattened again after (Plan.leaves_of).
        self.user_runs = 0


_local = _Local()

CACHE_BATCH_BYTES = int(os.environ.get("HOLOTX_BATCH_BYTES", 8 << 20))
"""Bytes of one buffer in a batch of leaves run together in eager mode on a CPU (see
:meth:`Plan.batches`). 8 MiB was the fastest of 2 to 16 MiB on the development machine
(32 MiB of last-level cache; ResNet-50's parameters through the adapter, one and two
threads: AdamW 63 -> 57 ms, LARS 38 -> 35, LAMB 48 -> 45, AdEMAMix 62 -> 49 at two
threads). ``HOLOTX_BATCH_BYTES`` sets it for another cache."""


_requires_grad = operator.attrgetter("requires_grad")


def _functorch_kinds() -> frozenset[Any]:
    stack = _functorch.get_interpreter_stack()
    return frozenset(i.key() for i in stack) if stack else frozenset()


class Plan:
    """What one step may do, decided when it starts (see the module docstring)."""

    __slots__ = (
        "compiling",
        "deciding",
        "decisions",
        "evaluated",
        "everything_outside",
        "flattened",
        "in_batch",
        "marked",
        "outside",
        "recording",
        "running",
        "scale_factors",
        "scale_target",
        "state_donated",
        "traced_structures",
        "transformed",
        "updates_read_only",
        "vmap",
    )

    def __init__(self, outside: set[int] | None, state_donated: bool = False) -> None:
        self.state_donated = state_donated
        self.updates_read_only = False
        self.marked: list[list[torch.Tensor]] = []
        self.evaluated: dict[tuple[int, int], Any] = {}
        # Host decisions (see decide()): recorded by a deciding prepare pass, or given by
        # the caller of a compiled step, which made that pass before the graph.
        self.deciding = False
        self.decisions: Mapping[int, Any] = {}
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
        # id(tree) -> [tree, leaves, spec, meta, made, user_runs]: the trees this step
        # remembers (its inputs, and the updates one transform hands the next until that one
        # reads them), so that each is flattened and its leaves described once (leaves_of).
        self.flattened: dict[int, list[Any]] = {}
        # Within multi_tensor_update's run of a leafwise transform on one batch (``then``).
        self.in_batch = False
        # Traced: the structures this step's trees had, each with the tree it was made
        # from (see leaves_of).
        self.traced_structures: list[tuple[Any, Any]] = []

    # ---------------------------------------------------------------- trees

    def leaves_of(self, t: Any, *, remember: bool = False, like: Any = None) -> tuple[list[Any], Any]:
        """``tree.flatten(t)``, once per step for the trees it remembers: its inputs
        (``remember=True``, given when they are first flattened) and the updates one
        transform hands the next (:meth:`made`, forgotten once the next transform has read
        them). A remembered tree is kept with its leaves, so its id stays its own. Any
        other tree (a combinator's sub-tree) is flattened and not kept: it would live on
        to the end of the step. User code run within the step (a transform holotx did not
        build, which may change a container in place) makes every step on this thread
        forget them all (:meth:`forget_trees`). Traced, no identity is read. ``like``, a
        structure ``t`` is expected to have (the updates', for the params), makes a tree
        that has it quicker to flatten (:func:`holotx.tree.leaves_like`)."""
        if self.compiling:
            # Dynamo runs optree's flattening as Python, building the structure node by
            # node: a tree with a structure this step has seen (the updates that one
            # transform hands the next, a state's buffers) is read by a walk of it instead,
            # at a twentieth of the cost (tree.leaves_like).
            # (A structure rebuilds dicts in the order of the tree it was made from: it is
            # taken for a tree whose dicts list their keys in that order, so that the
            # step's results keep eager's order.)
            if like is not None:
                leaves = tree.leaves_like(t, like)
                if leaves is not None:
                    return leaves, like
            for spec, made_from in self.traced_structures:
                leaves = tree.leaves_like(t, spec)
                if leaves is not None and tree._same_key_order(t, made_from):
                    return leaves, spec
            leaves, spec = tree.flatten(t)
            if len(self.traced_structures) < 4:
                self.traced_structures.append((spec, t))
            return leaves, spec
        hit = self.flattened.get(id(t))
        if hit is not None:
            if hit[5] == _local.user_runs:
                if hit[4]:
                    # A tree the step made is read by the transform after the one that made
                    # it: forgotten then, so that the step does not keep intermediate updates.
                    del self.flattened[id(t)]
                return hit[1], hit[2]
            del self.flattened[id(t)]  # (user code has run since)
        leaves = None if like is None else tree.leaves_like(t, like)
        if leaves is None:
            leaves, spec = tree.flatten(t)
        else:
            spec = like
        if remember:
            self.flattened[id(t)] = [t, leaves, spec, None, False, _local.user_runs]
        return leaves, spec

    def described(self, t: Any, leaves: list[Any]) -> list[Any]:
        """:func:`_meta` of ``t``'s leaves (as :meth:`leaves_of` gave them), once per step
        for a remembered tree."""
        hit = None if self.compiling else self.flattened.get(id(t))
        if hit is None or hit[1] is not leaves:
            return _meta(leaves)
        if hit[3] is None:
            hit[3] = _meta(leaves)
        return hit[3]

    def made(self, t: Any, leaves: list[Any], spec: Any, meta: list[Any] | None = None) -> Any:
        """``t``, a tree this step built from ``leaves``: known, so the next transform does
        not flatten it again (and then forgets it, see :meth:`leaves_of`); nor describe its
        leaves again, if ``meta`` (their :func:`_meta`) is given."""
        if not self.compiling:
            # One at a time: a combinator that reads the updates without this memory (and so
            # does not forget them) cannot keep them alive past the next transform's updates.
            for key in [k for k, entry in self.flattened.items() if entry[4]]:
                del self.flattened[key]
            self.flattened[id(t)] = [t, leaves, spec, meta, True, _local.user_runs]
        return t

    def forget_trees(self) -> None:
        """After user code that may have changed a container: every step on this thread
        (this one, and any it runs within: ``apply_if_finite`` runs its inner transform in
        a step of its own) flattens its trees again. (Traced, nothing is remembered.)"""
        if not self.compiling:
            _local.user_runs += 1
            self.flattened.clear()

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
        for t in tensors:
            if not t.is_cpu or is_wrapper(t):
                return False
        return not (torch.is_grad_enabled() and any(map(_requires_grad, tensors)))

    def batches(self, idx: list[int], leaves: Sequence[torch.Tensor]) -> list[list[int]]:
        """The order of work for one device/dtype group of leaves (their indices ``idx``).

        One batch of all of them (each op of a rule is one foreach call streaming every
        leaf) when traced, on an accelerator, or when the group fits in cache. In eager
        mode on a CPU, a larger group is cut into batches of consecutive leaves of about
        :data:`CACHE_BATCH_BYTES` each (a larger leaf alone), and the whole rule runs on one
        batch before the next: its buffers are still in cache from one op to the next,
        where one op over every leaf reads them all from memory again (the reason
        Holocron's per-tensor loop beats one-foreach-per-pass on large models). Every
        element sees the same ops in the same order: results are bit-identical."""
        first = leaves[idx[0]]
        if self.compiling or self.transformed or first.device.type != "cpu":
            return [idx]
        budget = max(1, CACHE_BATCH_BYTES // first.element_size())
        group = leaves if len(idx) == len(leaves) else [leaves[i] for i in idx]
        if sum(map(torch.Tensor.numel, group)) <= budget:
            return [idx]
        out: list[list[int]] = []
        batch: list[int] = []
        size = 0
        for i in idx:
            n = leaves[i].numel()
            if batch and size + n > budget:
                out.append(batch)
                batch, size = [], 0
            batch.append(i)
            size += n
        out.append(batch)
        return out

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
            return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))
        if self.transformed or not self.outside.isdisjoint(map(id, xs)):
            return False
        return not (torch.is_grad_enabled() and any(map(_requires_grad, xs)))

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
        if dead is None or self.compiling or not self.may_write(dead) or is_wrapper(dead[0]):
            return False
        return not self.differentiated(x for xs in inputs for x in xs)

    def exclude(self, *trees: Any) -> None:
        """Never write into any tensor of ``trees`` during this step."""
        if self.everything_outside or self.compiling:
            return
        for t in trees:
            self.outside.update(map(id, tree.flatten(t)[0]))

    def exclude_leaves(self, xs: Iterable[Any]) -> None:
        """:meth:`exclude` for a list of leaves."""
        if not (self.everything_outside or self.compiling):
            self.outside.update(map(id, xs))


def is_wrapper(x: object) -> bool:
    """Whether ``x`` is a tensor subclass that wraps others (a ``DTensor``): it has no
    storage of its own to read, and no ``.tolist()``."""
    return is_wrapper_type(type(x))


def is_wrapper_type(cls: type) -> bool:
    """:func:`is_wrapper` for a class: a tensor subclass that flattens into inner tensors
    (what ``torch.utils._python_dispatch.is_traceable_wrapper_subclass`` asks of an
    instance, asked once of its class)."""
    return cls is not torch.Tensor and hasattr(cls, "__tensor_flatten__")


def current() -> Plan:
    """The plan of the step running on this thread; outside any step, a plan that writes
    nothing (ops used directly are pure)."""
    plan = _local.plan
    return Plan(None) if plan is None else plan


def _active() -> Plan | None:
    return _local.plan


@contextmanager
def _planned(plan: Plan | None) -> Iterator[Plan | None]:
    previous = _local.plan
    _local.plan = plan
    try:
        yield plan
    finally:
        _local.plan = previous


# ------------------------------------------------------------------- entry points

def register(update: Callable[..., Any],
             prepare: Callable[[Any, Any], None] | None = None, *,
             scaling: bool = False, leafwise: bool = False, count_fields: int = 0,
             state_type: Sequence[type] = (),
             kept_fields: Mapping[str, tuple[bool, str]] | None = None) -> Callable[..., Any]:
    """Wrap the math of a holotx transform's ``update`` as its entry point.

    Called by a caller outside any step, the entry starts one: a pure step by default,
    ``donate=True`` for one that may overwrite the state and the incoming updates,
    ``donate=True, donate_updates=False`` for the state alone (see :mod:`holotx.base`).
    Called within a step (by :func:`call`), it runs the math in that step.

    ``prepare(state, params)``, if given, evaluates what the transform takes from user
    code at each step (schedules, through :func:`evaluate`), and prepares the transforms
    it wraps (:func:`prepare`). A step runs it for the whole tree of transforms before
    any math, so that an exception or an interrupt raised there leaves every buffer as
    it was.

    ``scaling=True`` declares the transform a final scaling: it multiplies each update by
    one value per leaf (a number, a schedule's value), so a scaling handed over before it
    may be applied after it (see :func:`chain`'s use of :func:`ask_scale`).

    ``leafwise=True`` declares that each leaf's update and new state follow from that
    leaf's update, state and param alone; that its state is a NamedTuple whose fields are
    ``None`` (and stay ``None``) or trees shaped like the updates, buffers of the updates'
    shapes and dtypes except the first ``count_fields``, step counts (a 0-d tensor per
    leaf); and that it takes no scaling handed over and evaluates or decides nothing
    keyed by its state. It may then be run on a batch of leaves at a time, as lists (see
    :func:`multi_tensor_update`'s ``then``), when its state matches the updates.

    ``state_type`` holds the class of the state the transform's ``init`` returns: declared
    by the transform, or recorded when its ``init`` first runs (``chain``'s tuple,
    ``named_chain``'s dict). A state of another class (another transform's, or
    ``update``'s arguments in the wrong order) is refused by name before anything runs.

    ``kept_fields`` maps each field of the state that the transform's options decide to
    ``(kept, because)``: whether this transform keeps it (``False``: it is ``None``), and
    the option that decides it (``"amsgrad=True"``). A state whose field says otherwise
    (made by the transform with other options, a checkpoint of another run) is refused by
    name, where the math would silently run the other variant.

    Both are checked in the prepare phase of a step, for every transform of the tree
    before any math (a donated chain's first transforms would otherwise have written their
    state when a later one refuses its own), and again when the update runs (compiled,
    where the prepare phase does not run)."""

    def entry(updates, state, params=None, *, donate: bool = False, donate_updates: bool | None = None,
              **extra):
        _check_state_form(entry, state)
        plan = _active()
        if plan is None:
            plan = _new_plan(updates, state, params, donate=donate,
                             donate_updates=donate if donate_updates is None else donate_updates)
            check_params(plan, updates, params)
            with _planned(plan):
                _prepare_step(plan, entry, state, params)
                return _running(plan, entry, update, updates, state, params, extra)
        return _running(plan, entry, update, updates, state, params, extra)

    entry.holotx_math = update  # type: ignore[attr-defined]
    entry.holotx_prepare = prepare  # type: ignore[attr-defined]
    entry.holotx_scaling = scaling  # type: ignore[attr-defined]
    entry.holotx_leafwise = leafwise  # type: ignore[attr-defined]
    entry.holotx_count_fields = count_fields  # type: ignore[attr-defined]
    entry.holotx_state_type = state_type  # type: ignore[attr-defined]
    entry.holotx_kept_fields = dict(kept_fields or {})  # type: ignore[attr-defined]
    # (Its name for messages, read here: traced by dynamo, a str method of a qualname is not.)
    entry.holotx_name = update.__qualname__.split(".<locals>")[0]  # type: ignore[attr-defined]
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


def is_scaling(tx: Any) -> bool:
    """Whether ``tx`` is a holotx transform declared a scaling (``register(scaling=True)``)."""
    return getattr(tx.update, "holotx_scaling", False)


def _new_plan(updates: Any, state: Any, params: Any, *, donate: bool, donate_updates: bool) -> Plan:
    outside: set[int] = set()
    plan = Plan(outside, state_donated=donate)
    if plan.compiling:  # no identities read (see the module docstring)
        return plan
    spec = None
    if not donate_updates and updates is not None:
        leaves, spec = plan.leaves_of(updates, remember=True)
        outside.update(map(id, leaves))  # (None's id: harmless)
    if not donate and state is not None:
        _add_tensor_ids(state, outside)  # (the transforms flatten their own parts)
    if params is not None:
        outside.update(map(id, plan.leaves_of(params, remember=True, like=spec)[0]))
    return plan


def _add_tensor_ids(t: Any, ids: set[int]) -> None:
    """Add the identity of every tensor in the tree ``t`` (a state) to ``ids``, with some
    containers' and ``None``'s (harmless: no op writes into them). The usual containers
    (tuples, NamedTuples, lists, dicts of tensors) are walked, which takes half the time
    of a flatten building a structure nobody reads; anything else is flattened."""
    kind = type(t)
    if kind is dict:
        values = t.values()
        if _PLAIN_LEAVES.issuperset(map(type, values)):
            ids.update(map(id, values))
            return
    elif kind is list or kind is tuple:
        values = t
    elif (issubclass(kind, tuple) and hasattr(kind, "_fields") and not hasattr(t, "__dict__")
          and optree.is_namedtuple_class(kind)):
        # (its slots, as optree reads them, whatever an __iter__ of its own says; a class
        # with a __dict__ may keep more in it, and is flattened as optree registers it)
        values = tuple.__iter__(t)
    else:
        ids.update(map(id, tree.flatten(t)[0]))
        return
    for x in values:
        if type(x) in _PLAIN_LEAVES:
            ids.add(id(x))
        else:
            _add_tensor_ids(x, ids)


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


def _prepare_step(plan: Plan, entry: Callable[..., Any], state: Any, params: Any) -> None:
    if not plan.compiling:  # compiled, the graph's input mutations come after all its math
        _prepare_entry(entry, state, params)


def _prepare_entry(entry: Callable[..., Any], state: Any, params: Any) -> None:
    _check_state_form(entry, state)
    prepare_fn = getattr(entry, "holotx_prepare", None)
    if prepare_fn is not None:
        prepare_fn(state, params)


def _check_state_form(entry: Callable[..., Any], state: Any) -> None:
    """The state's type and optional fields, as :func:`register` declared them for the
    transform whose entry point ``entry`` is."""
    state_type = getattr(entry, "holotx_state_type", ())
    if state_type and type(state) is not state_type[0]:
        raise ValueError(f"state is a {type(state).__name__}, not the {state_type[0].__name__} this "
                         "transform's init returns: a state from another transform, or update's "
                         "arguments in the wrong order? (update(updates, state, params))")
    kept_fields = getattr(entry, "holotx_kept_fields", None)
    if not kept_fields:
        return
    name = entry.holotx_name
    for field, (kept, because) in kept_fields.items():
        if not hasattr(state, field):
            raise ValueError(f"{name}: state is a {type(state).__name__}, which has no field {field}: a "
                             "state from another transform?")
        value = getattr(state, field)
        held = value is not None
        if kept == held:
            continue
        if kept:
            if all(v is None for v in state):
                continue  # (init over params that are None: a transform given no leaf keeps nothing)
            raise ValueError(f"{name}: state.{field} is None, but this transform keeps it ({because}): "
                             "the state of a transform made with other options? Make the state with "
                             "this transform's init")
        raise ValueError(f"{name}: state.{field} holds a {type(value).__name__}, but this transform "
                         f"keeps none ({because}): the state of a transform made with other options "
                         "(its math would run that variant)? Make the state with this transform's init, "
                         f"or drop the field (state._replace({field}=None))")


def prepare(tx: Any, state: Any, params: Any) -> None:
    """For a combinator's own ``prepare``: prepare a transform it wraps (nothing for a
    transform holotx did not build: it runs when its turn comes)."""
    if is_own(tx):
        _prepare_entry(tx.update, state, params)


def evaluate(schedule: Callable[[Any], Any], count: Any) -> Any:
    """``schedule(count)``: evaluated once per step, in the step's prepare phase (before
    any buffer is written), and the same value given again when the math asks."""
    plan = _active()
    if plan is None or plan.compiling:
        return schedule(count)
    key = (id(schedule), id(count))
    if key in plan.evaluated:
        return plan.evaluated[key][2]
    value = schedule(count)
    # The schedule and the count are kept with the value, so that their ids stay theirs.
    plan.evaluated[key] = (schedule, count, value)
    return value


def decide(values: Callable[[], Iterable[tuple[torch.Tensor, Any]]]) -> None:
    """For a transform's ``prepare``: Python values its math will need and that follow
    from state it can read on the host now (a wrapper's sync flags, from step counts kept
    on the CPU), each recorded under the identity of a state tensor, its key. ``values``
    computes the ``(key, value)`` pairs; only a deciding pass (:func:`decisions`) calls it:
    an eager step reads its host values itself, at no cost."""
    plan = _active()
    if plan is not None and plan.deciding:
        for key, value in values():
            plan.decisions[id(key)] = value  # type: ignore[index]


def decided(key: torch.Tensor) -> Any:
    """What :func:`decide` recorded under ``key`` for this step, or ``None``. Traced by
    ``torch.compile``, a value given by the caller is a Python constant of the graph:
    dynamo guards on it, so each value gets a graph of its own (a Lookahead step that
    synchronises and one that does not), and neither computes the other's work."""
    plan = _active()
    if plan is None or not plan.decisions:
        return None
    return plan.decisions.get(id(key))


def decisions(tx: Any, state: Any, params: Any) -> dict[int, Any]:
    """The host decisions of ``tx``'s next step on ``state``: its prepare pass run eagerly,
    recording what :func:`decide` is given (nothing else of it is kept: schedules are
    evaluated again by the step). A caller that compiles the step runs this before the
    graph and passes the result in (``run(..., donate=True, decisions=...)``), where the
    math cannot read a tensor's value without breaking the graph. The keys are the
    identities of state tensors, so only a donated step takes decisions: it keeps its
    state tensors from step to step, and its graphs with them (a pure step's new state
    would match nothing). Empty for a transform that decides nothing."""
    if not is_own(tx):
        return {}
    found: dict[int, Any] = {}
    plan = Plan(None)
    plan.deciding, plan.decisions = True, found
    with _planned(plan), torch.no_grad():
        _prepare_entry(tx.update, state, params)
    return found


def call_pure(tx: Any, updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
    """Run ``tx`` pure, as :func:`call` runs a user's transform: for a combinator that
    reads its inner transform's inputs again afterwards (the old state of a skipped
    step). A holotx transform runs in a pure step of its own that shares the current
    step's evaluated schedules; any other outside every step."""
    plan = _active()
    if plan is None:
        return tx.update(updates, state, params, **extra)
    if is_own(tx):
        pure = _new_plan(updates, state, params, donate=False, donate_updates=False)
        pure.evaluated = plan.evaluated
        with _planned(pure):
            new_updates, new_state = tx.update(updates, state, params, **extra)
    else:
        with _planned(None):
            new_updates, new_state = tx.update(updates, state, params, **extra)
        plan.forget_trees()  # (it may have changed a container it was given)
    plan.exclude(updates, state, new_updates, new_state)
    return new_updates, new_state


class Step(NamedTuple):
    """A step begun by :func:`begin`: its plan made and its schedules evaluated, no buffer
    written yet."""

    tx: Any
    updates: Any
    state: Any
    params: Any
    plan: Plan
    factors: list[Any]


def begin(tx: Any, updates: Any, state: Any, params: Any, *, donate: bool = False,
          donate_updates: bool = False, hand_over_scale: bool = False,
          decisions: Mapping[int, Any] | None = None) -> Step:
    """The first half of :func:`run`: decide the plan and evaluate every schedule of
    ``tx``. A caller with several steps to take together (the adapter's param groups)
    begins them all before it finishes any, so that a schedule that raises in the last
    leaves the first unchanged too."""
    plan = _new_plan(updates, state, params, donate=donate, donate_updates=donate_updates)
    if is_own(tx):
        check_params(plan, updates, params)
    # The caller applies the updates and then drops them: it only reads them.
    plan.updates_read_only = True
    if decisions and donate:
        # Keyed by the identity of state tensors: only a donated step keeps them (a pure one
        # makes a new state, and would match nothing at its next step).
        plan.decisions = decisions  # type: ignore[assignment]  (only read)
    factors: list[Any] = []
    if is_own(tx):
        if hand_over_scale:
            plan.scale_target, plan.scale_factors = tx.update, factors
        with _planned(plan):
            _prepare_step(plan, tx.update, state, params)
    return Step(tx, updates, state, params, plan, factors)


def finish(step: Step, **extra: Any) -> tuple[Any, Any, Any, bool]:
    """The second half of :func:`run`: the math, with the plan :func:`begin` made."""
    plan = step.plan
    with _planned(plan):
        new_updates, new_state = call(step.tx, step.updates, step.state, step.params, **extra)
        owned = not plan.compiling and plan.may_write(
            [x for x in plan.leaves_of(new_updates)[0] if x is not None])
    return new_updates, new_state, scale_factor(step.factors), owned


def run(tx: Any, updates: Any, state: Any, params: Any, *, donate: bool = False,
        donate_updates: bool = False, hand_over_scale: bool = False,
        decisions: Mapping[int, Any] | None = None, **extra: Any) -> tuple[Any, Any, Any, bool]:
    """One update of ``tx`` for a caller that applies it (``make_step``, the adapter).

    Returns ``(updates, state, factor, owned)``: ``factor`` is the final scaling handed
    over (``None`` when none was: the updates are fully scaled), and ``owned`` whether
    the updates are the step's own memory (made by it, or donated to it), which the
    caller may then reuse (e.g. for the new params). ``decisions`` are what
    :func:`decisions` returned for this step (a compiled step's caller passes them in, see
    there). ``extra`` reaches ``tx.update``."""
    return finish(begin(tx, updates, state, params, donate=donate, donate_updates=donate_updates,
                        hand_over_scale=hand_over_scale, decisions=decisions), **extra)


# ------------------------------------------------------- lifting a list rule to trees
#
# multi_tensor_update is the plumbing every elementwise transform shares: flatten the
# updates once, check that state and params line up with them (errors name the path), drop
# None gradients (their state passes through untouched), group the rest by device and
# dtype (so foreach kernels see homogeneous lists, as torch.optim's multi-tensor path
# does), cut each group into the batches the plan chooses, call the rule, and put the
# trees back together.

Kernel = Callable[..., tuple[list[Any], ...]]


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
    then: tuple[Any, Any, Mapping[str, Any]] | None = None,
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
    each as one more list argument after ``p``, sliced like the tensors.

    ``then=(tx, tx_state, extra)`` runs the transform ``tx`` on the kernel's updates, as
    ``call(tx, updates, tx_state, params, **extra)``, and appends its new state to the
    states returned. Where the plan runs the leaves in several batches (cut to stay in
    cache, or groups of several devices or dtypes) and ``tx`` is declared leafwise
    (:func:`register`) with a state that fits the updates, it runs on each batch right
    after the kernel, while the batch is in cache: its buffers are then as large as a
    batch, not the model (a fresh update per leaf freed batch by batch, where the whole
    tree of them would be allocated and freed at every step).

    Returns the updates tree and the list of new state trees.
    """
    plan = current()
    g_leaves, spec = plan.leaves_of(updates)
    for values in leaf_values:
        if len(values) != len(g_leaves):
            raise ValueError(f"leaf_values has {len(values)} entries for {len(g_leaves)} leaves")
    # Every leaf's (shape, device, dtype), read once: a state or params whose leaves have
    # exactly these (the usual case) needs no check per leaf. Anything else goes through
    # the checks below, which name the first path that differs (or let a legal
    # difference pass: state kept where the gradient is None).
    g_meta = plan.described(updates, g_leaves)
    if (any(m is _NOT_A_TENSOR for m in g_meta) if plan.compiling  # (dynamo compares no object())
            else _NOT_A_TENSOR in g_meta):  # (by identity first; equal to no tensor's entry)
        _check_tensors(g_leaves, spec)
    state_leaves: list[list[Any] | None] = []
    unmatched: list[tuple[str, list[Any]]] = []  # (a state that matches has every entry)
    for k, st in enumerate(states):
        if st is None:
            state_leaves.append(None)
            continue
        name = state_names[k] if state_names else f"state[{k}]"
        leaves = tree.leaves_matching(st, spec, name, "updates")
        per_leaf = k >= count_states
        dtype_of = (state_dtypes or {}).get(k)
        if per_leaf:
            matches = dtype_of is None and _meta(leaves) == g_meta
        else:  # counts: a tensor wherever the updates have one, on their device unless on the host
            matches = _counts_match(leaves, g_meta, host_counts)
        if not matches:
            _check_state(g_leaves, leaves, spec, name, per_leaf=per_leaf, dtype_of=dtype_of,
                         host_counts=host_counts)
            unmatched.append((name, leaves))
        state_leaves.append(leaves)
    if params is None:
        # (Updates with no tensor, a transform routed no leaf: masked or partition over one
        # bare tensor, give it None params too, and there is nothing to step.)
        if needs_params and any(g is not None for g in g_leaves):
            raise ValueError("this transform needs params: call update(updates, state, params)")
        p_leaves = None
    else:
        p_leaves, p_spec = plan.leaves_of(params, like=spec)
        if p_spec != spec:
            tree.leaves_matching(params, spec, "params", "updates")  # raises, naming the difference
        if plan.described(params, p_leaves) != g_meta:
            tree.check_leaves(g_leaves, p_leaves, spec, "updates", "params")
            for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
                if g is not None and p is None:
                    path = tree.path_strings(spec)[i]
                    raise ValueError(f"params at {path} is None but updates has a tensor there")
    if unmatched:
        _check_entries(g_leaves, unmatched, spec)

    batches = _layout(plan, g_leaves, g_meta, spec)
    new_u: list[Any] = [None] * len(g_leaves)
    new_states = [None if leaves is None else list(leaves) for leaves in state_leaves]
    by_batch = None if then is None or len(batches) < 2 else _leafwise_fields(*then, spec, g_meta)
    for wrapped, complex_view, idx in batches:
        whole = len(idx) == len(g_leaves)  # (every leaf in one batch: no slicing)
        if whole:
            inputs = [list(g_leaves), *[None if leaves is None else list(leaves) for leaves in state_leaves],
                      None if p_leaves is None else list(p_leaves), *[list(values) for values in leaf_values]]
        else:
            inputs = [
                [g_leaves[i] for i in idx],
                *[None if leaves is None else [leaves[i] for i in idx] for leaves in state_leaves],
                None if p_leaves is None else [p_leaves[i] for i in idx],
                *[[values[i] for i in idx] for values in leaf_values],
            ]
        if complex_view:
            inputs, of_view = _real_views(plan, inputs, 1 + count_states, 1 + len(state_leaves))
        plan.mark_state(inputs[1:1 + len(state_leaves)])
        if wrapped:
            with _replicating():
                outs = kernel(*inputs)
        else:
            outs = kernel(*inputs)
        if complex_view:
            # (outs[1:1 + count_states] are the counts, never viewed.)
            outs = [out if out is None or 0 < k <= count_states
                    else _complex_again(plan, out, of_view) for k, out in enumerate(outs)]
        if whole:
            new_u = list(outs[0])
        else:
            for j, i in enumerate(idx):
                new_u[i] = outs[0][j]
        for k, out in enumerate(outs[1:]):
            if new_states[k] is not None:
                if whole:
                    new_states[k] = list(out)
                else:
                    for j, i in enumerate(idx):
                        new_states[k][i] = out[j]
                # A state is never written through the updates of a later transform (a
                # momentum buffer may be the updates of a pure step).
                plan.exclude_leaves(out)
        if by_batch is not None:
            _then_on_batch(then, by_batch, idx, new_u, p_leaves)
            outs = None  # (the kernel's updates, now read: freed before the next batch makes its own)
    # Updates written in place are the leaves described at the start: no need to read them again.
    same = all(map(operator.is_, new_u, g_leaves))
    new_updates = plan.made(tree.unflatten(spec, new_u), new_u, spec, g_meta if same else None)
    new_trees = [None if leaves is None else tree.unflatten(spec, leaves) for leaves in new_states]
    if then is None:
        return new_updates, new_trees
    tx, tx_state, extra = then
    if by_batch is None:
        new_updates, new_tx_state = call(tx, new_updates, tx_state, params, **extra)
    else:
        new_tx_state = type(tx_state)._make(
            tree.unflatten(spec, value) if per_leaf else value for per_leaf, value in by_batch)
    return new_updates, [*new_trees, new_tx_state]


def _leafwise_fields(tx: Any, state: Any, extra: Mapping[str, Any], spec: Any,
                     g_meta: list[Any]) -> list[list[Any]] | None:
    """For :func:`multi_tensor_update`'s ``then``: ``tx``'s state as ``[per_leaf, value]``
    per field, ``value`` the field's leaves (a list, one per leaf of the updates) or the
    field itself where it is ``None``; ``None`` where ``tx`` runs on the whole tree: not
    declared leafwise, given extras, or a state that does not match the updates (described
    by ``g_meta``) as its checks require. Those then run before it writes anything, and
    name the path in the whole tree, where a batch's would have written the batches
    before it."""
    if extra or not getattr(tx.update, "holotx_leafwise", False):
        return None
    if not (isinstance(state, tuple) and hasattr(type(state), "_make")):
        return None
    counts = tx.update.holotx_count_fields
    fields = []
    for k, value in enumerate(state):
        if value is None:
            fields.append([False, None])
            continue
        leaves, field_spec = tree.flatten(value)
        if field_spec != spec or not (_counts_match(leaves, g_meta, False) if k < counts
                                      else _buffers_match(leaves, g_meta)):
            return None
        fields.append([True, leaves])
    return fields


def _buffers_match(leaves: list[Any], g_meta: list[Any]) -> bool:
    """Whether per-leaf buffers fit the updates described by ``g_meta`` where they have a
    tensor (a leaf whose update is ``None`` keeps whatever its state holds, untouched)."""
    meta = _meta(leaves)
    return meta == g_meta or all(m is None or s == m for s, m in zip(meta, g_meta))


def _then_on_batch(then: tuple[Any, Any, Mapping[str, Any]], fields: list[list[Any]], idx: list[int],
                   new_u: list[Any], p_leaves: list[Any] | None) -> None:
    """Run ``then``'s leafwise transform on the leaves ``idx`` of the kernel's updates
    ``new_u`` (replaced by its updates) and of its state ``fields`` (their per-leaf
    lists updated in place), with their lists for trees."""
    tx, tx_state, _ = then
    state = type(tx_state)._make([leaves[i] for i in idx] if per_leaf else leaves
                                 for per_leaf, leaves in fields)
    params = None if p_leaves is None else [p_leaves[i] for i in idx]
    plan = current()
    previous, plan.in_batch = plan.in_batch, True
    try:
        u, new_state = call(tx, [new_u[i] for i in idx], state, params)
    finally:
        plan.in_batch = previous
    if (type(u) is not list or len(u) != len(idx) or type(new_state) is not type(tx_state)
            or any(not per_leaf and value is not None for (per_leaf, _), value in zip(fields, new_state))):
        raise RuntimeError(f"a transform declared leafwise returned {type(u).__name__} updates and a "
                           f"{type(new_state).__name__} state of another form for a batch of "
                           f"{len(idx)} leaves")
    for j, i in enumerate(idx):
        new_u[i] = u[j]
    for field, value in zip(fields, new_state):
        if field[0]:
            for j, i in enumerate(idx):
                field[1][i] = value[j]


_LAYOUTS: dict[tuple[Any, ...], list[tuple[bool, bool, list[int]]]] = {}
""":func:`_layout`'s decisions, by what they follow from."""


def _layout(plan: Plan, leaves: list[Any], meta: list[Any], spec: Any) -> list[tuple[bool, bool, list[int]]]:
    """The order of work for a step's leaves (described by ``meta``, see :func:`_meta`):
    ``(wrapped, complex, indices)`` for each batch, the leaves grouped by device and dtype (a
    foreach kernel takes one of each, as torch.optim's multi-tensor path groups them),
    DTensors apart from plain tensors (``wrapped``), and each group cut as
    :meth:`Plan.batches` chooses. That follows from the leaves' descriptions, classes and
    the context alone, so it is decided once for each and kept: on a small model the
    decision costs as much as a foreach kernel. Traced, decided afresh (the trace runs
    once)."""
    if plan.compiling or plan.in_batch:  # (a leafwise transform on one batch: not worth keeping)
        return _decide_layout(plan, leaves, meta, spec)
    key = (tuple(meta), tuple(map(type, leaves)), plan.transformed, CACHE_BATCH_BYTES)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _decide_layout(plan, leaves, meta, spec)
        if len(_LAYOUTS) >= 256:  # (models whose shapes keep changing)
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _decide_layout(plan: Plan, leaves: list[Any], meta: list[Any],
                   spec: Any) -> list[tuple[bool, bool, list[int]]]:
    groups: dict[tuple[Any, Any, bool], list[int]] = {}
    uniform = (None not in meta and len({(m[1], m[2]) for m in meta}) == 1
               and len({type(g) for g in leaves}) == 1)
    if uniform:  # (the usual case: every leaf a tensor of one class, on one device, of one dtype)
        groups[meta[0][1], meta[0][2], is_wrapper_type(type(leaves[0]))] = list(range(len(leaves)))
    else:
        for i, m in enumerate(meta):
            if m is not None:
                # DTensors apart from plain tensors: a foreach kernel takes one kind or the other.
                groups.setdefault((m[1], m[2], is_wrapper(leaves[i])), []).append(i)
    for (_, dtype, _), idx in groups.items():
        if not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"updates at {tree.path_strings(spec)[idx[0]]} has dtype {dtype}: holotx steps "
                             "floating-point and complex tensors (an integer parameter cannot take a "
                             "fractional step)")
    return [(wrapped, dtype.is_complex, batch) for (_, dtype, wrapped), idx in groups.items()
            for batch in plan.batches(idx, leaves)]


def _real_views(plan: Plan, inputs: list[Any], first_per_leaf: int,
                end_state: int) -> tuple[list[Any], dict[int, torch.Tensor]]:
    """A batch of complex leaves as torch.optim steps them: each as its real view
    (``torch.view_as_real``, a trailing dimension of 2), the updates, the per-leaf states
    and the params (at ``end_state``) alike; the counts, before ``first_per_leaf``, as they
    are. A view of a tensor the step may not write is not written either; ``of_view`` maps
    each view back to its complex tensor."""
    of_view: dict[int, torch.Tensor] = {}

    def view(xs: list[Any] | None) -> list[Any] | None:
        if xs is None:
            return None
        out = []
        for x in xs:
            if isinstance(x, torch.Tensor) and x.is_complex():
                v = torch.view_as_real(x)
                of_view[id(v)] = x
                if not plan.everything_outside and not plan.compiling and id(x) in plan.outside:
                    plan.outside.add(id(v))
                out.append(v)
            else:
                out.append(x)
        return out

    views = [view(xs) if k == 0 or first_per_leaf <= k <= end_state else xs for k, xs in enumerate(inputs)]
    return views, of_view


def _complex_again(plan: Plan, xs: list[Any], of_view: dict[int, torch.Tensor]) -> list[Any]:
    """A kernel's results over real views as complex tensors: a view it was given (written
    in place, or passed through) is its own complex tensor again, so that identities (what
    the step may write) hold; a new result is viewed once, the same object wherever it
    appears (a momentum buffer that is also the updates)."""
    out = []
    for x in xs:
        if not (isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] == 2 and x.is_floating_point()):
            out.append(x)  # not a view's value (None, a per-leaf ratio)
            continue
        if id(x) not in of_view:
            of_view[id(x)] = torch.view_as_complex(x)
        out.append(of_view[id(x)])
    return out


def _check_tensors(leaves: list[Any], spec: Any) -> None:
    """Every leaf of the updates is a tensor or ``None``."""
    for i, g in enumerate(leaves):
        if g is not None and not isinstance(g, torch.Tensor):
            raise ValueError(f"updates at {tree.path_strings(spec)[i]} is a {type(g).__name__}, not a tensor "
                             "(or None for no gradient)")


_NOT_A_TENSOR = (object(), None, None)
""":func:`_meta`'s entry for a leaf that is not a tensor: equal to no tensor's description."""


_describe = operator.attrgetter("shape", "device", "dtype")
_PLAIN_TENSORS = tree._PLAIN_TENSORS
_PLAIN_LEAVES = tree._TENSOR_LEAVES


def _meta(leaves: Sequence[Any]) -> list[Any]:
    """Each leaf's ``(shape, device, dtype)``, ``None`` for ``None``, and an entry equal to
    no tensor's for anything else (an array with the same attributes included), so that
    the full checks run and say what it is."""
    if not torch.compiler.is_compiling() and _PLAIN_TENSORS.issuperset(map(type, leaves)):
        # (the usual case, without a Python loop: half the time; dynamo traces no attrgetter)
        return list(map(_describe, leaves))
    return [None if x is None else (x.shape, x.device, x.dtype) if isinstance(x, torch.Tensor)
            else _NOT_A_TENSOR for x in leaves]


def _counts_match(leaves: Sequence[Any], g_meta: list[Any], host_counts: bool) -> bool:
    """Whether a state of step counts lines up with the updates described by ``g_meta``
    (:func:`_meta`) as :func:`_check_state` requires, in one pass: ``False`` sends it
    through the full check, which says what differs."""
    for x, m in zip(leaves, g_meta):
        if m is None:
            if x is not None and not isinstance(x, torch.Tensor):
                return False
        elif not isinstance(x, torch.Tensor) or not (host_counts or x.device == m[1]):
            return False
    return True


def _check_state(g_leaves: list[Any], leaves: list[Any], spec: Any, name: str, *, per_leaf: bool,
                 dtype_of: Callable[[Any], Any] | None, host_counts: bool) -> None:
    """The leaves of one state against the updates': tensors, and per-leaf buffers of the
    same shape, device and dtype (or the dtype ``dtype_of`` gives); counts (not
    ``per_leaf``) only on the same device, unless kept on the host. That it has an entry
    wherever the updates have a tensor is :func:`_check_entries`'s, after the params'."""
    tree.check_leaves(g_leaves, leaves, spec, "updates", name, shape=per_leaf,
                      dtype=per_leaf and dtype_of is None, device=per_leaf or not host_counts)
    if dtype_of is not None:
        for i, (g, x) in enumerate(zip(g_leaves, leaves)):
            if g is not None and x is not None and x.dtype != dtype_of(g.dtype):
                raise ValueError(f"{name} at {tree.path_strings(spec)[i]} has dtype {x.dtype}, "
                                 f"expected {dtype_of(g.dtype)} for updates of {g.dtype}")


def _check_entries(g_leaves: list[Any], states: list[tuple[str, list[Any]]], spec: Any) -> None:
    """Every state in ``states`` has an entry wherever the updates have a tensor (the first
    leaf that lacks one named, as a step's checks name it)."""
    for i, g in enumerate(g_leaves):
        if g is not None:
            for name, leaves in states:
                if leaves[i] is None:
                    raise ValueError(f"{name} has no entry at {tree.path_strings(spec)[i]}, "
                                     "where updates has a tensor: was init given this leaf?")


def check_params(plan: Plan, updates: Any, params: Any) -> None:
    """At the start of a step: ``params``, where given, has the structure of the updates
    and the same shape at every leaf, whether or not the transform reads them (nothing
    broadcasts: a ``(1, 3)`` gradient for a ``(3,)`` parameter is an error)."""
    if params is None or plan.compiling:
        return
    g_leaves, spec = plan.leaves_of(updates, remember=True)
    g_meta = plan.described(updates, g_leaves)
    if _NOT_A_TENSOR in g_meta:  # (by identity first; equal to no tensor's entry)
        _check_tensors(g_leaves, spec)
    p_leaves, p_spec = plan.leaves_of(params, remember=True, like=spec)
    if p_spec != spec:
        tree.leaves_matching(params, spec, "params", "updates")  # raises, naming the difference
    p_meta = plan.described(params, p_leaves)
    if p_meta != g_meta and [None if m is None else m[0] for m in g_meta] != [
            None if m is None else m[0] for m in p_meta]:
        tree.check_leaves(g_leaves, p_leaves, spec, "updates", "params", dtype=False, device=False)


def _replicating() -> contextlib.AbstractContextManager[Any]:
    """For a group of ``DTensor`` leaves: a context in which plain tensors (step counts,
    bias corrections, per-tensor scalars kept as plain state) take part in their math as
    replicated values."""
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


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


def ask_scale(inner: Any) -> None:
    """For a combinator that was asked for its final scaling (it checked
    :func:`scale_requested` when it started): ask ``inner``, which it runs next. ``chain``
    asks the transforms of its trailing scalings and the one before them, since a scaling
    handed over by that one may be applied after the scalings that follow it (each
    multiplies every leaf by one value: they commute)."""
    _local.plan.scale_target = inner.update


def release_scale(inner: Any) -> None:
    """Withdraw a request :func:`ask_scale` made of ``inner`` that it did not take."""
    plan = _local.plan
    if plan is not None and plan.scale_target is inner.update:
        plan.scale_target = None


def take_scale(factor: Any) -> bool:
    """For a final scaling: hand ``factor`` over if asked (then return the updates
    unscaled), else return ``False`` (scale them). ``factor`` is one number or 0-d tensor
    for every leaf, or a list with one for each leaf of the updates in flattening order
    (``None`` where the update is ``None``: per-tensor trust ratios). Factors handed over
    by several transforms multiply (:func:`scale_factor`)."""
    if not scale_requested():
        return False
    plan = _local.plan
    plan.scale_factors.append(factor)
    plan.scale_target = None
    return True


def scale_factor(factors: Sequence[Any]) -> Any:
    """The factors handed over (:func:`take_scale`), together: ``None`` for none, their
    product where all are scalars, else a list with, per leaf, the tuple of its factors
    (``None`` where a list has ``None``), to be multiplied in the leaf's precision by
    :func:`leaf_factor` (a float32 parameter then moves by the same step whether its
    learning rate was given as a float or a float32 tensor, as with Holocron's
    ``alpha=-lr * ratio``)."""
    if not any(isinstance(f, list) for f in factors):
        out: Any = None
        for f in factors:
            out = f if out is None else out * f
        return out
    n = next(len(f) for f in factors if isinstance(f, list))
    per_leaf: list[Any] = [()] * n
    for f in factors:
        column = f if isinstance(f, list) else [f] * n
        per_leaf = [None if a is None or b is None else a + (b if isinstance(b, tuple) else (b,))
                    for a, b in zip(per_leaf, column)]
    return per_leaf


def leaf_factor(factor: Any, dtype: torch.dtype) -> Any:
    """One leaf's entry of :func:`scale_factor` as one number (or 0-d tensor): a tuple's
    factors multiplied as a tensor of ``dtype`` would multiply them (float32 for half
    precision, the precision in which a foreach kernel takes its scalars); plain eager on
    the CPU, each 0-d tensor read to the host first."""
    if not isinstance(factor, tuple):
        return factor
    if len(factor) == 1:
        return factor[0]
    if any(isinstance(f, torch.Tensor) for f in factor) and not current().host_scalars(
            [f for f in factor if isinstance(f, torch.Tensor)]):
        out = factor[0]
        for f in factor[1:]:
            out = out * f
        return out
    values = [f.item() if isinstance(f, torch.Tensor) else f for f in factor]
    single = dtype.to_real() != torch.float64  # (a complex128 leaf is stepped as float64)
    out = _to_float32(values[0]) if single else values[0]
    for v in values[1:]:
        # Two float32 values multiply exactly in a double: rounding the product once is
        # float32 multiplication.
        out = _to_float32(out * _to_float32(v)) if single else out * v
    return out


def _to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (infinite beyond its range)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


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
