"""holotx.adapters.TransformOptimizer: a holotx transform behind ``torch.optim.Optimizer``.

The reference throughout is holotx itself: the adapter must give, bit for bit, what
``holotx.flat.make_step(tx, donate=True)`` gives on clones of the same params (the
adapter runs the same donated update), and torch.optim's conventions (None grads,
closures, hooks, state dicts, ``torch.distributed.checkpoint``, GradScaler, compile).
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import holotx
from holotx.adapters import TransformOptimizer
from holotx.flat import make_step

SHAPES = [(5, 4), (4,), (3, 2)]

FACTORIES = {
    "sgd": holotx.sgd, "adam": holotx.adam, "adamw": holotx.adamw, "radam": holotx.radam,
    "lars": holotx.lars, "lamb": holotx.lamb, "ralars": holotx.ralars, "tadam": holotx.tadam,
    "adabelief": holotx.adabelief, "adamp": holotx.adamp, "adan": holotx.adan,
    "ademamix": holotx.ademamix,
}
MOMENTUM = ("sgd", "lars")  # factories that take momentum (default 0)

STATE_CLASSES = (holotx.ScaleByAdamState, holotx.ScaleByAdanState, holotx.ScaleByBeliefState,
                 holotx.ScaleByTAdamState, holotx.ScaleByAdEMAMixState, holotx.TraceState)


# -- helpers --------------------------------------------------------------------------------


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def leafs(params):
    return [p.clone().requires_grad_() for p in params]


def grad_stream(steps, dtype=torch.float32, seed=1, shapes=SHAPES, skip=True):
    """Per step, one gradient per param: None when (step + i) % 4 == 0 (with ``skip``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        row = []
        for i, s in enumerate(shapes):
            x = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
            row.append(None if skip and (t + i) % 4 == 0 else x)
        out.append(row)
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def clones(grads):
    return [None if g is None else g.clone() for g in grads]


def assert_params_equal(actual, expected, msg=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"{msg} param {i}: dtype {a.dtype} != {e.dtype}"
        assert torch.equal(a.detach(), e.detach()), \
            f"{msg} param {i}: max diff {(a.detach().double() - e.detach().double()).abs().max().item()}"


def snapshot_state(opt):
    """The optimizer's state as {param index: {key: cloned tensor}}."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: {k: v.clone() for k, v in opt.state[p].items()}
            for i, p in enumerate(params) if p in opt.state}


def assert_state_equal(opt, snap):
    assert snapshot_state(opt).keys() == snap.keys()
    for i, entry in snapshot_state(opt).items():
        assert entry.keys() == snap[i].keys(), f"param {i}"
        for k, v in entry.items():
            assert v.dtype == snap[i][k].dtype, f"param {i}, key {k}"
            assert torch.equal(v, snap[i][k]), f"param {i}, key {k}"


def groups_view(opt):
    """param_groups with params by identity, for comparing before/after."""
    return [{k: ([id(p) for p in v] if k == "params" else v) for k, v in g.items()} for g in opt.param_groups]


def model_and_input(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed + 100))
    return model, x


def train(model, opt, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def transform_opt(params, tx, how, **hp):
    """A transform-built optimizer with ``hp`` given as constructor keywords ("kwarg") or in
    the group dict ("group")."""
    if how == "kwarg":
        return TransformOptimizer(params, tx, **hp)
    return TransformOptimizer([{"params": params, **hp}], tx)


HOW = [pytest.param("kwarg"), "group"]


def adam_chain():
    return holotx.chain(holotx.scale_by_adam(), holotx.scale(-1.0))


def hp_for(name, lr=0.01, weight_decay=0.0, momentum=0.9):
    hp = {"lr": lr, "weight_decay": weight_decay}
    if name in MOMENTUM:
        hp["momentum"] = momentum
    return hp


# -- 1. bit for bit against the functional donated loop -------------------------------------


def run_both(opt_params, opt, tx, ref_params, steps=13, dtype=torch.float32):
    state = tx.init(ref_params)
    step = make_step(tx, donate=True)
    for t, grads in enumerate(grad_stream(steps, dtype)):
        set_grads(opt_params, grads)
        opt.step()
        for p, g in zip(opt_params, grads):  # the .grad tensors are never written
            assert (p.grad is None) == (g is None)
            assert g is None or torch.equal(p.grad, g)
        ref_params, state = step(ref_params, clones(grads), state)
        assert_params_equal(opt_params, ref_params, f"step {t}:")
    return state


def assert_state_matches_functional(opt, params, state):
    """Every per-param leaf of the known state classes sits, equal, under its field name
    in opt.state[p]."""
    found = [s for cls in STATE_CLASSES for s in holotx.tree.find_states(state, cls)]
    checked = 0
    for s in found:
        for field, value in zip(s._fields, s):
            if not (isinstance(value, list) and len(value) == len(params)):
                continue
            for i, p in enumerate(params):
                if not isinstance(value[i], torch.Tensor):
                    continue
                # under a wrapper two leaves may share a field name ("count", "inner_state.count")
                keys = [k for k in opt.state[p] if k.split(".")[-1] == field]
                assert keys, f"param {i}: {field!r} not in {sorted(opt.state[p])}"
                assert any(torch.equal(opt.state[p][k], value[i]) for k in keys), f"param {i}, {keys}"
                checked += 1
    return checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd0", "wd"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_factory_matches_functional_donated_loop(name, weight_decay, dtype):
    factory = FACTORIES[name]
    hp = hp_for(name, weight_decay=weight_decay)
    base = make_params(dtype)
    params = leafs(base)
    opt = TransformOptimizer(params, factory, **hp)
    state = run_both(params, opt, factory(**hp), [p.clone() for p in base], dtype=dtype)
    checked = assert_state_matches_functional(opt, params, state)
    assert checked >= len(params)  # every algorithm here keeps a per-param buffer


@pytest.mark.parametrize("name", MOMENTUM)
def test_factory_without_momentum_matches_functional(name):
    factory = FACTORIES[name]
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, factory, lr=0.01)
    run_both(params, opt, factory(lr=0.01), [p.clone() for p in base])


def test_adamw_state_is_the_functional_state():
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, holotx.adamw, lr=0.01)
    state = run_both(params, opt, holotx.adamw(lr=0.01), [p.clone() for p in base])
    (adam,) = holotx.tree.find_states(state, holotx.ScaleByAdamState)
    counts = []
    for i, p in enumerate(params):
        assert set(opt.state[p]) == {"count", "mu", "nu"}
        assert torch.equal(opt.state[p]["count"], adam.count[i])
        assert torch.equal(opt.state[p]["mu"], adam.mu[i])
        assert torch.equal(opt.state[p]["nu"], adam.nu[i])
        counts.append(int(opt.state[p]["count"]))
    # 13 steps, None when (t + i) % 4 == 0: param 0 skips 4 steps, the others 3
    assert counts == [9, 10, 10]


WRAPPED = [
    pytest.param(wrap, inner, compat, id=f"{wrap.__name__}-{iname}-{compat}")
    for wrap in (holotx.lookahead, holotx.scout)
    for iname, inner in (("adamw", lambda: holotx.adamw(lr=0.01)),
                         ("sgd_m", lambda: holotx.sgd(lr=0.01, momentum=0.9)))
    for compat in (None, "holocron")
]


@pytest.mark.parametrize(("wrap", "inner", "compat"), WRAPPED)
def test_wrapper_transform_matches_functional_donated_loop(wrap, inner, compat):
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, wrap(inner(), 0.5, 3, compat=compat))
    state = run_both(params, opt, wrap(inner(), 0.5, 3, compat=compat), [p.clone() for p in base])
    assert assert_state_matches_functional(opt, params, state) >= len(params)
    assert "slow" in opt.state[params[0]]
    assert "count" in opt.state[params[0]]


def bf16_ulp(x):
    # Near zero the difference is set by the size of the updates (lr * |u| ~ 1e-2), not by
    # the param's own ulp: ulps are counted at magnitudes >= 2**-5.
    x = x.detach().float().abs().clamp_min(2.0 ** -5)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bfloat16_close_to_pure_loop(name):
    # torch 2.13 rounds bf16 in-place and out-of-place _foreach_mul differently, so the
    # donated (in-place) adapter is compared with the pure loop to a few bf16 ulps.
    factory = FACTORIES[name]
    hp = hp_for(name, weight_decay=0.1)
    base = make_params(torch.bfloat16)
    params = leafs(base)
    opt = TransformOptimizer(params, factory, **hp)
    tx = factory(**hp)
    ref = [p.clone() for p in base]
    s = tx.init(ref)
    for grads in grad_stream(13, torch.bfloat16):
        set_grads(params, grads)
        opt.step()
        u, s = tx.update(clones(grads), s, ref)
        ref = holotx.apply_updates(ref, u)
    for p, r in zip(params, ref):
        assert p.dtype == torch.bfloat16
        diff = (p.detach().float() - r.float()).abs()
        assert (diff <= 4 * bf16_ulp(r)).all(), f"{(diff / bf16_ulp(r)).max().item()} ulps"
    assert not all(torch.equal(p.detach(), b) for p, b in zip(params, base))


@pytest.mark.parametrize("path", ["factory", "transform"])
def test_schedule_lr_matches_functional_donated_loop(path):
    def make_tx():
        if path == "factory":
            return holotx.adam(lr=holotx.exponential_decay(0.01, 1, 0.9))
        return holotx.chain(holotx.scale_by_adam(), holotx.scale_by_schedule(holotx.constant_schedule(-0.01)))
    base = make_params()
    params = leafs(base)
    if path == "factory":
        opt = TransformOptimizer(params, holotx.adam, lr=holotx.exponential_decay(0.01, 1, 0.9))
    else:
        opt = TransformOptimizer(params, make_tx())
    run_both(params, opt, make_tx(), [p.clone() for p in base], steps=6)


# -- 2. None grads --------------------------------------------------------------------------


NONE_GRAD_OPTS = {
    "adamw": lambda ps: TransformOptimizer(ps, holotx.adamw, lr=0.01),
    "lamb": lambda ps: TransformOptimizer(ps, holotx.lamb, lr=0.01),
    "adan": lambda ps: TransformOptimizer(ps, holotx.adan, lr=0.01),
    "sgd_momentum": lambda ps: TransformOptimizer(ps, holotx.sgd, lr=0.01, momentum=0.9),
    "lookahead_adamw": lambda ps: TransformOptimizer(ps, holotx.lookahead(holotx.adamw(lr=0.01), 0.5, 2)),
}


@pytest.mark.parametrize("name", list(NONE_GRAD_OPTS))
def test_none_grad_leaves_param_and_state_unchanged(name):
    params = leafs(make_params())
    opt = NONE_GRAD_OPTS[name](params)
    grads = grad_stream(4, skip=False)
    for g in grads[:2]:
        set_grads(params, g)
        opt.step()
    for t in (2, 3):  # two steps without a grad for param 1 (lookahead: a sync falls in them)
        set_grads(params, grads[t])
        params[1].grad = None
        before_p = [p.detach().clone() for p in params]
        before_s = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
        opt.step()
        assert torch.equal(params[1].detach(), before_p[1])
        assert opt.state[params[1]].keys() == before_s[1].keys()
        for k, v in before_s[1].items():
            assert torch.equal(opt.state[params[1]][k], v), k
        for i in (0, 2):
            assert not torch.equal(params[i].detach(), before_p[i])
            assert any(not torch.equal(opt.state[params[i]][k], v) for k, v in before_s[i].items())
    counts = {k: int(v) for k, v in opt.state[params[1]].items() if k.endswith("count")}
    assert all(c == 2 for c in counts.values()), counts
    assert all(int(v) == 4 for k, v in opt.state[params[0]].items() if k.endswith("count"))


def test_state_created_on_a_groups_first_step_for_all_its_params():
    params = leafs(make_params())
    extra = leafs(make_params(seed=5, shapes=[(2, 3), (3,)]))
    opt = TransformOptimizer([{"params": params}, {"params": extra, "lr": 0.1}], holotx.adamw, lr=0.01)
    assert not opt.state
    for g in grad_stream(2, skip=False):
        set_grads(params, g)
        opt.step()
    # the second group has had no grads: no state at all
    assert all(p not in opt.state for p in extra)
    assert all(int(opt.state[p]["count"]) == 2 for p in params)
    # its first step, one param with a grad: state for both of its params
    extra[0].grad = torch.ones(2, 3)
    extra_before = extra[1].detach().clone()
    opt.step()
    assert all(p in opt.state for p in extra)
    assert int(opt.state[extra[0]]["count"]) == 1
    assert int(opt.state[extra[1]]["count"]) == 0
    assert torch.equal(opt.state[extra[1]]["mu"], torch.zeros(3))
    assert torch.equal(extra[1].detach(), extra_before)


def test_partly_stepped_optimizer_round_trips():
    # group 1 has state, group 0 none yet: the checkpoint holds only group 1's entries
    base = make_params()
    grads = grad_stream(6, skip=False)

    def make(ps):
        return TransformOptimizer([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}], holotx.adan, lr=0.01)
    a, b = leafs(base), leafs(base)
    opt_a = make(a)
    for g in grads[:3]:
        set_grads(a[1:], g[1:])
        opt_a.step()
    sd = opt_a.state_dict()
    assert set(sd["state"]) == {1, 2}
    for p, q in zip(b, a):
        p.data.copy_(q.detach())
    opt_b = make(b)
    opt_b.load_state_dict(sd)
    assert b[0] not in opt_b.state
    for g in grads[3:]:
        set_grads(a, g)
        set_grads(b, g)
        opt_a.step()
        opt_b.step()
    assert_params_equal(b, a)
    assert int(opt_b.state[b[0]]["count"]) == 3


# -- 3. maximize ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "sgd", "lamb", "adan"])
def test_maximize_factory_is_descent_on_negated_grads(name):
    factory = FACTORIES[name]
    hp = hp_for(name)
    base = make_params()
    up, down = leafs(base), leafs(base)
    opt_up = TransformOptimizer(up, factory, maximize=True, **hp)
    opt_down = TransformOptimizer(down, factory, **hp)
    for grads in grad_stream(6):
        set_grads(up, grads)
        set_grads(down, [None if g is None else -g for g in grads])
        opt_up.step()
        opt_down.step()
    assert_params_equal(up, down)
    assert not torch.equal(up[0].detach(), base[0])


@pytest.mark.parametrize("how", HOW)
def test_maximize_transform_is_descent_on_negated_grads(how):
    base = make_params()
    up, down = leafs(base), leafs(base)
    opt_up = transform_opt(up, adam_chain(), how, lr=0.01, maximize=True)
    opt_down = transform_opt(down, adam_chain(), how, lr=0.01)
    assert opt_up.param_groups[0]["maximize"] is True
    for grads in grad_stream(6):
        set_grads(up, grads)
        set_grads(down, [None if g is None else -g for g in grads])
        opt_up.step()
        opt_down.step()
    assert_params_equal(up, down)
    # ascending on |p|^2 with its own gradient increases it
    p = leafs(base)
    opt = transform_opt(p, adam_chain(), how, lr=0.01, maximize=True)
    start = float(sum((q.detach() ** 2).sum() for q in p))
    for _ in range(5):
        opt.zero_grad()
        sum((q * q).sum() for q in p).backward()
        opt.step()
    assert float(sum((q.detach() ** 2).sum() for q in p)) > start


# -- 4. closure, zero_grad ------------------------------------------------------------------


def test_step_closure_returns_loss_with_grad_enabled():
    params = leafs(make_params())
    opt = TransformOptimizer(params, holotx.adam, lr=0.01)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True]
    assert torch.is_tensor(loss)
    assert torch.equal(loss.detach(), sum((b * b).sum() for b in before))
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert opt.step() is None


def test_zero_grad():
    params = leafs(make_params())
    opt = TransformOptimizer(params, holotx.adam, lr=0.01)
    set_grads(params, grad_stream(1, skip=False)[0])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# -- 5. add_param_group and validation ------------------------------------------------------


def test_add_param_group_mid_run_steps_with_its_own_lr():
    base = make_params()
    params = leafs(base[:2])
    new = leafs(base[2:])
    opt = TransformOptimizer(params, holotx.adamw, lr=0.01)
    ref_new = [base[2].clone()]
    tx_new = holotx.adamw(lr=0.05, betas=(0.8, 0.99))
    s_new = tx_new.init(ref_new)
    step_new = make_step(tx_new, donate=True)
    grads = grad_stream(8, skip=False)
    for t, g in enumerate(grads):
        if t == 3:
            opt.add_param_group({"params": new, "lr": 0.05, "betas": (0.8, 0.99)})
            assert opt.param_groups[1]["weight_decay"] == 0.01  # the default filled in
        set_grads(params, g[:2])
        if t >= 3:
            set_grads(new, g[2:])
            ref_new, s_new = step_new(ref_new, clones(g[2:]), s_new)
        opt.step()
    assert_params_equal(new, ref_new)
    assert int(opt.state[new[0]]["count"]) == 5
    assert int(opt.state[params[0]]["count"]) == 8


@pytest.mark.parametrize(("bad", "arg"), [({"lr": -1}, "lr"), ({"betas": (1.5, 0.9)}, "betas"),
                                      ({"weight_decay": -0.5}, "weight_decay"),
                                      ({"eps": "x"}, "eps")])
def test_add_param_group_rejects_bad_hyperparameters(bad, arg):
    params = leafs(make_params())
    opt = TransformOptimizer(params[:2], holotx.adamw, lr=0.01)
    set_grads(params, grad_stream(1, skip=False)[0])
    opt.step()
    before = groups_view(opt)
    snap = snapshot_state(opt)
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group({"params": params[2:], **bad})
    assert groups_view(opt) == before
    assert len(opt.param_groups) == 1
    assert_state_equal(opt, snap)


def test_transform_add_param_group_rejects_bad_lr():
    params = leafs(make_params())
    opt = TransformOptimizer([{"params": params[:2], "lr": 0.1}], adam_chain())
    before = groups_view(opt)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    assert groups_view(opt) == before


@pytest.mark.parametrize(("build", "edit", "arg"), [
    (lambda groups: TransformOptimizer(groups, holotx.adamw, lr=0.01), {"lr": -1.0}, "lr"),
    (lambda groups: TransformOptimizer(groups, holotx.adamw, lr=0.01), {"betas": (0.9, 1.5)}, "betas"),
    (lambda groups: TransformOptimizer(groups, adam_chain()), {"lr": float("nan")}, "lr"),
], ids=["factory-lr", "factory-betas", "transform-nan-lr"])
def test_a_group_edited_to_a_bad_value_fails_the_step_before_any_group_steps(build, edit, arg):
    """Every group is checked before any steps: the bad value in the second group raises
    with the first group's params and state as they were (their count not advanced)."""
    params = leafs(make_params())
    opt = build([{"params": params[:2]}, {"params": params[2:]}])
    stream = grad_stream(2, skip=False)
    set_grads(params, stream[0])
    opt.step()
    opt.param_groups[1].update(edit)
    set_grads(params, stream[1])
    values = [p.detach().clone() for p in params]
    snap = snapshot_state(opt)
    with pytest.raises(ValueError, match=arg):
        opt.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert_state_equal(opt, snap)


def test_construction_errors():
    params = leafs(make_params())
    with pytest.raises(ValueError, match="lr"):
        TransformOptimizer(params, holotx.lamb, lr=-1)
    with pytest.raises(ValueError, match="foo"):
        TransformOptimizer(params, holotx.lamb, foo=1)
    with pytest.raises(ValueError, match="weight_decay"):
        TransformOptimizer(params, adam_chain(), weight_decay=0.1)
    with pytest.raises(ValueError, match="lr"):
        TransformOptimizer([{"params": params, "lr": -1.0}], adam_chain())
    with pytest.raises(ValueError, match="betas"):
        TransformOptimizer([{"params": params[:1]}, {"params": params[1:], "betas": (0.9, 1.0)}],
                           holotx.adam)


def test_hyperparameters_are_checked_before_the_params():
    """As torch.optim's classes do (torch's test_errors passes ``params=None``): a bad
    value raises ValueError naming it, a wrong type TypeError, whatever the params;
    good values with ``params=None`` get torch.optim's own TypeError."""
    from holotx.adapters import LARS

    bad = [(lambda: TransformOptimizer(None, holotx.adam, betas=(1.0, 0.9)), r"betas\[0\]"),
           (lambda: TransformOptimizer(None, holotx.sgd, momentum=-0.5), "momentum"),
           (lambda: TransformOptimizer(None, holotx.lamb, lr=torch.tensor([1e-3, 1e-3])), "lr"),
           (lambda: TransformOptimizer(None, adam_chain(), lr=-1.0), "lr"),
           (lambda: LARS(None, weight_decay=-1.0), "weight_decay")]
    for build, arg in bad:
        with pytest.raises(ValueError, match=arg):
            build()
    with pytest.raises(TypeError, match="amsgrad"):
        TransformOptimizer(None, holotx.adam, amsgrad="no")
    with pytest.raises(TypeError, match="iterable"):
        TransformOptimizer(None, holotx.adam, lr=1e-3)


@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["(1,)", "(1,1)"])
def test_one_element_tensor_hyperparameters_of_any_shape(shape):
    """torch.optim takes ``lr=torch.tensor([1e-3])``; so does the adapter (the factory
    gets a 0-d view): the float run's numbers, bit for bit, and an in-place change of the
    tensor (a scheduler's ``fill_``) takes effect on the next step."""
    base = make_params(torch.float64)
    a, b = leafs(base), leafs(base)
    lr = torch.full(shape, 0.01, dtype=torch.float64)
    beta1 = torch.full(shape, 0.9, dtype=torch.float64)
    opt_a = TransformOptimizer(a, holotx.adam, lr=lr, betas=(beta1, 0.999))
    opt_b = TransformOptimizer(b, holotx.adam, lr=0.01, betas=(0.9, 0.999))
    stream = grad_stream(8, torch.float64)
    for k, grads in enumerate(stream):
        if k == 4:
            lr.fill_(0.001)
            opt_b.param_groups[0]["lr"] = 0.001
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
        assert_params_equal(a, b, f"step {k}")
    assert opt_a.param_groups[0]["lr"] is lr
    with pytest.raises(ValueError, match="one element"):
        TransformOptimizer(a, holotx.adam, lr=torch.full((2,), 0.01))


def test_transform_constructor_rejects_negative_lr():
    with pytest.raises(ValueError, match="lr"):
        TransformOptimizer(leafs(make_params()), adam_chain(), lr=-1.0)


@pytest.mark.parametrize(("lr", "message"), [
    (math.inf, "lr must be finite"),
    (-math.inf, "lr must be finite"),
    (math.nan, "lr must not be NaN"),
    (-1.0, "lr must be >= 0"),
    (torch.tensor(math.inf), "lr must be finite"),
    (torch.tensor([-1.0]), "lr must be >= 0"),
    (torch.tensor([[-0.5]]), "lr must be >= 0"),
    ("0.1", "lr must be a number"),
    (True, "lr must be a number"),
], ids=["inf", "-inf", "nan", "negative", "inf-tensor", "negative-1-element", "negative-1x1", "string",
        "bool"])
@pytest.mark.parametrize("path", ["factory", "transform"])
def test_both_kinds_refuse_the_same_bad_lr(lr, message, path):
    """A transform given built checks its groups' lr as a factory checks its own (an
    infinite or negative tensor lr once stepped every param to -inf)."""
    params = leafs(make_params())
    tx = holotx.adam if path == "factory" else adam_chain()
    with pytest.raises(ValueError, match=message):
        TransformOptimizer(params, tx, lr=lr)
    opt = TransformOptimizer([{"params": params[:2], "lr": 0.1}], tx)
    before = groups_view(opt)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": params[2:], "lr": lr})
    assert groups_view(opt) == before


@pytest.mark.parametrize("lr", [torch.tensor([0.01]), torch.tensor([[0.01]])], ids=["1", "1x1"])
def test_transform_built_takes_a_one_element_lr_tensor(lr):
    params = leafs(make_params())
    opt = TransformOptimizer(params, adam_chain(), lr=lr)
    reference = TransformOptimizer(leafs(make_params()), adam_chain(), lr=0.01)
    for o in (opt, reference):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(opt.param_groups[0]["params"], reference.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_transform_constructor_keywords_reach_the_groups():
    opt = TransformOptimizer(leafs(make_params()), adam_chain(), lr=0.01, maximize=True)
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["maximize"] is True


# -- 6. hyperparameters changed between steps -----------------------------------------------


SCHEDULED = [
    ("adamw", lambda t: {"lr": 0.01 * 0.9 ** t, "betas": (0.9 - 0.01 * t, 0.999 - 0.001 * t),
                         "weight_decay": 0.01 + 0.01 * t}),
    ("lamb", lambda t: {"lr": 0.02 * 0.8 ** t, "betas": (0.85 + 0.01 * t, 0.99),
                        "weight_decay": 0.1 / (t + 1)}),
    ("adan", lambda t: {"lr": 0.01 + 0.002 * t, "betas": (0.98, 0.92 - 0.01 * t, 0.99),
                        "weight_decay": 0.02 * (t + 1)}),
    ("sgd", lambda t: {"lr": 0.1 / (t + 1), "momentum": 0.5 + 0.05 * t, "weight_decay": 0.01 * (t + 1)}),
]


@pytest.mark.parametrize(("name", "schedule"), SCHEDULED, ids=[s[0] for s in SCHEDULED])
def test_changing_hyperparameters_takes_effect_next_step(name, schedule):
    factory = FACTORIES[name]
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, factory, **schedule(0))
    ref = [p.clone() for p in base]
    state = factory(**schedule(0)).init(ref)
    for t, grads in enumerate(grad_stream(8)):
        opt.param_groups[0].update(schedule(t))
        set_grads(params, grads)
        opt.step()
        ref, state = make_step(factory(**schedule(t)), donate=True)(ref, clones(grads), state)
        assert_params_equal(params, ref, f"step {t}:")
    # a run that kept the first values ends elsewhere
    fixed = leafs(base)
    opt_fixed = TransformOptimizer(fixed, factory, **schedule(0))
    for grads in grad_stream(8):
        set_grads(fixed, grads)
        opt_fixed.step()
    assert not torch.equal(fixed[0].detach(), params[0].detach())


def _swap_adam_state(new_state, old_state):
    (old,) = holotx.tree.find_states(old_state, holotx.ScaleByAdamState)
    assert isinstance(new_state, tuple)
    return tuple(old if isinstance(s, holotx.ScaleByAdamState) else s for s in new_state)


def test_weight_decay_zero_to_nonzero_keeps_state():
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, holotx.adam, lr=0.01, weight_decay=0.0)
    ref = [p.clone() for p in base]
    tx0, tx1 = holotx.adam(lr=0.01), holotx.adam(lr=0.01, weight_decay=0.1)
    state = tx0.init(ref)
    grads = grad_stream(8, skip=False)
    for t, g in enumerate(grads):
        if t == 4:
            opt.param_groups[0]["weight_decay"] = 0.1
            mu_before = opt.state[params[0]]["mu"].clone()
            state = _swap_adam_state(tx1.init(ref), state)
        set_grads(params, g)
        opt.step()
        ref, state = make_step(tx1 if t >= 4 else tx0, donate=True)(ref, clones(g), state)
        assert_params_equal(params, ref, f"step {t}:")
        if t == 4:
            assert set(opt.state[params[0]]) == {"count", "mu", "nu"}
            assert int(opt.state[params[0]]["count"]) == 5  # the count continued
            assert not torch.equal(opt.state[params[0]]["mu"], 0.1 * g[0])  # mu continued...
            assert not torch.equal(opt.state[params[0]]["mu"], mu_before)  # ...and moved


