"""PyTorch's own optimizer tests, ported to holotx's ``torch.optim`` adapter.

The behaviours checked are those of ``TestOptimRenewed`` (torch's ``test/optim/test_optim.py``)
and of the ``OptimizerInfo`` inputs and error inputs of
``torch.testing._internal.common_optimizers``, applied to every holotx optimizer behind
:class:`holotx.adapters.TransformOptimizer` and to the drop-in classes of
``holotx.adapters`` (both ``compat`` modes); then every scheduler of
``torch.optim.lr_scheduler`` run against the adapter, its learning rates compared with the
same scheduler on a ``torch.optim`` optimizer and its params with a functional holotx run.

Written for holotx, not copied from torch: the checks are often stricter (bit for bit where
the math allows it; torch's suite mostly compares with tolerances).

Not ported: fused/foreach/capturable/differentiable variants, CUDA and device moves, peak
memory, and complex params (holotx steps a complex param as its real view, as torch does:
tests/test_complex.py compares it with its real-view run and with torch.optim).
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as lrs
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import holotx
from holotx import executor
from holotx.adapters import (
    LAMB,
    LARS,
    AdaBelief,
    AdamP,
    Adan,
    AdEMAMix,
    RaLars,
    TAdam,
    TransformOptimizer,
)
from holotx.base import apply_updates

# -- the optimizers under test ------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One optimizer under test: ``build(params, **hyperparams)`` and what it runs."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    factory: Callable[..., Any]
    lr: float = 1e-2
    base: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        return _defaults_of(self.name)


def _from_factory(factory: Callable[..., Any], **base: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Any, **kw: Any) -> torch.optim.Optimizer:
        return TransformOptimizer(params, factory, **{**base, **kw})

    return build


def _drop_in(cls: type, compat: str | None) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Any, **kw: Any) -> torch.optim.Optimizer:
        return cls(params, **kw) if compat is None else cls(params, compat=compat, **kw)

    return build


_FACTORIES: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    ("sgd", holotx.sgd, {"momentum": 0.9}),
    ("adam", holotx.adam, {}),
    ("adamw", holotx.adamw, {}),
    ("radam", holotx.radam, {}),
    ("lars", holotx.lars, {}),
    ("lamb", holotx.lamb, {}),
    ("ralars", holotx.ralars, {}),
    ("tadam", holotx.tadam, {}),
    ("adabelief", holotx.adabelief, {}),
    ("adamp", holotx.adamp, {}),
    ("adan", holotx.adan, {}),
    ("ademamix", holotx.ademamix, {}),
]
_CLASSES: list[tuple[type, Callable[..., Any]]] = [
    (LARS, holotx.lars), (LAMB, holotx.lamb), (RaLars, holotx.ralars), (TAdam, holotx.tadam),
    (AdaBelief, holotx.adabelief), (AdamP, holotx.adamp), (Adan, holotx.adan), (AdEMAMix, holotx.ademamix),
]

SPECS: list[Spec] = [Spec(f"TransformOptimizer[{n}]", _from_factory(f, **kw), f, base=kw)
                     for n, f, kw in _FACTORIES]
SPECS += [Spec(f"{cls.__name__}[{compat or 'default'}]", _drop_in(cls, compat), f,
               base={} if compat is None else {"compat": compat})
          for cls, f in _CLASSES for compat in (None, "holocron")]
_BY_NAME = {s.name: s for s in SPECS}

every_optimizer = pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])


@functools.cache
def _defaults_of(name: str) -> dict[str, Any]:
    return dict(_BY_NAME[name].build([torch.zeros(1, requires_grad=True)]).defaults)


# -- small problems and helpers -----------------------------------------------------------


def _params(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float32), seed: int = 0
            ) -> list[torch.Tensor]:
    """A weight (3, 4) and a bias (3,), leaf tensors requiring grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (3,)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(d).requires_grad_()
            for s, d in zip(shapes, dtypes)]


