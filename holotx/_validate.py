"""Hyperparameter checks at construction: an error that names the argument, raised before
anything is built.

A wrong type raises :class:`HyperparameterTypeError`, which is both a ``TypeError`` (what
torch.optim raises for one) and a ``ValueError`` (what every other bad value raises). Numbers
may be Python or NumPy scalars. A tensor must be 0-d; its value is checked where reading it
costs nothing (a plain CPU tensor in eager mode), and left unread elsewhere (on an
accelerator, under ``torch.compile``, batched under ``vmap`` or wrapped by ``grad``), where
reading it would force a host sync or break tracing.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch._C._functorch as _functorch


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type (a string, a bool where a number is meant, a
    schedule where none is taken)."""


def _readable(t: torch.Tensor) -> bool:
    """Whether a tensor's value can be read here for free: a plain CPU tensor, eager."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
            and not torch.compiler.is_compiling() and not _functorch.is_functorch_wrapped_tensor(t))


def _number(name: str, value: Any, *, finite: bool = True) -> float | None:
    """``value`` as a float to check, or ``None`` for a tensor whose value is not read."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise HyperparameterTypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if not _readable(value):
            return None
        value = value.item()
    elif callable(value):
        raise HyperparameterTypeError(f"{name} must be a number, not a schedule ({value!r}); "
                                      "to change it during training, use inject_hyperparams")
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise HyperparameterTypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if finite and math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def python_number(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (so that arithmetic on it runs in
    float64, as on a float); anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def flag(name: str, value: Any) -> bool:
    """A bool option: ``True`` or ``False`` (a NumPy bool too), never read by truthiness
    (``amsgrad='no'`` would mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise HyperparameterTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def schedule_value(name: str, value: Any) -> None:
    """A schedule's value for ``name`` at one step: a number or 0-d tensor, finite and
    ``>= 0`` where it can be read (see the module docstring)."""
    if callable(value) and not isinstance(value, torch.Tensor):
        raise HyperparameterTypeError(f"the {name} schedule returned {value!r}, not a number")
    try:
        non_negative(name, value)
    except ValueError as e:
        raise type(e)(f"the {name} schedule returned {value!r}: {e}") from None


def non_negative(name: str, value: Any, *, finite: bool = True) -> None:
    v = _number(name, value, finite=finite)
    if v is not None and not v >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Any, *, finite: bool = True) -> None:
    v = _number(name, value, finite=finite)
    if v is not None and not v > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def in_unit_interval(name: str, value: Any, *, include_one: bool = False) -> None:
    """``0 <= value < 1`` (or ``<= 1`` with ``include_one``)."""
    v = _number(name, value)
    if v is None:
        return
    ok = 0.0 <= v <= 1.0 if include_one else 0.0 <= v < 1.0
    if not ok:
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def betas(name: str, value: Any, n: int = 2) -> tuple[Any, ...]:
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"{name} must be a tuple of {n} numbers, got {value!r}")
    for i, b in enumerate(value):
        in_unit_interval(f"{name}[{i}]", b)
    return tuple(python_number(b) for b in value)


def scale_clip(name: str, value: Any) -> tuple[float, float] | None:
    """``None``, or a pair ``(low, high)`` with ``0 <= low <= high``, returned as floats."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be None or a pair (low, high), got {value!r}")
    low, high = value
    non_negative(f"{name}[0]", low)
    non_negative(f"{name}[1]", high, finite=False)  # (0, inf): no upper clip
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return float(low), float(high)


def nesterov(momentum: Any, dampening: Any, enabled: bool) -> None:
    """Nesterov momentum needs ``momentum > 0`` and ``dampening == 0`` (torch.optim.SGD's
    rule). Tensor values (injected hyperparameters) are not read."""
    if not flag("nesterov", enabled):
        return
    no_momentum = isinstance(momentum, (int, float)) and momentum <= 0
    damped = isinstance(dampening, (int, float)) and dampening != 0
    if no_momentum or damped:
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0, "
                         f"got momentum={momentum!r}, dampening={dampening!r}")