def test_lars_momentum_zero_to_nonzero_starts_fresh_buffer():
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, holotx.lars, lr=0.1)
    ref = [p.clone() for p in base]
    tx0, tx1 = holotx.lars(lr=0.1), holotx.lars(lr=0.1, momentum=0.9)
    state = tx0.init(ref)
    for t, g in enumerate(grad_stream(8, skip=False)):
        if t == 3:
            opt.param_groups[0]["momentum"] = 0.9
            state = tx1.init(ref)  # the trace buffer starts fresh
        set_grads(params, g)
        opt.step()
        ref, state = make_step(tx1 if t >= 3 else tx0, donate=True)(ref, clones(g), state)
        assert_params_equal(params, ref, f"step {t}:")
    assert any("trace" in k for k in opt.state[params[0]])
    # back to zero: the adapter keeps working and matches lars without momentum
    opt.param_groups[0]["momentum"] = 0.0
    g = grad_stream(1, seed=9, skip=False)[0]
    set_grads(params, g)
    opt.step()
    ref, _ = make_step(tx0, donate=True)(ref, clones(g), tx0.init(ref))
    assert_params_equal(params, ref)


def test_amsgrad_switched_on_adds_fresh_buffer_keeps_moments():
    base = make_params()
    params = leafs(base)
    opt = TransformOptimizer(params, holotx.adam, lr=0.01)
    ref = [p.clone() for p in base]
    tx0, tx1 = holotx.adam(lr=0.01), holotx.adam(lr=0.01, amsgrad=True)
    state = tx0.init(ref)
    for t, g in enumerate(grad_stream(6, skip=False)):
        if t == 2:
            opt.param_groups[0]["amsgrad"] = True
            (old,) = holotx.tree.find_states(state, holotx.ScaleByAdamState)
            new = tx1.init(ref)
            state = tuple(old._replace(nu_max=s.nu_max) if isinstance(s, holotx.ScaleByAdamState) else s
                          for s in new)
        set_grads(params, g)
        opt.step()
        ref, state = make_step(tx1 if t >= 2 else tx0, donate=True)(ref, clones(g), state)
        assert_params_equal(params, ref, f"step {t}:")
    assert set(opt.state[params[0]]) == {"count", "mu", "nu", "nu_max"}
    assert int(opt.state[params[0]]["count"]) == 6


