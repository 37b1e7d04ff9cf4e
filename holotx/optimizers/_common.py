"""Pieces the optimizer aliases share."""

from __future__ import annotations

from typing import Any

from holotx import _validate
from holotx.base import GradientTransformation
from holotx.transforms import add_decayed_weights, scale


def is_zero(value: Any) -> bool:
    """A Python zero: the term can be left out. A tensor (an injected hyperparameter,
    maybe batched) is never taken as zero, so the transform's structure never depends
    on a tensor's value."""
    return isinstance(value, (int, float)) and value == 0


def maximize_first(maximize: bool) -> list[GradientTransformation]:
    """``[scale(-1)]`` to ascend instead of descend (torch's ``maximize``), else ``[]``."""
    return [scale(-1.0)] if _validate.flag("maximize", maximize) else []


COMPAT_MODES = (None, "holocron")


def holocron_mode(compat: str | None) -> bool:
    """Whether ``compat`` asks for Holocron 0.3.0's numerics; ``ValueError`` if it names
    no known mode."""
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or 'holocron', got {compat!r}")
    return compat == "holocron"


def decay_or_nothing(weight_decay: Any) -> list[GradientTransformation]:
    """``[add_decayed_weights(weight_decay)]``, or ``[]`` for a Python zero."""
    return [] if is_zero(weight_decay) else [add_decayed_weights(weight_decay)]


def trust_ratio_leaves(trust_ratio_mask: Any, weight_decay: Any, always_adapt: bool) -> Any:
    """The trust-ratio mask of LARS, LAMB and RaLars: ``trust_ratio_mask`` as given, or
    ``False`` (ratio 1 for every leaf) when ``always_adapt`` is off and the group's weight
    decay is a Python zero: the convention of apex's ``FusedLAMB`` and timm's ``Lamb`` and
    ``Lars`` (``always_adapt=False``), whose no-decay groups (biases, norm weights) take
    plain steps. A tensor weight decay counts as non-zero (its value is never read)."""
    if _validate.flag("always_adapt", always_adapt) or not is_zero(weight_decay):
        return trust_ratio_mask
    return False
