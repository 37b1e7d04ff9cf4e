"""Runs move between torch.optim and holotx: torch.optim's SGD, Adam, AdamW and RAdam
checkpoints load into ``TransformOptimizer`` with the matching holotx factory and the run
continues as it would have in torch; ``state_dict(format="torch")`` goes the other way.
Float64, compared step by step with the run that never moved (1e-12: the formulas agree
to rounding, see tests/test_torch_parity.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import holotx
from holotx.adapters import TransformOptimizer

F64 = torch.float64
SHAPES = [(4, 3), (3,), (2, 2, 2)]

CASES = {
    "sgd-momentum": (torch.optim.SGD, holotx.sgd, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    "sgd-dampening": (torch.optim.SGD, holotx.sgd, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    "sgd-nesterov": (torch.optim.SGD, holotx.sgd, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "sgd-plain": (torch.optim.SGD, holotx.sgd, {"lr": 0.1}),
    "adam": (torch.optim.Adam, holotx.adam, {"lr": 1e-2, "weight_decay": 1e-2}),
    "adam-amsgrad": (torch.optim.Adam, holotx.adam, {"lr": 1e-2, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, holotx.adamw, {"lr": 1e-2, "weight_decay": 1e-1}),
    "adamw-amsgrad": (torch.optim.AdamW, holotx.adamw, {"lr": 1e-2, "amsgrad": True}),
    "radam": (torch.optim.RAdam, holotx.radam, {"lr": 1e-2}),
    "radam-decoupled": (torch.optim.RAdam, holotx.radam, {"lr": 1e-2, "weight_decay": 0.1,
                                                           "decoupled_weight_decay": True}),
}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=F64, requires_grad=True) for s in SHAPES]


def _grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=F64) for s in SHAPES] for _ in range(steps)]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_a_torch_checkpoint_continues_in_holotx(case):
    torch_cls, factory, hp = CASES[case]
    grads = _grads(10)
    reference = _params()
    ref_opt = torch_cls(reference, **hp)
    moving = _params()
    torch_opt = torch_cls(moving, **hp)
    for g in grads[:5]:
        _step(ref_opt, reference, g)
        _step(torch_opt, moving, g)
    checkpoint = copy.deepcopy(torch_opt.state_dict())
    opt = TransformOptimizer(moving, factory, **hp)
    opt.load_state_dict(checkpoint)
    for g in grads[5:]:
        _step(ref_opt, reference, g)
        _step(opt, moving, g)
        _close(moving, reference)


@pytest.mark.parametrize("case", list(CASES))
def test_a_holotx_checkpoint_continues_in_torch(case):
    torch_cls, factory, hp = CASES[case]
    grads = _grads(10)
    reference = _params()
    ref_opt = TransformOptimizer(reference, factory, **hp)
    moving = _params()
    opt = TransformOptimizer(moving, factory, **hp)
    for g in grads[:5]:
        _step(ref_opt, reference, g)
        _step(opt, moving, g)
    checkpoint = copy.deepcopy(opt.state_dict(format="torch"))
    if hp.get("momentum"):
        assert set(checkpoint["state"][0]) == {"momentum_buffer"}
    torch_opt = torch_cls(moving, **hp)
    torch_opt.load_state_dict(checkpoint)
    for g in grads[5:]:
        _step(ref_opt, reference, g)
        _step(torch_opt, moving, g)
        _close(moving, reference)
    # and back: torch's checkpoint of the continued run loads into holotx again
    again = TransformOptimizer(moving, factory, **hp)
    again.load_state_dict(torch_opt.state_dict())
    for key, value in again.state_dict()["state"][0].items():
        assert isinstance(value, torch.Tensor), key


def test_a_torch_checkpoint_of_another_algorithm_is_still_refused():
    params = _params()
    torch_opt = torch.optim.Adam(params, lr=1e-2)
    _step(torch_opt, params, _grads(1)[0])
    opt = TransformOptimizer(params, holotx.sgd, lr=0.1, momentum=0.9)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="another algorithm"):
        opt.load_state_dict(torch_opt.state_dict())
    assert opt.state_dict() == before


@pytest.mark.parametrize("step", [1.5, -1.0, float("nan")])
def test_a_torch_step_that_is_not_a_whole_count_is_refused(step):
    params = _params()
    torch_opt = torch.optim.Adam(params, lr=1e-2)
    _step(torch_opt, params, _grads(1)[0])
    checkpoint = torch_opt.state_dict()
    checkpoint["state"][1]["step"] = torch.tensor(step)
    opt = TransformOptimizer(params, holotx.adam, lr=1e-2)
    with pytest.raises(ValueError, match=r"param 1, key 'step'"):
        opt.load_state_dict(checkpoint)
    assert len(opt.state) == 0


def test_a_format_without_a_torch_twin_is_refused():
    opt = TransformOptimizer(_params(), holotx.lamb, lr=1e-2)
    with pytest.raises(ValueError, match=r"no torch\.optim twin"):
        opt.state_dict(format="torch")
    with pytest.raises(ValueError, match="format"):
        TransformOptimizer(_params(), holotx.adam).state_dict(format="optax")


def test_a_holocron_format_needs_a_holocron_twin():
    with pytest.raises(ValueError, match="no Holocron twin"):
        TransformOptimizer(_params(), holotx.sgd, lr=0.1, momentum=0.9).state_dict(format="holocron")
