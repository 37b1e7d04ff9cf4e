"""Checkpoints in torch.optim's layout.

holotx's ``sgd``, ``adam``, ``adamw`` and ``radam`` compute torch.optim's SGD, Adam, AdamW
and RAdam; through :class:`~holotx.adapters.TransformOptimizer` they keep the same state
under holotx's names. This module maps one layout to the other, so that a run moves
between the two libraries in both directions: ``load_state_dict`` takes a torch.optim
checkpoint of the matching class, and ``state_dict(format="torch")`` writes one.

torch keeps ``step`` as a float tensor; holotx keeps ``count`` as an int64 one. A step that
is not a whole number >= 0 is refused. SGD with dampening counts steps in holotx (its
first buffer is the undampened gradient) and not in torch: a torch checkpoint that has a
buffer has taken a step, so its count is 1 (enough for the rule, which only asks whether
the first step is past).
"""

from __future__ import annotations

from typing import Any

import torch

import holotx

_ADAM_KEYS = {"step": "count", "exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"}

TORCH_KEYS: dict[Any, dict[str, str]] = {
    holotx.sgd: {"momentum_buffer": "trace"},
    holotx.adam: _ADAM_KEYS,
    holotx.adamw: _ADAM_KEYS,
    holotx.radam: {k: v for k, v in _ADAM_KEYS.items() if k != "max_exp_avg_sq"},
}
"""torch.optim's state key -> holotx's, for the factories that have a torch.optim twin."""

TORCH_NAMES = {holotx.sgd: "SGD", holotx.adam: "Adam", holotx.adamw: "AdamW", holotx.radam: "RAdam"}


def from_torch(factory: Any, entry: dict[str, Any], expected: set[str], label: str) -> dict[str, Any] | None:
    """A torch.optim state entry renamed to holotx's keys, or ``None`` when ``entry`` is not
    in the torch layout of ``factory``'s twin (then the caller reports the mismatch)."""
    keys = TORCH_KEYS.get(factory)
    if keys is None or not set(entry) <= set(keys):
        return None
    out = {keys[k]: v for k, v in entry.items()}
    if "count" in expected and "count" not in out and "trace" in out:
        out["count"] = torch.ones((), dtype=torch.int64)  # a torch SGD buffer: past its first step
    if set(out) != expected:
        return None
    if "count" in out and "step" in entry:
        out["count"] = _count(entry["step"], label)
    return out


def to_torch(factory: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """One param's holotx state in torch.optim's layout (``step`` a float32 tensor, as
    torch keeps it on the CPU)."""
    inverse = {v: k for k, v in TORCH_KEYS[factory].items()}
    out = {}
    for key, value in entry.items():
        if key == "count" and factory is holotx.sgd:
            continue  # torch's SGD counts no steps
        if key == "count":
            value = value.detach().to(dtype=torch.float32, copy=True)
        out[inverse[key]] = value
    return out


def _count(step: Any, label: str) -> torch.Tensor:
    value = step.item() if isinstance(step, torch.Tensor) else step
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value < 0 or value != int(value):
        raise ValueError(f"{label}, key 'step': {step!r} in the checkpoint is not a whole number of steps")
    return torch.tensor(int(value), dtype=torch.int64)