# -- 7. transform mode: lr multiplies the updates -------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_transform_lr_multiplies_updates(how):
    # The chain's last scale(-1.0) hands its factor over and the adapter applies
    # p += (-1.0 * lr) * u, the same factor adam(lr) hands over: bit for bit.
    base = make_params()
    a, b = leafs(base), leafs(base)
    opt_a = transform_opt(a, adam_chain(), how, lr=0.01)
    opt_b = TransformOptimizer(b, holotx.adam, lr=0.01)
    for grads in grad_stream(10):
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b)


def test_transform_two_groups_with_their_own_lr():
    base = make_params()
    a = leafs(base)
    refs = [leafs(base[:2]), leafs(base[2:])]
    opt = TransformOptimizer([{"params": a[:2], "lr": 0.01}, {"params": a[2:], "lr": 0.2}], adam_chain())
    ref_opts = [TransformOptimizer(refs[0], holotx.adam, lr=0.01),
                TransformOptimizer(refs[1], holotx.adam, lr=0.2)]
    for grads in grad_stream(8):
        set_grads(a, grads)
        set_grads(refs[0], grads[:2])
        set_grads(refs[1], grads[2:])
        opt.step()
        for o in ref_opts:
            o.step()
    assert_params_equal(a, refs[0] + refs[1])


