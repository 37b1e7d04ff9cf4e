"""Step-size schedules: callables mapping an optimizer step count to a value.

A *schedule* is a callable ``schedule(count) -> value`` where ``count`` is the
number of optimizer steps already taken (so the first update uses
``schedule(0)``). ``count`` may be either

* a Python ``int``: the value is returned as a Python ``float``; or
* an integer :class:`torch.Tensor` (normally 0-d, ``int32`` or ``int64``, on any
  device): the value is computed with torch ops only and returned as a tensor
  of the same shape on ``count``'s device, with dtype ``float64`` (``float32``
  on ``mps``, which has no float64 support).

The tensor path never inspects tensor values from Python (no ``.item()``, no
``bool(tensor)``, branches are selected with :func:`torch.where` /
:func:`torch.clamp`), so it works with a step counter that lives on an
accelerator, under :func:`torch.func.vmap` (a batch of counts),
:func:`torch.func.grad` (the schedule is a constant with respect to the
differentiated inputs) and ``torch.compile(..., fullgraph=True)`` without graph
breaks; changing the value of the count does not trigger a recompilation. Each
schedule's math is written once, as its tensor formula: an ``int`` count is
evaluated as a 0-d int64 tensor on the CPU, so both kinds of count give the same
float64 value.

Every schedule built here is an instance of a module-level class (its math in a
``formula`` method, its hyperparameters in attributes), so it pickles and deep-copies, and
its ``repr`` is the call that built it (``holotx.cosine_decay_schedule(init_value=0.1,
decay_steps=100, alpha=0.0, exponent=1.0)``): an optimizer holding one can be saved with
:func:`torch.save` or ``copy.deepcopy``.

Hyperparameters are plain Python numbers, validated when the schedule is
built: a bad value raises :class:`ValueError` whose message names the argument
and the value. Step-like hyperparameters (``transition_steps``,
``decay_steps``, boundaries, ...) must be Python integers (``bool`` and
``float`` are rejected); value-like hyperparameters must be finite real
numbers.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    "warmup_cosine_decay_schedule",
]

Schedule = Callable[[int | torch.Tensor], float | torch.Tensor]
"""A callable ``schedule(count)``: ``int -> float`` or ``Tensor -> Tensor``."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _float_dtype(count: torch.Tensor) -> torch.dtype:
    """The floating dtype used for values computed from a tensor ``count``."""
    return torch.float32 if count.device.type == "mps" else torch.float64


def _tensor_count(count: torch.Tensor) -> torch.Tensor:
    """``count`` converted to the schedule's floating dtype (same device)."""
    return count.to(_float_dtype(count))


def _int_count(count: object) -> int:
    """Validate and return a non-tensor ``count`` as a Python ``int``."""
    if isinstance(count, bool):
        raise TypeError(f"count must be an int or an integer tensor, got {count!r}")
    try:
        return operator.index(count)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"count must be an int or an integer tensor, got {count!r}") from None


def _check_real(name: str, value: object) -> float:
    """Validate that ``value`` is a finite real Python number; return it as float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_positive_real(name: str, value: object) -> float:
    """Validate that ``value`` is a finite real number ``> 0``; return it as float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) <= 0.0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Validate that ``value`` is a Python integer (``>= minimum`` if given)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None:
        ok = int(value) >= minimum  # type: ignore[call-overload]
    if not ok:
        if minimum == 1:
            kind = "a positive integer"
        elif minimum == 0:
            kind = "a non-negative integer"
        elif minimum is None:
            kind = "an integer"
        else:
            kind = f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


class _FormulaSchedule:
    """A schedule from its tensor formula, the one implementation of its math: a Python
    int count is evaluated as a 0-d int64 tensor and the value returned as a float.

    Subclasses keep their validated hyperparameters as attributes and implement
    :meth:`formula`; the public function that builds one names it (:meth:`_named`), which
    is its ``repr``. A module-level class (not a closure), so a schedule pickles."""

    _call = ""

    def __call__(self, count: int | torch.Tensor) -> float | torch.Tensor:
        if isinstance(count, torch.Tensor):
            return self.formula(count)
        return float(self.formula(torch.tensor(_int_count(count), dtype=torch.int64)))

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _named(self, name: str, **arguments: object) -> _FormulaSchedule:
        self._call = f"holotx.{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
        return self

    def __repr__(self) -> str:
        return self._call or f"<{type(self).__name__}>"


