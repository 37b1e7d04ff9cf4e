"""Specification: holotx's sgd/adam/adamw/radam are torch.optim's SGD/Adam/AdamW/RAdam.

For every configuration in a grid of hyperparameters, holotx and torch.optim are run side by
side from the same initial parameters for ``STEPS`` steps, and after *every* step both the
parameters and the optimizer state are compared:

=========================  ==========================
holotx state field         torch ``optimizer.state``
=========================  ==========================
``TraceState.trace``       ``momentum_buffer``
``ScaleByAdamState.mu``    ``exp_avg``
``ScaleByAdamState.nu``    ``exp_avg_sq``
``...nu_max``              ``max_exp_avg_sq``
``...count``               ``step``
=========================  ==========================

Two gradient regimes:

* **open loop**: the same seeded random gradients are fed to both, at scales 1e-3, 1 and 1e3;
* **closed loop**: a small conv + MLP ``nn.Module``; torch computes gradients with
  ``loss.backward()`` on the module's parameters, holotx with ``torch.func.functional_call`` +
  ``torch.func.grad`` on a params dict holding the same initial values, on the same data.

The parameter set always holds a shape-``(1,)`` tensor, a 4-D conv weight, and a tensor whose
gradient is sometimes exactly zero (all of it on every third step, starting with the first,
and one entry always), which exercises ``0 / (0 + eps)`` and decaying-but-untouched moments.

Tolerance (float64): ``REL_TOL = 1e-12``, as a *norm-wise* relative error per tensor,
``max|a - b| <= REL_TOL * S + ABS_FLOOR`` where ``S`` is the largest ``max|b|`` that tensor has
had so far in the run. holotx and torch evaluate the same formulas with the same float64
scalars but not always in the same order (e.g. holotx forms ``-lr * (m / denom / bc1)``,
torch ``m / denom * (-lr / bc1)``), so single steps differ by a few ulp (~1e-16 relative) and
50 steps accumulate far less than 1e-12 (the closed loop feeds these differences back through
the gradients, which over 50 steps of a well-conditioned small net amplifies them only
mildly). The error is norm-wise rather than elementwise because an entry that passes near zero
carries an absolute error of a few ulp *of the tensor's scale*, a huge elementwise relative
error although the optimizers agree; for the same reason ``S`` is a running maximum: a tensor
that shrinks from 1 to 1e-4 (a decaying parameter or moment) keeps the absolute rounding error
it picked up at scale 1. ``ABS_FLOOR = 1e-300`` only makes the comparison defined for tensors
that are exactly zero on the reference side (moments of never-touched entries): there the
other side must be zero too, to within denormals.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import holotx
from holotx.transforms import ScaleByAdamState, ScaleByScheduleState, TraceState
from holotx.tree import find_states

STEPS = 50
REL_TOL = 1e-12
ABS_FLOOR = 1e-300
GRAD_SCALES = (1e-3, 1.0, 1e3)

# Open-loop parameter set: name -> shape.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (1,),
    "conv": (4, 3, 3, 3),
    "matrix": (5, 7),
    "sometimes_zero": (6,),
}


# --------------------------------------------------------------------------- configurations

def _sgd_grid() -> list[tuple[str, dict[str, Any]]]:
    # torch (and holotx) refuse nesterov without momentum or with dampening: only valid rows.
    momentum_rows = [
        dict(momentum=0.0, dampening=0.0, nesterov=False),
        dict(momentum=0.9, dampening=0.0, nesterov=False),
        dict(momentum=0.9, dampening=0.5, nesterov=False),
        dict(momentum=0.9, dampening=0.0, nesterov=True),
    ]
    out = []
    for row, wd, maximize in itertools.product(momentum_rows, (0.0, 0.1), (False, True)):
        kw = dict(lr=1e-2, weight_decay=wd, maximize=maximize, **row)
        name = (f"sgd-mom{row['momentum']}-damp{row['dampening']}-nest{int(row['nesterov'])}"
                f"-wd{wd}-max{int(maximize)}")
        out.append((name, kw))
    return out


def _adam_grid() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"adam-ams{int(a)}-wd{wd}-max{int(m)}",
         dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, amsgrad=a, maximize=m))
        for a, wd, m in itertools.product((False, True), (0.0, 0.1), (False, True))
    ]


def _adamw_grid() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"adamw-ams{int(a)}-wd{wd}", dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, amsgrad=a))
        for a, wd in itertools.product((False, True), (0.0, 0.1))
    ]


def _radam_grid() -> list[tuple[str, dict[str, Any]]]:
    # Default betas: rho_t > 5 from step 6 on, so 50 steps cover both of RAdam's branches.
    return [
        (f"radam-wd{wd}-dec{int(d)}", dict(lr=1e-2, weight_decay=wd, decoupled_weight_decay=d))
        for wd, d in itertools.product((0.0, 0.1), (False, True))
    ]


ALGORITHMS: dict[str, tuple[type[torch.optim.Optimizer], Callable[..., holotx.GradientTransformation]]] = {
    "sgd": (torch.optim.SGD, holotx.sgd),
    "adam": (torch.optim.Adam, holotx.adam),
    "adamw": (torch.optim.AdamW, holotx.adamw),
    "radam": (torch.optim.RAdam, holotx.radam),
}

CONFIGS = _sgd_grid() + _adam_grid() + _adamw_grid() + _radam_grid()


def _algorithm(config_name: str) -> str:
    return config_name.split("-")[0]


# --------------------------------------------------------------------------- helpers



class Checker:
    """Norm-wise relative comparison against the running scale of each tensor (module docstring)."""

    def __init__(self, rtol: float) -> None:
        self.rtol = rtol
        self.scale: dict[str, float] = {}

    def close(self, key: str, actual: torch.Tensor, expected: torch.Tensor, step: int) -> None:
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
        assert actual.dtype == expected.dtype, (key, actual.dtype, expected.dtype)
        s = self.scale[key] = max(self.scale.get(key, 0.0), expected.abs().max().item())
        err = (actual - expected).abs().max().item()
        assert err <= self.rtol * s + ABS_FLOOR, (
            f"step {step}: {key}: |error| {err:.3e} > {self.rtol:.0e} * scale {s:.3e}")


def compare_with_torch(check: Checker, step: int, algorithm: str, params: dict[str, torch.Tensor],
                       state: Any, tparams: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """After step ``step`` (1-based): params and every moment agree, counts are equal."""
    for name, tp in tparams.items():
        check.close(f"param {name!r}", params[name], tp.detach(), step)

    if algorithm == "sgd":
        traces = find_states(state, TraceState)
        momentum = opt.param_groups[0]["momentum"]
        if momentum == 0:
            assert traces == [], "without momentum holotx keeps no momentum buffer (torch: None)"
            assert all(opt.state[tp].get("momentum_buffer") is None for tp in tparams.values())
            return
        (tr,) = traces
        damped = opt.param_groups[0]["dampening"] != 0
        assert (tr.count is not None) == damped, "a step count is kept only where dampening needs it"
        for name in tparams if damped else ():
            assert int(tr.count[name]) == step, f"step count {name!r}"
        for name, tp in tparams.items():
            check.close(f"momentum_buffer {name!r}", tr.trace[name], opt.state[tp]["momentum_buffer"], step)
        return

    (adam_state,) = find_states(state, ScaleByAdamState)
    amsgrad = opt.param_groups[0].get("amsgrad", False)
    for name, tp in tparams.items():
        ts = opt.state[tp]
        count = adam_state.count[name]
        assert count.dtype == torch.int64
        assert count.dim() == 0
        assert int(count) == int(ts["step"]) == step, f"step count {name!r}"
        check.close(f"exp_avg {name!r}", adam_state.mu[name], ts["exp_avg"], step)
        check.close(f"exp_avg_sq {name!r}", adam_state.nu[name], ts["exp_avg_sq"], step)
        if amsgrad:
            check.close(f"max_exp_avg_sq {name!r}", adam_state.nu_max[name], ts["max_exp_avg_sq"], step)
        else:
            assert adam_state.nu_max is None
            assert "max_exp_avg_sq" not in ts


def open_loop_grads(gen: torch.Generator, step: int, scale: float,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    grads = {k: scale * torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}
    grads["sometimes_zero"][0] = 0.0  # one entry never gets a gradient
    if step % 3 == 0:  # and on every third step (the first included) none of it does
        grads["sometimes_zero"].zero_()
    return grads


def initial_params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in SHAPES.items()}


def run_open_loop(config_name: str, kwargs: dict[str, Any], scale: float, dtype: torch.dtype,
                  rtol: float, tx: holotx.GradientTransformation | None = None,
                  steps: int = STEPS) -> None:
    algorithm = _algorithm(config_name)
    torch_cls, factory = ALGORITHMS[algorithm]
    tx = factory(**kwargs) if tx is None else tx
    p0 = initial_params(dtype)
    tparams = {k: nn.Parameter(v.clone()) for k, v in p0.items()}
    opt = torch_cls(list(tparams.values()), foreach=False, **kwargs)
    params = {k: v.clone() for k, v in p0.items()}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(1234)
    check = Checker(rtol)
    for step in range(steps):
        grads = open_loop_grads(gen, step, scale, dtype)
        for k, tp in tparams.items():
            tp.grad = grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        compare_with_torch(check, step + 1, algorithm, params, state, tparams, opt)


# --------------------------------------------------------------------------- open loop

@pytest.mark.parametrize("scale", GRAD_SCALES, ids=lambda s: f"g{s:g}")
@pytest.mark.parametrize(("config_name", "kwargs"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_open_loop_float64_matches_torch_every_step(config_name, kwargs, scale):
    """Seeded random gradients at scale 1e-3, 1, 1e3: params and moments within 1e-12."""
    run_open_loop(config_name, kwargs, scale, torch.float64, REL_TOL)


# --------------------------------------------------------------------------- closed loop

class SmallNet(nn.Module):
    """conv (4-D weight) -> tanh -> linear -> tanh -> linear, times a shape-(1,) temperature,
    plus ``gate * sum(aux**2)``: with ``gate = 0`` (every third step) ``aux``'s gradient is
    exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.fc = nn.Linear(3 * 2 * 2, 5)
        self.out = nn.Linear(5, 1)
        self.temperature = nn.Parameter(torch.ones(1))
        self.aux = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor, gate: float) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc(h))
        return self.out(h) * self.temperature + gate * (self.aux**2).sum()