def _clones(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _set_grads(params: list[torch.Tensor], step: int, zero: bool = False) -> None:
    """Fixed gradients for ``step``: the same for every run, whatever the params' values."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * (1 + i)
        p.grad = torch.zeros_like(p) if zero else grad


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for k in steps:
        _set_grads(params, k)
        opt.step()


def _fit_problem() -> tuple[list[torch.Tensor], Callable[[], torch.Tensor]]:
    """A linear layer fit by least squares on fixed data."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 3, generator=g)
    w = torch.randn(3, 4, generator=g).requires_grad_()
    b = torch.randn(3, generator=g).requires_grad_()
    return [w, b], lambda: ((x @ w.T + b - y) ** 2).mean()


def _snapshot(x: Any) -> Any:
    """A deep copy of tensors inside containers (an optimizer's state, its params)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_snapshot(v) for v in x)
    return x


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal bit for bit: tensors with the same dtype and values, the rest with ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), where
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _state_by_index(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    return [_snapshot(opt.state[p]) if p in opt.state else None for p in params]


def _hyperparams(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


# -- errors on construction ---------------------------------------------------------------


def _bad_values(defaults: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    bad: list[tuple[dict[str, Any], str]] = [({"lr": -1e-3}, "lr"), ({"weight_decay": -0.1}, "weight_decay")]
    if "eps" in defaults:
        bad.append(({"eps": -1e-8}, "eps"))
    if "momentum" in defaults:
        bad.append(({"momentum": -0.5}, "momentum"))
    if "betas" in defaults:
        for i in range(len(defaults["betas"])):
            for value in (-0.1, 1.0, 1.5):
                betas = list(defaults["betas"])
                betas[i] = value
                bad.append(({"betas": tuple(betas)}, rf"betas\[{i}\]"))
        bad.append(({"betas": (*tuple(defaults["betas"]), 0.5)}, "betas"))
    return bad


@every_optimizer
def test_errors_bad_hyperparameters(spec):
    """torch: ``ValueError`` for a negative lr, an invalid beta, a negative eps or weight decay."""
    p = torch.zeros(2, requires_grad=True)
    for kw, name in _bad_values(spec.defaults()):
        with pytest.raises(ValueError, match=name):
            spec.build([p], **kw)


@every_optimizer
def test_errors_bad_group_values(spec):
    """A bad value in a param group raises too, and a bad ``add_param_group`` leaves the
    optimizer as it was (torch validates group values when the group is added)."""
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        spec.build([{"params": [p]}, {"params": [q], "lr": -1.0}], lr=spec.lr)
    opt = spec.build([p], lr=spec.lr)
    for kw, _ in _bad_values(spec.defaults()):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [q], **kw})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [q], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5


@every_optimizer
def test_errors_bad_params(spec):
    """torch's messages and types: an empty list, a bare tensor, a param in two groups."""
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        spec.build([], lr=spec.lr)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        spec.build(p, lr=spec.lr)
    with pytest.raises(ValueError, match="more than one parameter group"):
        spec.build([{"params": [p]}, {"params": [p]}], lr=spec.lr)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        spec.build([p, p], lr=spec.lr)
    opt = spec.build([p], lr=spec.lr)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})


_NESTEROV = [s for s in SPECS if {"nesterov", "momentum"} <= set(s.defaults())]


