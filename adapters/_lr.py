"""A param group whose ``lr`` is a holotx schedule, under torch's LR schedulers.

:class:`~holotx.adapters.TransformOptimizer` keeps four keys in such a group::

    group["lr"] == group["lr_schedule"](group["lr_count"]) * group["lr_scale"]

``lr`` is the learning rate the group's next step uses, a float (so a monitor that logs
``group["lr"]`` logs what is used); ``lr_schedule`` the schedule; ``lr_count`` the number
of steps the group has taken (0 at first: the first step uses ``schedule(0)``);
``lr_scale`` a multiplier, 1 at first, which is what a torch LR scheduler (or the user)
changes by writing ``group["lr"]``.

Between steps the float in ``group["lr"]`` is a :class:`ScheduledLR`, which also knows the
multiple of the schedule it stands for (``lr_scale``); a number times it stands for that
number times the multiple. torch's schedulers compute what they write either from
``group["lr"]`` (the chainable ones: ``StepLR``, ``MultiStepLR``, ``ExponentialLR``,
``MultiplicativeLR``, ``ConstantLR``, ``LinearLR``, ``PolynomialLR``,
``CosineAnnealingLR``) or from the base they took from it when they were built,
``initial_lr`` (``LambdaLR``, the closed forms ``SequentialLR`` uses at its milestones,
``CosineAnnealingWarmRestarts``). Either way they write a :class:`ScheduledLR` whose value
is what the next step uses (a multiple of the base is the schedule's value at the group's
count now times its multiple; ``get_last_lr()``, read back from the group, is that too),
and the next step takes ``lr_scale`` from it. So ``LambdaLR(opt, lambda epoch: 1.0)``
changes nothing, ``StepLR`` multiplies the schedule's values by ``gamma`` at its steps,
Hugging Face's schedulers (``LambdaLR``) multiply the holotx schedule, and all of it holds
where the schedule's value is 0 (a warmup from 0) too.

What is written into the group is read at the next step (or ``state_dict()``):

- ``lr`` a :class:`ScheduledLR` (a scheduler's, as above): ``lr_scale`` becomes its multiple;
- ``lr`` a plain **number** (``ReduceLROnPlateau``, which computes on ``float(group["lr"])``;
  ``CyclicLR`` and ``OneCycleLR``, which compute learning rates of their own; the user) is
  the learning rate of the next step, and ``lr_scale`` becomes that number divided by the
  schedule's value at ``lr_count``, so that the following steps follow the schedule from
  it (where the schedule's value is 0 the scale cannot be read off: the number is used for
  the next step and the scale stays; setting ``lr_scale`` always works);
- ``lr`` a **schedule** replaces the group's schedule; the count and the scale carry on;
- ``lr_schedule``, ``lr_count``, ``lr_scale`` (``lr`` untouched): ``lr`` follows them.

During a step ``group["lr"]`` is the plain float the step uses: the step reads the groups
outside the graph under ``torch.compile``, where a float subclass would be a guarded
constant (a recompile at every step).

A :class:`ScheduledLR` knows its optimizer (a weak reference) and the group's index, which
it needs to compute a multiple of a base from the schedule's value now. A base read back
from a pickle (a scheduler's ``state_dict``, loaded) finds them again: the live
:class:`~holotx.adapters.TransformOptimizer` whose group at that index has the same schedule
(by its description) and that ``initial_lr`` (the same value and scale); of several, the
one built, copied or loaded last (the one a checkpoint is being resumed into).
"""

from __future__ import annotations

import copy
import itertools
import math
import numbers
import weakref
from typing import Any

import numpy as np
import torch

from holotx import _validate
from holotx.schedules import _FormulaSchedule

__all__ = ["ScheduledLR", "advance", "as_float", "describe", "is_schedule", "is_schedule_group",
           "plain_group", "register", "republish", "restored_group", "schedule_group", "settle"]

Binding = tuple[weakref.ReferenceType, int]
"""A weak reference to the optimizer and the group's index in its ``param_groups``."""