def test_transform_lr_changed_between_steps():
    base = make_params()
    a, b = leafs(base), leafs(base)
    opt_a = TransformOptimizer(a, adam_chain())
    opt_b = TransformOptimizer(b, holotx.adam, lr=0.01)
    for t, grads in enumerate(grad_stream(6)):
        for o in (opt_a, opt_b):
            o.param_groups[0]["lr"] = 0.01 * 0.5 ** t
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b)


# -- 8. tensor lr ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd", "adan"])
def test_tensor_lr_equals_float_lr(name, dtype):
    # The tensor has the params' dtype, so as a scalar it rounds to what 0.01 rounds to
    # in that dtype: bit for bit.
    base = make_params(dtype)
    a, b = leafs(base), leafs(base)
    lr_t = torch.tensor(0.01, dtype=dtype)
    hp = {"momentum": 0.9} if name in MOMENTUM else {}
    opt_a = TransformOptimizer(a, FACTORIES[name], lr=lr_t, **hp)
    opt_b = TransformOptimizer(b, FACTORIES[name], lr=0.01, **hp)
    assert opt_a.param_groups[0]["lr"] is lr_t
    for grads in grad_stream(8, dtype):
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b)
    assert not torch.equal(a[0].detach(), base[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("how", HOW)
def test_transform_tensor_lr_equals_float_lr(how, dtype):
    base = make_params(dtype)
    a, b = leafs(base), leafs(base)
    lr_t = torch.tensor(0.01, dtype=dtype)
    opt_a = transform_opt(a, adam_chain(), how, lr=lr_t)
    opt_b = TransformOptimizer(b, holotx.adam, lr=0.01)
    assert opt_a.param_groups[0]["lr"] is lr_t
    for grads in grad_stream(8, dtype):
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.step()
        opt_b.step()
    assert_params_equal(a, b)


# -- 9. state_dtype -------------------------------------------------------------------------


def quadratic_run(dtype, state_dtype, steps=30):
    """Adam on 0.5 * sum(a * (p - t)^2) from near zero; the trajectory, in float32."""
    g = torch.Generator().manual_seed(3)
    target = torch.randn(256, generator=g)
    scale = torch.rand(256, generator=g) * 2 + 0.5
    p = (torch.randn(256, generator=g) * 0.1).to(dtype).requires_grad_()
    opt = TransformOptimizer([p], holotx.adam, lr=0.05, betas=(0.9, 0.99), state_dtype=state_dtype)
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * scale * (p.float() - target) ** 2).sum().backward()
        opt.step()
        traj.append(p.detach().float().clone())
    return p, opt, torch.stack(traj)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_state_dtype_keeps_float32_state(dtype):
    _, _, ref = quadratic_run(torch.float32, None)
    p32, opt32, traj32 = quadratic_run(dtype, torch.float32)
    plow, optlow, trajlow = quadratic_run(dtype, None)
    assert p32.dtype == dtype
    assert plow.dtype == dtype
    assert opt32.state[p32]["mu"].dtype == torch.float32
    assert opt32.state[p32]["nu"].dtype == torch.float32
    assert optlow.state[plow]["mu"].dtype == dtype
    # mean distance to the float32 trajectory over the 30 steps (low-precision state:
    # about twice that of float32 state; NaN, were it to break down, counts as worse)
    err32 = (traj32 - ref).abs().mean().item()
    errlow = (trajlow - ref).abs().mean().item()
    assert not errlow <= 1.25 * err32, (err32, errlow)
    # float32 state with low-precision params: within an ulp of the param on average (a
    # rounding of the param per step, not an error that grows)
    assert err32 <= torch.finfo(dtype).eps * ref.abs().mean().item(), err32


# -- 10. state_dict -------------------------------------------------------------------------


CHECKPOINTED = {
    "adamw": lambda ps: TransformOptimizer(ps, holotx.adamw, lr=0.01),
    "lamb": lambda ps: TransformOptimizer(ps, holotx.lamb, lr=0.01, weight_decay=0.01),
    "lookahead_adan": lambda ps: TransformOptimizer(ps, holotx.lookahead(holotx.adan(lr=0.01), 0.5, 3)),
    "scout_adamw": lambda ps: TransformOptimizer([{"params": ps, "lr": 0.5}],
                                                 holotx.scout(holotx.adamw(lr=0.01), 0.5, 3)),
}


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    make = CHECKPOINTED[name]
    base = make_params()
    grads = grad_stream(10)
    full = leafs(base)
    opt_full = make(full)
    assert opt_full.state_dict()["state"] == {}
    for g in grads:
        set_grads(full, g)
        opt_full.step()
    part = leafs(base)
    opt_part = make(part)
    for g in grads[:5]:
        set_grads(part, g)
        opt_part.step()
    sd = opt_part.state_dict()
    assert sd["param_groups"][0]["params"] == [0, 1, 2]
    assert set(sd["state"]) == {0, 1, 2}
    for entry in sd["state"].values():
        assert isinstance(entry, dict)
        assert entry
        assert all(isinstance(v, torch.Tensor) for v in entry.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    resumed = leafs([p.detach() for p in part])
    opt_res = make(resumed)
    opt_res.load_state_dict(loaded)
    for g in grads[5:]:
        set_grads(resumed, g)
        opt_res.step()
    assert_params_equal(resumed, full)
    # without the state, the continuation differs
    cold = leafs([p.detach() for p in part])
    opt_cold = make(cold)
    for g in grads[5:]:
        set_grads(cold, g)
        opt_cold.step()
    assert not all(torch.equal(c.detach(), f.detach()) for c, f in zip(cold, full))


def test_state_dict_param_names():
    model, x = model_and_input()
    opt = TransformOptimizer(model.named_parameters(), holotx.adamw, lr=0.01)
    train(model, opt, x, 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["state"][0]["mu"].shape == (3, 4)


# -- 11. load_state_dict errors -------------------------------------------------------------


def _lamb(params, **kw):
    return TransformOptimizer(params, holotx.lamb, lr=0.01, **kw)


def _stepped(opt, params, steps=2, seed=1):
    for g in grad_stream(steps, seed=seed, shapes=[p.shape for p in params], skip=False):
        set_grads(params, g)
        opt.step()
    return opt


def _bad_checkpoints():
    def other_algorithm():
        ps = leafs(make_params())
        return _stepped(TransformOptimizer(ps, holotx.adan, lr=0.01), ps).state_dict()

    def other_state_keys():
        ps = leafs(make_params())
        sd = _stepped(_lamb(ps), ps).state_dict()
        adan = _stepped(TransformOptimizer(ps, holotx.adan, lr=0.01), ps).state_dict()
        return {"state": adan["state"], "param_groups": sd["param_groups"]}

    def other_shapes():
        ps = leafs(make_params(shapes=[(5, 4), (5,), (3, 2)]))
        return _stepped(_lamb(ps), ps).state_dict()

    def other_groups():
        ps = leafs(make_params())
        opt = TransformOptimizer([{"params": ps[:1]}, {"params": ps[1:]}], holotx.lamb)
        return _stepped(opt, ps).state_dict()

    def other_count():
        ps = leafs(make_params(shapes=SHAPES[:2]))
        return _stepped(_lamb(ps), ps, seed=1).state_dict()

    def missing_key():
        ps = leafs(make_params())
        sd = _stepped(_lamb(ps), ps).state_dict()
        del sd["state"][1]["nu"]
        return sd

    def int_where_float():
        ps = leafs(make_params())
        sd = _stepped(_lamb(ps), ps).state_dict()
        sd["state"][2]["mu"] = torch.zeros(3, 2, dtype=torch.int64)
        return sd

    return [
        pytest.param(other_algorithm, "does not fit this optimizer: betas must be a tuple of 2",
                     id="adan-into-lamb"),
        pytest.param(other_state_keys, r"unexpected \['diff_avg', 'prev_grad'\]", id="adan-state-keys"),
        pytest.param(other_shapes, r"param 1, key 'mu': shape \(5,\)", id="shapes"),
        pytest.param(other_groups, "has 2 param groups", id="groups"),
        pytest.param(other_count, "2 params in the checkpoint, 3 here", id="param-count"),
        pytest.param(missing_key, r"missing \['nu'\]", id="missing-key"),
        pytest.param(int_where_float, "key 'mu': dtype torch.int64", id="int-dtype"),
    ]


@pytest.mark.parametrize(("make_bad", "match"), _bad_checkpoints())
def test_load_state_dict_rejects_and_leaves_optimizer_unchanged(make_bad, match):
    base = make_params()
    params, twin = leafs(base), leafs(base)
    opt = _stepped(_lamb(params), params, seed=7)
    opt_twin = _stepped(_lamb(twin), twin, seed=7)
    bad = make_bad()
    snap, groups = snapshot_state(opt), groups_view(opt)
    state_objects = {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in params}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_state_equal(opt, snap)
    assert groups_view(opt) == groups
    assert {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in params} == state_objects
    # and it steps on as its twin that never saw the checkpoint
    _stepped(opt, params, steps=2, seed=8)
    _stepped(opt_twin, twin, steps=2, seed=8)
    assert_params_equal(params, twin)


def test_load_state_dict_restores_checkpoint_lr():
    base = make_params()
    a = leafs(base)
    opt_a = _stepped(_lamb(a), a)
    sd = copy.deepcopy(opt_a.state_dict())
    sd["param_groups"][0]["lr"] = 0.123
    b = leafs([p.detach() for p in a])
    opt_b = _lamb(b)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == 0.123
    opt_a.param_groups[0]["lr"] = 0.123
    for g in grad_stream(3, seed=4):
        set_grads(a, g)
        set_grads(b, g)
        opt_a.step()
        opt_b.step()
    assert_params_equal(b, a)


@pytest.mark.parametrize("path", [
    "factory",
    "transform",
])
def test_load_state_dict_rejects_negative_lr(path):
    params = leafs(make_params())
    tx = holotx.adam if path == "factory" else adam_chain()
    opt = _stepped(TransformOptimizer([{"params": params, "lr": 0.01}], tx), params)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = -1.0
    snap, groups = snapshot_state(opt), groups_view(opt)
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(sd)
    assert groups_view(opt) == groups
    assert_state_equal(opt, snap)


# -- 12. torch.distributed.checkpoint -------------------------------------------------------


DCP_OPTS = {
    "adamw": lambda m: TransformOptimizer(m.parameters(), holotx.adamw, lr=0.01),
    "lamb": lambda m: TransformOptimizer(m.parameters(), holotx.lamb, lr=0.01),
    "lookahead_adan": lambda m: TransformOptimizer(m.parameters(),
                                                   holotx.lookahead(holotx.adan(lr=0.01), sync_period=2)),
}


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flat"])
@pytest.mark.parametrize("name", list(DCP_OPTS))
def test_distributed_checkpoint_state_dict(name, flatten):
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    options = dcp.StateDictOptions(flatten_optimizer_state_dict=flatten)
    make = DCP_OPTS[name]
    model, x = model_and_input()
    opt = make(model)
    train(model, opt, x, 3)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    osd = dcp.get_optimizer_state_dict(model, opt, options=options)
    if name == "lookahead_adan":
        keys = list(osd) if flatten else [k for e in osd["state"].values() for k in e]
        assert any("inner_state" in k for k in keys)
    new_model, _ = model_and_input(seed=1)
    new_model.load_state_dict(model.state_dict())
    new_opt = make(new_model)
    before = [p.detach().clone() for p in new_model.parameters()]
    dcp.set_optimizer_state_dict(new_model, new_opt, osd, options=options)
    assert_params_equal(list(new_model.parameters()), before, "after set:")
    train(new_model, new_opt, x, 4)
    train(ref_model, ref_opt, x, 4)
    assert_params_equal(list(new_model.parameters()), list(ref_model.parameters()))


@pytest.mark.parametrize("name", list(DCP_OPTS))
def test_distributed_checkpoint_init_step_leaves_params(name):
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    model, _ = model_and_input()
    opt = DCP_OPTS[name](model)
    before = [p.detach().clone() for p in model.parameters()]
    dcp._init_optim_state(opt)
    assert_params_equal(list(model.parameters()), before)
    assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[0]["lr"] == (1.0 if name == "lookahead_adan" else 0.01)


# -- 13. GradScaler -------------------------------------------------------------------------


def test_grad_scaler():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except (RuntimeError, AttributeError, TypeError) as err:
        pytest.skip(f"no CPU GradScaler: {err}")
    if not scaler.is_enabled():
        pytest.skip("CPU GradScaler disabled")
    model, x = model_and_input()
    opt = TransformOptimizer(model.parameters(), holotx.adamw, lr=0.01)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    for t in range(5):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        if t == 2:
            before = [p.detach().clone() for p in model.parameters()]
            snap = snapshot_state(opt)
            scale = scaler.get_scale()
            next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            assert_params_equal(list(model.parameters()), before)
            assert_state_equal(opt, snap)
            assert scaler.get_scale() < scale
            continue
        scaler.step(opt)
        scaler.update()
        train(ref_model, ref_opt, x, 1)
    # The scale is a power of two: scaling and unscaling are exact but for rounding in
    # the backward's reductions, so float32 tolerance.
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert int(opt.state[next(model.parameters())]["count"]) == 4


# -- 14. hooks ------------------------------------------------------------------------------


def test_step_hooks_fire_in_order():
    params = leafs(make_params())
    opt = TransformOptimizer(params, holotx.adam, lr=0.01)
    log = []
    opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", o)))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global", o)))
    try:
        set_grads(params, grad_stream(1, skip=False)[0])
        before = params[0].detach().clone()

        def closure():
            log.append(("step", not torch.equal(params[0].detach(), before)))
            return None
        opt.step(closure)
    finally:
        handle.remove()
    assert [e[0] for e in log] == ["global", "pre", "step", "post"]
    assert log[0][1] is opt
    assert log[1][1] is opt
    assert log[3][1] is opt
    assert log[2][1] is False  # the closure ran before the params moved
    assert not torch.equal(params[0].detach(), before)
    log.clear()
    opt.step()
    assert [e[0] for e in log] == ["pre", "post"]  # the global hook is gone