@pytest.mark.parametrize("spec", _NESTEROV, ids=[s.name for s in _NESTEROV])
def test_errors_nesterov_needs_momentum(spec):
    """torch.optim.SGD's rule, for the optimizers with nesterov momentum."""
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="nesterov"):
        spec.build([p], lr=spec.lr, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        spec.build([p], lr=spec.lr, momentum=0.9, dampening=0.1, nesterov=True)


@every_optimizer
def test_errors_sparse_grad(spec):
    """torch: ``RuntimeError`` on a sparse gradient for optimizers without sparse support."""
    p = torch.zeros(3, requires_grad=True)
    opt = spec.build([p], lr=spec.lr)
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize("spec", [_BY_NAME["TransformOptimizer[adam]"], _BY_NAME["LAMB[default]"]],
                         ids=["TransformOptimizer[adam]", "LAMB[default]"])
def test_errors_tensor_lr_must_have_one_element(spec):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        spec.build([p], lr=torch.tensor([0.1, 0.2]))


def test_errors_tensor_lr_must_have_one_element_transform():
    """Built from a transform, the check is there (for a group's lr)."""
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        TransformOptimizer([{"params": [p], "lr": torch.tensor([0.1, 0.2])}], holotx.adam())
    with pytest.raises(ValueError, match="lr"):
        TransformOptimizer([{"params": [p], "lr": -1.0}], holotx.adam())


def test_transform_path_takes_lr_and_maximize():
    p = torch.zeros(2, requires_grad=True)
    opt = TransformOptimizer([p], holotx.sgd(lr=1.0), lr=0.5, maximize=True)
    p.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["maximize"] is True
    assert torch.equal(p.detach(), torch.full((2,), 0.5))


# -- the direction of the steps -----------------------------------------------------------


@every_optimizer
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
def test_forloop_goes_right_direction(spec, maximize):
    """10 steps lower the loss; with ``maximize=True`` the optimizer ascends, so it is
    given ``-loss``. The closure's loss is what ``step`` returns."""
    params, loss_fn = _fit_problem()
    opt = spec.build(params, lr=spec.lr, maximize=maximize)
    sign = -1.0 if maximize else 1.0

    def closure():
        opt.zero_grad()
        loss = sign * loss_fn()
        loss.backward()
        return loss

    initial = loss_fn().item()
    for _ in range(10):
        returned = opt.step(closure)
        assert isinstance(returned, torch.Tensor)
    assert loss_fn().item() < initial


@every_optimizer
def test_maximize_ascends(spec):
    """``maximize=True`` on the loss itself raises it."""
    params, loss_fn = _fit_problem()
    opt = spec.build(params, lr=spec.lr, maximize=True)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    initial = loss_fn().item()
    for _ in range(10):
        opt.step(closure)
    assert loss_fn().item() > initial


# -- learning rates -----------------------------------------------------------------------


@every_optimizer
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_tensor_lr(spec, lr_dtype):
    """A 0-d tensor lr gives the float lr's numbers bit for bit (float32 params: the float
    lr is rounded to float32 in the kernels too), and an in-place change of the tensor
    takes effect on the next step, as a scheduler's ``fill_`` does."""
    ref, ten = _params(), _params()
    opt_ref = spec.build(ref, lr=spec.lr)
    lr = torch.tensor(spec.lr, dtype=lr_dtype)
    opt = spec.build(ten, lr=lr)
    _run(opt_ref, ref, range(4))
    _run(opt, ten, range(4))
    _assert_same(ref, ten)
    opt_ref.param_groups[0]["lr"] = spec.lr / 4
    lr.fill_(spec.lr / 4)
    _run(opt_ref, ref, range(4, 7))
    _run(opt, ten, range(4, 7))
    _assert_same(ref, ten)
    assert opt.param_groups[0]["lr"] is lr


@every_optimizer
def test_param_groups_lr(spec):
    """A group with ``lr=0`` keeps its params fixed while the other group moves."""
    w, b = _params()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = spec.build([{"params": [w]}, {"params": [b], "lr": 0.0}], lr=spec.lr)
    _run(opt, [w, b], range(5))
    assert not torch.equal(w, w0)
    assert torch.equal(b, b0)
    assert opt.param_groups[1]["lr"] == 0.0
    assert opt.param_groups[0]["lr"] == spec.lr


@every_optimizer
def test_param_groups_are_independent(spec):
    """Two groups with their own lr and weight decay step exactly as two optimizers."""
    w, b = _params()
    w1, b1 = _clones([w, b])
    opt = spec.build([{"params": [w], "weight_decay": 0.0},
                      {"params": [b], "lr": spec.lr / 3, "weight_decay": 0.05}], lr=spec.lr)
    opt_w = spec.build([w1], lr=spec.lr, weight_decay=0.0)
    opt_b = spec.build([b1], lr=spec.lr / 3, weight_decay=0.05)
    for k in range(5):
        _set_grads([w, b], k)
        _set_grads([w1, b1], k)
        opt.step()
        opt_w.step()
        opt_b.step()
    _assert_same([w, b], [w1, b1])


@every_optimizer
def test_param_groups_weight_decay(spec):
    """Weight decay in one group changes that group only: the other group's params are
    bit for bit those of a run without any weight decay."""
    w, b = _params()
    w1, b1 = _clones([w, b])
    decayed = spec.build([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                         lr=spec.lr)
    plain = spec.build([{"params": [w1]}, {"params": [b1]}], lr=spec.lr, weight_decay=0.0)
    _run(decayed, [w, b], range(5))
    _run(plain, [w1, b1], range(5))
    assert torch.equal(b, b1)
    assert not torch.equal(w, w1)


# -- steps that must not move -------------------------------------------------------------


@every_optimizer
def test_step_is_noop_for_zero_grads(spec):
    """From a fresh state, zero gradients and no weight decay leave every param as it is,
    for every holotx optimizer: Adam-like moments stay 0 (so the step is 0/(0+eps)), SGD's
    and LARS's buffers start as the gradient (0), and LAMB/RaLars take ratio 1 on a zero
    direction (both compat modes). (After non-zero steps this no longer holds anywhere a
    momentum remains, see the next test.)"""
    params = _params()
    before = _snapshot(params)
    opt = spec.build(params, lr=spec.lr, weight_decay=0.0)
    for k in range(3):
        _set_grads(params, k, zero=True)
        opt.step()
    _assert_same(params, before)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.factory in (holotx.lamb, holotx.ralars)],
                         ids=[s.name for s in SPECS if s.factory in (holotx.lamb, holotx.ralars)])
def test_zero_grads_after_steps_trust_ratio_moves_by_lr_phi(spec):
    """The documented exception: once the moments are non-zero, a zero gradient still moves
    every LAMB/RaLars tensor by exactly ``lr * clamp(||theta||, 0, 10)`` (Holocron's
    behaviour, kept in both modes)."""
    params = _params()
    opt = spec.build(params, lr=spec.lr, weight_decay=0.0)
    _run(opt, params, range(6))
    before = _snapshot(params)
    _set_grads(params, 6, zero=True)
    opt.step()
    for p, p0 in zip(params, before):
        moved = (p.detach().double() - p0.double()).norm().item()
        assert moved == pytest.approx(spec.lr * min(p0.double().norm().item(), 10.0), rel=1e-5)


@pytest.mark.parametrize("compat", [None, "holocron"])
def test_zero_grads_after_steps_lars_momentum_unnormalised(compat):
    """The other documented exception: LARS with momentum and a zero gradient takes ratio 1
    (its denominator is 0), so the decayed buffer moves theta un-normalised."""
    params = _params()
    opt = TransformOptimizer(params, holotx.lars, lr=0.1, momentum=0.9, compat=compat)
    _run(opt, params, range(3))
    before = _snapshot(params)
    _set_grads(params, 3, zero=True)
    opt.step()
    for p, p0 in zip(params, before):
        buf = opt.state[p]["inner.trace"]
        torch.testing.assert_close(p.detach(), p0 - 0.1 * buf, rtol=1e-6, atol=1e-7)
        assert buf.abs().sum() > 0


