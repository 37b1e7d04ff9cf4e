"""holotx's ``OptimizerInfo`` entries, for the generic optimizer tests of PyTorch.

PyTorch tests its optimizers with ``TestOptimRenewed`` (``test/test_optim.py`` in a pytorch
checkout), whose tests are instantiated for every ``OptimizerInfo`` of
``torch.testing._internal.common_optimizers.optim_db``: an optimizer class, the
hyperparameters to run it with (``optim_inputs_func``), the bad ones and the error each
must raise (``optim_error_inputs_func``), and flags saying which of torch's optional
features (foreach/fused/differentiable kernels, capturable, sparse and complex params) it
offers. :data:`HOLOTX_OPTIM_DB` is such a list for holotx's ``torch.optim`` classes; the
opt-in runner ``.ci/torch_optim_suite.py`` puts it in place of ``optim_db`` and runs
torch's file against it, and ``tests/test_torch_optim_infos.py`` checks the entries
themselves in the default suite.

Every entry needs a class of its own (torch names each test after ``optim_cls.__name__``,
and builds it as ``optim_cls(params, **kwargs)``), so:

- the drop-in classes are entered as they are: ``LARS``, ``LAMB``, ``RaLars``, ``TAdam``,
  ``AdaBelief``, ``AdamP``, ``Adan``, ``AdEMAMix``; their inputs run both ``compat`` modes
  (holotx's default math, and ``compat="holocron"``);
- ``TransformOptimizer`` over a factory is entered as ``HolotxSGD``, ``HolotxAdam``,
  ``HolotxAdamW``, ``HolotxRAdam`` (subclasses that pass ``holotx.sgd`` etc.), and over a
  transform as ``HolotxChain`` (``clip_by_global_norm`` then AdamW, whose groups read only
  ``lr`` and ``maximize``);
- the ``Lookahead`` and ``Scout`` adapters, which wrap an optimizer, are entered as
  ``LookaheadAdamW`` (around ``HolotxAdamW``), ``LookaheadTorchSGD`` (around
  ``torch.optim.SGD``: the wrapper with a foreign base) and ``ScoutSGD`` (around
  ``HolotxSGD``), each built from ``params`` and the base's and wrapper's keywords.

Flags, as holotx is:

- ``supported_impls``: none of torch's ``foreach``/``differentiable`` switches exist
  (holotx picks its kernels; to differentiate through steps, use the functional API).
  ``fused=True`` exists on every :class:`~holotx.adapters.TransformOptimizer` (flat
  buffers and one ``torch.compile``d step); it is declared on ``HolotxAdamW`` alone,
  whose fused step torch's tests then compare with the unfused one in four dtypes and
  run through every other test: each fused optimizer compiles its own step (seconds),
  torch's tests make hundreds, and declared everywhere the run would take hours
  (``tests/test_fused.py`` covers the other rules). holotx's fused step
  does not take part in ``GradScaler``'s fused protocol (``found_inf``/``grad_scale``
  attributes, which torch's fused kernels read): the scaler unscales the grads first, as
  for any optimizer.
- ``has_capturable_arg=False`` (no CUDA-graph capture), ``supports_sparse=False`` (a
  sparse gradient raises ``RuntimeError``; ``LookaheadTorchSGD`` excepted, whose base,
  torch's SGD, takes them), ``supports_complex=True`` (a complex param is stepped as its
  real view, as torch does).
- ``not_og_supported_flags``: the group keys a checkpoint may lack and still load (their
  defaults are taken): ``maximize`` for the torch-style classes; for the drop-ins, every
  key beyond ``holocron.optim``'s signature (``maximize``, ``compat``, ...), which a
  checkpoint written by Holocron-era code lacks.

Written for holotx in its own words; torch's test code is not part of this repository.
"""

from __future__ import annotations

import inspect
import unittest
from typing import Any

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ConstantLR, ExponentialLR, LinearLR, ReduceLROnPlateau, StepLR
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

import holotx
from holotx.adapters import (
    LAMB,
    LARS,
    AdaBelief,
    AdamP,
    Adan,
    AdEMAMix,
    Lookahead,
    RaLars,
    Scout,
    TAdam,
    TransformOptimizer,
)

__all__ = [
    "HOLOTX_OPTIM_DB",
    "HolotxAdam",
    "HolotxAdamW",
    "HolotxChain",
    "HolotxRAdam",
    "HolotxSGD",
    "LookaheadAdamW",
    "LookaheadTorchSGD",
    "ScoutSGD",
]


