"""Hyperparameters that live in the optimizer state.

``inject_hyperparams(factory)(**kwargs)`` builds the same transform as ``factory(**kwargs)``
but keeps its numeric hyperparameters in the state as 0-d tensors. They can then change
between steps without rebuilding or re-tracing (write a new value into
``state.hyperparams``), be logged, be batched with ``torch.func.vmap`` (sweeps) and be
differentiated (meta-learned learning rates). A hyperparameter given as a schedule is
evaluated at the step count each step and its value stored, so it can be logged too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from numbers import Number
from typing import Any, NamedTuple

import torch

from holotx import executor
from holotx.base import GradientTransformation, init_count, next_count, own_transform

__all__ = ["InjectHyperparamsState", "inject_hyperparams"]


class InjectHyperparamsState(NamedTuple):
    """The state of a transform built by :func:`inject_hyperparams`.

    Args:
        count: steps taken (0-d int64); schedules are evaluated at this value.
        hyperparams: each injected hyperparameter: a 0-d tensor, or a tuple of them (``betas``).
        inner_state: the state of the transform the factory builds.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.inject_hyperparams(holotx.adam)(lr=0.1, betas=(0.9, 0.99))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> state.hyperparams["lr"]
        tensor(0.1000, dtype=torch.float64)
        >>> state.hyperparams["betas"][1]
        tensor(0.9900, dtype=torch.float64)
    """

    count: torch.Tensor
    """Steps taken; schedules are evaluated at this value."""
    hyperparams: dict[str, Any]
    """Each injected hyperparameter: a 0-d tensor, or a tuple of them (``betas``)."""
    inner_state: Any


def _is_number(x: Any) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool)


def _is_numeric(x: Any) -> bool:
    if _is_number(x) or (isinstance(x, torch.Tensor) and x.dim() == 0):
        return True
    return isinstance(x, tuple) and len(x) > 0 and all(_is_number(v) or isinstance(v, torch.Tensor)
                                                       for v in x)


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    static_args: Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wrap ``factory`` so that its numeric arguments become state.

    Every argument given in the call that is a number, a 0-d tensor, a tuple of numbers
    (``betas``), or a schedule (a callable, evaluated at the step count) is injected,
    unless named in ``static_args``; booleans, strings and other values stay static, and
    so do the factory's defaults for arguments not given (a factory may leave a term out
    when its default is zero, e.g. weight decay: pass ``weight_decay=0.0`` to make it a
    hyperparameter you can change later). Values are stored as 0-d tensors of
    ``hyperparam_dtype`` (float64 by default, so a float64 run equals the un-injected one
    exactly) on the params' device.

    The factory is called again on each update with the current tensors, so it must
    accept 0-d tensors for those arguments (every holotx factory does) and must not make
    structural decisions on their values. Extra keywords of ``update`` reach the inner
    transform.

    Args:
        factory: a function returning a :class:`~holotx.GradientTransformation` (``holotx.adam``,
            ...), taking its hyperparameters as arguments.
        static_args: names of arguments kept static (not injected), e.g. ``("sync_period",)``
            (default ``()``).
        hyperparam_dtype: the dtype of the injected tensors (default ``None``: float64, float32 on
            MPS).

    Returns:
        A function taking the factory's arguments and returning the transform, whose state
        is an :class:`InjectHyperparamsState`.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.inject_hyperparams(holotx.sgd)(lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> new_lr = torch.tensor(0.5, dtype=torch.float64)
        >>> state = state._replace(hyperparams={**state.hyperparams, "lr": new_lr})
        >>> updates, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> updates["w"]  # the new learning rate, without rebuilding the transform
        tensor([-0.5000, -0.5000])
    """
    static = set(static_args)
    signature = inspect.signature(factory)

    def build(*args: Any, **kwargs: Any) -> GradientTransformation:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                raise ValueError(f"inject_hyperparams cannot wrap a factory with *{name}")
        schedules = {k: v for k, v in arguments.items()
                     if k not in static and callable(v) and not isinstance(v, torch.Tensor)}
        numeric = {k: v for k, v in arguments.items()
                   if k not in static and k not in schedules and _is_numeric(v)}
        fixed = {k: v for k, v in arguments.items() if k not in schedules and k not in numeric}
        # The factory checks the values now, as it would un-injected (schedules at step 0),
        # rather than at init.
        zero = torch.zeros((), dtype=torch.int64)
        factory(**fixed, **numeric, **{k: s(zero) for k, s in schedules.items()})

        def as_tensor(value: Any, device: torch.device) -> Any:
            dtype = hyperparam_dtype or (torch.float32 if device.type == "mps" else torch.float64)
            if isinstance(value, tuple):
                return tuple(as_tensor(v, device) for v in value)
            if isinstance(value, torch.Tensor):
                return value.to(device=device, dtype=dtype)
            return torch.tensor(value, dtype=dtype, device=device)

        def current(count: torch.Tensor, stored: dict[str, Any]) -> dict[str, Any]:
            values = dict(stored)
            device = count.device
            for name, schedule in schedules.items():
                values[name] = as_tensor(executor.evaluate(schedule, count), device)
            return values

        def init(params):
            count = init_count(params)
            hyperparams = current(count, {k: as_tensor(v, count.device) for k, v in numeric.items()})
            inner = factory(**fixed, **hyperparams)
            return InjectHyperparamsState(count, hyperparams, inner.init(params))

        def update(updates, state, params=None, **extra):
            hyperparams = current(state.count, state.hyperparams)
            inner = factory(**fixed, **hyperparams)
            executor.redirect_scale(inner)
            updates, inner_state = executor.call(inner, updates, state.inner_state, params, **extra)
            count = next_count(state.count)
            return updates, InjectHyperparamsState(count, hyperparams, inner_state)

        def prepare(state, params):
            # The schedules, before any buffer is written. (The transform the factory
            # builds from their values takes no schedule of its own.)
            current(state.count, state.hyperparams)

        # What a factory builds is run as it is: a user's transform pure (executor.call).
        return own_transform(init, update, prepare, state_type=InjectHyperparamsState)

    return build