@every_optimizer
def test_step_is_noop_when_params_have_no_grad(spec):
    """Params without ``.grad``: no update and no state, fresh or after steps; ``step``
    still runs and returns the closure's value."""
    params = _params()
    before = _snapshot(params)
    opt = spec.build(params, lr=spec.lr)
    assert opt.step(lambda: torch.tensor(1.0)).item() == 1.0
    _assert_same(params, before)
    assert not opt.state
    _run(opt, params, range(3))
    before, state = _snapshot(params), _state_by_index(opt, params)
    for p in params:
        p.grad = None
    opt.step()
    _assert_same(params, before)
    _assert_same(_state_by_index(opt, params), state)


@every_optimizer
def test_param_without_grad_is_skipped(spec):
    """A param whose grad is None while the others step keeps its value and its state (its
    count does not advance): it later steps exactly as in an optimizer started then."""
    w, b = _params()
    (b_late,) = _clones([b])
    opt = spec.build([w, b], lr=spec.lr)
    late = spec.build([b_late], lr=spec.lr)
    b0 = b.detach().clone()
    for k in range(2):
        _set_grads([w, b], k)
        b.grad = None
        opt.step()
    assert torch.equal(b, b0)
    assert b in opt.state  # the group's state is created for all its params
    for k in range(2, 6):
        _set_grads([w, b], k)
        _set_grads([w, b_late], k)
        opt.step()
        late.step()
    _assert_same(b, b_late)
    _assert_same(_snapshot(opt.state[b]), _snapshot(late.state[b_late]))


@every_optimizer
def test_empty_param(spec):
    """A param with no elements steps alongside a normal one."""
    e = torch.empty(0, requires_grad=True)
    (w,) = _params()[:1]
    w0 = w.detach().clone()
    opt = spec.build([e, w], lr=spec.lr)
    for k in range(3):
        _set_grads([w], k)
        e.grad = torch.empty(0)
        opt.step()
    assert e.shape == (0,)
    assert not torch.equal(w, w0)
    assert torch.isfinite(w).all()


# -- state_dict ---------------------------------------------------------------------------


@every_optimizer
def test_state_dict_deterministic(spec):
    """Prime 3 steps, load the state into a fresh optimizer on cloned params (built with
    another lr: the groups come from the checkpoint), then 5 more steps on both: the same
    bits; and the loaded optimizer's state_dict is the original's."""
    params = _params()
    opt = spec.build(params, lr=spec.lr, weight_decay=0.01)
    _run(opt, params, range(3))
    clones = _clones(params)
    other = spec.build(clones, lr=spec.lr * 7, weight_decay=0.0)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == spec.lr
    assert other.param_groups[0]["weight_decay"] == 0.01
    _assert_same(other.state_dict(), opt.state_dict())
    _run(opt, params, range(3, 8))
    _run(other, clones, range(3, 8))
    _assert_same(clones, params)
    _assert_same(other.state_dict(), opt.state_dict())


@every_optimizer
def test_state_dict_weights_only_roundtrip(spec):
    """``torch.save`` then ``torch.load(weights_only=True)``: loads and resumes bit for bit."""
    params = _params()
    opt = spec.build(params, lr=spec.lr)
    _run(opt, params, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    clones = _clones(params)
    other = spec.build(clones, lr=spec.lr)
    other.load_state_dict(loaded)
    _assert_same(other.state_dict(), opt.state_dict())
    _run(opt, params, range(3, 6))
    _run(other, clones, range(3, 6))
    _assert_same(clones, params)


@every_optimizer
def test_state_dict_load_leaves_checkpoint_alone(spec):
    """Loading copies: stepping the loaded optimizer changes neither the checkpoint nor the
    optimizer it came from."""
    params = _params()
    opt = spec.build(params, lr=spec.lr)
    _run(opt, params, range(3))
    sd = opt.state_dict()
    saved = _snapshot(sd)
    clones = _clones(params)
    other = spec.build(clones, lr=spec.lr)
    other.load_state_dict(sd)
    _run(other, clones, range(3, 6))
    _assert_same(sd, saved)
    _assert_same(opt.state_dict(), saved)


@pytest.mark.parametrize("named", [(True, True), (True, False), (False, True)],
                         ids=["named-to-named", "named-to-plain", "plain-to-named"])
@every_optimizer
def test_can_load_from_to_named_state_dict(spec, named):
    """Params given as ``(name, tensor)`` pairs: ``param_names`` in the groups; checkpoints
    load between named and plain optimizers and resume bit for bit."""
    params = _params()

    def given(ps, is_named):
        return list(zip(("weight", "bias"), ps)) if is_named else ps

    opt = spec.build(given(params, named[0]), lr=spec.lr)
    _run(opt, params, range(3))
    clones = _clones(params)
    if named[0]:
        assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    other = spec.build(given(clones, named[1]), lr=spec.lr)
    other.load_state_dict(opt.state_dict())
    _run(opt, params, range(3, 6))
    _run(other, clones, range(3, 6))
    _assert_same(clones, params)


@every_optimizer
def test_can_load_older_state_dict(spec):
    params = _params()
    opt = spec.build(params, lr=spec.lr)
    _run(opt, params, range(3))
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["maximize"]
    clones = _clones(params)
    other = spec.build(clones, lr=spec.lr)
    other.load_state_dict(old)
    _run(opt, params, range(3, 5))
    _run(other, clones, range(3, 5))
    _assert_same(clones, params)


@every_optimizer
def test_load_state_dict_extra_group_keys(spec):
    """Keys the optimizer does not use (a scheduler's ``initial_lr``) load and are kept."""
    params = _params()
    opt = spec.build(params, lr=spec.lr)
    _run(opt, params, range(2))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["initial_lr"] = 0.5
    other = spec.build(_clones(params), lr=spec.lr)
    other.load_state_dict(sd)
    assert other.param_groups[0]["initial_lr"] == 0.5
    assert other.state_dict()["param_groups"][0]["initial_lr"] == 0.5


# -- hooks --------------------------------------------------------------------------------


@every_optimizer
def test_step_pre_and_post_hooks(spec):
    """Global and per-optimizer step hooks fire in torch's order, see the optimizer and the
    step's arguments, and stop when removed."""
    params = _params()
    opt = spec.build(params, lr=spec.lr)
    calls: list[str] = []

    def closure():
        calls.append("closure")
        _set_grads(params, len(calls))
        return torch.tensor(2.0)

    def hook(tag):
        def fn(optimizer, args, kwargs):
            # torch passes the bound call's arguments: args[0] is the optimizer itself
            assert optimizer is opt
            assert args[0] is opt
            assert args[1:] == (closure,) or kwargs.get("closure") is closure
            calls.append(tag)
        return fn

    handles = [opt.register_step_pre_hook(hook("pre")), opt.register_step_post_hook(hook("post")),
               register_optimizer_step_pre_hook(hook("global_pre")),
               register_optimizer_step_post_hook(hook("global_post"))]
    try:
        opt.step(closure)
        assert calls == ["global_pre", "pre", "closure", "post", "global_post"]
        calls.clear()
        opt.step(closure=closure)
        assert calls == ["global_pre", "pre", "closure", "post", "global_post"]
    finally:
        for h in handles:
            h.remove()
    calls.clear()
    opt.step(closure)
    assert calls == ["closure"]


@every_optimizer
def test_step_pre_hook_may_replace_arguments(spec):
    """A pre hook returning ``(args, kwargs)`` replaces the step's arguments."""
    params = _params()
    opt = spec.build(params, lr=spec.lr)

    def other_closure():
        _set_grads(params, 0)
        return torch.tensor(42.0)

    handle = opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0],), {"closure": other_closure}))
    assert opt.step(lambda: torch.tensor(1.0)).item() == 42.0
    assert params[0].grad is not None
    assert params[0] in opt.state
    handle.remove()
    assert opt.step(lambda: torch.tensor(1.0)).item() == 1.0