# -- classes that torch can build as optim_cls(params, **kwargs) ------------------------------


class HolotxSGD(TransformOptimizer):
    """``TransformOptimizer(params, holotx.sgd, **hyperparams)``."""

    def __init__(self, params: Any, **hyperparams: Any) -> None:
        super().__init__(params, holotx.sgd, **hyperparams)


class HolotxAdam(TransformOptimizer):
    """``TransformOptimizer(params, holotx.adam, **hyperparams)``."""

    def __init__(self, params: Any, **hyperparams: Any) -> None:
        super().__init__(params, holotx.adam, **hyperparams)


class HolotxAdamW(TransformOptimizer):
    """``TransformOptimizer(params, holotx.adamw, **hyperparams)``."""

    def __init__(self, params: Any, **hyperparams: Any) -> None:
        super().__init__(params, holotx.adamw, **hyperparams)


class HolotxRAdam(TransformOptimizer):
    """``TransformOptimizer(params, holotx.radam, **hyperparams)``."""

    def __init__(self, params: Any, **hyperparams: Any) -> None:
        super().__init__(params, holotx.radam, **hyperparams)


class HolotxChain(TransformOptimizer):
    """``TransformOptimizer`` over a transform: gradient clipping then AdamW at lr 1e-2,
    scaled by the group's ``lr`` (default 1)."""

    def __init__(self, params: Any, **hyperparams: Any) -> None:
        tx = holotx.chain(holotx.clip_by_global_norm(1.0), holotx.adamw(lr=1e-2, weight_decay=0.0))
        super().__init__(params, tx, **hyperparams)


class LookaheadAdamW(Lookahead):
    """``Lookahead(HolotxAdamW(params, lr=lr, **base), sync_rate, sync_period, compat=compat)``."""

    def __init__(self, params: Any, lr: Any = 1e-3, sync_rate: float = 0.5, sync_period: int = 6, *,
                 compat: str | None = None, **base: Any) -> None:
        super().__init__(HolotxAdamW(params, lr=lr, **base), sync_rate, sync_period, compat=compat)


class LookaheadTorchSGD(Lookahead):
    """``Lookahead(torch.optim.SGD(params, lr=lr, **base), ...)``: the wrapper around an
    optimizer that is not holotx's."""

    def __init__(self, params: Any, lr: Any = 1e-3, sync_rate: float = 0.5, sync_period: int = 6, *,
                 compat: str | None = None, **base: Any) -> None:
        super().__init__(torch.optim.SGD(params, lr=lr, **base), sync_rate, sync_period, compat=compat)


class ScoutSGD(Scout):
    """``Scout(HolotxSGD(params, lr=lr, **base), sync_rate, sync_period, compat=compat)``."""

    def __init__(self, params: Any, lr: Any = 1e-3, sync_rate: float = 0.5, sync_period: int = 6, *,
                 compat: str | None = None, **base: Any) -> None:
        super().__init__(HolotxSGD(params, lr=lr, **base), sync_rate, sync_period, compat=compat)


# -- inputs -----------------------------------------------------------------------------------


def _inputs(*cases: tuple[str, dict[str, Any]]) -> list[OptimizerInput]:
    return [OptimizerInput(params=None, kwargs=dict(kwargs), desc=desc) for desc, kwargs in cases]


