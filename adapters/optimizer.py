"""TransformOptimizer: any holotx transform as a real ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from copy import deepcopy
from numbers import Number
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, required

import holotx
from holotx import _validate, executor, tree
from holotx.base import GradientTransformation, apply_step_updates
from holotx.combine import chain
from holotx.transforms import clip_by_global_norm, global_norm, scale

from . import _formats, _lr
from ._fused import FusedGroup, FusionRefused
from ._layout import StateLayout

__all__ = ["TransformOptimizer"]

Factory = Callable[..., GradientTransformation]

_ADAPTER_KEYS = ("lr", "maximize")
"""Group keys the adapter itself handles when the factory (or transform) does not take them."""


class TransformOptimizer(Optimizer):
    r"""A holotx transform behind the ``torch.optim.Optimizer`` interface.

    Built from a **factory** (``holotx.lamb``, ``holotx.adamw``, or any function returning
    a :class:`~holotx.GradientTransformation`) and keyword hyperparameters::

        opt = TransformOptimizer(model.parameters(), holotx.lamb, lr=1e-3, weight_decay=0.01)

    every param group carries every argument of the factory in its dict (the factory's
    defaults, overridden by the keywords, overridden by the group's own entries), and the
    group's transform is the factory called with the group's values **on every step**: a
    change made by the user or by any ``torch.optim.lr_scheduler`` (``lr``, ``betas``,
    ``weight_decay``, ...) takes effect on the next step, and the state carries on.
    Arguments that change the transform's structure (``amsgrad``, ``nesterov``,
    ``compat``, a hyperparameter moving between zero and non-zero) may change too: the
    state is then carried over key by key and new buffers start fresh, as
    ``torch.optim.SGD`` creates its momentum buffer when momentum becomes non-zero.

    Built from a **transform** (``holotx.chain(...)``, ``holotx.lookahead(...)``), every
    group runs that transform on its own state, and only two things vary per group: its
    ``lr`` (default 1), by which its updates are multiplied (so a scheduler scales the
    transform's steps), and ``maximize``. Hyperparameters inside the transform are fixed;
    to vary them per group or over time, pass a factory (``functools.partial`` works) or
    build the transform with :func:`holotx.inject_hyperparams`.

    ``lr`` may be a holotx **schedule** (``lr=holotx.warmup_cosine_decay_schedule(...)``, or
    any callable ``count -> lr``), for either kind, as the default or per group. Such a group
    keeps the schedule in ``group["lr_schedule"]``, the number of steps it has taken in
    ``group["lr_count"]`` (0) and a multiplier in ``group["lr_scale"]`` (1), and
    ``group["lr"]`` is always the float its next step uses:

    .. math::

        \text{lr} = \text{lr\_schedule}(\text{lr\_count}) \cdot \text{lr\_scale}

    so a monitor that logs ``group["lr"]`` (Lightning's ``LearningRateMonitor``) logs what is
    used; the first step uses ``schedule(0)``, as :func:`holotx.adamw` with the same schedule
    does (bit for bit). A torch LR scheduler on top composes with the schedule instead of
    replacing it: what it writes into ``group["lr"]`` sets ``lr_scale``. A multiple of
    ``group["lr"]`` (``StepLR``, ``ExponentialLR``, ...) or of the ``initial_lr`` it took from
    it (``LambdaLR``, Hugging Face's schedulers) carries its multiple of the schedule, even
    where the schedule's value is 0, so ``LambdaLR(opt, lambda epoch: 1)`` changes nothing
    and ``StepLR(opt, 10, gamma=0.5)`` halves the schedule's values every 10 epochs; a plain
    number (``ReduceLROnPlateau``, ``CyclicLR``, ``OneCycleLR``, one set by hand) is the next
    step's lr, the schedule going on from it (``lr_scale`` becomes the number over the
    schedule's value). A schedule assigned to ``group["lr"]`` replaces the group's (the count
    and the scale go on; a number group starts one at count 0). Between steps
    ``group["lr"]`` is a float subclass that carries its scale (``adapters/_lr.py`` has the
    details); during the step, a plain float.

    :meth:`state_dict` keeps such a group's ``lr`` (a float), ``lr_count`` and ``lr_scale``,
    and describes the schedule (``lr_schedule``: its ``repr``, a string) rather than saving
    it: the checkpoint holds only tensors, numbers and strings, and loads with
    ``torch.load(weights_only=True)``. :meth:`load_state_dict` keeps this optimizer's own
    schedule and resumes the run bit for bit; it raises ``ValueError`` for a checkpoint whose
    lr is a number where this optimizer's is a schedule, or the reverse (loading it would
    replace one by the other). holotx's schedules pickle, so ``torch.save(opt)`` and
    ``copy.deepcopy(opt)`` work too. For example::

        opt = TransformOptimizer(model.parameters(), holotx.adamw, weight_decay=0.01,
                                 lr=holotx.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 10_000))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5_000, gamma=0.1)
        for batch in loader:
            ...
            opt.step()       # uses opt.param_groups[0]["lr"], then sets it to the next lr
            sched.step()     # from step 5000 on: 0.1 times the schedule's values
        torch.save(opt.state_dict(), "opt.pt")    # lr, lr_count, lr_scale; not the schedule

    As in torch.optim:

    - ``params`` is an iterable of tensors, of ``(name, tensor)`` pairs, or of group
      dicts; :meth:`add_param_group` works mid-run;
    - hyperparameters are checked when the optimizer is made, before ``params`` is read: a
      bad value raises ``ValueError`` naming it (``TypeError`` for a wrong type), with
      ``params=None`` too; a tensor hyperparameter may have any shape with one element
      (``torch.tensor([1e-3])``), the factory gets a 0-d view of it;
    - :meth:`step` takes an optional closure and returns its loss;
    - a param whose ``.grad`` is ``None`` is skipped: no update, no state change, its step
      count does not advance (a group none of whose params has a gradient is not stepped
      at all); the state of a group is created on its first step, for all its params;
    - ``maximize=True`` ascends;
    - :meth:`state_dict` is laid out per parameter (``state[i]`` a dict of tensors,
      ``param_groups`` with ``params`` indices), loads with
      ``torch.load(weights_only=True)`` and round-trips through
      ``torch.distributed.checkpoint``; :meth:`load_state_dict` restores a run bit for bit
      and raises ``ValueError`` naming what differs when a checkpoint does not fit,
      leaving the optimizer as it was.

    A group's state keys are the field names of the transform's state (``"count"``,
    ``"mu"``, ``"nu"`` for Adam; ``"slow"``, ``"inner_state.mu"`` under Lookahead); a
    group-wide leaf (a schedule's step count) is stored under every param of the group.
    Unlike torch.optim, every param of a group that has stepped has an entry in
    ``self.state``, empty for a rule that keeps no state (SGD without momentum): the state
    is one tree over the group's params. This, and the other differences that PyTorch's
    own optimizer tests find (a transform's groups refuse hyperparameters they do not
    read; ``fused=True`` does not take part in ``GradScaler``'s fused protocol; meta params
    step unfused), are listed in ``docs/torch_optim.rst``, "torch's own optimizer tests".

    The step is the donated one of the contract (``docs/contract.rst``, "Donation"): the
    optimizer owns its state, so the
    transform updates it in place, and the learning rate is applied as the params are
    (``p += lr * u``, one pass). The ``.grad`` tensors are left as they were (unless ``donate_grads``).

    ``state_dtype`` (e.g. ``torch.float32``) keeps the state of lower-precision params
    (bfloat16, float16) in that dtype: the transform sees their gradients and params
    upcast, and each update is added to the upcast param and rounded once into the param.

    ``donate_grads=True`` lets the step use the ``.grad`` tensors as scratch, as the
    functional donated step does: they hold garbage after it (torch.optim leaves them as
    they were; a loop that calls ``zero_grad()`` after each step never sees the
    difference). On a CPU this spares the allocation of one buffer per param per step,
    whose page faults cost more than a pass over memory (about 20% of an AdamW step on
    the ResNet-50 set).

    ``max_grad_norm`` (a positive number, ``inf`` for none) clips the gradients of all
    param groups together by their global L2 norm before the step, as
    ``torch.nn.utils.clip_grad_norm_`` over ``model.parameters()`` would (without its
    1e-6 added to the norm): each group's updates are multiplied by
    :math:`c / \max(\lVert g \rVert_2, c)`, the norm taken over every gradient of every
    group. The step equals that of one group holding all the params with
    ``chain(clip_by_global_norm(c), ...)`` in front of its transform, bit for bit; giving
    that chain to the adapter instead clips each group by its own norm. The ``.grad``
    tensors are not written. ``create_optimizer(..., max_grad_norm=c)`` passes it on.

    ``fused=True`` (torch's keyword for its fused kernels) keeps each group's params,
    grads and state in flat buffers, one per device and dtype (each param, its ``.grad``
    and its state entries are views of them, so ``state_dict()`` is key for key the
    unfused one and checkpoints move freely between the two), and runs the donated step
    compiled by ``torch.compile`` over them: on ResNet-50's parameters (CPU, 2 threads)
    AdamW steps in 10.5 to 14.6 ms against 49 ms unfused and 14.1 to 14.7 ms for torch's
    fused AdamW, LAMB in 23 to 28 ms against 70 ms (Holocron's: 58 to 78 ms), in two runs.
    The first step compiles (3.3 to 7.6 s on that machine, without inductor's on-disk
    cache); a new ``lr``, betas or weight decay recompiles nothing (they enter the graph
    as 0-d tensors). torch.optim's semantics
    stay: ``zero_grad()`` keeps the grad views and zeroes them, a param that backward did
    not reach since has no gradient, and a step where only some params of a group have
    one runs unfused (torch skips the others); their step counts then differ, and the
    group stays unfused, saying so once in a ``RuntimeWarning``. Frozen params (that do
    not require grad and have no gradient when the group first steps) are left out of the
    buffers, so the others fuse; they keep their own state entries (initial, as unfused)
    and take no step. One unfrozen later joins the buffers (the group is bound again and
    its step compiles again) where its step count is the others' (SGD's momentum, say);
    where not (Adam's count) the group runs unfused from then on, saying so: a layer to be
    unfrozen mid-run fuses in a param group of its own. A param frozen mid-run leaves the
    buffers the same way. A group that cannot be
    fused runs unfused with such a warning: DTensor (FSDP2) params, params bound by
    another fused optimizer, ``state_dtype`` upcasts, a rule with per-tensor reductions
    and no flat path (a per-param trust ratio mask; Scout in Holocron mode), or no working
    compiler. TAdam, AdamP (its cosines per output channel or per tensor), the trust-ratio
    rules and :func:`holotx.lookahead` / :func:`holotx.scout` transforms fuse. The step
    then equals the unfused one up to the compiler's rounding (float64: within 1e-13 of
    the values' scale after five steps, in the tests).

    ``torch.compile(opt.step)`` gives the eager numbers; the group's numbers are read
    outside the graph (one graph break), so a scheduler changing ``lr`` never recompiles.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        tx_or_factory: a factory (``holotx.lamb``, ``functools.partial(...)``, any function returning
            a :class:`~holotx.GradientTransformation`), or a transform.
        state_dtype: keep the state of lower-precision params in this floating dtype (default
            ``None``: the params' own).
        donate_grads: use the ``.grad`` tensors as scratch (default ``False``).
        fused: flat buffers and one compiled step per group (default ``False``).
        max_grad_norm: clip the gradients of all groups together to this global L2 norm
            (default ``None``: no clipping).
        **hyperparams: the factory's arguments (every group's defaults); built from a transform,
            only ``lr`` (default ``1``) and ``maximize``.

    Example:
        >>> import torch
        >>> import holotx
        >>> from holotx.adapters import TransformOptimizer
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = TransformOptimizer([w], holotx.adamw, lr=0.1, weight_decay=0.1)
        >>> opt.param_groups[0]["betas"]
        (0.9, 0.999)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w  # holotx.adamw's functional example, through torch.optim's interface
        Parameter containing:
        tensor([ 0.8900, -2.0800,  3.0700], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'nu']
    """

    def __init__(
        self,
        params: Iterable[Any],
        tx_or_factory: GradientTransformation | Factory,
        *,
        state_dtype: torch.dtype | None = None,
        donate_grads: bool = False,
        fused: bool = False,
        max_grad_norm: float | None = None,
        **hyperparams: Any,
    ) -> None:
        if isinstance(tx_or_factory, GradientTransformation):
            self._factory: Factory | None = None
            self._transform: GradientTransformation | None = tx_or_factory
            self._tensor_args: frozenset[str] = frozenset({"lr"})
            self._factory_args: tuple[str, ...] = ()
            defaults: dict[str, Any] = {"lr": 1.0, "maximize": False}
            unknown = sorted(set(hyperparams) - set(defaults))
            if unknown:
                raise ValueError(
                    f"TransformOptimizer built from a transform takes only lr and maximize as "
                    f"hyperparameters, got {', '.join(unknown)}: pass a factory (e.g. holotx.lamb) "
                    "to have per-group hyperparameters")
            defaults.update(hyperparams)
        elif callable(tx_or_factory):
            self._factory = tx_or_factory
            self._transform = None
            defaults, self._factory_args, self._tensor_args = _factory_defaults(tx_or_factory, hyperparams)
        else:
            raise ValueError("tx_or_factory must be a holotx GradientTransformation or a function "
                             f"returning one, got {type(tx_or_factory).__name__}")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                            and state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
        self._state_dtype = state_dtype
        if not isinstance(donate_grads, bool):
            raise ValueError(f"donate_grads must be a bool, got {donate_grads!r}")
        self._donate_grads = donate_grads
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be a bool, got {fused!r}")
        self._fused = fused
        if max_grad_norm is not None:
            _validate.positive("max_grad_norm", max_grad_norm, finite=False)  # inf: never clips
        self._max_grad_norm = max_grad_norm
        self._grad_norm = _GradNorm()
        # Per group (by its params list, which load_state_dict keeps): its fused binding, or
        # why it runs unfused.
        self._fused_groups: dict[int, tuple[list[torch.Tensor], FusedGroup | str]] = {}
        self._runtimes: dict[int, _GroupRuntime] = {}
        self._built: dict[int, tuple[Any, GradientTransformation]] = {}
        # Per group (by id, with the group): the tensors its numbers were last given as to a
        # compiled step (see _hyperparameters).
        self._number_tensors: dict[int, tuple[dict[str, Any], dict[str, tuple[Any, Any]]]] = {}
        # Per schedule group (by id): the group and the lr last published in it.
        self._lr_published: dict[int, tuple[dict[str, Any], _lr.ScheduledLR]] = {}
        # The hyperparameters are checked before the params are read, as torch.optim's
        # classes do: a bad value raises ValueError (TypeError for a wrong type) naming it,
        # whatever the params (None included). A factory argument without a default is
        # checked per group, where a group gives it.
        given = {name: value for name, value in defaults.items() if value is not required}
        if _lr.is_schedule(given.get("lr")):
            given["lr"] = 1.0  # (a schedule is checked with its group, in add_param_group)
        if all(name in given for name in self._factory_args):
            self._check_group(given)
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(_plain_schedule_groups, prepend=True)
        _lr.register(self)

    # -- groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does (a layer unfrozen mid-run, say).

        Its hyperparameters are checked first (by building its transform), so a bad value
        raises ``ValueError`` naming the argument and the optimizer is left as it was. A
        group whose ``lr`` (its own, or the optimizer's default) is a schedule gets
        ``lr_schedule``, ``lr_count`` (0) and ``lr_scale`` (1), and ``lr`` its value (see
        the class docstring). Its params start with no state: their first step is step 1.

        Args:
            param_group: ``{"params": [...], **hyperparameters}``; keys left out take the
                optimizer's defaults. A :class:`TransformOptimizer` given a built transform
                takes only ``lr`` and ``maximize`` per group.

        Returns:
            ``None``.

        Example:
            >>> import torch
            >>> import holotx
            >>> from holotx.adapters import TransformOptimizer
            >>> body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
            >>> opt = TransformOptimizer(body.parameters(), holotx.adamw, lr=1e-3)
            >>> opt.add_param_group({"params": head.parameters(), "lr": 1e-2})
            >>> [g["lr"] for g in opt.param_groups]
            [0.001, 0.01]
            >>> opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": -1.0})
            Traceback (most recent call last):
                ...
            ValueError: lr must be >= 0, got -1.0
        """
        if isinstance(param_group, dict):
            lr = param_group.get("lr", self.defaults.get("lr"))
            scheduled, published = dict(param_group), None
            if _lr.is_schedule(lr) or _lr.is_schedule_group(param_group):
                published = _lr.schedule_group(scheduled, lr, (weakref.ref(self), len(self.param_groups)))
            candidate = dict(scheduled)
            for name, default in self.defaults.items():
                if default is not required:
                    candidate.setdefault(name, default)
            if all(name in candidate for name in self._factory_args):
                self._check_group(candidate)
            param_group.update(scheduled)
            super().add_param_group(param_group)
            if published is not None:
                self._lr_published[id(param_group)] = (param_group, published)
            return
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming the argument if the group's hyperparameters are invalid
        (its transform is built once to find out)."""
        if self._factory is None:
            _validate_lr(group.get("lr"))
            unread = sorted(k for k in group if k in _HYPERPARAMETER_NAMES)
            if unread:
                raise ValueError(
                    f"the param group sets {', '.join(unread)}, which a TransformOptimizer built from a "
                    "transform does not read (its groups take only lr and maximize): give a factory "
                    "(e.g. holotx.adamw) to have per-group hyperparameters")
        _validate.flag("maximize", group.get("maximize", False))
        for name in self._tensor_args:
            value = group.get(name)
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(value.shape)}")
        self._build(group)

    def _values(self, group: dict[str, Any]) -> dict[str, Any]:
        return {name: _lr.as_float(group[name]) for name in self._factory_args}

    def _build(self, group: dict[str, Any]) -> GradientTransformation:
        """The group's transform, from the numbers in its dict."""
        return self._transform_from(self._values(group), group.get("maximize", False))

    def _transform_from(self, values: dict[str, Any], maximize: bool) -> GradientTransformation:
        if self._factory is None:
            assert self._transform is not None
            tx = self._transform
        else:
            tx = self._factory(**{k: _as_factory_value(v, k in self._tensor_args) for k, v in values.items()})
            if not isinstance(tx, GradientTransformation):
                raise ValueError(f"{_name(self._factory)} returned {type(tx).__name__}, "
                                 "not a GradientTransformation")
        if maximize and "maximize" not in self._factory_args:
            tx = chain(scale(-1.0), tx)
        if self._max_grad_norm is not None:
            # Every group is clipped by the norm over all of them (see step).
            tx = chain(clip_by_global_norm(self._max_grad_norm, norm=self._grad_norm.get), tx)
        return tx

    def _signature(self, group: dict[str, Any]) -> list[Any]:
        """What fixes the structure of the group's transform: the values that are not
        numbers, and which numbers are Python zeros (a factory leaves a zero term out)."""
        out: list[Any] = []
        for name in (*self._factory_args, "maximize"):
            value = group.get(name)
            if name in self._tensor_args and _is_numeric(value):
                out.append((name, _is_zero(value)))
            else:
                out.append((name, value))
        return out

    # -- the step -------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step of every group whose params have gradients, as ``torch.optim`` steps.

        Every group's hyperparameters and schedules are checked and evaluated before any
        group steps, so a bad value raises with every param and state as it was. A param
        whose ``grad`` is ``None`` is skipped: it does not move and its state (its count
        included) stays. An exception raised by a transform's own math in the middle of a
        step (an out-of-memory error, say) leaves the groups already stepped stepped, and
        the group it stopped in possibly half written, as with torch.optim's in-place
        kernels: restore a checkpoint to go on.

        Args:
            closure: re-evaluates the model and returns the loss (with ``backward`` called
                inside), as torch.optim's closures; run with gradients enabled.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Example:
            >>> import torch
            >>> import holotx
            >>> from holotx.adapters import TransformOptimizer
            >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
            >>> opt = TransformOptimizer([w], holotx.sgd, lr=0.1)
            >>> def closure():
            ...     opt.zero_grad()
            ...     loss = (w ** 2).sum()
            ...     loss.backward()
            ...     return loss
            >>> opt.step(closure)
            tensor(2., grad_fn=<SumBackward0>)
            >>> w.data
            tensor([ 0.8000, -0.8000])
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group's transform is built (its hyperparameters checked) before any group
        # steps: a bad value edited into group 1 raises with group 0 unchanged too.
        compiling = torch.compiler.is_compiling()
        scheduled = self._settle_lrs(for_step=True)
        if self._max_grad_norm is not None:
            with torch.no_grad():  # (before any group steps: donated grads become scratch)
                self._grad_norm.value = self._global_grad_norm()
        fused, handled = self._plan_fused() if self._fused and not compiling else ([], frozenset())
        groups = self.param_groups if scheduled is None else scheduled
        planned = [(group, *self._plan(group, compiling)) for group in groups
                   if id(group) not in handled and _has_grads(group)]
        with torch.no_grad():
            # Every group's step is begun (its schedules evaluated) before any is finished.
            begun = [self._begin_group(group, tx, compiling) for group, tx, _ in planned]
            for binding, group, values, lr in fused:
                self._fused_step(binding, group, values, lr)
            for (group, _, lr), step in zip(planned, begun):
                self._finish_group(group, lr, step)
        self._advance_lrs({id(group) for _, group, _, _ in fused} | {id(group) for group, _, _ in planned})
        return loss

    def _global_grad_norm(self) -> torch.Tensor:
        """The L2 norm of every gradient of every group together, as the transforms see
        them (upcast to ``state_dtype``), in the order of one group holding all the params:
        what ``clip_by_global_norm`` would compute over that one group."""
        sd = self._state_dtype
        grads = [p.grad.to(sd) if _upcast(p, sd) else p.grad
                 for group in self.param_groups for p in group["params"] if p.grad is not None]
        return global_norm(grads)

    # -- a schedule as lr -----------------------------------------------------------------

    @torch._disable_dynamo
    def _settle_lrs(self, for_step: bool = False) -> list[dict[str, Any]]:
        """Every schedule group's ``lr`` read (what a scheduler or the user wrote, see
        ``adapters/_lr.py``) and checked: ``ValueError`` naming the key before any group
        steps. A number group given a schedule as ``lr`` becomes a schedule group, at count
        0. ``for_step``: the groups' lrs are left plain floats for the step (which reads
        the groups outside the graph, for torch.compile: dynamo takes an optimizer's
        param groups apart, and would guard their changing count and a float subclass as
        constants). Returns the groups if one is a schedule group, else ``None``."""
        this = weakref.ref(self)
        for i, group in enumerate(self.param_groups):
            if _lr.is_schedule_group(group):
                published = _lr.settle(group, (this, i), self._published_lr(group), for_step=for_step)
            elif _lr.is_schedule(group.get("lr")):
                published = _lr.schedule_group(group, group["lr"], (this, i), restart=True)
                if for_step:
                    group["lr"] = float(published)
            else:
                continue
            self._lr_published[id(group)] = (group, published)
        return list(self.param_groups) if self._lr_published else None

    def _published_lr(self, group: dict[str, Any]) -> _lr.ScheduledLR | None:
        entry = self._lr_published.get(id(group))
        return entry[1] if entry is not None and entry[0] is group else None

    @torch._disable_dynamo
    def _advance_lrs(self, stepped: set[int]) -> None:
        """After the step: each schedule group that stepped counts it, and its ``lr`` is
        the schedule's value at the new count times its scale (the next step's); the
        others' lr is published again as it is."""
        this = weakref.ref(self)
        for i, group in enumerate(self.param_groups):
            if not _lr.is_schedule_group(group):
                continue
            if id(group) in stepped:
                published = _lr.advance(group, (this, i))
            elif group["lr"] is not self._published_lr(group):
                published = _lr.republish(group, (this, i))
            else:
                continue
            self._lr_published[id(group)] = (group, published)

    # -- fused groups ---------------------------------------------------------------------

    @torch._disable_dynamo
    def _plan_fused(self) -> tuple[list[tuple[FusedGroup, dict[str, Any], dict[str, Any], Any]],
                                   frozenset[int]]:
        """The fused groups' steps, checked (nothing changed), and the ids of the groups
        they take care of (stepped fused, or skipped: no param has a gradient)."""
        fused, handled = [], set()
        for group in self.param_groups:
            binding = self._fused_group(group)
            if binding is None:
                continue
            present = binding.has_grad()
            if any(present):
                missing = [i for i, (p, m, h) in enumerate(zip(group["params"], binding.members, present))
                           if m and not h and p.requires_grad]
                if missing:
                    self._unfuse(group, binding, f"param {missing[0]} had no gradient at a step, and "
                                 "torch.optim skips such a param: its state no longer moves with its group's")
                    continue
                members = binding.members_for(present)
                if members != binding.members:
                    binding = self._rebind(group, binding, members)
                    if binding is None:
                        continue
                self._plan(group, False)  # checked as an unfused group is
                values, lr = self._hyperparameters(group, True)
                fused.append((binding, group, values, lr))
            handled.add(id(group))
        return fused, frozenset(handled)

    @torch._disable_dynamo
    def _fused_step(self, binding: FusedGroup, group: dict[str, Any], values: dict[str, Any],
                    lr: Any) -> None:
        # (Its own function: a try block in step() would make dynamo skip step() whole
        # under torch.compile(opt.step), whose numbers would then be baked into graphs.)
        try:
            binding.step(self._transform_from, values, group.get("maximize", False),
                         lr if self._factory is None else None, self._donate_grads)
        except FusionRefused as err:  # no compiler: this step and the next run unfused
            self._unfuse(group, binding, str(err))
            tx, lr = self._plan(group, False)
            self._finish_group(group, lr, self._begin_group(group, tx, False))

    @torch._disable_dynamo
    def _fused_group(self, group: dict[str, Any]) -> FusedGroup | None:
        """The group's fused binding, made on its first step with a gradient (its state is
        created then), and re-synced when ``self.state`` no longer holds its views; ``None``
        where the group runs unfused (the reason warned once)."""
        params = group["params"]
        entry = self._fused_groups.get(id(params))
        if entry is not None and entry[0] is params and isinstance(entry[1], str):
            return None
        binding = entry[1] if entry is not None and entry[0] is params else None
        if binding is None and not _has_grads(group):
            return None
        fresh = binding is None and not any(p in self.state for p in params)
        if fresh:
            # A group's first step: its state is made once, in the flat buffers (the
            # per-param entries views of them), not per param and then copied.
            runtime = self._new_runtime(group, self._signature(group), fresh=False)
        else:
            runtime = self._runtime(group)

        def build() -> GradientTransformation:
            return self._build(group)

        try:
            if binding is None:
                if self._state_dtype is not None and self._working_copies(params, [None] * len(params))[2]:
                    raise FusionRefused("state_dtype keeps its statistics in another dtype than its params")
                binding = FusedGroup(params, runtime.layout, self.state, build)
            elif binding.per_param_layout is not runtime.layout or not binding.state_is_bound(self.state):
                binding.per_param_layout = runtime.layout
                binding.sync_state(self.state, build)
        except FusionRefused as err:
            if fresh:  # the unfused step makes the state
                self._runtimes.pop(id(group), None)
            self._unfuse(group, binding, str(err))
            return None
        self._fused_groups[id(params)] = (params, binding)
        return binding

    def _rebind(self, group: dict[str, Any], binding: FusedGroup, members: list[bool]) -> FusedGroup | None:
        """The group bound again over other params (a param frozen since its binding leaves
        it; one frozen before, which has a gradient now, joins it): its params, grads and
        state copied, unchanged, into new buffers (its step compiles again). ``None`` where
        a param that joins holds another step count than those it would share a buffer
        with, or had left the buffers before (it skipped steps; so each param joins once
        and leaves once, and a group re-binds a bounded number of times): the group then
        runs unfused, saying why once."""
        params = group["params"]
        joined = [i for i, (was, m) in enumerate(zip(binding.members, members)) if m and not was]
        left = [i for i, (was, m) in enumerate(zip(binding.members, members)) if was and not m]
        back = [i for i in joined if binding.former[i]]
        if back:
            self._unfuse(group, binding, f"param {back[0]} was frozen after its group was bound and has a "
                         "gradient again: it skipped its group's steps, and torch.optim skips such a param")
            return None
        clash = binding.clash(self.state, members)
        if clash is None:
            former = [f or (was and not m) for f, was, m in zip(binding.former, binding.members, members)]
            binding.release(self.state)
            binding.unpack(self.state, left)
            try:
                new = FusedGroup(params, self._runtime(group).layout, self.state, lambda: self._build(group),
                                 members, former)
            except FusionRefused as err:
                clash, binding = str(err), None
            else:
                self._fused_groups[id(params)] = (params, new)
                return new
        if joined:
            reason = (f"param {joined[0]}, left out of its flat buffers while frozen, has a gradient, and "
                      f"the group cannot be bound again with it: {clash} (a layer to be unfrozen mid-run "
                      "fuses in a param group of its own)")
        else:
            reason = f"param {left[0]} was frozen, and the group cannot be bound again without it: {clash}"
        self._unfuse(group, binding, reason)
        return None

    def _unfuse(self, group: dict[str, Any], binding: FusedGroup | None, reason: str) -> None:
        """Run the group unfused from now on, and say why once."""
        if binding is not None:
            binding.release(self.state)
        params = group["params"]
        self._fused_groups[id(params)] = (params, reason)
        index = next((i for i, g in enumerate(self.param_groups) if g is group), "?")
        warnings.warn(f"{type(self).__name__}(fused=True): param group {index} runs unfused: {reason}",
                      RuntimeWarning, stacklevel=_caller_stacklevel())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        A ``fused=True`` group keeps its gradients as views of one buffer, zeroed; with
        ``set_to_none`` a param of it still reads ``grad is None`` until backward reaches
        it, so it is skipped as torch.optim skips it.

        Args:
            set_to_none: set each ``grad`` to ``None`` (default ``True``) instead of
                zeroing it.

        Returns:
            ``None``.

        Example:
            >>> import torch
            >>> import holotx
            >>> from holotx.adapters import TransformOptimizer
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = TransformOptimizer([w], holotx.adam, lr=1e-3)
            >>> w.sum().backward()
            >>> opt.zero_grad()
            >>> w.grad is None
            True
        """
        super().zero_grad(set_to_none)
        for _, binding in self._fused_groups.values():
            if isinstance(binding, FusedGroup):
                binding.after_zero_grad()

    def _plan(self, group: dict[str, Any], compiling: bool) -> tuple[GradientTransformation, Any]:
        """The group's transform and the adapter's lr, checked; nothing is changed."""
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if self._factory is None:
            _validate_lr(group.get("lr"))
        values, lr = self._hyperparameters(group, compiling)
        maximize = _validate.flag("maximize", group.get("maximize", False))
        if compiling:  # the numbers are new 0-d tensors on every call: nothing to reuse
            return self._transform_from(values, maximize), lr
        # The group's transform is rebuilt only when a value in its dict changed (a
        # scheduler's new lr, an edit): building it is most of the adapter's fixed cost.
        key = _values_key(values, maximize)
        built = self._built.get(id(group))
        if key is not None and built is not None and built[0] == key:
            return built[1], lr
        tx = self._transform_from(values, maximize)
        if key is not None:
            self._built[id(group)] = (key, tx)
        return tx, lr

    def _begin_group(self, group: dict[str, Any], tx: GradientTransformation, compiling: bool) -> Any:
        params: list[torch.Tensor] = group["params"]
        grads = [p.grad for p in params]
        runtime = self._runtime(group)
        tx_params, tx_grads, upcast = self._working_copies(params, grads)
        state = runtime.assemble(self.state, params)
        # Eager, the chain's last scaling (the lr) is applied with the update, in one pass;
        # compiled, the compiler fuses it, and better without the hand-over (as make_step).
        step = executor.begin(tx, tx_grads, state, tx_params, donate=True, donate_updates=self._donate_grads,
                              hand_over_scale=not compiling)
        return runtime, tx_params, upcast, step

    def _finish_group(self, group: dict[str, Any], lr: Any, begun: Any) -> None:
        params: list[torch.Tensor] = group["params"]
        runtime, tx_params, upcast, step = begun
        updates, state, factor, _ = executor.finish(step)
        runtime.scatter(self.state, params, state)
        if self._factory is None:  # the group's lr multiplies the transform's updates
            factor = lr if factor is None else executor.scale_factor([factor, lr])
        if not upcast:
            apply_step_updates(params, updates, scale=factor)
            return
        apply_step_updates(tx_params, updates, scale=factor)
        for i in upcast:
            params[i].copy_(tx_params[i])

    @torch._disable_dynamo
    def _runtime(self, group: dict[str, Any]) -> _GroupRuntime:
        """The group's runtime, rebuilt (its state carried over key by key) when the
        structure of its transform changed."""
        signature = self._signature(group)
        runtime = self._runtimes.get(id(group))
        if runtime is None or runtime.signature != signature or runtime.group is not group:
            runtime = self._new_runtime(group, signature, fresh=True)
        return runtime

    @torch._disable_dynamo
    def _hyperparameters(self, group: dict[str, Any], compiling: bool) -> tuple[dict[str, Any], Any]:
        """The factory's arguments and the adapter's lr. Outside any graph: under
        torch.compile the non-zero numbers become 0-d tensors here, so the graph takes them
        as inputs and a new value (a scheduler's) needs no recompile."""
        values = self._values(group)
        lr = _lr.as_float(group.get("lr"))
        if compiling:
            device = group["params"][0].device
            entry = self._number_tensors.get(id(group))
            if entry is None or entry[0] is not group:
                entry = self._number_tensors[id(group)] = (group, {})
            made = entry[1]
            for name, value in values.items():
                if name in self._tensor_args and _is_numeric(value) and not _is_zero(value):
                    # Shaped (1,), which the factory gets as a 0-d view (_as_factory_value):
                    # dynamo (torch 2.13) traces a 0-d float input as a symbolic Python
                    # float, and one the step never computes with (AdamP's wd_ratio without
                    # weight decay) makes it trace the whole step a second time.
                    values[name] = _number_tensor(made, name, value, device, (1,))
            if self._factory is None and _is_numeric(lr):
                lr = _number_tensor(made, "lr", lr, device, ())
        return values, lr

    def _working_copies(self, params, grads):
        """Params and grads as the transform sees them: lower-precision ones upcast to
        ``state_dtype``; and the indices of those."""
        sd = self._state_dtype
        if sd is None:
            return list(params), grads, []
        upcast = [i for i, p in enumerate(params) if _upcast(p, sd)]
        if not upcast:
            return list(params), grads, []
        tx_params, tx_grads = list(params), list(grads)
        for i in upcast:
            tx_params[i] = params[i].to(sd)
            tx_grads[i] = None if grads[i] is None else grads[i].to(sd)
        return tx_params, tx_grads, upcast

    @torch._disable_dynamo
    def _new_runtime(self, group: dict[str, Any], signature: list[Any], *, fresh: bool) -> _GroupRuntime:
        if not fresh:  # the state is all there: only its layout is needed
            runtime = _GroupRuntime(group, signature, self._layout_for(group))
        else:
            params = group["params"]
            tx_params, _, _ = self._working_copies(params, [None] * len(params))
            with torch.no_grad():
                init = self._build(group).init(tx_params)
            runtime = _GroupRuntime(group, signature, StateLayout.of(init, params))
            runtime.adopt(self.state, params, init)
        self._runtimes[id(group)] = runtime
        return runtime

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self, format: str | None = None) -> dict[str, Any]:
        """The optimizer's state and param groups, as ``torch.optim.Optimizer.state_dict``.

        By default holotx's own layout: per param, the leaves of the transform's state at
        that param (``count``, ``mu``, ``nu`` for AdamW), keyed by the param's index. A
        schedule ``lr`` is saved as its description, ``lr_count`` and ``lr_scale``, never
        the callable, so the result loads with ``torch.load(weights_only=True)``.

        Args:
            format: ``None`` (holotx's layout); ``"torch"``, the layout of the torch.optim
                twin of this optimizer's factory (``holotx.sgd``, ``adam``, ``adamw``,
                ``radam``: torch.optim's SGD, Adam, AdamW, RAdam), which that class loads
                and continues; or ``"holocron"``, pylocron 0.3.0's layout (Holocron's eight,
                to be continued by Holocron's class from a ``compat="holocron"`` run). Both
                are read back by :meth:`load_state_dict`.

        Returns:
            ``{"state": {index: {key: tensor}}, "param_groups": [...]}``.

        Example:
            >>> import torch
            >>> import holotx
            >>> from holotx.adapters import TransformOptimizer
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = TransformOptimizer([w], holotx.adamw, lr=1e-3)
            >>> w.grad = torch.ones(2)
            >>> opt.step()
            >>> sorted(opt.state_dict()["state"][0])
            ['count', 'mu', 'nu']
            >>> sorted(opt.state_dict(format="torch")["state"][0])
            ['exp_avg', 'exp_avg_sq', 'step']
        """
        self._settle_lrs()
        if format is None:
            return super().state_dict()
        if format not in ("torch", "holocron"):
            raise ValueError(f"format must be None, 'torch' or 'holocron', got {format!r}")
        scheduled = [g for g, group in enumerate(self.param_groups) if _lr.is_schedule_group(group)]
        if scheduled:
            library = "torch.optim" if format == "torch" else "Holocron"
            raise ValueError(f"format={format!r}: the lr of param group {scheduled[0]} is a holotx schedule, "
                             f"which {library}'s optimizer cannot go on with (give it its own scheduler)")
        keys = _formats.TORCH_KEYS if format == "torch" else _formats.HOLOCRON_KEYS
        if self._factory not in keys:
            twins = ", ".join(_name(f) for f in keys)
            library = "torch.optim" if format == "torch" else "Holocron"
            raise ValueError(f"{_name(self._factory)} has no {library} twin to write a checkpoint for "
                             f"(those that do: {twins})")
        state_dict = super().state_dict()
        if format == "torch":
            state_dict["state"] = {i: _formats.to_torch(self._factory, entry)
                                   for i, entry in state_dict["state"].items()}
        else:
            params = [p for group in self.param_groups for p in group["params"]]
            state_dict["state"] = {i: _formats.to_holocron(self._factory, entry, params[i])
                                   for i, entry in state_dict["state"].items()}
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (holotx's, torch.optim's or Holocron's layout).

        Everything is checked before anything changes: a checkpoint of another algorithm
        or chain, other shapes, another number of groups or params, missing or unexpected
        keys raise ``ValueError`` naming the group, the param and the key, and leave the
        optimizer as it was. Tensors are moved to their param's device; floating-point
        state takes the dtype this optimizer keeps.

        Args:
            state_dict: what :meth:`state_dict` returned (any ``format``), or a
                torch.optim SGD/Adam/AdamW/RAdam or pylocron 0.3.0 optimizer's state dict.

        Returns:
            ``None``.

        Example:
            >>> import torch
            >>> import holotx
            >>> from holotx.adapters import TransformOptimizer
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> torch_opt = torch.optim.AdamW([w], lr=1e-3)
            >>> w.grad = torch.ones(2)
            >>> torch_opt.step()
            >>> opt = TransformOptimizer([w], holotx.adamw, lr=1e-3)
            >>> opt.load_state_dict(torch_opt.state_dict())
            >>> opt.state_dict()["state"][0]["count"]
            tensor(1)
        """
        check_state_dict(state_dict)
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_state_dict(state_dict)
        saved_groups = deepcopy(state_dict["param_groups"])
        saved_state = state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        new_groups = []
        new_published: dict[int, tuple[dict[str, Any], _lr.ScheduledLR]] = {}
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {g} has {len(saved['params'])} params in the checkpoint, "
                                 f"{len(group['params'])} here")
            candidate = {**saved, "params": group["params"]}
            if "param_names" in group and "param_names" not in saved:
                candidate["param_names"] = group["param_names"]
            candidate, published = _lr_from_checkpoint(g, group, candidate, (weakref.ref(self), g))
            if published is not None:
                new_published[id(candidate)] = (candidate, published)
            # A checkpoint from before an argument existed takes its default (torch.optim's
            # rule for flags added later); a checkpoint of another algorithm is told by its
            # state keys below.
            for name, default in self.defaults.items():
                if name not in candidate:
                    if default is required:
                        raise ValueError(f"param group {g} of the checkpoint lacks {name}, which this "
                                         "optimizer requires")
                    candidate[name] = default
            try:
                self._check_group(candidate)
            except (TypeError, ValueError) as err:
                raise ValueError(f"param group {g} of the checkpoint does not fit this optimizer: "
                                 f"{err}") from err
            entries = [saved_state.get(i) for i in saved["params"]]
            if any(e is not None for e in entries):
                layout = self._layout_for(candidate)
                new_state.update(_checked_entries(g, group, entries, layout, self._factory))
            new_groups.append(candidate)
        # Nothing above changed the optimizer: now it takes the checkpoint.
        self.state.clear()
        self.state.update(new_state)
        self.param_groups = new_groups
        self._lr_published = new_published
        _lr.register(self)
        self._runtimes = {}
        self._built = {}
        self._number_tensors = {}
        for group in self.param_groups:
            if any(p in self.state for p in group["params"]):
                self._new_runtime(group, self._signature(group), fresh=False)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _layout_for(self, group: dict[str, Any]) -> StateLayout:
        tx = self._build(group)
        params = group["params"]
        meta, _, _ = self._working_copies([torch.empty_like(p, device="meta") for p in params],
                                          [None] * len(params))
        return StateLayout.of(tx.init(meta), params)

    # -- copies and pickles ---------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_factory=self._factory, _transform=self._transform, _tensor_args=self._tensor_args,
                     _factory_args=self._factory_args, _state_dtype=self._state_dtype,
                     _donate_grads=self._donate_grads, _fused=self._fused,
                     _max_grad_norm=self._max_grad_norm)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.register_state_dict_post_hook(_plain_schedule_groups, prepend=True)
        _lr.register(self)
        this = weakref.ref(self)
        self._lr_published = {}
        for i, group in enumerate(self.param_groups):  # a copy's lrs are bound to the copy
            if _lr.is_schedule_group(group):
                self._lr_published[id(group)] = (group, _lr.republish(group, (this, i)))
            base = group.get("initial_lr")
            if isinstance(base, _lr.ScheduledLR) and base._binding is None:
                base._binding = (this, i)
        self._fused = state.get("_fused", False)
        self._max_grad_norm = state.get("_max_grad_norm")
        self._grad_norm = _GradNorm()
        # A copy binds its own params to its own buffers at its next step.
        self._fused_groups = {}
        self._runtimes = {}
        self._built = {}
        self._number_tensors = {}
        for group in self.param_groups:
            if any(p in self.state for p in group["params"]):
                self._new_runtime(group, self._signature(group), fresh=False)

    def __repr__(self) -> str:
        what = _name(self._factory) if self._factory is not None else "transform"
        return super().__repr__().replace(type(self).__name__ + " (", f"{type(self).__name__} [{what}] (", 1)


class _GradNorm:
    """The norm ``max_grad_norm`` clips by: computed by :meth:`TransformOptimizer.step`
    over every group before any group steps, read by each group's clip."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("max_grad_norm: the global norm is computed by TransformOptimizer.step, "
                               "and this transform ran outside it")
        return self.value


class _GroupRuntime:
    """A group's state layout, for the structure its transform has now."""

    __slots__ = ("group", "layout", "signature")

    def __init__(self, group: dict[str, Any], signature: list[Any], layout: StateLayout) -> None:
        self.group = group
        self.signature = signature
        self.layout = layout

    def assemble(self, state: dict[torch.Tensor, dict[str, Any]], params: list[torch.Tensor]) -> Any:
        """The group's pytree state, read from the per-param dicts."""
        layout = self.layout
        leaves = []
        for key, owner in zip(layout.keys, layout.owners):
            if key is None:
                leaves.append(None)
            else:
                leaves.append(state[params[0 if owner is None else owner]].get(key))
        return layout.build(leaves)

    def scatter(self, state: dict[torch.Tensor, dict[str, Any]], params: list[torch.Tensor],
                new_state: Any) -> None:
        """Write the group's new pytree state back into the per-param dicts."""
        layout = self.layout
        leaves = layout.leaves(new_state)
        if len(leaves) != len(layout.keys):
            raise RuntimeError(f"the transform returned a state of {len(leaves)} leaves, its init had "
                               f"{len(layout.keys)}: an update must keep the structure of its state")
        for leaf, key, owner in zip(leaves, layout.keys, layout.owners):
            if key is None:
                continue
            for p in params if owner is None else (params[owner],):
                state[p][key] = leaf

    def adopt(self, state: dict[torch.Tensor, dict[str, Any]], params: list[torch.Tensor], init: Any) -> None:
        """Take ``init`` as the group's state, keeping every existing entry whose key,
        shape and dtype still fit (a structure change carries the state over)."""
        leaves, _ = tree.flatten(init)
        layout = self.layout
        keep: list[dict[str, Any]] = []
        for p in params:
            old = state.get(p, {})
            keep.append({})
            for key, owner, exp in zip(layout.keys, layout.owners, layout.expected):
                if key is None or key not in old or (owner is not None and params[owner] is not p):
                    continue
                value = old[key]
                if isinstance(value, torch.Tensor) and exp is not None and \
                        (value.shape, value.dtype, value.device) == exp:
                    keep[-1][key] = value
        for p in params:
            state[p] = {}
        for leaf, key, owner in zip(leaves, layout.keys, layout.owners):
            if key is None:
                continue
            for i in range(len(params)) if owner is None else (owner,):
                state[params[i]][key] = keep[i].get(key, leaf)


def check_state_dict(state_dict: Any) -> None:
    """The outline of an optimizer ``state_dict``, checked before anything is read from it:
    a dict with ``state`` and ``param_groups``, whose state is keyed by ids that the groups
    list (a JSON round trip turns them into strings, and every entry would be dropped)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("an optimizer state_dict is a dict with the keys 'state' and 'param_groups', got "
                         f"{type(state_dict).__name__}")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)) or \
            not all(isinstance(g, dict) and "params" in g for g in groups):
        raise ValueError("the checkpoint's param_groups must be a list of dicts with 'params'")
    if not isinstance(state, dict):
        raise ValueError(f"the checkpoint's state must be a dict, got {type(state).__name__}")
    ids = {i for g in groups for i in g["params"]}
    stray = [k for k in state if k not in ids]
    if stray:
        json = any(isinstance(k, str) for k in stray)
        hint = " (string keys: a JSON round trip? the ids are ints)" if json else ""
        raise ValueError(f"the checkpoint's state has entries {sorted(map(repr, stray))[:5]} for params that "
                         f"no param group lists{hint}")


_HYPERPARAMETER_NAMES = frozenset(
    name for factory in (holotx.sgd, holotx.adam, holotx.adamw, holotx.radam, holotx.lars, holotx.lamb,
                         holotx.ralars, holotx.tadam, holotx.adabelief, holotx.adamp, holotx.adan,
                         holotx.ademamix)
    for name in inspect.signature(factory).parameters) - {"lr", "maximize"}
"""The hyperparameters of holotx's optimizers: in a param group of a TransformOptimizer
built from a transform, which reads none of them, they would be silently ignored."""


def _checked_entries(g: int, group: dict[str, Any], entries: list[Any],
                     layout: StateLayout, factory: Any = None) -> dict[torch.Tensor, dict[str, Any]]:
    """The checkpoint's entries for one group, checked against its layout and cast. An
    entry in torch.optim's layout, for a factory with a torch.optim twin, is renamed first
    (:mod:`adapters._formats`), and so is one in Holocron 0.3.0's."""
    params = group["params"]
    names = group.get("param_names")
    expected_keys = layout.keys_per_param(len(params))
    where: dict[tuple[int, str], tuple[torch.Size, torch.dtype, torch.device]] = {}
    for key, owner, exp in zip(layout.keys, layout.owners, layout.expected):
        if key is not None and exp is not None:
            for i in range(len(params)) if owner is None else (owner,):
                where[(i, key)] = exp
    out: dict[torch.Tensor, dict[str, Any]] = {}
    for i, (p, entry) in enumerate(zip(params, entries)):
        label = f"param group {g}, param {i}" + (f" ({names[i]})" if names else "")
        if entry is None:
            raise ValueError(f"{label} has no state in the checkpoint, while other params of its group do")
        if not isinstance(entry, dict):
            raise ValueError(f"{label}: its state in the checkpoint is a {type(entry).__name__}, not a dict")
        entry = _dotted(entry)
        if set(entry) != expected_keys[i]:
            entry = (_formats.from_torch(factory, entry, expected_keys[i], label)
                     or _formats.from_holocron(factory, entry, expected_keys[i], label) or entry)
        missing = sorted(expected_keys[i] - set(entry))
        unexpected = sorted(set(entry) - expected_keys[i])
        if missing or unexpected:
            raise ValueError(
                f"{label}: the checkpoint's state has keys {sorted(entry)}, this optimizer expects "
                f"{sorted(expected_keys[i])} (missing {missing}, unexpected {unexpected}): it was saved by "
                "another algorithm or chain")
        cast = {}
        for key, value in entry.items():
            shape, dtype, device = where[(i, key)]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{label}, key {key!r}: expected a tensor, got {type(value).__name__}")
            if value.device.type == "meta":
                raise ValueError(f"{label}, key {key!r}: a meta tensor has no values to load")
            if not dtype.is_floating_point and not dtype.is_complex:
                value = _formats.whole_count(value, f"{label}, key {key!r}")
            if value.shape != shape:
                raise ValueError(f"{label}, key {key!r}: shape {tuple(value.shape)} in the checkpoint, "
                                 f"{tuple(shape)} expected")
            if value.is_floating_point() != dtype.is_floating_point:
                raise ValueError(f"{label}, key {key!r}: dtype {value.dtype} in the checkpoint, "
                                 f"{dtype} expected")
            cast[key] = value.to(device=device, dtype=dtype, copy=True)
        out[p] = cast
    # A group-wide leaf is one tensor under every param; give them one tensor again.
    for key, owner in zip(layout.keys, layout.owners):
        if key is not None and owner is None:
            first = out[params[0]][key]
            for p in params[1:]:
                out[p][key] = first
    return out


def _dotted(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A param's state with nested dicts flattened to dotted keys (a flattened
    ``torch.distributed.checkpoint`` splits ``"inner_state.mu"`` at its dots)."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _values_key(values: dict[str, Any], maximize: Any) -> Any:
    """What the transform built from ``values`` depends on, comparable with ``==``: each
    value with its type (1, 1.0 and True build different transforms); ``None`` where that
    cannot tell, which rebuilds every step: an unhashable value, or a tensor (a factory
    may read its value when it builds, as ``-lr``, and the tensor can change in place)."""
    def frozen(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            raise TypeError("a tensor's value is not part of the key")
        if isinstance(v, (list, tuple)):
            return (type(v), tuple(frozen(x) for x in v))
        return (type(v), v)

    try:
        key = (frozen(maximize), *((name, frozen(v)) for name, v in values.items()))
        hash(key)
    except TypeError:
        return None
    return key


def _upcast(p: torch.Tensor, state_dtype: torch.dtype | None) -> bool:
    """Whether the transform sees ``p`` (and its gradient) upcast to ``state_dtype``."""
    return (state_dtype is not None and p.is_floating_point() and p.dtype != state_dtype
            and p.dtype.itemsize < state_dtype.itemsize)


def _has_grads(group: dict[str, Any]) -> bool:
    """Whether the group steps: it has a param with a gradient."""
    return any(p.grad is not None for p in group["params"])


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside holotx and torch
    (the user's ``opt.step()``): between them lie torch.optim's step wrappers and dynamo's
    ``disable`` frames, whose number depends on the path taken."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL_ROOTS)


# holotx's packages (the adapters are installed as holotx.adapters, but may live apart in a
# source checkout) and torch's.
_INTERNAL_ROOTS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                        for f in (__file__, executor.__file__, torch.__file__))


def _validate_lr(lr: Any) -> None:
    """The lr of a group whose transform was given built, checked as a factory checks its
    own: a finite number ``>= 0`` or a one-element tensor holding one (its value read where
    that costs nothing), or a schedule (checked where the group takes it)."""
    if not _lr.is_schedule(lr):
        _lr.check_lr(lr)


def _plain_schedule_groups(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """State-dict post-hook, run before any other: each schedule group as a checkpoint
    holds it (:func:`adapters._lr.plain_group`: the schedule described, not saved), so that
    the checkpoint loads with ``torch.load(weights_only=True)``."""
    state_dict["param_groups"] = [_lr.plain_group(g) for g in state_dict["param_groups"]]


def _lr_from_checkpoint(g: int, group: dict[str, Any], candidate: dict[str, Any],
                        binding: _lr.Binding) -> tuple[dict[str, Any], _lr.ScheduledLR | None]:
    """The checkpoint's param group ``candidate`` for this optimizer's ``group``, its lr
    checked against this group's: a schedule group takes the checkpoint's count, scale and
    lr and keeps its own schedule; a checkpoint whose kind of lr (schedule or number)
    contradicts the group's raises ``ValueError`` (loading it would replace one by the
    other). Returns the group and its published lr (``None`` for a number group)."""
    saved_lr, saved_schedule = candidate.get("lr"), candidate.get("lr_schedule")
    for value in (saved_lr, saved_schedule):
        if _lr.is_schedule(value):
            raise ValueError(f"param group {g} of the checkpoint holds a schedule object ({value!r}) "
                             "where a checkpoint keeps the schedule's count and scale (lr_count, lr_scale) "
                             "and describes it in lr_schedule: it cannot be resumed")
    own = group.get("lr_schedule") if _lr.is_schedule_group(group) else None
    if own is None and saved_schedule is None:
        return candidate, None
    if own is None:
        raise ValueError(
            f"param group {g}: the checkpoint's lr is a schedule ({saved_schedule}, at lr_count "
            f"{candidate.get('lr_count')!r}) and this optimizer's is a number ({group.get('lr')!r}); a "
            "checkpoint keeps a schedule's count and scale, not the schedule: build the optimizer with the "
            "schedule as lr to resume it (or drop lr_schedule, lr_count and lr_scale from the checkpoint's "
            "group to go on with its lr as a number)")
    if saved_schedule is None:
        raise ValueError(
            f"param group {g}: the checkpoint's lr is a number ({saved_lr!r}) and this optimizer's is a "
            f"schedule ({_lr.describe(own)}); loading it would replace the schedule: load it into an "
            "optimizer whose lr is a number (then assign a schedule to group['lr'] to start one at count 0)")
    if not isinstance(saved_schedule, str):
        raise ValueError(f"param group {g} of the checkpoint: lr_schedule must be the description of a "
                         f"schedule (a string), got {saved_schedule!r}")
    try:
        return _lr.restored_group(candidate, own, saved_schedule == _lr.describe(own), binding)
    except ValueError as err:
        raise ValueError(f"param group {g} of the checkpoint does not fit this optimizer: {err}") from err


def _number_tensor(made: dict[str, tuple[Any, Any]], name: str, value: Any, device: torch.device,
                   shape: tuple[int, ...]) -> Any:
    """:func:`_as_tensor` of a group's value, the tensors made at its last step again where
    the value is the same Python number (or tuple of them): making them took a sixth of a
    fused step on a small model (each ``torch.tensor`` a few microseconds). A tensor value
    is converted at every step: it may have changed in place. One group's names never share
    a tensor (a graph's inputs that alias one another would guard on it)."""
    plain = isinstance(value, (int, float)) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value))
    if not plain:
        return _as_tensor(value, device, shape)
    # (By the plain number's repr, which round-trips a float, tells -0.0 from 0.0 and matches
    # a NaN; a subclass's own __repr__ may not show its value.)
    numbers = value if isinstance(value, (tuple, list)) else (value,)
    key = (tuple(float.__repr__(v) if isinstance(v, float) else int.__repr__(v) for v in numbers),
           device, shape)
    hit = made.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    tensor = _as_tensor(value, device, shape)
    made[name] = (key, tensor)
    return tensor


def _as_tensor(value: Any, device: torch.device, shape: tuple[int, ...] = ()) -> Any:
    """A number (or a tuple of them) as float64 tensors (float32 on MPS) of ``shape`` (0-d
    by default) on ``device``."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if isinstance(value, (tuple, list)):
        return tuple(_as_tensor(v, device, shape) for v in value)
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(shape)
    return torch.tensor(value, dtype=dtype, device=device).reshape(shape)


def _factory_defaults(factory: Factory, given: dict[str, Any]
                      ) -> tuple[dict[str, Any], tuple[str, ...], frozenset[str]]:
    """The group defaults of a factory: its keyword arguments' defaults (``required``
    where there is none), the adapter's ``lr``/``maximize`` where it does not take them,
    then ``given``; the factory's argument names; those that may be 0-d tensors."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot read the arguments of {_name(factory)}: {err}") from err
    defaults: dict[str, Any] = {}
    tensor_args = set()
    for name, p in signature.parameters.items():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ValueError(f"{_name(factory)} has a positional-only argument {name!r}: "
                             "the adapter passes hyperparameters by name")
        defaults[name] = required if p.default is inspect.Parameter.empty else p.default
        if _admits_tensor(p.annotation):
            tensor_args.add(name)
    args = tuple(defaults)
    unknown = sorted(set(given) - set(defaults) - set(_ADAPTER_KEYS))
    if unknown:
        raise ValueError(f"{_name(factory)} has no argument {', '.join(map(repr, unknown))}; "
                         f"its arguments are {', '.join(args)}")
    if "lr" in given and "lr" not in defaults:
        raise ValueError(f"{_name(factory)} takes no lr: the adapter's lr applies to transforms only")
    defaults.setdefault("maximize", False)
    defaults.update(given)
    return defaults, args, frozenset(tensor_args)


def _admits_tensor(annotation: Any) -> bool:
    """Whether an argument may be a 0-d tensor: unannotated, or typed with holotx's
    ``Scalar`` (``float | Tensor``) or a type naming ``Tensor``."""
    if annotation is inspect.Parameter.empty:
        return True
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "Scalar" in text or "Tensor" in text


def _is_numeric(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, Number) or (isinstance(x, torch.Tensor) and x.numel() == 1 and x.is_floating_point()):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(
        (isinstance(v, Number) and not isinstance(v, bool))
        or (isinstance(v, torch.Tensor) and v.numel() == 1)
        for v in x)


def _as_factory_value(value: Any, tensor_arg: bool) -> Any:
    """A group's value as a factory takes it: a list of numbers as a tuple (JSON and some
    checkpoints turn betas into lists), and, for an argument that may be a tensor, a
    one-element tensor of any shape (torch.optim takes ``torch.tensor([1e-3])`` as an lr)
    as a 0-d view of it, which follows in-place changes (a scheduler's ``fill_``):
    holotx's factories take 0-d tensors."""
    if tensor_arg and isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == 1:
        return value.reshape(())
    if isinstance(value, list) and _is_numeric(value):
        return tuple(_as_factory_value(v, tensor_arg) for v in value)
    if tensor_arg and isinstance(value, tuple) and _is_numeric(value):
        return tuple(_as_factory_value(v, tensor_arg) for v in value)
    return value


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _name(factory: Any) -> str:
    module = getattr(factory, "__module__", "") or ""
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    if module.startswith("holotx"):
        module = "holotx"
    return f"{module}.{name}" if module else name
