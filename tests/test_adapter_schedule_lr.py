"""A holotx schedule as the ``lr`` of :class:`holotx.adapters.TransformOptimizer`.

The rule: ``group["lr"]`` is at every moment the float the group's next step uses,
``lr_schedule(lr_count) * lr_scale``; a torch LR scheduler on top composes with the
schedule (it changes ``lr_scale``) instead of replacing it; a checkpoint keeps the count and
the scale (not the schedule), saves with ``torch.save``, loads with
``torch.load(weights_only=True)`` and resumes bit for bit; a checkpoint whose kind of lr
(schedule or number) contradicts the optimizer's is refused.

References: the functional API (``make_step(holotx.adamw(lr=schedule), donate=True)``, or
the factory rebuilt each step with the learning rates the adapter used), and the same
scheduler on ``torch.optim.SGD(lr=1)``, whose learning rates are the scheduler's
multipliers.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch.optim import lr_scheduler as lrs

import holotx
from holotx import executor
from holotx.adapters import LAMB, Lookahead, TransformOptimizer, create_optimizer
from holotx.base import apply_updates
from holotx.flat import make_step

F64 = torch.float64
SHAPES = [(4, 3), (3,)]
STEPS = 14

WARMUP_COSINE = holotx.warmup_cosine_decay_schedule(0.0, 0.1, 3, 30, end_value=0.01)  # 0 at count 0
SCHEDULES = {
    "warmup_cosine": WARMUP_COSINE,
    "cosine": holotx.cosine_decay_schedule(0.05, 20, alpha=0.1),
    "exponential": holotx.exponential_decay(0.02, 3, 0.7, staircase=True),
    "piecewise": holotx.piecewise_constant_schedule(0.03, {4: 0.5, 9: 0.0}),  # 0 from count 9
}


# -- helpers --------------------------------------------------------------------------------


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in SHAPES]


def grads_at(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return [torch.randn(s, generator=g, dtype=F64) for s in SHAPES]


def set_grads(params: list[torch.Tensor], k: int) -> None:
    for p, g in zip(params, grads_at(k)):
        p.grad = g.clone()


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max().item()


def scheduler_step(sched: Any, k: int) -> None:
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(PLATEAU_METRICS[k])
    elif sched is not None:
        sched.step()


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], sched: Any,
        steps: range) -> list[list[float]]:
    """``opt.step()`` then ``sched.step()`` over ``steps``; per step, the groups' lr before
    it (what a monitor would log). Checks on the way that ``get_last_lr()`` is the groups'
    lr, and that torch sees the calls in the right order."""
    used = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in steps:
            used.append([float(g["lr"]) for g in opt.param_groups])
            set_grads(params, k)
            opt.step()
            scheduler_step(sched, k)
            if sched is not None:
                assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
    order = [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert not order, order[0].message
    return used


def functional_run(factory: Callable[..., Any], base: dict[str, Any], used: list[list[float]],
                   steps: range, seed: int = 0) -> list[torch.Tensor]:
    """The functional API, the factory rebuilt at each step with the lr the adapter's group
    used (one group), its state carried; updates applied as the adapter does."""
    params = [p.detach().clone() for p in make_params(seed)]
    state = factory(lr=used[0][0], **base).init(params)
    for k, lrs_k in zip(steps, used):
        tx = factory(lr=lrs_k[0], **base)
        updates, state, factor, _ = executor.run(tx, grads_at(k), state, params, hand_over_scale=True)
        params = apply_updates(params, updates, scale=factor)
    return params


def multipliers(make_sched: Callable[[torch.optim.Optimizer], Any], steps: range) -> list[float]:
    """The scheduler's multipliers: its learning rates on ``torch.optim.SGD(lr=1)``."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_sched(opt)
    out = []
    for k in steps:
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros(1)
        opt.step()
        scheduler_step(sched, k)
    return out


def plain(value: Any) -> bool:
    """Whether ``value`` holds only what ``torch.load(weights_only=True)`` reads back as it
    is: tensors, plain numbers, strings, None and containers of them."""
    if isinstance(value, dict):
        return all(plain(k) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor) or type(value) in (bool, int, float, str)