class _Constant(_FormulaSchedule):
    def __init__(self, value: float) -> None:
        self.value = value

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        # full_like keeps the result tied to ``count`` (device, vmap batching).
        return torch.full_like(count, self.value, dtype=_float_dtype(count))


class _Polynomial(_FormulaSchedule):
    def __init__(self, delta: float, end: float, power: float, steps: int, begin: int) -> None:
        self.delta, self.end, self.power, self.steps, self.begin = delta, end, power, steps, begin

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_tensor_count(count) - self.begin, 0.0, float(self.steps))
        return self.delta * torch.pow(1.0 - t / self.steps, self.power) + self.end


class _Cosine(_FormulaSchedule):
    """``scale * c ** exponent + offset`` with ``c = (1 + cos(pi * t / steps)) / 2``.

    ``t = clip(count, 0, steps)``; ``steps > 0`` and ``exponent > 0`` are
    assumed to be validated by the caller.
    """

    def __init__(self, scale: float, offset: float, steps: int, exponent: float) -> None:
        self.scale, self.offset, self.steps, self.exponent = scale, offset, steps, exponent
        self.omega = math.pi / steps

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_tensor_count(count), 0.0, float(self.steps))
        c = 0.5 * (1.0 + torch.cos(t * self.omega))
        return self.scale * torch.pow(c, self.exponent) + self.offset


class _Exponential(_FormulaSchedule):
    def __init__(self, init: float, steps: int, rate: float, begin: int, staircase: bool,
                 end: float | None) -> None:
        self.init, self.steps, self.rate, self.begin = init, steps, rate, begin
        self.staircase, self.end = staircase, end
        self.lower_bound = rate < 1.0

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(_tensor_count(count) - self.begin, min=0.0)
        e = t / self.steps
        if self.staircase:
            e = torch.floor(e)
        value = self.init * torch.pow(self.rate, e)
        if self.end is not None:
            value = (torch.clamp(value, min=self.end) if self.lower_bound
                     else torch.clamp(value, max=self.end))
        return value


class _Piecewise(_FormulaSchedule):
    def __init__(self, init: float, boundaries: list[int], values: list[float]) -> None:
        # values[i] is the value on [boundaries[i-1], boundaries[i]); values[0] = init.
        self.init, self.boundaries, self.values = init, boundaries, values

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        value = torch.full_like(count, self.init, dtype=_float_dtype(count))
        for b, v in zip(self.boundaries, self.values[1:]):
            value = torch.where(count >= b, v, value)
        return value


class _Join(_FormulaSchedule):
    def __init__(self, schedules: list[Schedule], boundaries: list[int]) -> None:
        self.schedules, self.boundaries = schedules, boundaries

    def formula(self, count: torch.Tensor) -> torch.Tensor:
        value = self.schedules[0](count)
        for b, s in zip(self.boundaries, self.schedules[1:]):
            value = torch.where(count >= b, s(count - b), value)
        return value


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


def constant_schedule(value: float) -> Schedule:
    """Constant schedule: ``schedule(count) = value`` for every ``count``.

    Args:
        value: the constant value (finite real number).

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> schedule = holotx.constant_schedule(0.1)
        >>> schedule(0), schedule(1000)
        (0.1, 0.1)
    """
    v = _check_real("value", value)
    return _Constant(v)._named("constant_schedule", value=v)