def closed_loop_batch(gen: torch.Generator, step: int, dtype: torch.dtype):
    x = torch.randn(8, 2, 4, 4, generator=gen, dtype=dtype)
    y = torch.randn(8, 1, generator=gen, dtype=dtype)
    gate = 0.0 if step % 3 == 0 else 1.0
    return x, y, gate


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


@pytest.mark.parametrize(("config_name", "kwargs"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_closed_loop_mlp_float64_matches_torch_every_step(config_name, kwargs):
    """torch: nn.Module + backward(); holotx: functional_call + torch.func.grad; within 1e-12."""
    algorithm = _algorithm(config_name)
    torch_cls, factory = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = SmallNet().double()
    fmodel = copy.deepcopy(model)  # holotx's side only borrows the module's code
    tparams = dict(model.named_parameters())
    opt = torch_cls(list(tparams.values()), foreach=False, **kwargs)
    tx = factory(**kwargs)
    params = {k: v.detach().clone() for k, v in tparams.items()}
    state = tx.init(params)

    # With maximize=True both sides ascend -mse (a bounded objective), so the run stays finite.
    sign = -1.0 if kwargs.get("maximize", False) else 1.0

    def loss_fn(p, x, y, gate):
        return sign * mse(torch.func.functional_call(fmodel, p, (x, gate)), y)

    grad_fn = torch.func.grad(loss_fn)
    gen = torch.Generator().manual_seed(99)
    check = Checker(REL_TOL)
    for step in range(STEPS):
        x, y, gate = closed_loop_batch(gen, step, torch.float64)
        opt.zero_grad()
        (sign * mse(model(x, gate), y)).backward()
        if gate == 0.0:
            assert torch.count_nonzero(model.aux.grad) == 0, "the gated gradient is exactly zero"
        opt.step()
        grads = grad_fn(params, x, y, gate)
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        compare_with_torch(check, step + 1, algorithm, params, state, tparams, opt)


# --------------------------------------------------------------------------- float32

# float32: the two sides round the same formulas in different orders, so each step's update
# differs by a few float32 ulp (eps = 1.19e-7) of its own size; over 50 steps these add up to
# well under 50 * 4 ulp = 2.4e-5 of the parameters' scale, and the moments (computed by the
# same lerp/addcmul in both) stay within a few ulp. 1e-5 leaves a margin without being loose
# enough to hide a wrong formula (a wrong bias correction or eps placement is >= 1e-3 here).
FLOAT32_REL_TOL = 1e-5


@pytest.mark.parametrize(("config_name", "kwargs"), [
    ("sgd", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("radam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
], ids=["sgd", "adam", "adamw", "radam"])
def test_open_loop_float32_matches_torch(config_name, kwargs):
    """float32 params and gradients: params and moments within FLOAT32_REL_TOL, dtype kept."""
    run_open_loop(config_name, kwargs, 1.0, torch.float32, FLOAT32_REL_TOL)


# --------------------------------------------------------------------------- torch.compile

def test_compiled_update_matches_eager(fresh_dynamo):
    """A ``torch.compile``d holotx step (AdamW + amsgrad, float64) equals the eager one to
    1e-12 every step. The compiler may fuse and reorder float64 arithmetic, which moves
    results by a few ulp per step, hence the same REL_TOL and not bitwise equality."""
    tx = holotx.adamw(lr=1e-2, weight_decay=0.1, amsgrad=True)
    p0 = initial_params(torch.float64)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return holotx.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    eager_p, comp_p = dict(p0), {k: v.clone() for k, v in p0.items()}
    eager_s, comp_s = tx.init(eager_p), tx.init(comp_p)
    gen = torch.Generator().manual_seed(5)
    check = Checker(REL_TOL)
    for i in range(4):
        grads = open_loop_grads(gen, i, 1.0, torch.float64)
        eager_p, eager_s = step(grads, eager_s, eager_p)
        comp_p, comp_s = compiled(grads, comp_s, comp_p)
        for k in p0:
            check.close(f"param {k!r}", comp_p[k], eager_p[k], i + 1)
        (ea,), (ca,) = find_states(eager_s, ScaleByAdamState), find_states(comp_s, ScaleByAdamState)
        for k in p0:
            assert int(ca.count[k]) == int(ea.count[k]) == i + 1
        for field in ("mu", "nu", "nu_max"):
            for k in p0:
                check.close(f"{field} {k!r}", getattr(ca, field)[k], getattr(ea, field)[k], i + 1)


# --------------------------------------------------------------------------- schedules

def test_scheduled_adamw_matches_torch_lambdalr():
    """``adamw(lr=linear_schedule(...))`` equals torch AdamW driven by ``LambdaLR``.

    Offsets: holotx evaluates ``schedule(count)`` with ``count`` = steps already taken, so
    its k-th update (0-based) uses ``schedule(k)``; torch's scheduler is stepped *after*
    ``optimizer.step()``, so its k-th step uses ``base_lr * lambda(k)`` with
    ``lambda(k) = schedule(k) / base_lr``. The two sequences agree to a rounding of that
    division (~1e-16), and the run agrees to REL_TOL; the schedule ends at step 30 < 50, so
    both the transition and the constant tail are covered.
    """
    base_lr, end_lr, transition = 1e-2, 1e-3, 30
    schedule = holotx.linear_schedule(base_lr, end_lr, transition)
    kwargs = dict(betas=(0.9, 0.99), weight_decay=0.1)
    tx = holotx.adamw(lr=schedule, **kwargs)

    p0 = initial_params(torch.float64)
    tparams = {k: nn.Parameter(v.clone()) for k, v in p0.items()}
    opt = torch.optim.AdamW(list(tparams.values()), lr=base_lr, foreach=False, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: schedule(k) / base_lr)
    params = {k: v.clone() for k, v in p0.items()}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(7)
    check = Checker(REL_TOL)
    for step in range(STEPS):
        torch_lr = opt.param_groups[0]["lr"]
        assert abs(torch_lr - schedule(step)) <= 1e-15 * schedule(step), "lr sequences line up"
        (sched_state,) = find_states(state, ScaleByScheduleState)
        assert int(sched_state.count) == step, "holotx evaluates the schedule at steps taken"
        grads = open_loop_grads(gen, step, 1.0, torch.float64)
        for k, tp in tparams.items():
            tp.grad = grads[k].clone()
        opt.step()
        sched.step()
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        compare_with_torch(check, step + 1, "adamw", params, state, tparams, opt)


# ----------------------------------------------------------------- gradients that are sometimes None

@pytest.mark.parametrize(("name", "holotx_tx", "torch_opt"), [
    ("adam", lambda: holotx.adam(1e-2, weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)),
    ("radam", lambda: holotx.radam(1e-2), lambda ps: torch.optim.RAdam(ps, lr=1e-2)),
    ("sgd-dampening", lambda: holotx.sgd(1e-2, momentum=0.9, dampening=0.5),
     lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.5)),
])
def test_a_leaf_without_gradient_is_skipped_as_torch_skips_it(name, holotx_tx, torch_opt):
    """torch.optim skips a parameter whose ``.grad`` is None: no update, no state change,
    its ``step`` does not advance, so its bias correction (and SGD's first-buffer rule)
    later runs on its own count. holotx keeps a count per leaf and must match, float64,
    20 steps, with ``rare`` given a gradient only on steps 3, 4, 9 and 15."""
    gen = torch.Generator().manual_seed(7)
    params = {"often": torch.randn(4, 3, generator=gen, dtype=torch.float64),
              "rare": torch.randn(5, generator=gen, dtype=torch.float64)}
    tparams = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch_opt(list(tparams.values()))
    tx = holotx_tx()
    state = tx.init(params)
    for step in range(1, 21):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
        if step not in (3, 4, 9, 15):
            grads["rare"] = None
        for k, tp in tparams.items():
            tp.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        for k, tp in tparams.items():
            torch.testing.assert_close(params[k], tp.detach(), rtol=REL_TOL, atol=1e-14,
                                       msg=f"{name} step {step}: param {k!r}")