def test_state_dict_hooks():
    params = leafs(make_params())
    opt = _stepped(TransformOptimizer(params, holotx.adam, lr=0.01), params)
    log = []
    opt.register_state_dict_pre_hook(lambda o: log.append("sd_pre"))

    def post(o, sd):
        log.append("sd_post")
        sd["extra"] = 1
        return sd
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert log == ["sd_pre", "sd_post"]
    assert sd["extra"] == 1
    log.clear()

    def load_pre(o, sd):
        log.append("load_pre")
        sd = dict(sd)
        sd.pop("extra")
        return sd
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load_post", o is opt)))
    opt.load_state_dict(sd)
    assert log == ["load_pre", ("load_post", True)]


# -- 15. deepcopy, pickle, repr -------------------------------------------------------------


COPIED = [("adamw", "deepcopy"), ("adamw", "pickle"), ("lamb", "deepcopy"), ("lamb", "pickle"),
          ("lookahead", "deepcopy")]  # pickle is for factory-built optimizers (a transform holds closures)


@pytest.mark.parametrize(("name", "how"), COPIED)
def test_copy_and_pickle_continue_identically(name, how):
    model, x = model_and_input()
    if name == "lookahead":
        opt = TransformOptimizer(model.parameters(), holotx.lookahead(holotx.adan(lr=0.01), sync_period=2))
    else:
        opt = TransformOptimizer(model.parameters(), FACTORIES[name], lr=0.01)
    train(model, opt, x, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    train(model, opt, x, 3)
    train(model2, opt2, x, 3)
    assert_params_equal(list(model2.parameters()), list(model.parameters()))
    assert int(opt2.state[next(model2.parameters())]["count"]) == 6


def test_repr():
    params = leafs(make_params())
    opt = TransformOptimizer([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}],
                             holotx.lamb, lr=0.01, weight_decay=0.02)
    text = repr(opt)
    assert "holotx.lamb" in text
    assert "Parameter Group 0" in text
    assert "Parameter Group 1" in text
    assert "lr: 0.01" in text
    assert "lr: 0.5" in text
    assert "weight_decay: 0.02" in text
    assert "betas: (0.9, 0.999)" in text
    tx_opt = TransformOptimizer([{"params": params, "lr": 0.3}], adam_chain())
    assert "transform" in repr(tx_opt)
    assert "lr: 0.3" in repr(tx_opt)


