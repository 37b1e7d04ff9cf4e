"""Hyperparameter checks at construction: a ``ValueError`` that names the argument.

Tensor values (injected hyperparameters, possibly batched under vmap) are not checked:
reading them would force a host sync or break tracing.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _number(name: str, value: Any) -> float | None:
    if isinstance(value, torch.Tensor) or callable(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


def non_negative(name: str, value: Any) -> None:
    v = _number(name, value)
    if v is not None and not v >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def positive(name: str, value: Any) -> None:
    v = _number(name, value)
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
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def betas(name: str, value: Any, n: int = 2) -> tuple[Any, ...]:
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"{name} must be a tuple of {n} numbers, got {value!r}")
    for i, b in enumerate(value):
        in_unit_interval(f"{name}[{i}]", b)
    return tuple(value)


def scale_clip(name: str, value: Any) -> tuple[float, float] | None:
    """``None``, or a pair ``(low, high)`` with ``0 <= low <= high``, returned as floats."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be None or a pair (low, high), got {value!r}")
    low, high = value
    non_negative(f"{name}[0]", low)
    non_negative(f"{name}[1]", high)
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return float(low), float(high)


def nesterov(momentum: Any, dampening: Any, enabled: bool) -> None:
    """Nesterov momentum needs ``momentum > 0`` and ``dampening == 0`` (torch.optim.SGD's
    rule). Tensor values (injected hyperparameters) are not read."""
    if not enabled:
        return
    no_momentum = isinstance(momentum, (int, float)) and momentum <= 0
    damped = isinstance(dampening, (int, float)) and dampening != 0
    if no_momentum or damped:
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0, "
                         f"got momentum={momentum!r}, dampening={dampening!r}")