def _both_modes(cases: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Each case as it is, and the same with ``compat="holocron"``."""
    return [*cases, *((f"{desc}, holocron", {**kw, "compat": "holocron"}) for desc, kw in cases)]


def _rule_inputs(*own: tuple[str, dict[str, Any]], decay: float = 0.1) -> list[tuple[str, dict[str, Any]]]:
    """What every single rule runs: its defaults, a float lr and a 0-d tensor lr, then its
    own cases, then maximize with weight decay ``decay``."""
    return [
        ("default", {}),
        ("lr 1e-2", {"lr": 1e-2}),
        ("0-d tensor lr", {"lr": torch.tensor(1e-3)}),
        *own,
        ("maximize, weight decay", {"maximize": True, "weight_decay": decay}),
    ]


def sgd_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_rule_inputs(
        ("weight decay", {"weight_decay": 0.3}),
        ("momentum", {"momentum": 0.9}),
        ("momentum, dampening", {"momentum": 0.8, "dampening": 0.3}),
        ("nesterov, weight decay", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    ))


def adam_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_rule_inputs(
        ("betas, eps", {"betas": (0.8, 0.99), "eps": 1e-6}),
        ("weight decay", {"weight_decay": 0.1}),
        ("amsgrad, weight decay", {"amsgrad": True, "weight_decay": 0.05}),
    ))


def radam_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_rule_inputs(
        ("weight decay", {"weight_decay": 0.1}),
        ("decoupled weight decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ))


def chain_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(
        ("default", {}),
        ("lr 0.5", {"lr": 0.5}),
        ("0-d tensor lr", {"lr": torch.tensor(0.5)}),
        ("maximize", {"maximize": True}),
    )


def lars_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("weight decay", {"weight_decay": 0.1}),
        ("momentum, dampening", {"momentum": 0.9, "dampening": 0.1}),
        ("nesterov, weight decay", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
        ("scale clip", {"scale_clip": (0.0, 10.0)}),
    )))


def lamb_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("betas, eps", {"betas": (0.8, 0.99), "eps": 1e-6}),
        ("weight decay", {"weight_decay": 0.1}),
        ("scale clip", {"scale_clip": (0.0, 10.0)}),
    )))


def ralars_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("weight decay", {"weight_decay": 0.1}),
        ("adaptive momentum forced", {"force_adaptive_momentum": True}),
        ("scale clip", {"scale_clip": (0.0, 10.0)}),
        # A small decay: in the first rectified steps RAdam's rectifier is ~0.05, so after
        # the trust ratio a decay of 0.1 outweighs the (ascending) moment term and 20 steps
        # at a scheduled lr may end below the start, by RaLars's own math.
        decay=0.01,
    )))


def tadam_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("weight decay", {"weight_decay": 0.1}),
        ("amsgrad", {"amsgrad": True}),
        ("degrees of freedom", {"dof": 3.0}),
    )))


def adabelief_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("weight decay", {"weight_decay": 0.1}),
        ("decoupled weight decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("amsgrad", {"amsgrad": True}),
    )))


def adamp_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("weight decay", {"weight_decay": 0.1}),
        ("amsgrad", {"amsgrad": True}),
        ("delta", {"delta": 0.5}),
    )))


def adan_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("betas", {"betas": (0.9, 0.9, 0.95)}),
        ("weight decay", {"weight_decay": 0.1}),
        ("amsgrad", {"amsgrad": True}),
    )))


def ademamix_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(*_both_modes(_rule_inputs(
        ("alpha, betas", {"alpha": 2.0, "betas": (0.8, 0.99, 0.999)}),
        ("weight decay", {"weight_decay": 0.1}),
    )))


def lookahead_adamw_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(
        ("default", {}),
        ("lr 1e-2, sync every 2", {"lr": 1e-2, "sync_period": 2}),
        ("0-d tensor lr", {"lr": torch.tensor(1e-3)}),
        ("sync rate 0.8, weight decay", {"sync_rate": 0.8, "sync_period": 3, "weight_decay": 0.1}),
        ("amsgrad, holocron counts", {"amsgrad": True, "sync_period": 2, "compat": "holocron"}),
        ("maximize, weight decay", {"maximize": True, "weight_decay": 0.1, "sync_period": 2}),
    )


def lookahead_sgd_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(
        ("default", {}),
        ("momentum, sync every 2", {"lr": 1e-2, "momentum": 0.9, "sync_period": 2}),
        ("weight decay", {"weight_decay": 0.1, "sync_period": 3}),
        ("holocron counts", {"momentum": 0.5, "sync_period": 2, "compat": "holocron"}),
        ("maximize, weight decay", {"maximize": True, "weight_decay": 0.1, "sync_period": 2}),
    )


def scout_sgd_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return _inputs(
        ("default", {}),
        ("momentum, sync every 2", {"lr": 1e-2, "momentum": 0.9, "sync_period": 2}),
        ("0-d tensor lr", {"lr": torch.tensor(1e-3), "sync_period": 3}),
        ("weight decay, sync rate 0.8", {"weight_decay": 0.1, "sync_rate": 0.8, "sync_period": 3}),
        ("holocron", {"momentum": 0.5, "sync_period": 2, "compat": "holocron"}),
        ("maximize, weight decay", {"maximize": True, "weight_decay": 0.1, "sync_period": 2}),
    )


# -- error inputs -----------------------------------------------------------------------------


def _bad(kwargs: dict[str, Any], error: type[Exception], regex: str, *, desc: str,
         params: Any = None) -> ErrorOptimizerInput:
    return ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs, desc=desc),
                               error_type=error, error_regex=regex)


def _sample(device: Any, dtype: Any) -> Parameter:
    return Parameter(torch.randn(2, 3, device=device, dtype=dtype))


def _common_errors(device: Any, dtype: Any, *, fixed_signature: bool = False) -> list[ErrorOptimizerInput]:
    """torch's cases for every optimizer (the params argument: a bare tensor, duplicates,
    names on some params only), less its tensor-lr case, whose message is torch's own; and
    holotx's cases for the arguments every class has. A bad hyperparameter raises before
    the params are read, as torch.optim's do, so ``params=None`` suffices. An unknown
    keyword is the factory's ``ValueError``, or Python's ``TypeError`` for a class with a
    fixed signature (AdaBelief has torch.optim.Adam's)."""
    torch_cases = [e for e in get_error_inputs_for_all_optims(device, dtype)
                   if "lr" not in e.optimizer_error_input.kwargs]
    if torch.device(device).type != "cpu":
        return torch_cases
    p = _sample(device, dtype)
    sparse = _sample(device, dtype)
    sparse.grad = torch.zeros_like(sparse).to_sparse()
    dense = _sample(device, dtype)
    dense.grad = torch.ones_like(dense)
    return [
        *torch_cases,
        _bad({"lr": -1e-3}, ValueError, "lr must be >= 0, got -0.001", desc="negative lr"),
        _bad({"lr": "fast"}, TypeError, "lr must be a number, got 'fast'", desc="lr of a wrong type"),
        _bad({"lr": torch.tensor([1e-3, 1e-3])}, ValueError,
             r"lr as a tensor must have one element, got shape \(2,\)", desc="tensor lr of 2 elements"),
        _bad({"lr": float("nan")}, ValueError, "lr must not be NaN", desc="NaN lr"),
        _bad({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0, got -0.1",
             desc="negative weight decay"),
        _bad({"maximize": "yes"}, TypeError, "maximize must be True or False, got 'yes'",
             desc="maximize not a bool"),
        _bad({"no_such_option": 1}, TypeError, "unexpected keyword argument 'no_such_option'",
             desc="unknown keyword") if fixed_signature else
        _bad({"no_such_option": 1}, ValueError, "has no argument 'no_such_option'",
             desc="unknown keyword"),
        _bad({"lr": 1e-3}, ValueError, "lr must be >= 0, got -1",
             params=[{"params": [p]}, {"params": [_sample(device, dtype)], "lr": -1}],
             desc="a bad value in the second param group"),
        ErrorOptimizerInput(OptimizerInput(params=[dense, sparse], kwargs={}, desc="sparse gradient"),
                            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
                            error_regex="does not support sparse gradients"),
    ]


def _betas_errors(n: int) -> list[ErrorOptimizerInput]:
    ok = (0.9, 0.99, 0.999)[:n]
    return [
        _bad({"betas": (1.0, *ok[1:])}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0",
                      desc="beta1 of 1"),
        _bad({"betas": (*ok[:-1], -0.5)}, ValueError,
             rf"betas\[{n - 1}\] must be in \[0, 1\), got -0.5", desc="negative last beta"),
        _bad({"betas": ok[:-1]}, ValueError, rf"betas must be a tuple of {n} numbers",
             desc="too few betas"),
        _bad({"eps": -1e-8}, ValueError, "eps must be >= 0", desc="negative eps"),
    ]


def _momentum_errors() -> list[ErrorOptimizerInput]:
    return [
        _bad({"momentum": -0.5}, ValueError, "momentum must be >= 0, got -0.5", desc="negative momentum"),
        _bad({"nesterov": True}, ValueError, "nesterov momentum requires momentum > 0",
             desc="nesterov without momentum"),
        _bad({"momentum": 0.9, "dampening": 0.5, "nesterov": True}, ValueError,
             "nesterov momentum requires momentum > 0 and dampening == 0", desc="nesterov with dampening"),
    ]


def _compat_errors() -> list[ErrorOptimizerInput]:
    return [_bad({"compat": "torch"}, ValueError, "compat must be None or 'holocron', got 'torch'",
                          desc="unknown compat")]


def _scale_clip_errors() -> list[ErrorOptimizerInput]:
    return [_bad({"scale_clip": (2.0, 1.0)}, ValueError, "scale_clip must have low <= high",
                          desc="scale clip upside down")]


def _flag_error(name: str) -> ErrorOptimizerInput:
    return _bad({name: "no"}, TypeError, f"{name} must be True or False, got 'no'", desc=f"{name} not a bool")


def sgd_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_momentum_errors()]


def adam_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(2), _flag_error("amsgrad")]