@every_optimizer
def test_state_dict_hooks(spec):
    """state_dict pre/post hooks and load_state_dict pre/post hooks, as in torch: the
    load pre hook may return a new state dict, the post hook sees the loaded optimizer."""
    params = _params()
    opt = spec.build(params, lr=spec.lr)
    _run(opt, params, range(2))
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))

    def sd_post(o, sd):
        seen.append("sd_post")
        sd["extra"] = "kept"
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert seen == ["sd_pre", "sd_post"]
    assert sd["extra"] == "kept"

    other = spec.build(_clones(params), lr=spec.lr)

    def load_pre(o, state_dict):
        seen.append("load_pre")
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [dict(g, lr=0.125) for g in state_dict["param_groups"]]
        state_dict.pop("extra")
        return state_dict

    def load_post(o):
        assert o is other
        assert o.param_groups[0]["lr"] == 0.125
        seen.append("load_post")

    other.register_load_state_dict_pre_hook(load_pre)
    other.register_load_state_dict_post_hook(load_post)
    other.load_state_dict(sd)
    assert seen[-2:] == ["load_pre", "load_post"]
    assert sd["param_groups"][0]["lr"] == spec.lr  # the hook's change did not leak back


# -- copies and printing ------------------------------------------------------------------


@every_optimizer
def test_deepcopy_copies_all_public_attrs(spec):
    """The copy has the same public attributes, defaults, groups and state values, owns
    its tensors, and steps independently (the same bits as the original)."""
    params = _params()
    opt = spec.build([{"params": [params[0]]}, {"params": [params[1]], "lr": spec.lr / 2}], lr=spec.lr)
    _run(opt, params, range(3))
    cp = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(cp) if not k.startswith("_")}
    # torch's Optimizer.__setstate__ adds differentiable=False to the defaults of any optimizer
    assert {k: v for k, v in cp.defaults.items() if k != "differentiable"} == opt.defaults
    assert [_hyperparams(g) for g in cp.param_groups] == [_hyperparams(g) for g in opt.param_groups]
    cp_params = [p for g in cp.param_groups for p in g["params"]]
    assert all(c is not p for c, p in zip(cp_params, params))
    _assert_same(_snapshot(cp_params), _snapshot(params))
    _assert_same(_state_by_index(cp, cp_params), _state_by_index(opt, params))
    for c, p in zip(cp_params, params):
        for key, value in cp.state[c].items():
            if isinstance(value, torch.Tensor) and value.numel():
                assert value.data_ptr() != opt.state[p][key].data_ptr(), key
    frozen_params, frozen_state = _snapshot(params), _state_by_index(opt, params)
    _run(cp, cp_params, range(3, 5))  # the copy alone
    _assert_same(_snapshot(params), frozen_params)
    _assert_same(_state_by_index(opt, params), frozen_state)
    _run(opt, params, range(3, 5))
    _assert_same(_snapshot(cp_params), _snapshot(params))