def polynomial_schedule(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Polynomial interpolation from ``init_value`` to ``end_value``.

    With ``T = transition_steps`` and
    ``t = clip(count - transition_begin, 0, T)``::

        value = (init_value - end_value) * (1 - t / T) ** power + end_value

    so the value is ``init_value`` up to step ``transition_begin`` and
    ``end_value`` from step ``transition_begin + T`` on.

    If ``transition_steps <= 0`` the schedule is the constant ``init_value``
    (the same convention as optax).

    For example, the polynomial learning-rate decay ``lr * (1 - t / T) ** 2``
    is ``polynomial_schedule(lr, 0.0, 2, T)``.

    Args:
        init_value: value before and at the start of the transition.
        end_value: value at and after the end of the transition.
        power: exponent of the polynomial (finite, ``>= 0``).
        transition_steps: length ``T`` of the transition, in steps (integer;
            ``<= 0`` means constant ``init_value``).
        transition_begin: number of steps during which the value is held at
            ``init_value`` before the transition starts (integer ``>= 0``).

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> schedule = holotx.polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
        >>> [schedule(t) for t in range(6)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    init = _check_real("init_value", init_value)
    end = _check_real("end_value", end_value)
    p = _check_real("power", power)
    if p < 0.0:
        raise ValueError(f"power must be a non-negative finite number, got {power!r}")
    steps = _check_int("transition_steps", transition_steps)
    begin = _check_int("transition_begin", transition_begin, minimum=0)
    schedule = _Constant(init) if steps <= 0 else _Polynomial(init - end, end, p, steps, begin)
    return schedule._named("polynomial_schedule", init_value=init, end_value=end, power=p,
                           transition_steps=steps, transition_begin=begin)


def linear_schedule(
    init_value: float,
    end_value: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value``.

    Equal to ``polynomial_schedule(init_value, end_value, 1, transition_steps,
    transition_begin)``: with ``t = clip(count - transition_begin, 0, T)``::

        value = (init_value - end_value) * (1 - t / T) + end_value

    If ``transition_steps <= 0`` the schedule is the constant ``init_value``.

    Args:
        init_value: value before and at the start of the transition.
        end_value: value at and after the end of the transition.
        transition_steps: length ``T`` of the transition, in steps (integer;
            ``<= 0`` means constant ``init_value``).
        transition_begin: number of steps held at ``init_value`` first
            (integer ``>= 0``).

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import torch
        >>> import holotx
        >>> schedule = holotx.linear_schedule(1.0, 0.0, transition_steps=4, transition_begin=1)
        >>> [schedule(t) for t in range(7)]
        [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
        >>> schedule(torch.tensor(3))
        tensor(0.5000, dtype=torch.float64)
    """
    schedule = polynomial_schedule(
        init_value=init_value,
        end_value=end_value,
        power=1,
        transition_steps=transition_steps,
        transition_begin=transition_begin,
    )
    return schedule._named("linear_schedule", init_value=float(init_value), end_value=float(end_value),
                           transition_steps=int(transition_steps), transition_begin=int(transition_begin))


def cosine_decay_schedule(
    init_value: float,
    decay_steps: int,
    alpha: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value``.

    With ``t = clip(count, 0, decay_steps)`` and
    ``c = (1 + cos(pi * t / decay_steps)) / 2``::

        value = init_value * ((1 - alpha) * c ** exponent + alpha)

    The value is ``init_value`` at step 0 and ``alpha * init_value`` from step
    ``decay_steps`` on (SGDR without restarts, Loshchilov & Hutter 2016).

    Args:
        init_value: initial value.
        decay_steps: number of steps over which to decay (integer ``> 0``).
        alpha: final value as a fraction of ``init_value`` (finite real).
        exponent: power applied to the cosine factor ``c`` (finite, ``> 0``).

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> schedule = holotx.cosine_decay_schedule(1.0, decay_steps=4, alpha=0.1)
        >>> [round(schedule(t), 4) for t in range(6)]
        [1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]

    References:
        Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR
        2017, https://arxiv.org/abs/1608.03983 (the cosine annealing).
    """
    init = _check_real("init_value", init_value)
    steps = _check_int("decay_steps", decay_steps, minimum=1)
    a = _check_real("alpha", alpha)
    e = _check_positive_real("exponent", exponent)
    return _Cosine(init * (1.0 - a), init * a, steps, e)._named(
        "cosine_decay_schedule", init_value=init, decay_steps=steps, alpha=a, exponent=e)


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay (or growth) of ``init_value`` by ``decay_rate``.

    With ``t = max(count - transition_begin, 0)`` and ``T = transition_steps``::

        value = init_value * decay_rate ** (t / T)           # staircase=False
        value = init_value * decay_rate ** floor(t / T)      # staircase=True

    If ``end_value`` is given, the value is clamped to it: it is a lower bound
    when ``decay_rate < 1`` and an upper bound when ``decay_rate >= 1`` (as in
    optax).

    Args:
        init_value: value up to step ``transition_begin``.
        transition_steps: number of steps over which the value is multiplied
            by ``decay_rate`` once (integer ``> 0``).
        decay_rate: multiplicative factor per ``transition_steps`` steps
            (finite, ``> 0``; ``< 1`` decays, ``> 1`` grows).
        transition_begin: number of steps held at ``init_value`` first
            (integer ``>= 0``).
        staircase: if ``True``, decay in discrete jumps every
            ``transition_steps`` steps.
        end_value: optional bound on the value (see above).

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> schedule = holotx.exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True)
        >>> [schedule(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    init = _check_real("init_value", init_value)
    steps = _check_int("transition_steps", transition_steps, minimum=1)
    rate = _check_positive_real("decay_rate", decay_rate)
    begin = _check_int("transition_begin", transition_begin, minimum=0)
    if not isinstance(staircase, bool):
        # Contract: every invalid hyperparameter raises ValueError.
        raise ValueError(f"staircase must be a bool, got {staircase!r}")
    end = None if end_value is None else _check_real("end_value", end_value)
    return _Exponential(init, steps, rate, begin, staircase, end)._named(
        "exponential_decay", init_value=init, transition_steps=steps, decay_rate=rate,
        transition_begin=begin, staircase=staircase, end_value=end)


def piecewise_constant_schedule(
    init_value: float,
    boundaries_and_scales: Mapping[int, float] | None = None,
) -> Schedule:
    """Piecewise-constant schedule with multiplicative jumps at boundaries.

    ``boundaries_and_scales`` maps a step ``b`` to a scale ``s_b``; the scale
    of boundary ``b`` applies from step ``count >= b`` on::

        value = init_value * prod(s_b for b in boundaries if count >= b)

    (the product is taken in increasing order of ``b``). With no boundaries the
    schedule is the constant ``init_value``.

    Args:
        init_value: value before the first boundary.
        boundaries_and_scales: mapping ``{boundary_step: scale}``; boundaries
            are integers ``>= 0``, scales finite reals ``>= 0``.

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> schedule = holotx.piecewise_constant_schedule(0.1, {2: 0.5, 4: 0.1})
        >>> [round(schedule(t), 6) for t in range(6)]
        [0.1, 0.1, 0.05, 0.05, 0.005, 0.005]
    """
    init = _check_real("init_value", init_value)
    items: list[tuple[int, float]] = []
    if boundaries_and_scales is not None:
        if not isinstance(boundaries_and_scales, Mapping):
            raise ValueError(
                "boundaries_and_scales must be a mapping {boundary: scale}, "
                f"got {boundaries_and_scales!r}"
            )
        for b, s in boundaries_and_scales.items():
            boundary = _check_int("boundaries_and_scales boundary", b, minimum=0)
            scale = _check_real(f"boundaries_and_scales scale (boundary {b!r})", s)
            if scale < 0.0:
                raise ValueError(
                    f"boundaries_and_scales scale (boundary {b!r}) must be non-negative, got {s!r}"
                )
            items.append((boundary, scale))
    items.sort()
    boundaries = [b for b, _ in items]
    # values[i] is the value on [boundaries[i-1], boundaries[i]); values[0] = init.
    values = [init]
    for _, scale in items:
        values.append(values[-1] * scale)
    return _Piecewise(init, boundaries, values)._named(
        "piecewise_constant_schedule", init_value=init, boundaries_and_scales=dict(items))


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Concatenate schedules in time.

    With boundaries ``b_1 <= ... <= b_{n-1}`` (``b_0 = 0``) and schedules
    ``s_0, ..., s_{n-1}``::

        value = s_i(count - b_i)   for b_i <= count < b_{i+1}

    i.e. ``s_0(count)`` before ``b_1``, and each later schedule is evaluated
    on the number of steps since its own boundary. A segment of zero length
    (equal consecutive boundaries) is skipped. With a tensor ``count`` all
    schedules are evaluated and the result is selected with
    :func:`torch.where`, so every schedule must accept (negative) tensor
    counts without raising.

    Args:
        schedules: non-empty sequence of ``n`` schedules.
        boundaries: ``n - 1`` non-decreasing integers ``>= 0``.

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> warmup = holotx.linear_schedule(0.0, 1.0, transition_steps=2)
        >>> decay = holotx.linear_schedule(1.0, 0.0, transition_steps=2)
        >>> schedule = holotx.join_schedules([warmup, decay], boundaries=[2])
        >>> [schedule(t) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    scheds = list(schedules)
    if not scheds:
        raise ValueError("schedules must be a non-empty sequence, got []")
    for i, s in enumerate(scheds):
        if not callable(s):
            # Contract: every invalid hyperparameter raises ValueError.
            raise ValueError(f"schedules[{i}] must be callable, got {s!r}")
    bounds = [_check_int(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(boundaries)]
    if len(bounds) != len(scheds) - 1:
        raise ValueError(
            f"boundaries must have len(schedules) - 1 = {len(scheds) - 1} entries, "
            f"got {len(bounds)}: {list(boundaries)!r}"
        )
    if any(b1 < b0 for b0, b1 in itertools.pairwise(bounds)):
        raise ValueError(f"boundaries must be non-decreasing, got {list(boundaries)!r}")

    return _Join(scheds, bounds)._named("join_schedules", schedules=scheds, boundaries=bounds)


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup followed by cosine decay.

    With ``W = warmup_steps`` and ``D = decay_steps - warmup_steps``::

        value = init + (peak - init) * count / W                      count < W
        value = (peak - end) * c ** exponent + end                    count >= W
        where c = (1 + cos(pi * min(count - W, D) / D)) / 2

    ``decay_steps`` is the total length of the schedule *including* the
    warmup (as in optax); the value is ``end_value`` from step ``decay_steps``
    on. Built with :func:`join_schedules` from :func:`linear_schedule` and a
    cosine decay.

    Args:
        init_value: value at step 0.
        peak_value: value at the end of the warmup (step ``warmup_steps``).
        warmup_steps: length of the linear warmup (integer ``>= 0``; 0 means
            no warmup, starting directly at ``peak_value``).
        decay_steps: total length, warmup included (integer
            ``> warmup_steps``).
        end_value: final value.
        exponent: power applied to the cosine factor (finite, ``> 0``).

    Returns:
        A :data:`Schedule`, whose ``schedule(count)`` is a Python float for an ``int`` count
        and a float64 tensor on the count's device for a tensor count.

    Example:
        >>> import holotx
        >>> schedule = holotx.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
        >>> [round(schedule(t), 4) for t in range(8)]
        [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
        >>> tx = holotx.adamw(lr=schedule)

    References:
        Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR
        2017, https://arxiv.org/abs/1608.03983 (the cosine annealing).

        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017,
        https://arxiv.org/abs/1706.02677 (the linear warm-up).
    """
    init = _check_real("init_value", init_value)
    peak = _check_real("peak_value", peak_value)
    warmup = _check_int("warmup_steps", warmup_steps, minimum=0)
    total = _check_int("decay_steps", decay_steps)
    if total <= warmup:
        raise ValueError(
            f"decay_steps must be greater than warmup_steps ({warmup}), got {decay_steps!r}"
        )
    end = _check_real("end_value", end_value)
    e = _check_positive_real("exponent", exponent)
    schedule = join_schedules(
        [
            linear_schedule(init, peak, warmup),
            _Cosine(peak - end, end, total - warmup, e),
        ],
        [warmup],
    )
    return schedule._named("warmup_cosine_decay_schedule", init_value=init, peak_value=peak,
                           warmup_steps=warmup, decay_steps=total, end_value=end, exponent=e)
