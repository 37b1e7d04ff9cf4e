"""Checkpoints in torch.optim's and Holocron's layouts.

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

Holocron 0.3.0's eight (``pylocron``) keep their state under torch's names too, with an
int ``step``; :func:`from_holocron` renames them for the drop-in classes of
``holotx.adapters`` (made with ``compat="holocron"`` to continue a Holocron run as
Holocron would). What holotx does not keep is dropped: LAMB's and RaLars' ``local_lr``
(the last step's ratio, written and never read) and Adan's ``prev_grad`` (Holocron never
updates it: always zeros). TAdam's ``W_t``, a 1-element tensor of the params' dtype,
becomes the 0-d float64 ``weight_sum``.
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


HOLOCRON_KEYS: dict[Any, tuple[dict[str, str], frozenset[str]]] = {
    holotx.lars: ({"momentum_buffer": "inner.trace"}, frozenset()),
    holotx.lamb: (_ADAM_KEYS, frozenset({"local_lr"})),
    holotx.ralars: (_ADAM_KEYS, frozenset({"local_lr"})),
    holotx.tadam: ({**_ADAM_KEYS, "W_t": "weight_sum"}, frozenset()),
    holotx.adabelief: (_ADAM_KEYS, frozenset()),
    holotx.adamp: (_ADAM_KEYS, frozenset()),
    # Holocron's Adan names its two second buffers the other way round from the paper:
    # its exp_avg_sq averages the gradient differences, its exp_avg_delta the squares.
    holotx.adan: ({"step": "count", "exp_avg": "mu", "exp_avg_sq": "diff_avg", "exp_avg_delta": "nu",
                   "max_exp_avg_delta": "nu_max"}, frozenset({"prev_grad"})),
    holotx.ademamix: ({"step": "count", "exp_avg": "mu", "exp_avg_sq": "nu", "exp_avg_slow": "mu_slow"},
                      frozenset()),
}
"""Holocron's state key -> holotx's, and the keys holotx drops, per factory."""


def from_holocron(factory: Any, entry: dict[str, Any], expected: set[str],
                  label: str) -> dict[str, Any] | None:
    """A pylocron 0.3.0 state entry in holotx's keys, or ``None`` when ``entry`` is not in
    the layout of ``factory``'s Holocron class."""
    if factory not in HOLOCRON_KEYS:
        return None
    keys, dropped = HOLOCRON_KEYS[factory]
    out = _renamed(entry, keys, dropped, expected, label)
    if out is not None and "W_t" in entry:
        w = entry["W_t"]
        if not isinstance(w, torch.Tensor) or w.numel() != 1:
            raise ValueError(f"{label}, key 'W_t': expected a 1-element tensor, got {w!r}")
        out["weight_sum"] = w.detach().reshape(()).to(torch.float64)
    return out


def to_holocron(factory: Any, entry: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """One param's holotx state in pylocron 0.3.0's layout: ``step`` a Python int, TAdam's
    ``W_t`` a 1-element tensor, Adan's ``prev_grad`` zeros (Holocron reads it and never
    updates it); LARS's count, which Holocron does not keep, is left out."""
    keys, _ = HOLOCRON_KEYS[factory]
    inverse = {v: k for k, v in keys.items()}
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "inner.count":
            continue
        if key == "count":
            out["step"] = int(value)
        elif key == "weight_sum":
            out["W_t"] = value.detach().reshape(1).to(param.dtype)
        else:
            out[inverse[key]] = value
    if factory is holotx.adan:
        out["prev_grad"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return out


def from_torch(factory: Any, entry: dict[str, Any], expected: set[str], label: str) -> dict[str, Any] | None:
    """A torch.optim state entry renamed to holotx's keys, or ``None`` when ``entry`` is not
    in the torch layout of ``factory``'s twin (then the caller reports the mismatch)."""
    keys = TORCH_KEYS.get(factory)
    return None if keys is None else _renamed(entry, keys, frozenset(), expected, label)


def _renamed(entry: dict[str, Any], keys: dict[str, str], dropped: frozenset[str], expected: set[str],
             label: str) -> dict[str, Any] | None:
    """``entry`` with the ``dropped`` keys left out and the others renamed by ``keys``, or
    ``None`` when that does not give exactly the ``expected`` keys. The foreign ``step``
    becomes holotx's int64 count; a momentum buffer whose count holotx keeps and the other
    library does not (SGD/LARS with dampening) has taken a step: count 1."""
    kept = {k: v for k, v in entry.items() if k not in dropped}
    if not set(kept) <= set(keys):
        return None
    out = {keys[k]: v for k, v in kept.items()}
    for key in [k for k in out if k.endswith("trace")]:
        count = key[:-len("trace")] + "count"
        if count in expected and count not in out:
            out[count] = torch.ones((), dtype=torch.int64)
    if set(out) != expected:
        return None
    if "step" in entry:
        out[keys["step"]] = _count(entry["step"], label)
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
    """A foreign ``step`` (torch's float tensor, Holocron's int) as holotx's int64 count."""
    where = f"{label}, key 'step'"
    if not isinstance(step, torch.Tensor):
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise ValueError(f"{where}: {step!r} in the checkpoint is not a whole number of steps")
        step = torch.tensor(step, dtype=torch.float64)
    if step.numel() != 1:
        raise ValueError(f"{where}: a count is one number, got shape {tuple(step.shape)}")
    return whole_count(step.reshape(()), where).to(torch.int64)


def whole_count(value: torch.Tensor, label: str) -> torch.Tensor:
    """A step count from a checkpoint: whole numbers >= 0 (a float one, as torch.optim keeps
    its ``step``, is taken when whole)."""
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{label}: a count cannot be {value.dtype}")
    if value.is_floating_point() and not bool(torch.all(value == torch.round(value))):
        raise ValueError(f"{label}: {value.tolist()} in the checkpoint is not a whole number of steps")
    if value.numel() and bool(torch.any(value < 0)):
        raise ValueError(f"{label}: a negative count ({value.tolist()}) in the checkpoint")
    return value.to(torch.int64) if value.is_floating_point() else value