@every_optimizer
def test_optimizer_can_be_printed(spec):
    """``repr``/``str``: the class, the factory, each group and its hyperparameters."""
    params = _params()
    opt = spec.build([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.25}], lr=spec.lr)
    text = repr(opt)
    assert str(opt) == text
    assert text.startswith(f"{type(opt).__name__} [holotx.{spec.factory.__name__}] (")
    for i, group in enumerate(opt.param_groups):
        assert f"Parameter Group {i}" in text
        block = text.split(f"Parameter Group {i}")[1].split("Parameter Group")[0]
        for key, value in _hyperparams(group).items():
            assert f"    {key}: {value}\n" in block
    assert "lr: 0.25" in text


# -- dtypes and groups added later --------------------------------------------------------


@every_optimizer
def test_mixed_dtypes(spec):
    """float32 and float64 params in one optimizer: each keeps its dtype (and so does its
    state), and each steps exactly as alone in an optimizer of its dtype."""
    params = _params((torch.float32, torch.float64))
    alone = _clones(params)
    opt = spec.build(params, lr=spec.lr, weight_decay=0.01)
    singles = [spec.build([p], lr=spec.lr, weight_decay=0.01) for p in alone]
    for k in range(4):
        _set_grads(params, k)
        _set_grads(alone, k)
        opt.step()
        for single in singles:
            single.step()
    assert [p.dtype for p in params] == [torch.float32, torch.float64]
    for p in params:
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert value.dtype == p.dtype, key
    _assert_same(_snapshot(params), _snapshot(alone))


@every_optimizer
def test_add_param_group_mid_run(spec):
    """A group added after some steps starts fresh: it steps as a new optimizer would."""
    w, b = _params()
    (b_new,) = _clones([b])
    opt = spec.build([w], lr=spec.lr)
    _run(opt, [w], range(3))
    opt.add_param_group({"params": [b], "lr": spec.lr * 2})
    assert opt.param_groups[1]["lr"] == spec.lr * 2
    assert set(_hyperparams(opt.param_groups[1])) == set(_hyperparams(opt.param_groups[0]))
    new = spec.build([b_new], lr=spec.lr * 2)
    for k in range(3, 6):
        _set_grads([w, b], k)
        _set_grads([w, b_new], k)
        opt.step()
        new.step()
    _assert_same(b, b_new)


# -- LR schedulers --------------------------------------------------------------------------


class HalvingEveryThree(lrs.LRScheduler):
    """A user's LRScheduler subclass, closed form."""

    def get_lr(self):
        return [base * 0.5 ** (self.last_epoch // 3) for base in self.base_lrs]


class ChainableWarmup(lrs.LRScheduler):
    """A user's LRScheduler subclass, chainable form (reads and rescales ``group['lr']``)."""

    def get_lr(self):
        factor = 2.0 if 0 < self.last_epoch <= 3 else 1.0
        return [group["lr"] * factor for group in self.optimizer.param_groups]


def _lambda_09(epoch: int) -> float:
    return 0.9 ** epoch


def _lambda_095(epoch: int) -> float:
    return 0.95


SCHEDULERS: dict[str, Callable[..., Any]] = {
    "LambdaLR": lambda o, **kw: lrs.LambdaLR(o, _lambda_09, **kw),
    "MultiplicativeLR": lambda o, **kw: lrs.MultiplicativeLR(o, _lambda_095, **kw),
    "StepLR": lambda o, **kw: lrs.StepLR(o, step_size=3, gamma=0.5, **kw),
    "MultiStepLR": lambda o, **kw: lrs.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3, **kw),
    "ConstantLR": lambda o, **kw: lrs.ConstantLR(o, factor=0.5, total_iters=4, **kw),
    "LinearLR": lambda o, **kw: lrs.LinearLR(o, start_factor=0.25, total_iters=6, **kw),
    "ExponentialLR": lambda o, **kw: lrs.ExponentialLR(o, gamma=0.8, **kw),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=4), lrs.ExponentialLR(o, gamma=0.9)],
        milestones=[4]),
    # lr reaches exactly 0 at epoch 8 and stays there
    "PolynomialLR": lambda o, **kw: lrs.PolynomialLR(o, total_iters=8, power=2.0, **kw),
    # lr is exactly 0 at epoch 5 and comes back: the transform's lr goes 0 and non-zero again
    "CosineAnnealingLR": lambda o, **kw: lrs.CosineAnnealingLR(o, T_max=5, **kw),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=3), lrs.ExponentialLR(o, gamma=0.9)], optimizer=o),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1),
    "CyclicLR": lambda o, **kw: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3,
                                             cycle_momentum=False, **kw),
    "CyclicLR-momentum": lambda o, **kw: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3,
                                                      cycle_momentum=True, base_momentum=0.8,
                                                      max_momentum=0.9, **kw),
    "OneCycleLR-momentum": lambda o, **kw: lrs.OneCycleLR(o, max_lr=0.1, total_steps=20,
                                                          cycle_momentum=True, **kw),
    "OneCycleLR": lambda o, **kw: lrs.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=False,
                                                 three_phase=True, **kw),
    "CosineAnnealingWarmRestarts": lambda o, **kw: lrs.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2,
                                                                                   eta_min=1e-3, **kw),
    "LRScheduler-subclass": lambda o, **kw: HalvingEveryThree(o, **kw),
    "LRScheduler-subclass-chainable": lambda o, **kw: ChainableWarmup(o, **kw),
}
_PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6]