_OPTIMIZERS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""The live optimizers, where a base read back from a pickle finds its group: each with
the serial number of when it was last built, copied or loaded."""
_SERIAL = itertools.count()


def register(optimizer: Any) -> None:
    """Note ``optimizer`` as built, copied or loaded now."""
    _OPTIMIZERS[optimizer] = next(_SERIAL)


def is_schedule(value: Any) -> bool:
    """Whether an ``lr`` is a schedule (a callable; a tensor is a number)."""
    return callable(value) and not isinstance(value, torch.Tensor)


def is_schedule_group(group: dict[str, Any]) -> bool:
    """Whether a param group's lr is a schedule (it has an ``lr_schedule``)."""
    return group.get("lr_schedule") is not None


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def as_float(value: Any) -> Any:
    """A :class:`ScheduledLR` as the plain float it holds; anything else as it is."""
    return float(value) if isinstance(value, ScheduledLR) else value


class ScheduledLR(float):
    """The learning rate of a schedule group between steps (``group["lr"]``, and the
    ``initial_lr`` a scheduler takes from it): a float, which also stands for ``scale``
    times the group's schedule.

    A product or quotient with a number (``group["lr"] * gamma``, ``base_lr *
    lr_lambda(epoch)``) is a :class:`ScheduledLR` whose scale is multiplied likewise (so a
    value of 0 carries its scale too); so is a sum or difference of two (their scales add
    up: ``CosineAnnealingLR`` adds to ``group["lr"]`` a multiple of its base). Adding or
    subtracting 0 keeps it; any other arithmetic gives a plain float. The value of a result
    is the float arithmetic's, except from a scheduler's base (a group's ``initial_lr``,
    once the optimizer has seen it): there it is the schedule's value at the group's count
    now times the result's scale, what the next step uses. It pickles as its value, scale,
    group index and whether it is a base (registered with
    :func:`torch.serialization.add_safe_globals`, so a scheduler's ``state_dict`` holding
    one loads with ``torch.load(weights_only=True)``)."""

    scale: float
    _binding: Binding | None = None
    _index: int | None = None  # the group's index, kept through a pickle
    _description: str | None = None  # the group's schedule described, kept through a pickle
    _source: tuple[Any, int, float] | None = None  # (schedule, count, scale) its value is for
    _origin: ScheduledLR | None = None  # the value it was derived from (a scheduler's base)
    _base = False  # a scheduler's base: results take the group's schedule value now

    def __new__(cls, value: float, scale: float, index: int | None = None, base: bool = False,
                description: str | None = None) -> ScheduledLR:
        self = super().__new__(cls, value)
        self.scale = float(scale)
        if index is not None:
            self._index = int(index)
        if base:
            self._base = True
        if description is not None:
            self._description = description
        return self

    def _group(self) -> dict[str, Any] | None:
        """The schedule group it is bound to (found again, if it was read from a pickle)."""
        if self._binding is None and self._base and self._index is not None:
            index, found = self._index, []
            for optimizer, serial in list(_OPTIMIZERS.items()):
                groups = optimizer.param_groups
                if index < len(groups) and is_schedule(groups[index].get("lr_schedule")) \
                        and describe(groups[index]["lr_schedule"]) == self._description \
                        and _same(groups[index].get("initial_lr"), self):
                    found.append((serial, optimizer))
            if found:
                self._binding = (weakref.ref(max(found, key=lambda x: x[0])[1]), index)
        return _bound_group(self._binding)

    def _derived(self, scale: float, value: float, other: ScheduledLR | None = None) -> ScheduledLR:
        operands = (self,) if other is None else (self, other)
        out = None
        for x in operands:
            group = x._group() if x._base else None
            if group is None:
                continue
            try:
                schedule, count = group["lr_schedule"], _checked_count(group.get("lr_count"))
                out = ScheduledLR(schedule_value(schedule, count) * scale, scale)
                out._source = (schedule, count, out.scale)
            except Exception:  # the group's keys are invalid: its next step says so
                out = None
            break
        if out is None:
            out = ScheduledLR(value, scale)
            sources = {(x._source[0], x._source[1]) if x._source is not None else None for x in operands}
            if len(sources) == 1 and None not in sources:  # every operand's value is for that count
                (schedule, count), = sources
                out._source = (schedule, count, out.scale)
        out._binding = next((x._binding for x in operands if x._binding is not None), None)
        out._index = next((x._index for x in operands if x._index is not None), None)
        out._description = next((x._description for x in operands if x._description is not None), None)
        out._origin = self._origin if self._origin is not None else self
        return out

    def __mul__(self, other: Any) -> Any:
        if _real(other):
            return self._derived(self.scale * other, float(self) * other)
        return float.__mul__(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Any:
        if _real(other) and other != 0:
            return self._derived(self.scale / other, float(self) / other)
        return float.__truediv__(self, other)

    def __add__(self, other: Any) -> Any:
        if isinstance(other, ScheduledLR):  # two multiples of the schedule
            return self._derived(self.scale + other.scale, float(self) + float(other), other)
        if _real(other) and other == 0:
            return self
        return float.__add__(self, other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, ScheduledLR):
            return self._derived(self.scale - other.scale, float(self) - float(other), other)
        if _real(other) and other == 0:
            return self
        return float.__sub__(self, other)

    def __reduce__(self) -> tuple[Any, ...]:
        index, description = self._index, self._description
        group = _bound_group(self._binding)
        if group is not None:
            index, description = self._binding[1], describe(group["lr_schedule"])  # type: ignore[index]
        return (ScheduledLR, (float(self), self.scale, index, self._base, description))

    def __deepcopy__(self, memo: dict[int, Any]) -> ScheduledLR:
        """A copy bound to the copy of its optimizer, if that is copied with it."""
        new = ScheduledLR(float(self), self.scale, self._index, self._base, self._description)
        group = _bound_group(self._binding)
        if group is not None:
            optimizer = memo.get(id(self._binding[0]()))  # type: ignore[index]
            new._index, new._description = self._binding[1], describe(group["lr_schedule"])  # type: ignore[index]
            if optimizer is not None:
                new._binding = (weakref.ref(optimizer), new._index)
        new._source = copy.deepcopy(self._source, memo)
        new._origin = copy.deepcopy(self._origin, memo)
        return new


torch.serialization.add_safe_globals([ScheduledLR])


def _same(a: Any, b: ScheduledLR) -> bool:
    return isinstance(a, ScheduledLR) and float(a) == float(b) and a.scale == b.scale


def _bound_group(binding: Binding | None) -> dict[str, Any] | None:
    if binding is None:
        return None
    optimizer = binding[0]()
    if optimizer is None:
        return None
    groups = optimizer.param_groups
    if binding[1] >= len(groups) or not is_schedule(groups[binding[1]].get("lr_schedule")):
        return None
    return groups[binding[1]]


# -- reading the keys -------------------------------------------------------------------------


def _checked_schedule(value: Any, name: str = "lr_schedule") -> Any:
    if not is_schedule(value):
        raise ValueError(f"{name} must be a schedule (a callable count -> lr), got {value!r}")
    return value


def _checked_count(value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise ValueError(f"lr_count must be a whole number >= 0, got {value!r}")
    return int(value)


def _checked_scale(value: Any, what: str = "lr_scale") -> float:
    if not _real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_lr(value: Any) -> None:
    """``ValueError`` naming lr unless ``value`` is what every lr must be
    (:func:`holotx._validate.non_negative`): a finite number >= 0, or a one-element tensor
    holding one (its value read where that costs nothing)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.reshape(())
    _validate.non_negative("lr", value)


def checked_lr(value: Any) -> float:
    """A number written as ``lr``, checked (:func:`check_lr`) and read as a float."""
    check_lr(value)
    return float(value)


def schedule_value(schedule: Any, count: int) -> float:
    """``schedule(count)`` as a float, checked: the count is given as a 0-d int64 tensor on
    the CPU (holotx's schedules take an int or a tensor, and give the same value for both;
    a schedule written for the functional API's tensor counts works too)."""
    value = schedule(torch.tensor(count, dtype=torch.int64))
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool:
        value = value.item()
    _validate.schedule_value("lr", value)
    return float(value)


def describe(schedule: Any) -> str:
    """What a checkpoint says of a group's schedule (the schedule itself is not saved): a
    holotx schedule's ``repr`` (the call that built it), a function's qualified name, else
    the callable's type."""
    if isinstance(schedule, _FormulaSchedule):
        return repr(schedule)
    named = schedule if hasattr(schedule, "__qualname__") else type(schedule)
    module = getattr(named, "__module__", None)
    return f"{module}.{named.__qualname__}" if module else named.__qualname__


# -- settling, publishing, advancing --------------------------------------------------------


def _publish(group: dict[str, Any], value: float, schedule: Any, count: int, scale: float,
             binding: Binding | None) -> ScheduledLR:
    lr = ScheduledLR(value, scale)
    lr._binding, lr._source = binding, (schedule, count, scale)
    group["lr"] = lr
    return lr


def settle(group: dict[str, Any], binding: Binding | None, published: ScheduledLR | None, *,
           for_step: bool = False) -> ScheduledLR:
    """Read what was written into a schedule group since ``published`` (the lr last
    published in it): afterwards ``group["lr"]`` is what the next step uses, a
    :class:`ScheduledLR` (returned), or its plain float with ``for_step`` (for the step
    itself). Raises ``ValueError`` naming the key (and whatever the schedule raises) with
    nothing changed."""
    lr = group.get("lr")
    new_schedule = is_schedule(lr)
    schedule = _checked_schedule(lr, "lr") if new_schedule else _checked_schedule(group.get("lr_schedule"))
    count = _checked_count(group.get("lr_count"))
    scale = _checked_scale(group.get("lr_scale"))
    unwritten = published is not None and (lr is published or (type(lr) is float and lr == float(published)))
    if new_schedule:
        value = schedule_value(schedule, count) * scale
        group["lr_schedule"] = schedule
    elif unwritten:  # the keys say what it is (they may have been set)
        source = published._source
        if source is not None and source[0] is schedule and source[1:] == (count, scale):
            value = float(published)  # (it may be a number written before)
        else:
            value = schedule_value(schedule, count) * scale
    elif isinstance(lr, ScheduledLR):  # a scheduler's: its scale is the new one
        source = lr._source
        scale = _checked_scale(lr.scale, f"the multiple of the schedule that lr ({float(lr)!r}) stands for")
        if source is not None and source[0] is schedule and source[1:] == (count, scale):
            value = float(lr)  # its value is for this count (computed from a base, or a product)
        else:
            value = schedule_value(schedule, count) * scale
        root = lr._origin if lr._origin is not None else lr
        if root._binding is None:  # a base read back from a pickle, which did not find its group
            root._binding, root._base = binding, True
    else:  # a number: the next step's lr, and the schedule goes on from it
        value = checked_lr(lr)
        s = schedule_value(schedule, count)
        if value != s * scale and s != 0 and math.isfinite(value / s):
            scale = value / s
    group["lr_scale"] = scale
    base = group.get("initial_lr")
    if isinstance(base, ScheduledLR):  # a scheduler's base, taken from a published lr
        base._base = True
        if base._binding is None:
            base._binding = binding
    published = _publish(group, value, schedule, count, scale, binding)
    if for_step:
        group["lr"] = float(published)
    return published


def advance(group: dict[str, Any], binding: Binding | None) -> ScheduledLR:
    """After a step of the group: one more in its count, and ``lr`` the schedule's value
    there times the scale (returned). A schedule that raises or gives an invalid value
    there leaves ``lr`` NaN, and the next step raises (as the functional API would at that
    step)."""
    count = group["lr_count"] + 1
    group["lr_count"] = count
    schedule, scale = group["lr_schedule"], group["lr_scale"]
    try:
        value = schedule_value(schedule, count) * scale
    except Exception:
        lr = ScheduledLR(math.nan, scale)
        lr._binding = binding
        group["lr"] = lr  # no source: the next step evaluates the schedule again, and raises
        return lr
    return _publish(group, value, schedule, count, scale, binding)


def republish(group: dict[str, Any], binding: Binding | None) -> ScheduledLR:
    """``group["lr"]`` taken as it is (the step's plain float, a copy's value) as the
    published lr, bound to ``binding``."""
    return _publish(group, float(group["lr"]), group["lr_schedule"], group["lr_count"], group["lr_scale"],
                    binding)


# -- making groups -----------------------------------------------------------------------------


def schedule_group(group: dict[str, Any], lr: Any, binding: Binding | None, *,
                   restart: bool = False) -> ScheduledLR:
    """``group`` made a schedule group, in place: its lr ``lr`` (a schedule), or, if ``lr``
    is a number, its ``lr_schedule`` given (``lr`` is then a number written, read as
    above); ``lr_count`` 0 and ``lr_scale`` 1 unless given (or whatever is given, with
    ``restart``). Raises ``ValueError`` naming the key if one is invalid, with ``group`` as
    it was. Returns the published lr."""
    candidate = dict(group)
    candidate["lr"] = lr
    if restart:
        candidate["lr_count"], candidate["lr_scale"] = 0, 1.0
    candidate.setdefault("lr_count", 0)
    candidate.setdefault("lr_scale", 1.0)
    if not is_schedule(lr):
        _checked_schedule(candidate.get("lr_schedule"))
    published = settle(candidate, binding, None)
    group.update(candidate)
    return published


def restored_group(candidate: dict[str, Any], schedule: Any, keep_lr: bool,
                   binding: Binding) -> tuple[dict[str, Any], ScheduledLR]:
    """A group loaded from a checkpoint, with this optimizer's own ``schedule``, and its
    published lr: the checkpoint's ``lr`` (the number its next step would have used) is
    kept if ``keep_lr`` (the checkpoint was saved with the same schedule), else recomputed
    from the schedule, the count and the scale. ``initial_lr`` with ``initial_lr_scale``
    becomes a :class:`ScheduledLR` again."""
    group = dict(candidate)
    group["lr_schedule"] = _checked_schedule(schedule)
    count = _checked_count(group.get("lr_count"))
    scale = _checked_scale(group.get("lr_scale"))
    lr = checked_lr(group.get("lr"))
    if "initial_lr_scale" in group:
        base_scale = _checked_scale(group.pop("initial_lr_scale"), "initial_lr_scale")
        base = group.get("initial_lr")
        if not _real(base) or not math.isfinite(base):
            raise ValueError(f"initial_lr must be a finite number, got {base!r}")
        group["initial_lr"] = ScheduledLR(base, base_scale, binding[1], base=True)
        group["initial_lr"]._binding = binding
    value = lr if keep_lr else schedule_value(schedule, count) * scale
    return group, _publish(group, value, schedule, count, scale, binding)


def plain_group(group: dict[str, Any]) -> dict[str, Any]:
    """A param group as a checkpoint holds it: a schedule described (a string), ``lr`` a
    plain float, and ``initial_lr`` a float beside its scale (``initial_lr_scale``). Only
    tensors, numbers, strings and containers of them, for ``torch.load(weights_only=True)``."""
    out = dict(group)
    if is_schedule(out.get("lr_schedule")):
        out["lr_schedule"] = describe(out["lr_schedule"])
    if isinstance(out.get("lr"), ScheduledLR):
        out["lr"] = float(out["lr"])
    base = out.get("initial_lr")
    if isinstance(base, ScheduledLR):
        out["initial_lr"] = float(base)
        out["initial_lr_scale"] = base.scale
    return out