def radam_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(2), _flag_error("decoupled_weight_decay")]


def chain_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    p = _sample(device, dtype)
    torch_cases = [e for e in get_error_inputs_for_all_optims(device, dtype)
                   if "lr" not in e.optimizer_error_input.kwargs]
    return [
        *torch_cases,
        _bad({"lr": -1.0}, ValueError, "lr must be >= 0, got -1.0",
             params=[p], desc="negative lr"),
        _bad({"weight_decay": 0.1}, ValueError,
             "takes only lr and maximize as hyperparameters, got weight_decay", desc="a factory's keyword"),
        _bad({}, ValueError, "sets weight_decay, which a TransformOptimizer built from a transform "
             "does not read", params=[{"params": [p], "weight_decay": 0.1}],
             desc="a group sets a hyperparameter the transform does not read"),
    ]


def lars_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_momentum_errors(), *_scale_clip_errors(), *_compat_errors()]


def lamb_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(2), *_scale_clip_errors(), *_compat_errors()]


def ralars_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*lamb_errors(device, dtype), _flag_error("force_adaptive_momentum")]


def tadam_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(2), *_compat_errors(), _flag_error("amsgrad"),
            _bad({"dof": 0.0}, ValueError, "dof must be > 0, got 0.0", desc="zero degrees of freedom")]