# the holotx optimizer (factory, kwargs) and the torch.optim twin whose schedule it must follow
SCHED_OPTIMIZERS: dict[str, tuple[Callable[..., Any], dict[str, Any], Callable[..., Any]]] = {
    "adamw": (holotx.adamw, {}, torch.optim.AdamW),
    "lamb": (holotx.lamb, {}, torch.optim.AdamW),
    "sgd-momentum": (holotx.sgd, {"momentum": 0.9}, functools.partial(torch.optim.SGD, momentum=0.9)),
    "lars-momentum": (holotx.lars, {"momentum": 0.9}, functools.partial(torch.optim.SGD, momentum=0.9)),
}
_SCHED_CASES = [(s, o) for s in SCHEDULERS for o in ("adamw", "lamb")]
_SCHED_CASES += [(s, o) for s in ("CyclicLR-momentum", "OneCycleLR-momentum", "StepLR")
                 for o in ("sgd-momentum", "lars-momentum")]
_LR0, _LR1 = 0.1, 0.05
_CYCLED = ("lr", "betas", "momentum")


def _group_params(seed: int = 0) -> list[torch.Tensor]:
    return _params(seed=seed)


def _groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"params": [params[0]]}, {"params": [params[1]], "lr": _LR1}]


def _schedule_step(sched: Any, k: int) -> None:
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(_PLATEAU_METRICS[k])
    else:
        sched.step()


def _record(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: _snapshot(g[k]) for k in _CYCLED if k in g} for g in opt.param_groups]


