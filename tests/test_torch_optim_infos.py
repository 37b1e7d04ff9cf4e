"""holotx's ``OptimizerInfo`` entries (``tests/torch_optim_infos.py``), checked without
torch's test file: what they declare must be true of holotx's classes, so that the opt-in
run of torch's ``TestOptimRenewed`` on them (``.ci/torch_optim_suite.py``) tests what
holotx does.

- every error input raises the declared type, with a message matching the declared
  regex, whatever the params (``None`` or real ones: hyperparameters are checked before
  the params are read), and a step that raises leaves params and state as they were;
- every input builds and steps, in float32 and float64, with finite params and state,
  and a state dict that another optimizer loads and continues from, step for step;
- the flags: no input sets torch's foreach/fused/differentiable switches (torch's tests
  add them), a declared ``fused`` is accepted, ``capturable`` is refused, a sparse
  gradient raises, and the names (torch's test names) are unique.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum
from torch_optim_infos import HOLOTX_OPTIM_DB

INFOS = {info.name: info for info in HOLOTX_OPTIM_DB}
NAMES = list(INFOS)


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), ()]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _set_grads(params: list[torch.Tensor], k: int) -> None:
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _state(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for entry in optimizer.state.values() if hasattr(entry, "items")
            for k, v in entry.items() if isinstance(v, torch.Tensor)]


def _tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for _, v in _state(optimizer)]


INFINITE_BY_DESIGN = {"scout_min", "scout_max"}
"""Scout's running minimum and maximum of a window, +inf and -inf where it starts."""


def _clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_entries_cover_holotx_classes():
    """One entry per class (torch names its tests after the class), and every class of
    ``holotx.adapters`` that torch can build has one."""
    assert len(NAMES) == len(set(NAMES)) == len(HOLOTX_OPTIM_DB)
    for name in ("LARS", "LAMB", "RaLars", "TAdam", "AdaBelief", "AdamP", "Adan", "AdEMAMix"):
        assert INFOS[name].optim_cls.__module__ == "holotx.adapters.holocron"
    for name in ("HolotxSGD", "HolotxAdam", "HolotxAdamW", "HolotxRAdam", "LookaheadAdamW", "ScoutSGD"):
        assert name in INFOS


@pytest.mark.parametrize("name", NAMES)
def test_inputs_leave_torch_switches_to_the_tests(name):
    """torch's tests add foreach/fused/differentiable themselves, from ``supported_impls``."""
    info = INFOS[name]
    for optim_input in info.optim_inputs_func("cpu"):
        assert optim_input.params is None
        switches = {"foreach", "fused", "differentiable", "capturable"}
        assert not switches & set(optim_input.kwargs), optim_input.desc
    assert set(info.supported_impls) <= {"fused"}
    assert not info.has_capturable_arg
    assert not info.only_supports_sparse_grads


@pytest.mark.parametrize("name", NAMES)
def test_declared_flags_hold(name, monkeypatch):
    """A declared ``fused`` is taken (and gives the unfused step's first update to
    rounding); ``capturable=True`` is refused (no capture support); a sparse gradient
    raises ``RuntimeError`` before anything changes where ``supports_sparse`` is False,
    and steps where it is True."""
    info = INFOS[name]
    if "fused" in info.supported_impls:
        from holotx.adapters import _fused

        monkeypatch.setattr(_fused, "BACKEND", "eager")  # the graph as inductor gets it, seconds sooner
        ref, fused = _params(torch.float64), _params(torch.float64)
        opts = [info.optim_cls(ref), info.optim_cls(fused, fused=True)]
        for ps, opt in zip((ref, fused), opts):
            _set_grads(ps, 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # where no compiler: unfused, said so
                opt.step()
        for a, b in zip(ref, fused):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises((TypeError, ValueError)):
        info.optim_cls(_params(torch.float32), capturable=True)
    params = _params(torch.float32)
    opt = info.optim_cls(params)
    _set_grads(params, 0)
    params[0].grad = params[0].grad.to_sparse()
    before = _clone_params(params)
    if info.supports_sparse:
        opt.step()
        assert not torch.equal(before[0], params[0])
        return
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert not _tensors(opt)


def _raises(error_input, call):
    """Call ``call`` and check it raises (or warns) as ``error_input`` declares."""
    error, regex = error_input.error_type, error_input.error_regex
    if issubclass(error, Warning):
        with pytest.warns(error) as record:
            call()
        assert any(re.search(regex, str(w.message)) for w in record), [str(w.message) for w in record]
        return
    with pytest.raises(Exception) as info:
        call()
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {info.value}"
    assert re.search(regex, str(info.value)), f"{regex!r} not in {info.value}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_error_inputs_raise_as_declared(name, dtype):
    """Each error input raises what it declares. A bad hyperparameter given with
    ``params=None`` raises the same with real params (it is checked first either way). A
    step that raises changes no param and creates no state."""
    info = INFOS[name]
    error_inputs = info.optim_error_inputs_func(device="cpu", dtype=dtype)
    assert any(e.optimizer_error_input.params is None for e in error_inputs) or name == "HolotxChain"
    for error_input in error_inputs:
        given = error_input.optimizer_error_input
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            _raises(error_input, lambda: info.optim_cls(given.params, **given.kwargs))
            if given.params is None:
                _raises(error_input, lambda: info.optim_cls(_params(dtype), **given.kwargs))
            continue
        assert error_input.error_on == OptimizerErrorEnum.STEP_ERROR
        params = given.params  # made afresh by each call of the function
        assert all(p.grad is not None for p in params), given.desc
        tensors = [p for p in params if isinstance(p, torch.Tensor)]
        opt = info.optim_cls(params, **given.kwargs)
        before = _clone_params(tensors)
        _raises(error_input, opt.step)
        assert all(torch.equal(a, b) for a, b in zip(before, tensors)), given.desc
        assert not _tensors(opt), given.desc


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_inputs_step_and_resume(name, dtype):
    """Every input builds an optimizer that steps three times with finite params and
    state in the params' dtype, moves them, and whose state dict a second optimizer
    loads and continues from: both take the same next two steps."""
    info = INFOS[name]
    for optim_input in info.optim_inputs_func("cpu", dtype):
        params = _params(dtype)
        start = _clone_params(params)
        opt = info.optim_cls(params, **optim_input.kwargs)
        for k in range(3):
            _set_grads(params, k)
            opt.step()
        what = f"{name} [{optim_input.desc}]"
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params), what
        assert any(not torch.equal(a, p) for a, p in zip(start, params)), what
        state = [t for k, t in _state(opt) if t.is_floating_point() and k not in INFINITE_BY_DESIGN]
        assert state or name in ("HolotxSGD", "LARS"), what
        assert all(torch.isfinite(t).all() for t in state), what
        assert all(t.dtype == dtype for t in state if t.dim() > 0), what

        twins = _clone_params(params)
        twins = [torch.nn.Parameter(t) for t in twins]
        other = info.optim_cls(twins, **copy.deepcopy(optim_input.kwargs))
        other.load_state_dict(copy.deepcopy(opt.state_dict()))
        for k in range(3, 5):
            _set_grads(params, k)
            _set_grads(twins, k)
            opt.step()
            other.step()
        for a, b in zip(params, twins):
            assert torch.equal(a, b), what