def saved(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def groups_view(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()} for g in opt.param_groups]


def state_view(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def assert_state_equal(opt: torch.optim.Optimizer, view: dict[int, dict[str, torch.Tensor]]) -> None:
    assert state_view(opt).keys() == view.keys()
    for key, entry in state_view(opt).items():
        assert entry.keys() == view[key].keys()
        assert all(torch.equal(entry[k], view[key][k]) for k in entry)


# -- 1. the lr is the float the next step uses -------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("factory", [holotx.adamw, holotx.sgd, holotx.lamb], ids=["adamw", "sgd", "lamb"])
def test_lr_is_the_schedule_value_the_next_step_uses(name, factory):
    """Before every step ``group["lr"]`` is the float ``schedule(count)`` (bit for bit), with
    ``lr_count`` the steps taken; the params equal, bit for bit, the functional donated
    loop of ``factory(lr=schedule)``."""
    schedule = SCHEDULES[name]
    params = make_params()
    opt = TransformOptimizer(params, factory, lr=schedule)
    ref = snapshot(params)
    tx = factory(lr=schedule)
    state, step = tx.init(ref), make_step(tx, donate=True)
    for k in range(STEPS):
        group = opt.param_groups[0]
        assert isinstance(group["lr"], float)
        assert float(group["lr"]) == schedule(k)
        assert (group["lr_schedule"], group["lr_count"], group["lr_scale"]) == (schedule, k, 1.0)
        set_grads(params, k)
        opt.step()
        ref, state = step(ref, grads_at(k), state)
        assert_same(snapshot(params), ref)


def test_transform_built_optimizer_takes_a_schedule_lr():
    """Built from a transform, the group's lr multiplies its updates: a schedule there is
    the functional ``chain(..., scale_by_lr(schedule))``, bit for bit."""
    params = make_params()
    tx = holotx.chain(holotx.scale_by_adam(), holotx.scale(-1.0))
    opt = TransformOptimizer(params, tx, lr=WARMUP_COSINE)
    ref = snapshot(params)
    tx = holotx.chain(holotx.scale_by_adam(), holotx.scale_by_lr(WARMUP_COSINE))
    state, step = tx.init(ref), make_step(tx, donate=True)
    for k in range(8):
        assert opt.param_groups[0]["lr"] == WARMUP_COSINE(k)
        set_grads(params, k)
        opt.step()
        ref, state = step(ref, grads_at(k), state)
        assert_same(snapshot(params), ref)


def test_groups_count_their_own_steps():
    """Each group has its own count (a group added later starts at 0; one whose params
    have no gradient does not step, so does not count), and may have a number lr."""
    params = make_params()
    opt = TransformOptimizer([{"params": params[:1]}, {"params": params[1:], "lr": 0.01}], holotx.adamw,
                             lr=WARMUP_COSINE)
    assert ["lr_schedule" in g for g in opt.param_groups] == [True, False]
    for k in range(3):
        set_grads(params, k)
        opt.step()
    extra = torch.zeros(2, dtype=F64, requires_grad=True)
    opt.add_param_group({"params": [extra]})
    params[0].grad = None
    params[1].grad = grads_at(3)[1]
    extra.grad = torch.ones(2, dtype=F64)
    opt.step()
    g0, g1, g2 = opt.param_groups
    assert (g0["lr_count"], g0["lr"]) == (3, WARMUP_COSINE(3))
    assert g1["lr"] == 0.01
    assert "lr_count" not in g1
    assert (g2["lr_count"], g2["lr"]) == (1, WARMUP_COSINE(1))


def test_monitor_reads_the_lr_each_step_uses():
    """A monitor in the manner of Lightning's ``LearningRateMonitor`` reads
    ``float(group["lr"])`` between steps; it logs the learning rates the steps use (those
    of a functional run rebuilt with them gives the same params), and they serialize as
    numbers."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    sched = lrs.StepLR(opt, step_size=4, gamma=0.5)
    logged: list[dict[str, float]] = []
    used = []
    for k in range(STEPS):
        logged.append({f"lr-AdamW/pg{i}": float(g["lr"]) for i, g in enumerate(opt.param_groups)})
        used.append([opt.param_groups[0]["lr"]])
        set_grads(params, k)
        opt.step()
        sched.step()
    assert json.loads(json.dumps(logged)) == logged
    assert [entry["lr-AdamW/pg0"] for entry in logged] == [u[0] for u in used]
    assert logged[5]["lr-AdamW/pg0"] == pytest.approx(WARMUP_COSINE(5) * 0.5, rel=1e-15)
    assert_same(snapshot(params), functional_run(holotx.adamw, {}, used, range(STEPS)))


# -- 2. torch's schedulers compose with the schedule --------------------------------------


PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6, 0.6]


def _lambda_09(epoch: int) -> float:
    return 0.9 ** epoch


def _hf_linear_with_warmup(epoch: int) -> float:
    """Hugging Face's ``get_linear_schedule_with_warmup`` (2 warmup, 16 training steps)."""
    if epoch < 2:
        return float(epoch) / 2
    return max(0.0, float(16 - epoch) / 14)


COMPOSING: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, _lambda_09),
    "LambdaLR-hf-linear-warmup": lambda o: lrs.LambdaLR(o, _hf_linear_with_warmup),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda epoch: 0.95),
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=6),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=8, power=2.0),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=5),  # 0 at epoch 5, and back
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=4), lrs.ExponentialLR(o, gamma=0.9)],
        milestones=[4]),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=3), lrs.ExponentialLR(o, gamma=0.9)], optimizer=o),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1),
}