def _scheduled_run(opt, params, sched, steps: range) -> list[list[dict[str, Any]]]:
    """Step ``opt`` then ``sched``; the cycled hyperparameters each step used."""
    used = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in steps:
            used.append(_record(opt))
            _set_grads(params, k)
            opt.step()
            _schedule_step(sched, k)
    order = [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert not order, order[0].message
    return used


def _compared(adapter_used, torch_used):
    """The values the adapter's groups held, restricted to the keys torch's groups hold."""
    return [[{k: v for k, v in a.items() if k in t} for a, t in zip(step_a, step_t)]
            for step_a, step_t in zip(adapter_used, torch_used)]


def _functional_run(factory, base, used, steps: range) -> list[torch.Tensor]:
    """holotx's functional API, one transform per group, rebuilt every step with the
    group's recorded hyperparameters, its state carried; updates applied as the adapter
    does (the final lr scale handed over, ``p += -lr * u``)."""
    params = [p.detach().clone() for p in _group_params()]
    groups = [[params[0]], [params[1]]]
    args = set(inspect.signature(factory).parameters)
    states = [factory(**base).init(g) for g in groups]
    for k, hyper in zip(steps, used):
        grads = _grad_values(params, k)
        for i, g in enumerate(groups):
            tx = factory(**{**base, **{n: v for n, v in hyper[i].items() if n in args}})
            updates, states[i], factor, _ = executor.run(tx, [grads[i]], states[i], g, hand_over_scale=True)
            g[:] = apply_updates(g, updates, scale=factor)
    return [groups[0][0], groups[1][0]]


def _grad_values(params: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    holders = [torch.zeros_like(p) for p in params]
    _set_grads(holders, k)
    return [h.grad for h in holders]


@pytest.mark.parametrize(("sched_name", "opt_name"), _SCHED_CASES, ids=[f"{s}-{o}" for s, o in _SCHED_CASES])
def test_scheduler_matches_torch_and_functional(sched_name, opt_name):
    """Over 12 steps the adapter's lr (and cycled ``betas``/``momentum``) sequence equals the
    same scheduler's on the torch.optim twin; its params equal, bit for bit, a twin adapter
    whose hyperparameters are set by hand to the recorded values, and a functional holotx
    run rebuilt each step from them (lr going to 0 and back included)."""
    factory, base, torch_cls = SCHED_OPTIMIZERS[opt_name]
    make = SCHEDULERS[sched_name]
    steps = range(12)

    ref_params = _group_params()
    ref = torch_cls(_groups(ref_params), lr=_LR0)
    torch_used = _scheduled_run(ref, ref_params, make(ref), steps)

    params = _group_params()
    opt = TransformOptimizer(_groups(params), factory, lr=_LR0, **base)
    used = _scheduled_run(opt, params, make(opt), steps)
    assert _compared(used, torch_used) == torch_used
    assert len({str(u) for u in used}) > 1, "the schedule never changed anything"
    if "momentum" in sched_name:
        cycled = "betas" if "betas" in used[0][0] else "momentum"
        assert len({str(u[0][cycled]) for u in used}) > 1

    twin_params = _group_params()
    twin = TransformOptimizer(_groups(twin_params), factory, lr=_LR0, **base)
    for k, hyper in zip(steps, used):
        for group, values in zip(twin.param_groups, hyper):
            group.update(values)
        _set_grads(twin_params, k)
        twin.step()
    _assert_same(_snapshot(twin_params), _snapshot(params))
    _assert_same(_functional_run(factory, base, used, steps), _snapshot(params))


_RESUMABLE = list(SCHEDULERS)


@pytest.mark.parametrize("sched_name", _RESUMABLE)
@pytest.mark.parametrize("opt_name", ["adamw", "sgd-momentum"])
def test_scheduler_resume_from_state_dicts(sched_name, opt_name):
    """Stop after 5 steps, save the optimizer's and the scheduler's state dicts (through
    ``torch.load(weights_only=True)`` for the optimizer), build a fresh optimizer and
    scheduler, load both, go on: the lr sequence and the params are those of the
    uninterrupted run; the loaded groups carry ``initial_lr``."""
    factory, base, _ = SCHED_OPTIMIZERS[opt_name]
    make = SCHEDULERS[sched_name]
    full_params = _group_params()
    full = TransformOptimizer(_groups(full_params), factory, lr=_LR0, **base)
    full_used = _scheduled_run(full, full_params, make(full), range(10))

    params = _group_params()
    opt = TransformOptimizer(_groups(params), factory, lr=_LR0, **base)
    sched = make(opt)
    _scheduled_run(opt, params, sched, range(5))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt_sd = torch.load(buffer, weights_only=True)
    sched_sd = copy.deepcopy(sched.state_dict())
    initial = [g["initial_lr"] for g in opt.param_groups] if "initial_lr" in opt.param_groups[0] else None

    resumed_params = _clones(params)
    resumed = TransformOptimizer(_groups(resumed_params), factory, lr=_LR0 * 3, **base)
    new_sched = make(resumed)
    resumed.load_state_dict(opt_sd)
    new_sched.load_state_dict(sched_sd)
    if initial is not None:
        assert [g["initial_lr"] for g in resumed.param_groups] == initial
    used = _scheduled_run(resumed, resumed_params, new_sched, range(5, 10))
    assert used == full_used[5:]
    _assert_same(_snapshot(resumed_params), _snapshot(full_params))


_LAST_EPOCH_OK = [s for s in SCHEDULERS if s not in ("SequentialLR", "ChainedScheduler", "ReduceLROnPlateau")]


@pytest.mark.parametrize("sched_name", _LAST_EPOCH_OK)
def test_scheduler_last_epoch_with_loaded_initial_lr(sched_name):
    """A scheduler built with ``last_epoch=4`` needs ``initial_lr`` in the groups (torch
    raises ``KeyError`` without it): after loading a checkpoint taken under a scheduler the
    adapter's groups carry it, the scheduler builds, and the following lr sequence is the
    one torch.optim.AdamW gets through the same procedure."""
    factory, base, torch_cls = SCHED_OPTIMIZERS["adamw"]
    make = SCHEDULERS[sched_name]

    def procedure(build):
        params = _group_params()
        opt = build(_groups(params))
        _scheduled_run(opt, params, make(opt), range(5))
        fresh_params = _clones(params)
        bare = build(_groups(_clones(params)))
        with pytest.raises(KeyError, match="initial_lr"):
            make(bare, last_epoch=4)
        fresh = build(_groups(fresh_params))
        fresh.load_state_dict(opt.state_dict())
        assert all("initial_lr" in g for g in fresh.param_groups)
        sched = make(fresh, last_epoch=4)
        return _scheduled_run(fresh, fresh_params, sched, range(5, 12)), fresh_params

    torch_used, _ = procedure(lambda groups: torch_cls(groups, lr=_LR0))
    used, _ = procedure(lambda groups: TransformOptimizer(groups, factory, lr=_LR0, **base))
    assert _compared(used, torch_used) == torch_used


@pytest.mark.parametrize("sched_name", ["StepLR", "CosineAnnealingLR", "LinearLR", "OneCycleLR"])
def test_scheduler_with_tensor_lr(sched_name):
    """A tensor lr under a scheduler: the scheduler fills it in place, and the params are
    those of the float-lr run, bit for bit."""
    make = SCHEDULERS[sched_name]
    float_params, tensor_params = _group_params(), _group_params()
    opt_f = TransformOptimizer(_groups(float_params), holotx.adamw, lr=_LR0)
    groups = _groups(tensor_params)
    groups[1]["lr"] = torch.tensor(_LR1, dtype=torch.float64)
    opt_t = TransformOptimizer(groups, holotx.adamw, lr=torch.tensor(_LR0, dtype=torch.float64))
    lr_tensors = [g["lr"] for g in opt_t.param_groups]
    used_f = _scheduled_run(opt_f, float_params, make(opt_f), range(10))
    used_t = _scheduled_run(opt_t, tensor_params, make(opt_t), range(10))
    assert [g["lr"] for g in opt_t.param_groups] == lr_tensors  # the same tensors, filled
    for uf, ut in zip(used_f, used_t):
        for gf, gt in zip(uf, ut):
            assert math.isclose(float(gt["lr"]), gf["lr"], rel_tol=1e-6)
    _assert_same(_snapshot(tensor_params), _snapshot(float_params))
