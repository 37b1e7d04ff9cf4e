"""Optimizers by name, as timm and pytorch-optimizer users expect.

``create_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05)`` builds a
:class:`~holotx.adapters.TransformOptimizer` (with ``lookahead_`` or ``scout_`` in front
of the name, wrapped in :class:`~holotx.adapters.Lookahead` or
:class:`~holotx.adapters.Scout`); given a module, biases, norm weights and other 1-D
params go to a group without weight decay and without trust-ratio adaptation
(:func:`param_groups_weight_decay`). ``list_optimizers("ada*")`` lists the names.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

import holotx
from holotx.base import GradientTransformation

from .optimizer import TransformOptimizer
from .wrappers import Lookahead, Scout

__all__ = ["create_optimizer", "list_optimizers", "param_groups_weight_decay", "register_optimizer"]

Factory = Callable[..., GradientTransformation]

_REGISTRY: dict[str, Factory] = {
    name: getattr(holotx, name)
    for name in ("adabelief", "adam", "adamp", "adamw", "adan", "ademamix", "lamb", "lars", "radam",
                 "ralars", "sgd", "tadam")
}
_WRAPPERS: dict[str, type[Lookahead] | type[Scout]] = {"lookahead": Lookahead, "scout": Scout}


def register_optimizer(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Make ``factory`` (a function returning a transform) available by ``name``
    (case-insensitive) to :func:`create_optimizer`.

    Args:
        name: the name (an identifier, not starting with ``lookahead_`` or ``scout_``).
        factory: a function returning a :class:`~holotx.GradientTransformation`.
        overwrite: replace a registered name (default ``False``: ``ValueError``).

    Example:
        >>> import functools
        >>> import torch
        >>> import holotx
        >>> from holotx.adapters import create_optimizer, register_optimizer
        >>> register_optimizer("nesterov_sgd", functools.partial(holotx.sgd, momentum=0.9, nesterov=True))
        >>> opt = create_optimizer(torch.nn.Linear(2, 1), "nesterov_sgd", lr=0.1)
        >>> opt.param_groups[0]["nesterov"]
        True
    """
    key = name.lower()
    if not key.isidentifier() or any(key.startswith(w + "_") for w in _WRAPPERS):
        raise ValueError("optimizer name must be an identifier not starting with a wrapper prefix, "
                         f"got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory must be callable, got {factory!r}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"an optimizer named {key!r} is registered already (pass overwrite=True)")
    _REGISTRY[key] = factory


def list_optimizers(pattern: str = "*", *, wrappers: bool = False) -> list[str]:
    """The registered names matching the shell-style ``pattern`` (case-insensitive),
    sorted; with ``wrappers=True`` also every ``lookahead_<name>`` and ``scout_<name>``.

    Args:
        pattern: a shell-style pattern (default ``"*"``).
        wrappers: also list the ``lookahead_`` and ``scout_`` forms (default ``False``).

    Returns:
        The sorted names.

    Example:
        >>> from holotx.adapters import list_optimizers
        >>> list_optimizers("ada*")
        ['adabelief', 'adam', 'adamp', 'adamw', 'adan']
        >>> list_optimizers("*lamb", wrappers=True)
        ['lamb', 'lookahead_lamb', 'scout_lamb']
    """
    names = list(_REGISTRY)
    if wrappers:
        names += [f"{w}_{n}" for w in _WRAPPERS for n in _REGISTRY]
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern.lower()))


def _resolve(name: str) -> tuple[type[Lookahead] | type[Scout] | None, Factory]:
    if not isinstance(name, str):
        raise ValueError(f"optimizer name must be a string, got {name!r}")
    key = name.lower()
    wrapper = None
    for prefix, cls in _WRAPPERS.items():
        if key.startswith(prefix + "_"):
            wrapper, key = cls, key[len(prefix) + 1:]
            break
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint} (list_optimizers() gives the names)")
    return wrapper, _REGISTRY[key]