# Schedulers that compute learning rates of their own: each value they write is the next
# step's, as on any optimizer (they drive the lr; the schedule only moves it between writes).
ABSOLUTE: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=False),
    "CosineAnnealingWarmRestarts-eta_min": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=1e-3),
}


@pytest.mark.parametrize("schedule_name", ["warmup_cosine", "cosine"])
@pytest.mark.parametrize("sched_name", list(COMPOSING))
def test_scheduler_multiplies_the_schedule(sched_name, schedule_name):
    """Under each torch scheduler that scales the learning rate, the lr of step ``t`` is
    ``schedule(t)`` times the scheduler's multiplier at ``t`` (its lr on ``SGD(lr=1)``), a
    warmup from 0 included (the multiplier is carried where the value is 0); each step
    uses ``group["lr"]`` (the params equal, bit for bit, the functional run rebuilt with
    those values); and ``get_last_lr()`` is ``group["lr"]`` after every scheduler step."""
    schedule = SCHEDULES[schedule_name]
    make = COMPOSING[sched_name]
    steps = range(STEPS)
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=schedule)
    used = run(opt, params, make(opt), steps)
    factors = multipliers(make, steps)
    assert len(set(factors)) > 1, "the scheduler never changed anything"
    for k, (lr, factor) in enumerate(zip(used, factors)):
        assert lr[0] == pytest.approx(schedule(k) * factor, rel=1e-14, abs=0), k
    assert_same(snapshot(params), functional_run(holotx.adamw, {}, used, steps))


@pytest.mark.parametrize("sched_name", list(ABSOLUTE))
def test_scheduler_with_learning_rates_of_its_own_drives_the_lr(sched_name):
    """``CyclicLR``, ``OneCycleLR``, a cosine with ``eta_min > 0`` compute learning rates,
    not multiples: the steps use exactly those torch.optim.AdamW (whose lr is the
    schedule's first value, the cosine's base) gets from them."""
    make = ABSOLUTE[sched_name]
    steps = range(STEPS)
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    used = run(opt, params, make(opt), steps)
    twin = torch.optim.AdamW(make_params(), lr=WARMUP_COSINE(0))
    twin_used = run(twin, twin.param_groups[0]["params"], make(twin), steps)
    assert used == twin_used
    assert_same(snapshot(params), functional_run(holotx.adamw, {}, used, steps))


