"""Properties of the contract, checked on drawn examples (hypothesis, derandomized: the
same examples on every run, a few hundred each, in bounded time).

Each property holds for every optimizer it names, on trees of a few small float64 tensors
drawn with random shapes, values and hyperparameters.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import holotx
from holotx.adapters import TransformOptimizer

F64 = torch.float64
EVERY = ["sgd", "adam", "adamw", "radam", "lars", "lamb", "ralars", "tadam", "adabelief", "adamp", "adan",
         "ademamix"]
ELEMENTWISE = ["sgd", "adam", "adamw", "radam", "adabelief", "adan", "ademamix"]
# (RAdam's first steps are SGD with momentum, m / (1 - b1^t): not scale-free.)
ADAM_FAMILY = ["adam", "adamw", "adabelief", "ademamix"]
PROPERTY = settings(derandomize=True, max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _factory(name, lr=1e-2, **kw):
    if name in ("sgd", "lars"):
        kw.setdefault("momentum", 0.9)
    return getattr(holotx, name)(lr, **kw)


@st.composite
def problems(draw, steps=3):
    """Params (a dict of 1 to 3 tensors of random shapes) and ``steps`` gradient trees."""
    seed = draw(st.integers(0, 2**16))
    n = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))) for _ in range(n)]
    scale = 10.0 ** draw(st.integers(-3, 3))
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=gen, dtype=F64) for i, s in enumerate(shapes)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=F64) * scale for k, v in params.items()}
             for _ in range(steps)]
    return params, grads


def _run(tx, params, grads):
    state = tx.init(params)
    updates = None
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = holotx.apply_updates(params, updates)
    return params, state, updates


def _leaves(tree):
    return [x for x in holotx.tree.flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems())
def test_updates_keep_the_tree_shapes_and_dtypes(name, problem):
    params, grads = problem
    tx = _factory(name)
    _, _, updates = _run(tx, params, grads)
    assert holotx.tree.structure(updates) == holotx.tree.structure(params)
    for u, p in zip(_leaves(updates), _leaves(params)):
        assert (u.shape, u.dtype, u.device) == (p.shape, p.dtype, p.device)


@PROPERTY
@given(name=st.sampled_from([*EVERY, "lookahead", "scout"]), problem=problems())
def test_the_state_keeps_its_structure_shapes_and_dtypes(name, problem):
    params, grads = problem
    tx = {"lookahead": lambda: holotx.lookahead(holotx.adam(1e-2), sync_period=2),
          "scout": lambda: holotx.scout(holotx.adam(1e-2), sync_period=2)}.get(name, lambda: _factory(name))()
    init = tx.init(params)
    _, state, _ = _run(tx, params, grads)
    assert holotx.tree.structure(state) == holotx.tree.structure(init)
    for a, b in zip(_leaves(state), _leaves(init)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems())
def test_zero_grads_without_weight_decay_give_zero_updates(name, problem):
    params, grads = problem
    zeros = [{k: torch.zeros_like(v) for k, v in params.items()} for _ in grads]
    _, _, updates = _run(_factory(name, weight_decay=0.0), params, zeros)
    assert all(bool((u == 0).all()) for u in _leaves(updates))


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems())
def test_maximize_is_the_step_on_the_negated_gradient(name, problem):
    params, grads = problem
    negated = [{k: -v for k, v in g.items()} for g in grads]
    a, _state_a, _ = _run(_factory(name, maximize=True), params, grads)
    b, _state_b, _ = _run(_factory(name), params, negated)
    assert _equal(a, b)


@PROPERTY
@given(name=st.sampled_from(ADAM_FAMILY), problem=problems(), exponent=st.integers(-20, 20))
def test_the_adam_family_does_not_see_the_gradient_scale_without_eps(name, problem, exponent):
    """With eps = 0, scaling every gradient by a power of two scales m by it and v by its
    square, exactly: the step is the same, bit for bit."""
    params, grads = problem
    c = 2.0 ** exponent
    scaled = [{k: v * c for k, v in g.items()} for g in grads]
    a, _, _ = _run(_factory(name, eps=0.0), params, grads)
    b, _, _ = _run(_factory(name, eps=0.0), params, scaled)
    assert _equal(a, b)


@PROPERTY
@given(problem=problems(), lr=st.floats(1e-4, 1.0), wd=st.floats(0.0, 0.1))
def test_chain_is_associative_and_identity_is_neutral(problem, lr, wd):
    params, grads = problem
    a, b, c = holotx.scale_by_adam(), holotx.add_decayed_weights(wd), holotx.scale_by_lr(lr)
    left = holotx.chain(holotx.chain(a, b), c)
    right = holotx.chain(a, holotx.chain(b, c))
    flat = holotx.chain(holotx.identity(), a, b, holotx.identity(), c)
    p_left, _, _ = _run(left, params, grads)
    p_right, _, _ = _run(right, params, grads)
    p_flat, _, _ = _run(flat, params, grads)
    assert _equal(p_left, p_right)
    assert _equal(p_left, p_flat)


@PROPERTY
@given(name=st.sampled_from(ELEMENTWISE), problem=problems())
def test_elementwise_rules_do_not_depend_on_how_leaves_are_split(name, problem):
    """An elementwise rule over the leaves, or over one tensor that concatenates them:
    the same values (per-tensor rules are left out: their reductions are per tensor)."""
    params, grads = problem
    keys = sorted(params)

    def joined(tree):
        return {"all": torch.cat([tree[k].reshape(-1) for k in keys])}

    split, _, _ = _run(_factory(name), params, grads)
    whole, _, _ = _run(_factory(name), joined(params), [joined(g) for g in grads])
    # Elementwise, the same ops on the same values; where a CPU's vector loop and its
    # scalar tail fuse a multiply-add differently, an element can move by an ulp: an
    # absolute floor at the params' scale (they are O(1)).
    scale = float(whole["all"].abs().max()) if whole["all"].numel() else 1.0
    torch.testing.assert_close(joined(split)["all"], whole["all"], rtol=1e-15, atol=1e-15 * scale)


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems(), batch=st.integers(1, 3))
def test_vmap_over_a_batch_of_problems_equals_a_loop(name, problem, batch):
    params, grads = problem
    tx = _factory(name)
    stacked_p = {k: torch.stack([v * (1 + i) for i in range(batch)]) for k, v in params.items()}
    stacked_g = [{k: torch.stack([v * (2 - i / 4) for i in range(batch)]) for k, v in g.items()}
                 for g in grads]

    def one(p, gs):
        state = tx.init(p)
        for g in gs:
            u, state = tx.update(g, state, p)
            p = holotx.apply_updates(p, u)
        return p

    batched = torch.func.vmap(one)(stacked_p, stacked_g)
    for i in range(batch):
        looped = one({k: v[i] for k, v in stacked_p.items()},
                     [{k: v[i] for k, v in g.items()} for g in stacked_g])
        for k in params:
            torch.testing.assert_close(batched[k][i], looped[k], rtol=1e-12, atol=1e-14)


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems(steps=4), k=st.integers(1, 4))
def test_k_micro_steps_equal_one_step_on_their_mean(name, problem, k):
    params, grads = problem
    micro = grads[:k]
    accumulated = holotx.multi_steps(_factory(name), every_k=k)
    state = accumulated.init(params)
    p = params
    for g in micro:
        u, state = accumulated.update(g, state, p)
        p = holotx.apply_updates(p, u)
    mean = {key: sum(g[key] for g in micro) / k for key in params}
    once, _, _ = _run(_factory(name), params, [mean])
    for key in params:
        torch.testing.assert_close(p[key], once[key], rtol=1e-12, atol=1e-14)


@PROPERTY
@given(name=st.sampled_from([*EVERY, "lookahead"]), problem=problems(steps=4), cut=st.integers(0, 4))
def test_saving_loading_and_going_on_equals_never_stopping(name, problem, cut):
    params, grads = problem
    make = (lambda: holotx.lookahead(holotx.adam(1e-2), sync_period=2)) if name == "lookahead" \
        else (lambda: _factory(name))
    straight, _, _ = _run(make(), params, grads)
    first, state, _ = _run(make(), params, grads[:cut])
    buffer = io.BytesIO()
    torch.save({"params": first, "state": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    tx = make()  # a fresh transform, as in a new process
    p, state = loaded["params"], loaded["state"]
    for g in grads[cut:]:
        u, state = tx.update(g, state, p)
        p = holotx.apply_updates(p, u)
    assert _equal(p, straight)


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems())
def test_the_adapter_equals_the_functional_loop(name, problem):
    params, grads = problem
    keys = sorted(params)
    tensors = [params[k].clone().requires_grad_() for k in keys]
    hp = {"momentum": 0.9} if name in ("sgd", "lars") else {}
    opt = TransformOptimizer(tensors, getattr(holotx, name), lr=1e-2, **hp)
    for g in grads:
        for t, k in zip(tensors, keys):
            t.grad = g[k].clone()
        opt.step()
    functional, _, _ = _run(_factory(name), params, grads)
    for t, k in zip(tensors, keys):
        torch.testing.assert_close(t.detach(), functional[k], rtol=1e-13, atol=1e-15)


@PROPERTY
@given(name=st.sampled_from(EVERY),
       bad=st.one_of(
           st.tuples(st.just("lr"), st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)),
           st.tuples(st.just("lr"), st.sampled_from([float("nan"), float("inf"), "0.1", None, True])),
           st.tuples(st.just("weight_decay"), st.floats(max_value=-1e-12, allow_infinity=False)),
           st.tuples(st.just("weight_decay"), st.sampled_from([float("nan"), float("inf"), "x"]))))
def test_invalid_drawn_values_raise_naming_the_argument(name, bad):
    key, value = bad
    kwargs = {key: value} if key != "lr" else {}
    with pytest.raises(ValueError) as info:
        getattr(holotx, name)(value if key == "lr" else 1e-3, **kwargs)
    assert key in str(info.value)


@PROPERTY
@given(name=st.sampled_from(EVERY), problem=problems(), donate=st.booleans())
def test_a_pure_update_writes_nothing_and_a_donated_one_the_same_values(name, problem, donate):
    params, grads = problem
    tx = _factory(name)
    kept = copy.deepcopy((params, grads))
    pure, _, _ = _run(tx, params, grads)
    assert _equal((params, grads), kept)
    step = holotx.flat.make_step(tx, donate=True)
    p, state = copy.deepcopy(params), tx.init(params)
    for g in copy.deepcopy(grads):
        p, state = step(p, g, state)
    torch.testing.assert_close(p, pure, rtol=1e-13, atol=1e-15)