def param_groups_weight_decay(
    model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float = 1e-5,
    skip: Iterable[str] = (),
    *,
    exclude_from_trust_ratio: bool = True,
) -> list[dict[str, Any]]:
    """Two param groups: one with ``weight_decay`` for the weights, one with none for
    biases, norm weights and every other param of at most one dimension, or named in
    ``skip`` (or in ``model.no_weight_decay()``, timm's convention): a name, or an
    ``fnmatch`` pattern as timm reads them (XCiT's ``'pos_embed.*'``). With
    ``exclude_from_trust_ratio`` the second group also has ``trust_ratio_mask=False``,
    which keeps LARS, LAMB and RaLars at ratio 1 there (other optimizers ignore the key).
    Params that do not require a gradient are left out; an empty group is omitted.

    Args:
        model: an ``nn.Module``, or ``(name, param)`` pairs.
        weight_decay: the weight decay of the first group (default ``1e-5``).
        skip: names or ``fnmatch`` patterns of params without weight decay (default ``()``).
        exclude_from_trust_ratio: add ``trust_ratio_mask=False`` to the group without weight
            decay (default ``True``).

    Returns:
        A list of param-group dicts, for any ``torch.optim.Optimizer``.

    Example:
        >>> import torch
        >>> from holotx.adapters import param_groups_weight_decay
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> groups = param_groups_weight_decay(model, 0.05)
        >>> [(len(g["params"]), g["weight_decay"], g.get("trust_ratio_mask")) for g in groups]
        [(3, 0.0, False), (1, 0.05, None)]
    """
    skip = set(skip)
    if isinstance(model, torch.nn.Module):
        if hasattr(model, "no_weight_decay"):
            skip |= set(model.no_weight_decay())
        named = list(model.named_parameters())
    else:
        named = list(model)
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or _skipped(name, skip) or name.endswith(".bias") else decay).append(p)
    plain: dict[str, Any] = {"weight_decay": 0.0}
    if exclude_from_trust_ratio:
        plain["trust_ratio_mask"] = False
    groups = [{"params": no_decay, **plain}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def _skipped(name: str, skip: set[str]) -> bool:
    """Whether ``name`` is one of ``skip``'s names, or matches one of its patterns."""
    return name in skip or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip
                               if any(c in pattern for c in "*?["))


def create_optimizer(
    model_or_params: Any,
    name: str = "adamw",
    *,
    filter_bias_and_norm: bool = True,
    sync_rate: float = 0.5,
    sync_period: int = 6,
    **hyperparams: Any,
) -> Optimizer:
    """An optimizer by name: :class:`~holotx.adapters.TransformOptimizer` over the
    registered factory, with ``hyperparams`` (the factory's arguments, and the adapter's
    ``state_dtype``, ``donate_grads``, ``fused`` and ``max_grad_norm``: one clip over all
    the groups made here). ``create_optimizer("lamb", model)`` works too.

    Given an ``nn.Module`` and ``filter_bias_and_norm`` (default), biases, norm weights
    and 1-D params go to a group without weight decay and without trust-ratio
    adaptation (:func:`param_groups_weight_decay`) when the optimizer has weight decay
    or trust ratios. A ``lookahead_`` or ``scout_`` prefix wraps the optimizer
    (``sync_rate``, ``sync_period``). An unknown name raises ``ValueError`` with the
    closest names.

    Args:
        model_or_params: an ``nn.Module`` (its biases and norm weights filtered), or params /
            param groups as any optimizer takes them.
        name: a registered name, with an optional ``lookahead_`` or ``scout_`` prefix
            (case-insensitive; default ``"adamw"``).
        filter_bias_and_norm: with a module, put biases, norm weights and 1-D params in a group
            without weight decay and trust ratio (default ``True``).
        sync_rate: the wrapper's ``sync_rate`` with a prefix (default ``0.5``).
        sync_period: the wrapper's ``sync_period`` with a prefix (default ``6``).
        **hyperparams: the factory's arguments, and :class:`TransformOptimizer`'s
            ``state_dtype``, ``donate_grads``, ``fused`` and ``max_grad_norm``.

    Returns:
        The optimizer: a :class:`TransformOptimizer`, or a :class:`Lookahead` /
        :class:`Scout` around one.

    Example:
        >>> import torch
        >>> from holotx.adapters import create_optimizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = create_optimizer(model, "lookahead_lamb", lr=1e-3, weight_decay=0.01)
        >>> type(opt).__name__, type(opt.base_optimizer).__name__
        ('Lookahead', 'TransformOptimizer')
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.0, 0.01]
    """
    if isinstance(model_or_params, str) and not isinstance(name, str):
        model_or_params, name = name, model_or_params
    wrapper, factory = _resolve(name)
    params: Any = model_or_params
    if isinstance(model_or_params, torch.nn.Module):
        arguments = inspect.signature(factory).parameters
        decay = hyperparams.get("weight_decay", arguments["weight_decay"].default
                                if "weight_decay" in arguments else 0.0)
        trust = "trust_ratio_mask" in arguments
        if filter_bias_and_norm and (decay or trust):
            params = param_groups_weight_decay(model_or_params, decay, exclude_from_trust_ratio=trust)
            if not trust:
                for group in params:
                    group.pop("trust_ratio_mask", None)
            hyperparams.pop("weight_decay", None)
        else:
            params = model_or_params.parameters()
    optimizer: Optimizer = TransformOptimizer(params, factory, **hyperparams)
    if wrapper is not None:
        optimizer = wrapper(optimizer, sync_rate, sync_period, compat=hyperparams.get("compat"))
    return optimizer
