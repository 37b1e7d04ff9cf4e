"""Pieces the optimizer aliases share."""

from __future__ import annotations

from typing import Any

from holotx.base import GradientTransformation
from holotx.transforms import scale


def is_zero(value: Any) -> bool:
    """A Python zero: the term can be left out. A tensor (an injected hyperparameter,
    maybe batched) is never taken as zero, so the transform's structure never depends
    on a tensor's value."""
    return isinstance(value, (int, float)) and value == 0


def maximize_first(maximize: bool) -> list[GradientTransformation]:
    """``[scale(-1)]`` to ascend instead of descend (torch's ``maximize``), else ``[]``."""
    return [scale(-1.0)] if maximize else []