def adabelief_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype, fixed_signature=True), *_betas_errors(2), *_compat_errors(),
            _flag_error("amsgrad"),
            _bad({"capturable": True}, ValueError, "AdaBelief does not support capturable=True",
                          desc="capturable"),
            _bad({"differentiable": True}, ValueError, "AdaBelief does not support differentiable=True",
                          desc="differentiable")]


def adamp_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(2), *_compat_errors(), _flag_error("amsgrad"),
            _bad({"delta": -0.1}, ValueError, "delta must be >= 0, got -0.1", desc="negative delta")]


def adan_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(3), *_compat_errors(), _flag_error("amsgrad")]


def ademamix_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_common_errors(device, dtype), *_betas_errors(3), *_compat_errors(),
            _bad({"alpha": -1.0}, ValueError, "alpha must be >= 0, got -1.0", desc="negative alpha")]


def _wrapper_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    """The base optimizer's errors come first (it is built before the wrapper); the
    wrapper's own need params for the base."""
    torch_cases = [e for e in get_error_inputs_for_all_optims(device, dtype)
                   if "lr" not in e.optimizer_error_input.kwargs]
    return [
        *torch_cases,
        _bad({"sync_rate": 1.5}, ValueError, r"sync_rate must be in \[0, 1\], got 1.5",
             params=[_sample(device, dtype)], desc="sync rate above 1"),
        _bad({"sync_period": 0}, ValueError, "sync_period must be a positive integer, got 0",
             params=[_sample(device, dtype)], desc="sync period 0"),
        _bad({"compat": "torch"}, ValueError, "compat must be None or 'holocron', got 'torch'",
             params=[_sample(device, dtype)], desc="unknown compat"),
    ]


def lookahead_adamw_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_wrapper_errors(device, dtype),
            _bad({"lr": -1e-3}, ValueError, "lr must be >= 0, got -0.001", desc="the base's negative lr"),
            *_betas_errors(2)]


def lookahead_sgd_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_wrapper_errors(device, dtype),
            _bad({"lr": -1e-3}, ValueError, "Invalid learning rate", desc="the base's negative lr")]


def scout_sgd_errors(device: Any, dtype: Any) -> list[ErrorOptimizerInput]:
    return [*_wrapper_errors(device, dtype), *_momentum_errors()]


# -- the entries ------------------------------------------------------------------------------

_SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: LinearLR(opt, start_factor=0.4, total_iters=4)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4), lambda opt: ExponentialLR(opt, gamma=0.9)],
)
"""Schedulers run with each entry (torch's Adam runs a similar set): holotx rebuilds a
group's transform when its lr changes, so each is a real test of the adapter."""

_SGD_SPARSE = (
    {"lr": 4.8e-3, "momentum": 0, "nesterov": False, "weight_decay": 0, "maximize": False},
    [lambda opt: StepLR(opt, gamma=0.99999, step_size=300)],
)
"""For the sparse-gradient tests of LookaheadTorchSGD: torch's SGD is tested there with
these settings (its sparse path is plain SGD; what is left of each input is the wrapper's
``sync_period``/``compat``)."""