# -- 16. torch.compile ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_compiled_step_with_scheduler_does_not_recompile(name):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        model, x = model_and_input()
        opt = TransformOptimizer(model.parameters(), FACTORIES[name], lr=0.01)
        eager_model, eager_opt = copy.deepcopy((model, opt))
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)
        eager_sched = torch.optim.lr_scheduler.StepLR(eager_opt, 1, 0.9)
        step = torch.compile(opt.step)
        graphs = []
        for _ in range(6):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            step()
            sched.step()
            graphs.append(counters["stats"]["unique_graphs"])
            train(eager_model, eager_opt, x, 1)
            eager_sched.step()
        assert graphs[0] > 0, "nothing was compiled"
        assert graphs[-1] == graphs[1], f"recompiled: unique graphs per step {graphs}"
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.9 ** 6)
        for p, r in zip(model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        assert not torch.equal(next(model.parameters()).detach(), next(model_and_input()[0].parameters()))
    finally:
        torch._dynamo.reset()


# -- 17. mixed dtypes, sparse grads ---------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_mixed_dtypes_in_one_group(name):
    base32, base64 = make_params(torch.float32), make_params(torch.float64, seed=4)
    mixed = leafs([base32[0], base64[1], base32[2]])
    opt = TransformOptimizer(mixed, FACTORIES[name], **hp_for(name))
    refs = [leafs([base32[0], base32[2]]), leafs([base64[1]])]
    ref_opts = [TransformOptimizer(r, FACTORIES[name], **hp_for(name)) for r in refs]
    for grads in grad_stream(6, skip=False):
        g = [grads[0], grads[1].double(), grads[2]]
        set_grads(mixed, g)
        set_grads(refs[0], [g[0], g[2]])
        set_grads(refs[1], [g[1]])
        opt.step()
        for o in ref_opts:
            o.step()
    assert [p.dtype for p in mixed] == [torch.float32, torch.float64, torch.float32]
    for p in mixed:
        for v in opt.state[p].values():
            assert not v.is_floating_point() or v.dtype == p.dtype
    # per-tensor algorithms: each param's trajectory is its own
    assert_params_equal(mixed, [refs[0][0], refs[1][0], refs[0][1]])


def test_sparse_grad_raises():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = TransformOptimizer(emb.parameters(), holotx.adam, lr=0.01)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
    assert not opt.state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd", "adan"])
def test_donate_grads_is_the_functional_donated_step(name, dtype):
    """With donate_grads the grads are donated too: the same in-place ops as
    make_step(tx, donate=True), so bit for bit even in bfloat16; without it every .grad
    is left as it was."""
    factory = FACTORIES[name]
    hp = hp_for(name, weight_decay=0.1)
    base = make_params(dtype)
    donating, keeping = leafs(base), leafs(base)
    opt_donating = TransformOptimizer(donating, factory, donate_grads=True, **hp)
    opt_keeping = TransformOptimizer(keeping, factory, **hp)
    tx = factory(**hp)
    ref = [p.clone() for p in base]
    state, step = tx.init(ref), make_step(tx, donate=True)
    overwritten = 0
    for grads in grad_stream(7, dtype):
        set_grads(donating, grads)
        set_grads(keeping, grads)
        opt_donating.step()
        opt_keeping.step()
        ref, state = step(ref, clones(grads), state)
        assert_params_equal(donating, ref, "donate_grads")
        for p, g in zip(keeping, grads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert torch.equal(p.grad, g), "a .grad was written without donate_grads"
        overwritten += sum(g is not None and not torch.equal(p.grad, g) for p, g in zip(donating, grads))
    if name != "adan":  # Adan's kernel writes its result into buffers of its own
        assert overwritten > 0  # the donated grads were really used as scratch
    with pytest.raises(ValueError, match="donate_grads"):
        TransformOptimizer(leafs(base), factory, donate_grads="yes")


def test_a_groups_transform_is_rebuilt_only_when_its_values_change():
    """Building the transform is most of the step's fixed cost: it is built again only
    when a value in the group changed (a scheduler's lr, a type change such as 1 -> 1.0)
    or the group holds a tensor (whose value may change in place); the numbers stay those
    of a rebuild every step."""
    calls = []

    def counted_adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        calls.append(lr)
        return holotx.adamw(lr, betas, eps, weight_decay)

    params = leafs(make_params())
    opt = TransformOptimizer(params, counted_adamw, lr=0.01)
    twin = [p.detach().clone().requires_grad_() for p in params]
    rebuilt = TransformOptimizer(twin, counted_adamw, lr=0.01)
    stream = grad_stream(7, skip=False)

    def step(grads):
        set_grads(params, grads)
        set_grads(twin, grads)
        before = len(calls)
        opt.step()
        built = calls[before:]
        rebuilt._built.clear()  # the twin builds its transform afresh every step
        rebuilt.step()
        assert_params_equal(params, twin)
        return built

    step(stream[0])  # the first step builds (and creates the state)
    assert step(stream[1]) == []
    assert step(stream[2]) == []
    opt.param_groups[0]["lr"] = rebuilt.param_groups[0]["lr"] = 0.005
    assert step(stream[3]) == [0.005]
    assert step(stream[4]) == []
    opt.param_groups[0]["lr"] = rebuilt.param_groups[0]["lr"] = 1  # an int: a new build
    assert step(stream[5]) == [1]
    lr = torch.tensor(0.005)
    opt.param_groups[0]["lr"] = rebuilt.param_groups[0]["lr"] = lr
    assert len(step(stream[6])) == 1
    assert len(step(stream[6])) == 1


def _first_value_only(updates, params):
    del params
    return [u[:1] for u in updates]  # (1,) for a (3,) param: an add would broadcast it


@pytest.mark.parametrize("position", ["first", "last"])
def test_updates_that_do_not_fit_the_params_are_refused_and_change_nothing(position):
    """A transform that is not holotx's, in the group's chain, whose updates do not have
    the params' shapes: the step is refused by name, not broadcast into the params."""
    bad = holotx.stateless(_first_value_only)

    def factory(lr):
        return holotx.chain(bad, holotx.sgd(lr)) if position == "first" else holotx.chain(holotx.sgd(lr), bad)

    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    w.grad = torch.full((3,), 0.5, dtype=torch.float64)
    opt = TransformOptimizer([w], factory, lr=0.1)
    with pytest.raises(ValueError, match=r"shape"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(3, dtype=torch.float64))


def test_a_param_listed_twice_in_a_group_is_refused_and_not_stepped_twice():
    """torch.optim only warns about a group that lists one param twice (and then steps it
    twice); the adapter refuses the step by name, as ``apply_updates`` does."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    w.grad = torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="duplicate"):
        opt = TransformOptimizer([w, w], holotx.sgd, lr=0.1)
    with pytest.raises(ValueError, match="same tensor"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("returned", ["one leaf more", "a leaf nested", "the same, nested"])
def test_a_state_returned_in_another_structure_is_refused_or_read_as_before(returned):
    """The adapter reads the state a group's transform returns by its init's structure: one
    with another number of leaves is refused by a ``RuntimeError`` that says so; one whose
    leaves are the same tensors in other containers is read leaf by leaf, as before."""
    def init(params):
        return [torch.zeros_like(p) for p in params]

    def update(updates, state, params=None):
        new = [m + g for m, g in zip(state, updates)]
        if returned == "one leaf more":
            return updates, [*new, torch.zeros(1, dtype=torch.float64)]
        if returned == "a leaf nested":
            return updates, [[new[0], torch.zeros(1, dtype=torch.float64)], *new[1:]]
        return updates, [[m] for m in new]

    params = [nn.Parameter(torch.ones(n, dtype=torch.float64)) for n in (2, 3)]
    opt = TransformOptimizer(params, holotx.GradientTransformation(init, update), lr=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    if returned == "the same, nested":
        opt.step()
        assert all(torch.equal(opt.state[p]["state"], torch.ones_like(p)) for p in params), opt.state
        return
    with pytest.raises(RuntimeError, match=r"returned a state of 3 leaves, its init had 2"):
        opt.step()


def test_a_state_returned_in_another_kind_of_dict_is_stored_by_key():
    """A transform whose init returns a dict and whose update returns the same keys in an
    ``OrderedDict`` of another order has each value stored under its own key (found in
    review: the state was read in the new dict's own order, and two keys swapped values)."""
    from collections import OrderedDict

    def init(params):
        return {"a": [torch.zeros_like(p) for p in params], "b": [torch.zeros_like(p) for p in params]}

    def update(updates, state, params=None):
        return updates, OrderedDict([("b", [m - g for m, g in zip(state["b"], updates)]),
                                     ("a", [m + g for m, g in zip(state["a"], updates)])])

    params = [nn.Parameter(torch.ones(n, dtype=torch.float64)) for n in (2, 3)]
    opt = TransformOptimizer(params, holotx.GradientTransformation(init, update), lr=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p in params:
        assert torch.equal(opt.state[p]["a"], torch.ones_like(p)), opt.state[p]
        assert torch.equal(opt.state[p]["b"], -torch.ones_like(p)), opt.state[p]
