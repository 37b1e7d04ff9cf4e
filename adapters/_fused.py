"""``fused=True``: a param group's params, grads and state in flat buffers, stepped by one
compiled function.

The unfused adapter runs a transform over the group's list of tensors, one foreach
kernel per pass over memory. Fused, the group's params become views of one flat buffer
per (device, dtype) (:meth:`holotx.flat.FlatLayout.bind`), their ``.grad`` views of a
second one (backward accumulates into them in place), and the transform's state lives in
flat buffers too: ``optimizer.state[p]`` holds views of them, so ``state_dict()`` is the
unfused optimizer's, key for key. The step is the donated step of
:func:`holotx.flat.make_step` compiled with ``torch.compile``: inductor fuses the rule
and the update of the params into loops that read and write each buffer once.

torch.optim's semantics are kept by falling back to the unfused step on the same
(viewed) tensors, never by changing the math:

- ``zero_grad()`` keeps the grad views (it zeroes the buffer); a param whose view was
  cleared and that backward did not reach since has, for the step, no gradient. A step
  in which some params of a group have a gradient and others do not is run unfused, as
  torch.optim would run it (the others skipped); the group's step counts then differ
  between params, and it stays unfused (it says so once). A param that does not require
  grad (its gradient set by hand) holds its view only while it has a gradient: backward
  never reaches it to say so.
- A frozen param (it does not require grad and has no gradient when the group is bound)
  is left out of the buffers: it keeps its storage and its state entries (their initial
  values, as the unfused first step makes them for every param of its group), and takes
  no step while it has no gradient, so the others fuse. Given one later (unfrozen, or by
  hand), it joins the buffers: the group is bound again, everything copied unchanged into
  new buffers, and its step compiles anew; unless its step count is not the others' (it
  did not step with them), and the group then runs unfused (it says so once). A member
  frozen since (no gradient, no longer requiring grad) leaves the buffers the same way,
  with storage of its own; it does not join again (it skipped steps).
- A gradient that is not the view (the user's own tensor, DDP's bucket view) is copied
  into the buffer first.
- Hyperparameters reach the compiled step as 0-d tensors: a scheduler's new ``lr``,
  betas or weight decay recompile nothing.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.exc
import torch._inductor.exc

from holotx import executor, tree
from holotx.base import apply_updates
from holotx.flat import COMPILE_OPTIONS, FlatLayout

from ._layout import StateLayout

__all__ = ["FusedGroup", "FusionRefused"]

ALIGN = 256
"""Each param starts on a row of this many values in its buffer, so per-tensor norms
(trust ratios) are sums over whole rows: :meth:`holotx.flat.FlatLayout.segments`."""

BACKEND: Any = "inductor"
"""The ``torch.compile`` backend of the fused step (a test swaps in a failing one)."""


class FusionRefused(Exception):
    """Why a group cannot be fused; the adapter warns with it and runs the group unfused."""


class FusedGroup:
    """One param group bound to flat buffers, with its compiled step. ``members`` says
    which of its params are packed (default :func:`bound_members`: all but the frozen);
    ``former``, which left an earlier binding of the group."""

    def __init__(self, params: list[torch.Tensor], per_param_layout: StateLayout,
                 state: dict[torch.Tensor, dict[str, Any]], build: Callable[[], Any],
                 members: list[bool] | None = None, former: list[bool] | None = None) -> None:
        if members is None:
            members = bound_members(params)
        if not any(members):
            raise ValueError("a fused group binds at least one param")
        self.params = params
        # The params packed into the flat buffers. The others (frozen: they did not require
        # grad and had no gradient when the group was bound) keep their own storage and
        # their own state, and take no step while they have no gradient, as unfused.
        self.members = list(members)
        # The params that were in an earlier binding of the group and left it (frozen since):
        # having skipped steps, they do not join again.
        self.former = [False] * len(params) if former is None else list(former)
        _check_params(params, self.members)
        packed = [p if m else None for p, m in zip(params, self.members)]
        self.layout = FlatLayout(packed, align=ALIGN)
        self.segments = self.layout.segments()
        # Each param's index among the tensors of its buffer (its entry in a per-tensor vector).
        seen: dict[int, int] = {}
        self.index_in_buffer: list[int | None] = []
        for slot in self.layout.slots:
            if slot is None:
                self.index_in_buffer.append(None)
                continue
            self.index_in_buffer.append(seen.get(slot.group, 0))
            seen[slot.group] = self.index_in_buffer[-1] + 1
        _probe(build, self.layout, self.segments)
        with torch.no_grad():
            self.param_buffers = _marked(self.layout.bind(packed))
            grads = [None if not m else p.grad if p.grad is not None else torch.zeros_like(p)
                     for p, m in zip(params, self.members)]
            self.grad_buffers = self.layout.flatten(grads)
        self.grad_views: list[torch.Tensor | None] = tree.flatten(self.layout.unflatten(self.grad_buffers))[0]
        # A view whose param has, for torch.optim's rules, no gradient: zero_grad() cleared it
        # and backward has not accumulated into it since.
        self.cleared = [p.grad is None for p in params]
        # Backward reaches only params that require grad, which get a hook to say so. One that
        # does not (grads set by hand, as torch's fused tests do) cannot have a hook: it holds
        # its view only while it has a gradient, and None otherwise, so that any later
        # gradient is a tensor of its own, copied in at the step.
        self.hooked = [m and p.requires_grad for p, m in zip(params, self.members)]
        own_grads = [p.grad for p in params]
        for i, (p, view) in enumerate(zip(params, self.grad_views)):
            if self.members[i] and (self.hooked[i] or p.grad is not None):
                p.grad = view
        self.hooks = [p.register_post_accumulate_grad_hook(self._touched(i))
                      for i, p in enumerate(params) if self.hooked[i]]
        for p, m in zip(params, self.members):
            if m:
                _BOUND[id(p)] = weakref.ref(p)
        self.per_param_layout = per_param_layout
        self.flat_state: Any = None
        self.bindings: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        self.step_fn: Callable[..., Any] | None = None
        # Whether the transform decides anything on the host before a step (Lookahead's
        # and Scout's sync flags, see executor.decisions); None until its first step.
        self.decides: bool | None = None
        try:
            self.sync_state(state, build)
        except FusionRefused:
            # Nothing of the state was written: give the params their grads back, unbound
            # (their values stay, in the new buffers), for the unfused step.
            self._unhook()
            for p, g in zip(params, own_grads):
                p.grad = g
            raise

    def _touched(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            self.cleared[i] = False
        return hook

    # -- state ----------------------------------------------------------------------------

    def sync_state(self, state: dict[torch.Tensor, dict[str, Any]], build: Any) -> None:
        """Put the per-param state into flat buffers and hand ``state`` views of them.

        A per-param tensor shaped like its param becomes its slot in the flat buffer; a
        0-d one (a step count) becomes the buffer's own, which needs every param of the
        buffer to hold the same value. A param without an entry (a group's first step)
        takes the flat state's initial value. A param left out of the buffers keeps its
        own per-param entries (without one, it takes its own initial value, as the
        unfused group's first step gives it) and shares the group-wide ones."""
        params, layout = self.params, self.per_param_layout
        with torch.no_grad():
            flat_state = build().init(self.param_buffers)
        flat_layout = StateLayout.of(flat_state, self.param_buffers)
        flat_leaves, _ = tree.flatten(flat_state)
        flat_by_key: dict[tuple[str, int | None], torch.Tensor] = {}
        for key, owner, leaf in zip(flat_layout.keys, flat_layout.owners, flat_leaves):
            if key is not None:
                flat_by_key[(key, owner)] = leaf
        wanted = {(k, None if o is None else self.layout.slots[o].group)
                  for k, o in zip(layout.keys, layout.owners)
                  if k is not None and (o is None or self.members[o])}
        if wanted != set(flat_by_key):
            raise FusionRefused("its transform keeps another state over flat buffers than over tensors "
                                f"({sorted(k for k, _ in flat_by_key)} vs {sorted(k for k, _ in wanted)})")
        own = self._own_entries(state, build)
        bindings = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, owner, expected in zip(layout.keys, layout.owners, layout.expected):
            if key is None:
                continue
            owners = range(len(params)) if owner is None else (owner,)
            for i in owners:
                p = params[i]
                value = state.get(p, {}).get(key)
                if owner is not None and not self.members[i]:
                    continue  # its own entry, outside the buffers (kept, or made by _own_entries)
                buffer = flat_by_key[(key, None if owner is None else self.layout.slots[i].group)]
                target = self._slot_of(buffer, i, expected[0], value, group_wide=owner is None)
                if target is None:
                    raise FusionRefused(f"its state {key!r} has no place in the flat buffers "
                                        f"(shape {tuple(expected[0] if value is None else value.shape)} "
                                        f"for a param of {tuple(p.shape)})")
                if value is not None:
                    copies.append((target, value))
                bindings.append((p, key, target))
        # Shared 0-d leaves must agree before anything is written.
        seen: dict[int, torch.Tensor] = {}
        for target, value in copies:
            if target.dim() == 0:
                first = seen.setdefault(id(target), value)
                if first is not value and not torch.equal(first, value):
                    raise FusionRefused(f"its params' state differs in a per-param scalar (step counts "
                                        f"{first.item()} and {value.item()}: a param skipped a step)")
        with torch.no_grad():
            for target, value in copies:
                if target is not value:
                    target.copy_(value)
        for p, entries in own.items():
            state.setdefault(p, {}).update(entries)
        for p, key, target in bindings:
            state.setdefault(p, {})[key] = target
        self.flat_state, self.bindings = flat_state, bindings
        # The per-param scalars that a buffer's params share (step counts), by key and buffer.
        self.scalars = {(key, *self.layout.groups[slot.group]): flat_by_key[(key, slot.group)]
                        for key, owner in zip(layout.keys, layout.owners)
                        if key is not None and owner is not None
                        and (slot := self.layout.slots[owner]) is not None
                        and flat_by_key[(key, slot.group)].dim() == 0}

    def clash(self, state: dict[torch.Tensor, dict[str, Any]], members: list[bool]) -> str | None:
        """Why the params that ``members`` adds to the buffers cannot share them, read from
        ``state`` before anything is bound: a per-param scalar that its buffer's params
        share (a step count) and that such a param holds another value of (it was frozen
        while they stepped). ``None`` where none differs."""
        for p, was, m in zip(self.params, self.members, members):
            if was or not m:
                continue
            for (key, device, dtype), shared in self.scalars.items():
                value = state.get(p, {}).get(key)
                if (p.device, p.dtype) == (device, dtype) and isinstance(value, torch.Tensor) and \
                        value.shape == shared.shape and not torch.equal(value, shared):
                    return (f"its {key!r} is {value.item()}, where the params it would share a flat buffer "
                            f"with have {shared.item()}")
        return None

    def unpack(self, state: dict[torch.Tensor, dict[str, Any]], leaving: list[int]) -> None:
        """After :meth:`release`: the params at ``leaving`` (frozen, to be left out of the
        next binding) get their values and per-param state entries in storage of their
        own, so that nothing of theirs keeps the old buffers alive."""
        with torch.no_grad():
            for i in leaving:
                p = self.params[i]
                p.data = p.data.clone()
                entries = state.get(p, {})
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor) and value._base is not None:
                        entries[key] = value.clone()

    def _own_entries(self, state: dict[torch.Tensor, dict[str, Any]],
                     build: Any) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-param entries that the params left out of the buffers lack (none, but on
        the group's first step): their initial values, from the transform's ``init`` over
        those params (over the whole group where that does not give each of them its keys,
        shapes and dtypes), as the unfused first step gives every param of its group."""
        layout = self.per_param_layout
        lacking = sorted({o for k, o in zip(layout.keys, layout.owners)
                          if k is not None and o is not None and not self.members[o]
                          and k not in state.get(self.params[o], {})})
        if not lacking:
            return {}
        found = self._initial_entries(build, lacking)
        if found is None:
            found = self._initial_entries(build, list(range(len(self.params))), lacking)
        if found is None:
            raise FusionRefused("its transform's init gives the params left out of the flat buffers "
                                "(they do not require grad) another state than its layout")
        return found

    def _initial_entries(self, build: Any, indices: list[int], only: list[int] | None = None
                         ) -> dict[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The per-param entries of ``init`` over the params at ``indices``, for those at
        ``only`` (default: all of them); ``None`` where they do not fit the group's layout."""
        layout = self.per_param_layout
        sub = [self.params[i] for i in indices]
        try:
            with torch.no_grad():
                init = build().init(sub)
            sub_layout = StateLayout.of(init, sub)
        except (ValueError, TypeError, RuntimeError):
            return None
        leaves, _ = tree.flatten(init)
        by_key = {(k, indices[o]): leaf for k, o, leaf in zip(sub_layout.keys, sub_layout.owners, leaves)
                  if k is not None and o is not None}
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for key, owner, expected in zip(layout.keys, layout.owners, layout.expected):
            if key is None or owner is None or owner not in (indices if only is None else only):
                continue
            leaf = by_key.get((key, owner))
            if not isinstance(leaf, torch.Tensor) or expected is None or \
                    (leaf.shape, leaf.dtype, leaf.device) != expected:
                return None
            out.setdefault(self.params[owner], {})[key] = leaf
        return out

    def _slot_of(self, buffer: torch.Tensor, i: int, shape: torch.Size, value: torch.Tensor | None,
                 group_wide: bool = False) -> torch.Tensor | None:
        """Where param ``i``'s entry lives in ``buffer``, an entry of ``shape`` unfused
        (``value``, its current tensor, or ``None`` for a param without an entry yet):

        - shaped like the param: its slot of a param-sized buffer (moments);
        - 0-d, with a 0-d buffer: that buffer, shared by the params it packs (a count);
        - 0-d, with one value per tensor of the buffer: the param's own (TAdam's weight sum);
        - for a param left out of the buffers, a ``group_wide`` entry: the buffer itself.
        """
        if value is not None and (value.dtype != buffer.dtype or value.device != buffer.device
                                  or value.shape != shape):
            return None
        slot = self.layout.slots[i]
        if slot is None:
            return buffer if group_wide and buffer.shape == shape else None
        if buffer.dim() == 0:
            return buffer if shape == () else None
        if shape == slot.shape and buffer.numel() == self.layout.sizes[slot.group]:
            return buffer[slot.offset:slot.offset + slot.shape.numel()].view(slot.shape)
        if shape == () and buffer.dim() == 1 and buffer.numel() == self.segments[slot.group].count:
            return buffer[self.index_in_buffer[i]]
        return None

    def state_is_bound(self, state: dict[torch.Tensor, dict[str, Any]]) -> bool:
        """Whether ``optimizer.state`` still holds this group's views (not a loaded
        checkpoint, an edit, or the state of a rebuilt transform)."""
        return all(state.get(p, {}).get(key) is target for p, key, target in self.bindings)

    # -- grads ----------------------------------------------------------------------------

    def has_grad(self) -> list[bool]:
        """Per param: whether it has a gradient this step, as torch.optim sees it."""
        return [p.grad is not None and not (self.cleared[i] and p.grad is self.grad_views[i])
                for i, p in enumerate(self.params)]

    def members_for(self, present: list[bool]) -> list[bool]:
        """The params a step with these gradients (:meth:`has_grad`) binds into the buffers:
        every param with a gradient (a frozen one unfrozen, or given one by hand), and each
        member without one that requires grad (that step then falls back, as torch.optim
        skips it); a member without a gradient that no longer requires grad (frozen since)
        is left out."""
        return [h or (m and p.requires_grad) for p, m, h in zip(self.params, self.members, present)]

    def after_zero_grad(self) -> None:
        """After torch.optim's ``zero_grad``, put the grad views back: a param whose grad
        it set to ``None`` gets its view again, zeroed, and has no gradient until
        backward reaches it; one whose grad it zeroed in place keeps that grad."""
        with torch.no_grad():
            for buffer in self.grad_buffers:
                buffer.zero_()
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            if p.grad is None and self.members[i]:
                self.cleared[i] = True
                if self.hooked[i]:
                    p.grad = view

    def release(self, state: dict[torch.Tensor, dict[str, Any]]) -> None:
        """Stop being fused (the buffers stay: params, grads and state are views of them).
        Cleared views become ``None`` again, so the unfused step skips those params, and a
        buffer's 0-d state (its step count), shared by its params, becomes one per param
        again (the unfused step advances each param's own)."""
        if self.state_is_bound(state):
            for p, key, target in self.bindings:
                if target.dim() == 0:
                    state[p][key] = target.clone()
        self._unhook()
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            if self.members[i] and self.cleared[i] and p.grad is view:
                p.grad = None

    def _unhook(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for p, m in zip(self.params, self.members):
            if m:
                _BOUND.pop(id(p), None)

    # -- the step -------------------------------------------------------------------------

    def step(self, build: Callable[..., Any], values: dict[str, Any], maximize: bool, lr: Any,
             donate_grads: bool) -> None:
        """One fused step; every param in the buffers has a gradient, none of the others
        (see :meth:`has_grad` and :func:`members_for`)."""
        with torch.no_grad():
            outside = [(view, p.grad) for p, view, m in zip(self.params, self.grad_views, self.members)
                       if m and p.grad is not view]
            if outside:
                torch._foreach_copy_([v for v, _ in outside], [g for _, g in outside])
            first = self.step_fn is None
            if first:
                # inductor's own options only where inductor compiles (a test swaps the backend).
                cpu = self.param_buffers[0].device.type == "cpu"  # where the options were measured
                options = {"options": COMPILE_OPTIONS} if BACKEND == "inductor" and cpu else {}
                self.step_fn = torch.compile(_fresh(_flat_step), backend=BACKEND, dynamic=False,
                                             fullgraph=True, **options)
            # What the step decides from host values (a sync flag), decided here, outside the
            # graph: each decision gets a graph of its own, which does only its own work.
            decisions: dict[int, Any] = {}
            if self.decides is not False:
                decisions = executor.decisions(build(values, maximize), self.flat_state, self.param_buffers)
                self.decides = bool(decisions)
            try:
                new_state = self.step_fn(build, values, maximize, lr, self.param_buffers, self.grad_buffers,
                                         self.flat_state, self.segments, donate_grads, decisions)
            except _COMPILE_ERRORS as err:
                if not first:
                    raise
                # Compiling fails before the graph runs: nothing has been written.
                self.step_fn = None
                raise FusionRefused(f"torch.compile failed ({type(err).__name__}: "
                                    f"{str(err).strip().splitlines()[0][:300]})") from err
            # The compiled step writes the state in place; a leaf it returned anew goes back
            # into its buffer, which the per-param views look at.
            for old, new in zip(tree.flatten(self.flat_state)[0], tree.flatten(new_state)[0]):
                if isinstance(old, torch.Tensor) and new is not old:
                    old.copy_(new)


_COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported,
                   torch._inductor.exc.InductorError)
"""What torch.compile raises when it cannot compile the step (no C++ compiler for
inductor, a graph break under ``fullgraph``)."""


def _flat_step(build, values, maximize, lr, params, grads, state, segments, donate_grads, decisions):
    """The compiled step: the group's transform built from its numbers (0-d tensors, so a
    new value is a new input, not a new graph), one donated update over the flat buffers,
    and ``p += lr * u`` in the same fused loops. ``decisions`` (Python values decided on
    the host before the graph, see :func:`holotx.executor.decisions`) select the graph."""
    tx = build(values, maximize)
    updates, new_state, factor, _ = executor.run(tx, grads, state, params, donate=True,
                                                 donate_updates=donate_grads, decisions=decisions,
                                                 segments=segments)
    if lr is not None:
        factor = lr if factor is None else factor * lr
    apply_updates(params, updates, inplace=True, scale=factor)
    return new_state


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs (and its
    recompile limit, 8) per code object: every fused group gets its own, so that many
    groups or optimizers in one process never push each other out into eager mode."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def bound_members(params: list[torch.Tensor]) -> list[bool]:
    """Which params a group binds into its flat buffers when it is first bound: all but the
    frozen ones, which neither require grad nor have a gradient (backward never reaches
    them, so unfused they take no step: packing them would make every step a partial one)."""
    return [p.requires_grad or p.grad is not None for p in params]


def _marked(buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    for b in buffers:
        setattr(b, tree.FLAT_BUFFER_MARK, True)
    return buffers


def _check_params(params: list[torch.Tensor], members: list[bool]) -> None:
    for i, p in enumerate(params):
        if not members[i]:
            continue
        if executor.is_wrapper(p):
            raise FusionRefused(f"param {i} is a {type(p).__name__} (FSDP2, tensor parallel): sharded "
                                "params have no storage of their own to pack into a flat buffer")
        if not p.is_floating_point():
            raise FusionRefused(f"param {i} has dtype {p.dtype}: fused steps take floating-point params")
        if p.device.type == "meta":
            raise FusionRefused(f"param {i} is a meta tensor: it has no data to pack into a flat buffer")
        bound = _BOUND.get(id(p))
        if bound is not None and bound() is p:
            raise FusionRefused(f"param {i} is bound to the flat buffers of another fused optimizer")
        if p.grad is not None and p.grad.is_sparse:
            raise FusionRefused(f"param {i} has a sparse gradient")


_BOUND: dict[int, weakref.ref[torch.Tensor]] = {}
"""Params bound to the buffers of a fused group, by id (a tensor's ``==`` is elementwise):
binding them twice would take them away from the first."""


def _probe(build: Callable[[], Any], layout: FlatLayout, segments: list[Any]) -> None:
    """Run the transform once over flat buffers on the meta device (no memory, no values):
    a rule with per-tensor reductions and no flat path refuses the marked buffers there."""
    buffers = _marked([torch.zeros(n, dtype=dt, device="meta")
                       for (_, dt), n in zip(layout.groups, layout.sizes)])
    segments = [s.to("meta") for s in segments]
    for b, seg in zip(buffers, segments):
        tree.set_segments(b, seg)
    tx = build()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tx.update(list(buffers), tx.init(buffers), buffers, segments=segments)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
        raise FusionRefused(f"its transform has no flat path ({err})") from err