_HOLOCRON_KEYS = {
    LARS: "lr momentum dampening weight_decay nesterov scale_clip",
    LAMB: "lr betas eps weight_decay scale_clip",
    RaLars: "lr betas eps weight_decay force_adaptive_momentum scale_clip",
    TAdam: "lr betas eps weight_decay amsgrad dof",
    AdaBelief: "lr betas eps weight_decay amsgrad",
    AdamP: "lr betas eps weight_decay amsgrad delta",
    Adan: "lr betas eps weight_decay amsgrad",
    AdEMAMix: "lr betas alpha eps weight_decay",
}
"""The group keys of ``holocron.optim``'s classes (pylocron 0.3.0)."""


def _new_keys(cls: type) -> tuple[str, ...]:
    """The keys of a drop-in's param groups that Holocron's lack."""
    p = torch.zeros(1, requires_grad=True)
    return tuple(sorted(set(cls([p]).defaults) - set(_HOLOCRON_KEYS[cls].split())))


def _skip(reason: str, test: str) -> DecorateInfo:
    return DecorateInfo(unittest.skip(reason), "TestOptimRenewed", test)


_PER_TENSOR = ("a per-tensor quantity ({what}): a complex tensor of n numbers is one tensor of 2n reals, "
               "not two tensors of n, so splitting it into real and imaginary params changes the step")
_NO_SPLIT_COMPLEX = {
    LARS: "the trust ratio's norms",
    LAMB: "the trust ratio's norms",
    RaLars: "the trust ratio's norms",
    AdamP: "the projection's cosine similarity",
    TAdam: "the default degrees of freedom, the param's size",
    ScoutSGD: "Scout's rate, a mean over params",
}


def _info(cls: type, inputs: Any, errors: Any, *, fused: bool = False,
          og_flags: tuple[str, ...] = ("maximize",), sparse: Any = None,
          skips: tuple[DecorateInfo, ...] = ()) -> OptimizerInfo:
    if cls in _NO_SPLIT_COMPLEX:
        skips = (*skips, _skip(_PER_TENSOR.format(what=_NO_SPLIT_COMPLEX[cls]), "test_complex_2d"))
    return OptimizerInfo(
        cls,
        optim_inputs_func=inputs,
        optim_error_inputs_func=errors,
        scheduler_inputs=_SCHEDULERS,
        supported_impls=("fused",) if fused else (),
        supports_fused_on=("cpu",) if fused else (),
        not_og_supported_flags=og_flags,
        has_capturable_arg=False,
        supports_sparse=sparse is not None,
        metadata_for_sparse=sparse or ({}, []),
        supports_complex=True,
        skips=skips,
    )


def _drop_in(cls: type, inputs: Any, errors: Any, **kw: Any) -> OptimizerInfo:
    return _info(cls, inputs, errors, og_flags=_new_keys(cls), **kw)


HOLOTX_OPTIM_DB: list[OptimizerInfo] = [
    _info(HolotxSGD, sgd_inputs, sgd_errors),
    _info(HolotxAdam, adam_inputs, adam_errors),
    _info(HolotxAdamW, adam_inputs, adam_errors, fused=True),
    _info(HolotxRAdam, radam_inputs, radam_errors),
    _info(HolotxChain, chain_inputs, chain_errors),
    _drop_in(LARS, lars_inputs, lars_errors),
    _drop_in(LAMB, lamb_inputs, lamb_errors),
    _drop_in(RaLars, ralars_inputs, ralars_errors),
    _drop_in(TAdam, tadam_inputs, tadam_errors),
    _drop_in(AdaBelief, adabelief_inputs, adabelief_errors),
    _drop_in(AdamP, adamp_inputs, adamp_errors),
    _drop_in(Adan, adan_inputs, adan_errors),
    _drop_in(AdEMAMix, ademamix_inputs, ademamix_errors),
    _info(LookaheadAdamW, lookahead_adamw_inputs, lookahead_adamw_errors),
    _info(LookaheadTorchSGD, lookahead_sgd_inputs, lookahead_sgd_errors, sparse=_SGD_SPARSE),
    _info(ScoutSGD, scout_sgd_inputs, scout_sgd_errors),
]
"""One entry per class under test, in the format of torch's ``optim_db``."""

assert len({info.name for info in HOLOTX_OPTIM_DB}) == len(HOLOTX_OPTIM_DB)
assert all("compat" in inspect.signature(cls).parameters for cls in _HOLOCRON_KEYS)