@pytest.mark.parametrize("lam", [lambda epoch: 1, lambda epoch: 1.0], ids=["int", "float"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lambda_lr_of_one_changes_nothing(name, lam):
    """``LambdaLR(opt, lambda epoch: 1)`` (Hugging Face's ``constant`` scheduler): the
    learning rates and the params are those of the run without it, bit for bit."""
    schedule = SCHEDULES[name]
    params, bare_params = make_params(), make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=schedule)
    bare = TransformOptimizer(bare_params, holotx.adamw, lr=schedule)
    used = run(opt, params, lrs.LambdaLR(opt, lam), range(STEPS))
    bare_used = run(bare, bare_params, None, range(STEPS))
    assert used == bare_used
    assert_same(snapshot(params), snapshot(bare_params))
    assert opt.param_groups[0]["lr_scale"] == 1.0


def test_step_lr_matches_the_product_schedule():
    """``StepLR(step_size=4, gamma=0.5)`` on ``schedule``: the params equal, bit for bit,
    the functional ``adamw(lr=product)`` where ``product(t) = schedule(t) * 0.5 ** (t // 4)``
    (the power taken by repeated multiplication, as the scheduler does)."""

    def product(count: Any) -> Any:
        scale = 1.0
        for _ in range(int(count) // 4):
            scale = scale * 0.5
        return WARMUP_COSINE(count) * scale

    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    sched = lrs.StepLR(opt, step_size=4, gamma=0.5)
    ref = snapshot(params)
    tx = holotx.adamw(lr=product)
    state, step = tx.init(ref), make_step(tx, donate=True)
    for k in range(STEPS):
        assert opt.param_groups[0]["lr"] == product(k)
        set_grads(params, k)
        opt.step()
        sched.step()
        ref, state = step(ref, grads_at(k), state)
        assert_same(snapshot(params), ref)
    assert opt.param_groups[0]["lr_scale"] == 0.5 ** 3


# -- 3. writing the group ------------------------------------------------------------------------


def test_a_number_written_is_the_next_lr_and_the_schedule_goes_on_from_it():
    """``group["lr"] = x`` (by hand, or ``ReduceLROnPlateau``): the next step uses ``x``
    exactly, and ``lr_scale`` becomes ``x / schedule(count)``, so the steps after follow
    the schedule from there."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    for k in range(4):
        set_grads(params, k)
        opt.step()
    group = opt.param_groups[0]
    group["lr"] = 0.02
    used = []
    for k in range(4, 8):
        used.append(group["lr"])
        set_grads(params, k)
        opt.step()
        if k == 4:
            assert group["lr_scale"] == 0.02 / WARMUP_COSINE(4)
    assert used[0] == 0.02
    assert used[1:] == [WARMUP_COSINE(k) * (0.02 / WARMUP_COSINE(4)) for k in range(5, 8)]


def test_writes_to_scale_count_and_schedule_are_read_at_the_next_step():
    """``lr_scale``, ``lr_count`` and ``lr_schedule`` may be set; ``lr`` follows at the
    next step (or ``state_dict()``). A schedule written to ``lr`` replaces the schedule,
    the count and the scale going on."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.sgd, lr=WARMUP_COSINE)
    group = opt.param_groups[0]
    group["lr_scale"] = 2.0
    group["lr_count"] = 5
    assert opt.state_dict()["param_groups"][0]["lr"] == WARMUP_COSINE(5) * 2.0
    assert group["lr"] == WARMUP_COSINE(5) * 2.0
    other = holotx.constant_schedule(0.3)
    group["lr"] = other
    opt.state_dict()
    assert (group["lr_schedule"], group["lr_count"], group["lr"]) == (other, 5, 0.6)
    group.update(lr_count=0, lr_scale=1.0)
    before = snapshot(params)
    set_grads(params, 0)
    opt.step()
    assert (group["lr_count"], group["lr"]) == (1, 0.3)
    assert_same(snapshot(params), [torch.add(b, g, alpha=-0.3) for b, g in zip(before, grads_at(0))])


def test_a_number_written_where_the_schedule_is_zero_is_used_once():
    """At a count where the schedule's value is 0, no scale gives the number written: the
    next step uses it, and the scale stays (``lr_scale`` itself can always be set)."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    group = opt.param_groups[0]
    group["lr"] = 0.01
    before = snapshot(params)
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    used: list[float] = []
    set_grads(params, 0)
    opt.step()
    assert used == [0.01]
    assert (group["lr"], group["lr_scale"]) == (WARMUP_COSINE(1), 1.0)
    assert not torch.equal(params[0].detach(), before[0])


def test_a_schedule_assigned_to_a_number_group_starts_at_count_0():
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=0.01)
    for k in range(3):
        set_grads(params, k)
        opt.step()
    opt.param_groups[0]["lr"] = WARMUP_COSINE
    set_grads(params, 3)
    opt.step()
    group = opt.param_groups[0]
    assert (group["lr_schedule"], group["lr_count"], group["lr"]) == (WARMUP_COSINE, 1, WARMUP_COSINE(1))


# -- 4. checkpoints, copies ------------------------------------------------------------------------


RESUMED: dict[str, Callable[[torch.optim.Optimizer], Any] | None] = {
    "none": None,
    "StepLR": COMPOSING["StepLR"],
    "LambdaLR-hf-linear-warmup": COMPOSING["LambdaLR-hf-linear-warmup"],
    "SequentialLR": COMPOSING["SequentialLR"],
    "ReduceLROnPlateau": COMPOSING["ReduceLROnPlateau"],
    "OneCycleLR": ABSOLUTE["OneCycleLR"],
}


@pytest.mark.parametrize("factory", [holotx.adamw, holotx.sgd], ids=["adamw", "sgd"])
@pytest.mark.parametrize("sched_name", list(RESUMED))
def test_checkpoint_loads_weights_only_and_resumes_bit_for_bit(sched_name, factory):
    """Stop after 5 steps; ``torch.save`` the optimizer's and the scheduler's state dicts
    and ``torch.load`` them with ``weights_only=True``; build a fresh optimizer (another
    lr scale) and scheduler, load both (in Hugging Face's order: both built first); go on:
    the learning rates and the params are those of the uninterrupted run, bit for bit."""
    make = RESUMED[sched_name]
    base = {"momentum": 0.9} if factory is holotx.sgd else {}

    def build(params):
        opt = TransformOptimizer(params, factory, lr=WARMUP_COSINE, **base)
        return opt, (make(opt) if make is not None else None)

    full_params = make_params()
    full, full_sched = build(full_params)
    full_used = run(full, full_params, full_sched, range(10))

    params = make_params()
    opt, sched = build(params)
    run(opt, params, sched, range(5))
    opt_sd = saved(opt.state_dict())
    sched_sd = saved(sched.state_dict()) if sched is not None else None
    assert plain(opt_sd)

    resumed_params = snapshot(params)
    for p in resumed_params:
        p.requires_grad_()
    resumed, resumed_sched = build(resumed_params)
    resumed.param_groups[0]["lr_scale"] = 3.0  # overwritten by the checkpoint
    resumed.load_state_dict(opt_sd)
    if resumed_sched is not None:
        resumed_sched.load_state_dict(sched_sd)
    assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    used = run(resumed, resumed_params, resumed_sched, range(5, 10))
    assert used == full_used[5:]
    assert_same(snapshot(resumed_params), snapshot(full_params))


def test_checkpoint_holds_the_count_and_scale_and_describes_the_schedule():
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    sched = lrs.StepLR(opt, step_size=2, gamma=0.5)
    run(opt, params, sched, range(3))
    group = opt.state_dict()["param_groups"][0]
    assert group["lr_schedule"] == repr(WARMUP_COSINE)
    assert group["lr_schedule"].startswith("holotx.warmup_cosine_decay_schedule(")
    assert (group["lr_count"], group["lr_scale"]) == (3, 0.5)
    assert type(group["lr"]) is float
    assert group["lr"] == opt.param_groups[0]["lr"]
    assert (group["initial_lr"], group["initial_lr_scale"]) == (0.0, 1.0)
    assert type(group["initial_lr"]) is float
    assert plain(opt.state_dict())
    assert isinstance(opt.param_groups[0]["lr_schedule"], type(WARMUP_COSINE))  # the live group keeps it


def test_user_schedule_function_is_described_by_name():
    params = make_params()
    opt = TransformOptimizer(params, holotx.sgd, lr=_lambda_09)
    assert opt.state_dict()["param_groups"][0]["lr_schedule"] == f"{__name__}._lambda_09"
    assert opt.param_groups[0]["lr"] == 1.0


def test_loading_with_another_schedule_applies_it_at_once():
    """The checkpoint keeps the count and the scale, not the schedule: loaded into an
    optimizer with another schedule, the next step uses that schedule at the count."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    run(opt, params, None, range(4))
    other = holotx.cosine_decay_schedule(0.05, 100)
    fresh = TransformOptimizer(make_params(), holotx.adamw, lr=other)
    fresh.load_state_dict(saved(opt.state_dict()))
    group = fresh.param_groups[0]
    assert (group["lr_schedule"], group["lr_count"], group["lr"]) == (other, 4, other(4))


@pytest.mark.parametrize("direction", ["number-into-schedule", "schedule-into-number"])
def test_a_checkpoint_whose_lr_kind_contradicts_the_optimizer_is_refused(direction):
    """A number-lr checkpoint would silently replace the schedule (and a schedule one
    would leave a number optimizer without it): ``ValueError`` naming the group and what
    differs, with the optimizer as it was."""
    numbered = direction == "number-into-schedule"
    src_params, params = make_params(), make_params()
    src = TransformOptimizer(src_params, holotx.adamw, lr=0.01 if numbered else WARMUP_COSINE)
    run(src, src_params, None, range(2))
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE if numbered else 0.01)
    run(opt, params, None, range(3))
    before, state = groups_view(opt), state_view(opt)
    match = "checkpoint's lr is a number" if numbered else "checkpoint's lr is a schedule"
    with pytest.raises(ValueError, match=f"param group 0: the {match}"):
        opt.load_state_dict(saved(src.state_dict()))
    assert groups_view(opt) == before
    assert_state_equal(opt, state)


@pytest.mark.parametrize(("key", "value"), [
    ("lr_count", -1), ("lr_count", 1.5), ("lr_count", True), ("lr_scale", -0.5), ("lr_scale", math.nan),
    ("lr_scale", "1"), ("lr", -0.1), ("lr", math.inf), ("lr", "0.1"), ("lr_schedule", 3),
    ("initial_lr_scale", -1.0),
])
def test_a_bad_schedule_group_in_a_checkpoint_is_refused(key, value):
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    lrs.LambdaLR(opt, _lambda_09)
    run(opt, params, None, range(2))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][key] = value
    before, state = groups_view(opt), state_view(opt)
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(sd)
    assert groups_view(opt) == before
    assert_state_equal(opt, state)


def test_a_schedule_object_in_a_checkpoint_is_refused():
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = WARMUP_COSINE
    with pytest.raises(ValueError, match="holds a schedule object"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("sched_name", ["StepLR", "LambdaLR-hf-linear-warmup"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_go_on_identically(how, sched_name):
    """``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole optimizer and its
    scheduler (the schedule with them): the copy's learning rates (as monitors read them)
    and params are the original's."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    sched = COMPOSING[sched_name](opt)
    run(opt, params, sched, range(4))
    if how == "deepcopy":
        params2, opt2, sched2 = copy.deepcopy((params, opt, sched))
    elif how == "pickle":
        params2, opt2, sched2 = pickle.loads(pickle.dumps((params, opt, sched)))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt, sched), buffer)
        buffer.seek(0)
        params2, opt2, sched2 = torch.load(buffer, weights_only=False)
    assert opt2.param_groups[0]["lr_schedule"] is not WARMUP_COSINE
    used = run(opt, params, sched, range(4, 10))
    used2 = run(opt2, params2, sched2, range(4, 10))
    assert used == used2
    assert_same(snapshot(params), snapshot(params2))
    assert pickle.loads(pickle.dumps(opt.param_groups[0]))["lr"].scale == opt.param_groups[0]["lr"].scale


def test_the_lr_is_a_float_and_arithmetic_on_a_kept_value_is_plain():
    """Between steps ``group["lr"]`` is a float (a subclass that carries ``lr_scale``);
    arithmetic on a value read earlier is the float arithmetic (only a scheduler's base
    follows the schedule)."""
    params = make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE)
    run(opt, params, None, range(2))
    kept = opt.param_groups[0]["lr"]
    assert isinstance(kept, float)
    assert kept == WARMUP_COSINE(2)
    run(opt, params, None, range(2, 5))
    assert kept * 2 == float(kept) * 2
    assert kept / 4 == float(kept) / 4


def test_arithmetic_on_the_lr():
    """``group["lr"]`` times or over a number, plus or minus another such lr, stands for a
    multiple of the schedule (its ``scale``); other arithmetic is plain float arithmetic."""
    opt = TransformOptimizer(make_params(), holotx.adamw, lr=SCHEDULES["cosine"])
    lr = opt.param_groups[0]["lr"]
    assert (lr * 0.5).scale == 0.5
    assert (0.5 * lr).scale == 0.5
    assert (lr / 4).scale == 0.25
    assert (lr + lr * 2).scale == 3.0
    assert (lr - lr / 2).scale == 0.5
    assert (lr + 0).scale == 1.0
    assert float(lr * 0.5) == float(lr) * 0.5
    for plain_result in (lr + 1e-3, lr - 1e-3, lr ** 2, -lr, 1e-3 - lr, lr * torch.tensor(2.0)):
        assert not isinstance(plain_result, type(lr))
    assert pickle.loads(pickle.dumps(lr * 0.5)).scale == 0.5


# -- 5. errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [lambda count: -0.1, lambda count: math.nan, lambda count: "0.1"],
                         ids=["negative", "nan", "string"])
def test_a_bad_schedule_raises_at_construction_naming_lr(bad):
    params = make_params()
    with pytest.raises(ValueError, match="lr"):
        TransformOptimizer(params, holotx.adamw, lr=bad)
    opt = TransformOptimizer(params[:1], holotx.adamw, lr=0.01)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": params[1:], "lr": bad})
    assert len(opt.param_groups) == 1


def test_a_schedule_that_goes_bad_raises_at_that_step_before_any_change():
    """The next lr is published after each step; a schedule invalid at the next count
    leaves ``group["lr"]`` NaN, and the step at that count raises ``ValueError`` naming
    lr with every group and the state as they were (the functional API raises at the
    same step)."""

    def schedule(count):
        return 0.01 if int(count) < 3 else -1.0

    params = make_params()
    opt = TransformOptimizer([{"params": params[:1], "lr": 0.01}, {"params": params[1:]}], holotx.adamw,
                             lr=schedule)
    run(opt, params, None, range(3))
    assert math.isnan(opt.param_groups[1]["lr"])
    values, before, state = snapshot(params), groups_view(opt), state_view(opt)
    set_grads(params, 3)
    with pytest.raises(ValueError, match="lr schedule returned"):
        opt.step()
    assert_same(snapshot(params), values)
    assert_state_equal(opt, state)
    assert groups_view(opt)[0] == before[0]


@pytest.mark.parametrize(("key", "value"), [("lr_count", -1), ("lr_scale", math.nan), ("lr_schedule", 3),
                                            ("lr", "fast")])
def test_a_bad_value_written_raises_at_the_next_step_before_any_group_steps(key, value):
    params = make_params()
    opt = TransformOptimizer([{"params": params[:1]}, {"params": params[1:]}], holotx.adamw, lr=WARMUP_COSINE)
    run(opt, params, None, range(2))
    opt.param_groups[1][key] = value  # left as written
    values, state = snapshot(params), state_view(opt)
    set_grads(params, 2)
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert_same(snapshot(params), values)
    assert_state_equal(opt, state)
    assert opt.param_groups[0]["lr_count"] == 2


@pytest.mark.parametrize(("value", "message"), [
    (math.inf, "lr must be finite"), (-1.0, "lr must be >= 0"), (math.nan, "lr must not be NaN"),
    (torch.tensor([-1.0]), "lr must be >= 0"), (True, "lr must be a number"),
], ids=["inf", "negative", "nan", "negative-tensor", "bool"])
def test_a_bad_lr_number_written_over_a_schedule_is_refused_as_every_lr(value, message):
    """A number written as a schedule group's lr is checked by the check every lr takes,
    with its message, before any group steps."""
    params = make_params()
    opt = TransformOptimizer([{"params": params[:1]}, {"params": params[1:]}], holotx.adamw, lr=WARMUP_COSINE)
    run(opt, params, None, range(2))
    opt.param_groups[1]["lr"] = value
    values, state = snapshot(params), state_view(opt)
    set_grads(params, 2)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_same(snapshot(params), values)
    assert_state_equal(opt, state)


@pytest.mark.parametrize("format", ["torch", "holocron"])
def test_foreign_formats_refuse_a_schedule(format):
    factory = holotx.adamw if format == "torch" else holotx.lamb
    opt = TransformOptimizer(make_params(), factory, lr=WARMUP_COSINE)
    with pytest.raises(ValueError, match="lr of param group 0 is a holotx schedule"):
        opt.state_dict(format=format)


# -- 6. around the adapter: drop-in classes, create_optimizer, Lookahead --------------------


def test_drop_in_class_registry_and_lookahead_take_a_schedule():
    """``LAMB(params, lr=schedule)``, ``create_optimizer(model, ..., lr=schedule)`` (two
    groups, each counting) and a ``Lookahead`` around them: same learning rates, and the
    Lookahead checkpoint round trip (weights only) resumes bit for bit."""
    model = torch.nn.Linear(3, 2).double()
    opt = create_optimizer(model, "lamb", lr=WARMUP_COSINE, weight_decay=0.01)
    assert [g["lr_count"] for g in opt.param_groups] == [0, 0]
    drop_in = LAMB(make_params(), lr=WARMUP_COSINE)
    assert drop_in.param_groups[0]["lr"] == WARMUP_COSINE(0)

    def build(params):
        la = Lookahead(TransformOptimizer(params, holotx.adamw, lr=WARMUP_COSINE), sync_period=3)
        return la, lrs.StepLR(la, step_size=2, gamma=0.5)

    full_params = make_params()
    full, full_sched = build(full_params)
    full_used = run(full, full_params, full_sched, range(8))
    params = make_params()
    la, sched = build(params)
    run(la, params, sched, range(4))
    sd, sched_sd = saved(la.state_dict()), saved(sched.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed, resumed_sched = build(resumed_params)
    resumed.load_state_dict(sd)
    resumed_sched.load_state_dict(sched_sd)
    assert run(resumed, resumed_params, resumed_sched, range(4, 8)) == full_used[4:]
    assert_same(snapshot(resumed_params), snapshot(full_params))


# -- 7. compiled steps ------------------------------------------------------------------------------


def test_fused_step_takes_the_schedule_without_recompiling():
    """``fused=True``: the schedule's values enter the compiled step as 0-d tensors (one
    compile for every lr), and the params equal the unfused run's to 1e-13."""
    schedule = SCHEDULES["cosine"]
    params, ref_params = make_params(), make_params()
    fused = TransformOptimizer(params, holotx.adamw, lr=schedule, fused=True)
    plain_opt = TransformOptimizer(ref_params, holotx.adamw, lr=schedule)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        used = run(fused, params, None, range(5))
    assert used == run(plain_opt, ref_params, None, range(5))
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-13)


def test_compiled_step_reads_the_schedule_outside_the_graph():
    """``torch.compile(opt.step)`` with a schedule and a scheduler: no recompile as the lr
    moves; the params equal the eager run's to 1e-13."""
    schedule = SCHEDULES["cosine"]
    params, ref_params = make_params(), make_params()
    opt = TransformOptimizer(params, holotx.adamw, lr=schedule)
    eager = TransformOptimizer(ref_params, holotx.adamw, lr=schedule)
    sched, eager_sched = lrs.StepLR(opt, 2, 0.5), lrs.StepLR(eager, 2, 0.5)
    torch._dynamo.reset()
    step = torch.compile(opt.step)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(5):
            for ps in (params, ref_params):
                set_grads(ps, k)
            step()
            eager.step()
            sched.step()
            eager_sched.step()
            assert opt.param_groups[0]["lr"] == eager.param_groups[0]["lr"]
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-13)
