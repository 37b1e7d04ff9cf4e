"""Specification of ``inject_hyperparams``: hyperparameters as state.

``inject_hyperparams(factory)(**kwargs)`` behaves as ``factory(**kwargs)`` while keeping the
numeric hyperparameters in ``state.hyperparams`` as 0-d tensors (float64 by default), so they
can be read, edited between steps, batched with ``vmap`` and differentiated.

Tolerances: the injected transform runs the same formulas with 0-d float64 tensors where the
plain one has Python floats; some ops then take a per-leaf path instead of a foreach kernel
(e.g. ``x + y * a`` instead of ``x.add(y, alpha=a)``), which may round differently by an ulp,
so injected vs. plain (and vmapped vs. separate) runs are compared to ``REL_TOL = 1e-12``
relative (norm-wise per tensor: 20 steps of ulp-level differences stay far below it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import holotx
from holotx import InjectHyperparamsState
from holotx import transforms as T
from holotx.tree import flatten

F64 = torch.float64
REL_TOL = 1e-12
TREE_FLOOR = 1e-3  # a leaf is compared at least at 1e-3 of the tree's largest magnitude
STEPS = 20


def params_tree(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(4, 3, generator=g, dtype=F64), "b1": torch.randn(4, generator=g, dtype=F64),
            "w2": torch.randn(1, 4, generator=g, dtype=F64), "scale": torch.randn(1, generator=g, dtype=F64)}


def grad_stream(n: int, seed: int = 1) -> list[dict]:
    return [params_tree(seed + 100 * i) for i in range(n)]


def assert_trees_close(a: Any, b: Any, rtol: float = REL_TOL) -> None:
    """Each leaf within ``rtol`` of its largest magnitude, with an absolute floor of
    ``rtol * TREE_FLOOR`` times the largest magnitude in the tree (the data's scale)."""
    la, sa = flatten(a)
    lb, sb = flatten(b)
    assert sa == sb
    data_scale = max((y.abs().max().item() for y in lb if y.numel()), default=0.0)
    for x, y in zip(la, lb):
        assert x.shape == y.shape
        assert x.dtype == y.dtype
        err = (x - y).abs().max().item()
        bound = rtol * max(y.abs().max().item(), TREE_FLOOR * data_scale, 1e-300)
        assert err <= bound, f"relative error {err:.3e}"


def run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = holotx.apply_updates(params, u)
    return params, state


# --------------------------------------------------------------------------- what is stored

def test_hyperparams_are_0d_float64_tensors_and_betas_a_tuple():
    tx = holotx.inject_hyperparams(holotx.adam)(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)
    state = tx.init(params_tree())
    assert isinstance(state, InjectHyperparamsState)
    hp = state.hyperparams
    assert set(hp) == {"lr", "betas", "weight_decay"}, (
        "bools (amsgrad) stay static, and so do defaults not given (eps, maximize)")
    for name, value in [("lr", 3e-3), ("weight_decay", 0.1)]:
        assert isinstance(hp[name], torch.Tensor), name
        assert hp[name].dim() == 0, name
        assert hp[name].dtype == F64, name
        assert hp[name].item() == value
    assert isinstance(hp["betas"], tuple)
    assert len(hp["betas"]) == 2
    for b, value in zip(hp["betas"], (0.8, 0.95)):
        assert isinstance(b, torch.Tensor)
        assert b.dim() == 0
        assert b.dtype == F64
        assert b.item() == value
    assert state.count.dtype == torch.int64
    assert state.count.dim() == 0
    assert int(state.count) == 0


def test_schedule_is_evaluated_at_count_and_stored():
    """After update k (1-based) the stored lr is ``schedule(k - 1)``, the value that update used,
    and the run equals the un-injected optimizer given the same schedule."""
    schedule = holotx.linear_schedule(1e-2, 1e-3, 10)
    tx = holotx.inject_hyperparams(holotx.adamw)(lr=schedule, weight_decay=0.1)
    plain = holotx.adamw(lr=schedule, weight_decay=0.1)
    params = ref_params = params_tree()
    state, ref_state = tx.init(params), plain.init(params)
    assert state.hyperparams["lr"].item() == schedule(0)
    for k, g in enumerate(grad_stream(15), start=1):
        u, state = tx.update(g, state, params)
        ru, ref_state = plain.update(g, ref_state, ref_params)
        params, ref_params = holotx.apply_updates(params, u), holotx.apply_updates(ref_params, ru)
        assert int(state.count) == k
        lr = state.hyperparams["lr"]
        assert lr.dim() == 0
        assert lr.dtype == F64
        assert abs(lr.item() - schedule(k - 1)) <= 1e-15 * schedule(k - 1)
        assert_trees_close(params, ref_params)


def test_static_args_stay_out_of_the_state():
    """A static momentum of 0 is a Python zero: no momentum buffer at all. Injected, it is a
    tensor (its value may change later), so the buffer exists."""
    static = holotx.inject_hyperparams(holotx.sgd, static_args=("momentum", "weight_decay"))(
        lr=0.1, momentum=0.0, weight_decay=0.0)
    injected = holotx.inject_hyperparams(holotx.sgd)(lr=0.1, momentum=0.0, weight_decay=0.0)
    params = params_tree()
    s_static, s_injected = static.init(params), injected.init(params)
    assert set(s_static.hyperparams) == {"lr"}, "dampening was not given: its default stays static"
    assert set(s_injected.hyperparams) == {"lr", "momentum", "weight_decay"}
    has_trace = lambda s: any(isinstance(x, T.TraceState) for x in s.inner_state)
    assert not has_trace(s_static)
    assert has_trace(s_injected)
    # ... and both are plain SGD with lr 0.1 here.
    p_static, _ = run(static, params, grad_stream(3))
    p_injected, _ = run(injected, params, grad_stream(3))
    p_plain, _ = run(holotx.sgd(0.1), params, grad_stream(3))
    assert_trees_close(p_static, p_plain)
    assert_trees_close(p_injected, p_plain)


CONFIGS = {
    "sgd-nesterov-wd": (holotx.sgd, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgd-dampening": (holotx.sgd, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "adam-amsgrad-wd": (holotx.adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    "adam-maximize": (holotx.adam, dict(lr=1e-2, maximize=True)),
    "adamw": (holotx.adamw, dict(lr=1e-2, weight_decay=0.1)),
    "radam-decoupled": (holotx.radam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_injected_equals_plain(name):
    factory, kwargs = CONFIGS[name]
    params, grads = params_tree(), grad_stream(STEPS)
    p_inj, _ = run(holotx.inject_hyperparams(factory)(**kwargs), params, grads)
    p_plain, _ = run(factory(**kwargs), params, grads)
    assert_trees_close(p_inj, p_plain)


# --------------------------------------------------------------------------- editing

@pytest.mark.parametrize("how", ["assign", "inplace"])
def test_editing_lr_takes_effect_next_step(how):
    """Doubling the stored lr doubles the next update exactly (lr is the last factor, and
    multiplying by 2 is exact in floating point)."""
    tx = holotx.inject_hyperparams(holotx.adam)(lr=1e-2)
    params = params_tree()
    g0, g1 = grad_stream(2)
    state = tx.init(params)
    _, state = tx.update(g0, state, params)
    u_same, _ = tx.update(g1, state, params)
    if how == "assign":
        state.hyperparams["lr"] = torch.tensor(2e-2, dtype=F64)
    else:
        state.hyperparams["lr"].mul_(2)
    u_double, state = tx.update(g1, state, params)
    for k in params:
        assert torch.equal(u_double[k], 2 * u_same[k]), k
    assert state.hyperparams["lr"].item() == 2e-2, "the edited value stays in force"


def test_editing_lr_to_zero_stops_sgd():
    tx = holotx.inject_hyperparams(holotx.sgd)(lr=0.1, momentum=0.9)
    params = params_tree()
    state = tx.init(params)
    _, state = tx.update(grad_stream(1)[0], state, params)
    state.hyperparams["lr"] = torch.zeros((), dtype=F64)
    u, _ = tx.update(grad_stream(1, seed=7)[0], state, params)
    assert all(torch.count_nonzero(x) == 0 for x in u.values())


# --------------------------------------------------------------------------- differentiating

def _loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["w1"].T + p["b1"])
    return (((h @ p["w2"].T) * p["scale"] - y) ** 2).mean()


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64)


@pytest.mark.parametrize(("factory", "kwargs", "lr0"), [
    (holotx.adam, dict(weight_decay=0.1), 3e-2),
    (holotx.sgd, dict(momentum=0.9, nesterov=True), 0.1),
], ids=["adam", "sgd-nesterov"])
def test_grad_wrt_injected_lr_through_3_steps_equals_finite_differences(factory, kwargs, lr0):
    """d(validation loss after 3 steps)/d(lr) by ``torch.func.grad`` against central
    differences in float64. The inner gradients come from a nested ``torch.func.grad``, so the
    lr reaches the loss through the params *and* through every later gradient and moment.

    Central-difference error with ``h = 1e-6 * lr``: truncation ~ h^2 |f'''| / 6 and rounding
    ~ 1e-16 |f| / h, both far below 1e-6 of |f'| for this smooth 3-step problem (a correct
    implementation agrees to ~3e-9). 1e-6 relative keeps that margin while a dropped or wrong
    term (a moment treated as a constant) moves the derivative by far more: percent level."""
    tx = holotx.inject_hyperparams(factory)(lr=lr0, **kwargs)
    params = params_tree()
    batches = [_data(s) for s in (10, 11, 12)]
    val = _data(13)
    inner_grad = torch.func.grad(_loss)

    def meta_loss(lr: torch.Tensor) -> torch.Tensor:
        state = tx.init(params)
        state = state._replace(hyperparams={**state.hyperparams, "lr": lr})
        p = params
        for x, y in batches:
            u, state = tx.update(inner_grad(p, x, y), state, p)
            p = holotx.apply_updates(p, u)
        return _loss(p, *val)

    lr = torch.tensor(lr0, dtype=F64)
    autodiff = torch.func.grad(meta_loss)(lr)
    h = 1e-6 * lr0
    with torch.no_grad():
        fd = (meta_loss(lr + h) - meta_loss(lr - h)) / (2 * h)
    assert autodiff.dim() == 0
    assert autodiff.dtype == F64
    assert abs(autodiff.item() - fd.item()) <= 1e-6 * abs(fd.item()), (autodiff.item(), fd.item())


@pytest.mark.parametrize(("factory", "steps"), [(holotx.adam, 1), (holotx.adam, 3), (holotx.radam, 7)],
                         ids=["adam-1-step", "adam-3-steps", "radam-7-steps-rectified"])
def test_grad_through_update_wrt_gradients_equals_finite_differences(factory, steps):
    """The other half of differentiating through an optimizer: d(sum of the last update)/dw
    where every step's gradient is ``w**3``. ``eps = 0.5`` is comparable to the gradients, so
    the update is far from its scale-invariant limit ``-lr * sign(g)`` and the derivative is
    O(1) rather than a difference of nearly equal numbers. Same central differences and
    tolerance as above (``h = 1e-6``). RAdam runs 7 steps so that its last step takes the
    rectified branch (rho_t > 5 from step 6)."""
    tx = factory(lr=1.0, eps=0.5)
    w0 = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)

    def last_update(w: torch.Tensor) -> torch.Tensor:
        q = {"w": w}
        state = tx.init(q)
        for _ in range(steps):
            u, state = tx.update({"w": w**3}, state, q)
        return u["w"].sum()

    autodiff = torch.func.grad(last_update)(w0)
    h = 1e-6
    with torch.no_grad():
        fd = torch.stack([(last_update(w0 + h * e) - last_update(w0 - h * e)) / (2 * h)
                          for e in torch.eye(4, dtype=F64)])
    scale = fd.abs().max().item()
    assert (autodiff - fd).abs().max().item() <= 1e-6 * scale + 1e-12, (autodiff, fd)


# --------------------------------------------------------------------------- vmap

@pytest.mark.parametrize(("factory", "kwargs"), [
    (holotx.adam, dict(amsgrad=True, weight_decay=0.1)),
    (holotx.sgd, dict(momentum=0.9, dampening=0.2)),
], ids=["adam-amsgrad", "sgd-momentum"])
def test_vmap_over_four_learning_rates_equals_four_runs(factory, kwargs):
    """``vmap`` with ``in_dims`` on ``state.hyperparams['lr']`` only: 4 runs in one."""
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    tx = holotx.inject_hyperparams(factory)(lr=lrs[0], **kwargs)
    params, grads = params_tree(), grad_stream(5)

    def run_from(state, params):
        for g in grads:
            u, state = tx.update(g, state, params)
            params = holotx.apply_updates(params, u)
        return params, state

    state0 = tx.init(params)
    batched = state0._replace(hyperparams={**state0.hyperparams, "lr": torch.tensor(lrs, dtype=F64)})
    state_dims = InjectHyperparamsState(
        count=None, hyperparams={k: (0 if k == "lr" else None) for k in state0.hyperparams}, inner_state=None)
    p_batched, s_batched = torch.func.vmap(run_from, in_dims=(state_dims, None))(batched, params)

    for i, lr in enumerate(lrs):
        p_i, s_i = run(holotx.inject_hyperparams(factory)(lr=lr, **kwargs), params, grads)
        assert_trees_close({k: v[i] for k, v in p_batched.items()}, p_i)
        assert s_batched.hyperparams["lr"][i].item() == lr
        assert int(s_batched.count[i]) == int(s_i.count) == len(grads)
