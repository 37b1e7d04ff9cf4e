"""The executor decides how a step runs; the math layer only says what it computes.

* The math layer (``holotx/transforms``, ``optimizers``, ``wrappers``, the combinators,
  the hyperparameters) names no execution policy: no donation or in-place flags, no
  storage reads, no context detection, no ``out=``, and of the executor only the
  composition calls (run or prepare a wrapped transform, evaluate a schedule, pass on or
  honour the final scaling).
* What may be written is decided by identity, once per step: never a tensor the caller
  did not donate, never a state a transform returned (a pure momentum's buffer is its
  updates too), never anything a user's transform saw or returned.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import pytest
import torch

import holotx
from holotx import executor, ops
from holotx.flat import make_step

ROOT = pathlib.Path(holotx.__file__).parent
MATH_LAYER = sorted([*ROOT.glob("transforms/*.py"), *ROOT.glob("optimizers/*.py"),
                     *ROOT.glob("wrappers/*.py"), ROOT / "combine.py", ROOT / "hyperparams.py",
                     ROOT / "schedules.py"])
POLICY_NAMES = {"donate", "donate_updates", "inplace", "owns_memory", "final_scale", "FINAL_SCALE",
                "is_compiling", "_functorch", "get_interpreter_stack", "data_ptr", "untyped_storage",
                "storage_offset", "may_write", "may_write_into", "mark_state"}
COMPOSITION_CALLS = {"call", "call_pure", "redirect_scale", "take_scale", "scale_request_to", "prepare",
                     "evaluate", "scale_requested", "ask_scale", "release_scale", "is_scaling",
                     "scale_factor", "leaf_factor", "decide", "decided"}
F64 = torch.float64


@pytest.mark.parametrize("path", MATH_LAYER, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_math_layer_names_no_execution_policy(path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in POLICY_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Attribute):
            if node.attr in POLICY_NAMES:
                found.append(node.attr)
            if isinstance(node.value, ast.Name) and node.value.id == "executor" \
                    and node.attr not in COMPOSITION_CALLS:
                found.append(f"executor.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in POLICY_NAMES | {"out"}:
            found.append(f"{node.arg}=")
        elif isinstance(node, ast.arg) and node.arg in POLICY_NAMES:
            found.append(f"argument {node.arg}")
    assert not found, f"{path.name} names execution policy: {sorted(set(found))}"


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)}


def _clones(tree: Any) -> Any:
    return holotx.tree.map(torch.clone, tree)


def _equal(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(holotx.tree.flatten(a)[0], holotx.tree.flatten(b)[0]))


def _equal_or_none(a: Any, b: Any) -> bool:
    """:func:`_equal` where leaves may be ``None`` (no gradient) too."""
    pairs = list(zip(holotx.tree.flatten(a)[0], holotx.tree.flatten(b)[0]))
    return all((x is None) == (y is None) and (x is None or torch.equal(x, y)) for x, y in pairs)


def test_a_pure_momentum_buffer_is_not_scaled_through_its_updates():
    """Pure, a momentum's updates are its new buffer: the learning rate after it must not
    scale the state through them."""
    params, grads = _params(), _params()
    tx = holotx.sgd(0.5, momentum=0.9)
    _, state = tx.update(grads, tx.init(params), params)
    trace_state = next(s for s in state if isinstance(s, holotx.TraceState))
    assert _equal(trace_state.trace, grads)


class Remembered(NamedTuple):
    last: Any


def remember_last() -> holotx.GradientTransformation:
    """A user's transform that keeps its incoming updates in its state and returns them."""

    def init(params):
        return Remembered(holotx.tree.map(torch.zeros_like, params))

    def update(updates, state, params=None, **extra):
        return updates, Remembered(updates)

    return holotx.GradientTransformation(init, update)


@pytest.mark.parametrize("donate", [False, True])
def test_nothing_a_user_transform_saw_is_written(donate):
    params, grads = _params(), _params()
    tx = holotx.chain(holotx.scale(3.0), remember_last(), holotx.scale(-0.5))
    step = make_step(tx, donate=donate)
    state = tx.init(params)
    with torch.no_grad():
        _, state = step(_clones(params), _clones(grads), state)
    assert _equal(state[1].last, holotx.tree.map(lambda g: 3.0 * g, grads))


def test_a_donated_step_writes_the_donated_buffers_in_place():
    params, grads = _params(), _params()
    tx = holotx.adam(0.1)
    state = tx.init(params)
    mu = state[0].mu
    with torch.no_grad():
        _, new_state = tx.update(grads, state, params, donate=True)
    assert new_state[0].mu["w"] is mu["w"], "a donated moment was not updated in place"
    _, pure_state = tx.update(grads, tx.init(params), params)
    assert pure_state[0].mu["w"] is not state[0].mu["w"]


def test_ops_outside_a_step_write_nothing():
    xs = [torch.ones(3)]
    out = ops.mul_(xs, 2.0)
    assert out[0] is not xs[0]
    assert torch.equal(xs[0], torch.ones(3))


def test_an_owned_step_writes_what_it_is_given():
    xs, keep = [torch.ones(3)], [torch.ones(3)]
    with executor.owned_step(keep):
        assert ops.mul_(xs, 2.0)[0] is xs[0]
        assert ops.mul_(keep, 2.0)[0] is not keep[0]
    assert torch.equal(xs[0], torch.full((3,), 2.0))
    assert torch.equal(keep[0], torch.ones(3))


# ------------------------------------------- a step completes or changes nothing (schedules)


class Interrupted(Exception):
    pass


def interrupting_schedule(raise_at: list[int], calls: list[int], exception: type[BaseException]):
    """0.1 for every step, and ``exception`` at the evaluation numbered ``raise_at[0]``."""

    def schedule(count):
        calls.append(int(count))
        if raise_at and len(calls) == raise_at[0]:
            raise exception
        return 0.1 + 0.0 * count.to(F64)

    return schedule


SCHEDULED = {
    "adamw": lambda s: holotx.adamw(s, weight_decay=0.1),
    "chain_schedule_last": lambda s: holotx.chain(holotx.scale_by_adam(), holotx.scale_by_lr(s)),
    "inject_after_adam": lambda s: holotx.chain(holotx.scale_by_adam(),
                                                holotx.inject_hyperparams(holotx.sgd)(lr=s, momentum=0.9)),
    "lookahead": lambda s: holotx.lookahead(holotx.adamw(s), sync_period=2),
    "scout": lambda s: holotx.scout(holotx.lamb(s), sync_period=2),
    "masked": lambda s: holotx.chain(holotx.scale_by_adam(), holotx.masked(
        holotx.scale_by_lr(s), lambda params: holotx.tree.map(lambda p: p.ndim > 1, params))),
    "apply_if_finite": lambda s: holotx.apply_if_finite(holotx.adamw(s), 2),
}


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in holotx.tree.flatten(tree)[0] if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("exception", [Interrupted, KeyboardInterrupt])
@pytest.mark.parametrize("path", ["update_donated", "make_step_donated", "adapter"])
@pytest.mark.parametrize("name", list(SCHEDULED))
def test_a_failing_schedule_leaves_everything_as_it_was(name, path, exception):
    """A schedule that raises (an exception, or an interrupt) at the third step: that
    step leaves params and state bit for bit as they were, though the schedule runs
    after transforms that write their state in place. Each schedule runs once a step."""
    calls: list[int] = []
    raise_at: list[int] = []
    tx = SCHEDULED[name](interrupting_schedule(raise_at, calls, exception))
    params = _params()
    gen = torch.Generator().manual_seed(1)

    def grads():
        return {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in params.items()}

    if path == "adapter":
        from holotx.adapters import TransformOptimizer

        tensors = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = TransformOptimizer(list(tensors.values()), tx)

        def step():
            for k, g in grads().items():
                tensors[k].grad = g
            opt.step()

        def snapshot():
            return [t.detach().clone() for t in tensors.values()] + [
                x.clone() for x in _leaves(opt.state_dict()["state"])]
    else:
        state = [tx.init(params)]
        run = make_step(tx, donate=True)

        def step():
            if path == "update_donated":
                with torch.no_grad():
                    updates, state[0] = tx.update(grads(), state[0], params, donate=True)
                    holotx.apply_updates(params, updates, inplace=True)
            else:
                run(params, grads(), state[0])

        def snapshot():
            return [x.clone() for x in _leaves(params)] + [x.clone() for x in _leaves(state[0])]

    step()  # (inject_hyperparams evaluates its schedules at init too: the adapter's is here)
    after_one = len(calls)
    step()
    assert len(calls) - after_one == 1, f"the schedule ran {len(calls) - after_one} times in one step"
    before = snapshot()
    raise_at.append(len(calls) + 1)
    with pytest.raises(exception):
        step()
    after = snapshot()
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the failed step changed something"


# ------------------------------------------------- leaf order: batches that stay in cache


BATCHED = {
    "adamw": lambda: holotx.adamw(0.1, weight_decay=0.1),
    "sgd_nesterov": lambda: holotx.sgd(0.1, momentum=0.9, nesterov=True),
    "lamb": lambda: holotx.lamb(0.1, weight_decay=0.1),
    "ralars": lambda: holotx.ralars(0.1),
    "lars": lambda: holotx.lars(0.1, momentum=0.9, weight_decay=0.1),
    "lars_nesterov": lambda: holotx.lars(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "lars_dampened": lambda: holotx.lars(0.1, momentum=0.9, dampening=0.5, weight_decay=0.1),
    # (an inner transform that is not leafwise runs on the whole tree after the batches)
    "trust_ratio_chained_inner": lambda: holotx.chain(
        holotx.scale_by_trust_ratio(weight_decay=0.1, inner=holotx.chain(holotx.trace(0.9))),
        holotx.scale(-0.1)),
    "tadam": lambda: holotx.tadam(0.1),
    "adamp": lambda: holotx.adamp(0.1, weight_decay=0.1),
    "adan": lambda: holotx.adan(0.1),
    "ademamix": lambda: holotx.ademamix(0.1),
    "adabelief": lambda: holotx.adabelief(0.1),
    "scout": lambda: holotx.scout(holotx.adamw(0.1), sync_period=2),
    "lookahead": lambda: holotx.lookahead(holotx.adamw(0.1), sync_period=2),
}


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("name", list(BATCHED))
def test_batches_of_leaves_give_the_same_bits(name, donate, monkeypatch):
    """In eager mode on a CPU a large group of leaves runs in batches that fit in cache;
    with a batch of a few hundred bytes every leaf is its own batch, and the results
    equal one batch of all leaves bit for bit."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (40,), (3, 2, 2), (1,), (0,), (64,)]
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(4)]

    def trajectory(batch_bytes):
        monkeypatch.setattr(executor, "CACHE_BATCH_BYTES", batch_bytes)
        tx = BATCHED[name]()
        p, state = _clones(params), tx.init(params)
        out = []
        for g in grads:
            with torch.no_grad():
                updates, state = tx.update(_clones(g), state, p, donate=donate)
            p = holotx.apply_updates(p, updates)
            out.append((p, state))
        return out

    calls = []
    original = executor.Plan.batches
    monkeypatch.setattr(executor, "_LAYOUTS", {})  # (decided afresh: nothing kept from other tests)
    monkeypatch.setattr(executor.Plan, "batches", lambda self, idx, leaves: calls.append(
        len(batches := original(self, idx, leaves))) or batches)
    one = trajectory(1 << 30)
    assert max(calls) == 1
    calls.clear()
    each = trajectory(256)
    assert max(calls) > 1, "no group was cut into batches"
    for (p1, s1), (p2, s2) in zip(one, each):
        assert _equal(p1, p2)
        assert all(torch.equal(a, b) for a, b in zip(_leaves(s1), _leaves(s2)))


@pytest.mark.parametrize("none_grad", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_a_leafwise_inner_runs_on_each_batch_whose_buffers_are_then_freed(donate, none_grad, monkeypatch):
    """LARS's momentum runs on each batch of leaves right after the batch's trust ratios
    and weight decay: it runs on every batch, and when it starts on one, the decayed
    updates of the batches before are freed (a model's worth of them is never alive at
    once; donated grads take the decay in place). A leaf without a gradient (an unused
    layer's) is skipped and keeps its state. The results equal one batch of every leaf,
    and the caller's grads are left as they were unless donated."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 5), (40,), (3, 2, 2), (64,)]
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    if none_grad:
        grads[1] = None
    batches: list[int] = []
    decayed: list[weakref.ref] = []
    handed: list[Any] = []  # (the grads of the step running)
    original = executor._then_on_batch

    def recording(then, fields, idx, new_u, p_leaves):
        gc.collect()
        assert not [r for r in decayed if r() is not None], "a batch's decayed updates outlived it"
        batches.append(len(idx))
        decayed.extend(weakref.ref(new_u[i]) for i in idx if not any(new_u[i] is g for g in handed))
        return original(then, fields, idx, new_u, p_leaves)

    monkeypatch.setattr(executor, "_LAYOUTS", {})
    monkeypatch.setattr(executor, "CACHE_BATCH_BYTES", 256)
    monkeypatch.setattr(executor, "_then_on_batch", recording)
    tx = holotx.lars(0.1, momentum=0.9, weight_decay=0.1, dampening=0.5)

    def step():
        state, given = tx.init(params), _clones(grads)
        handed[:] = given
        with torch.no_grad():
            updates, state = tx.update(given, state, _clones(params), donate=donate)
        if not donate:
            assert _equal_or_none(given, grads)
        return updates, state

    batched = step()
    assert sum(batches) == len(shapes) - none_grad
    assert len(batches) > 1
    assert donate or decayed, "no fresh decayed updates were watched"
    monkeypatch.setattr(executor, "CACHE_BATCH_BYTES", 1 << 30)
    whole = step()
    assert sum(batches) == len(shapes) - none_grad, "one batch ran batch by batch"
    assert _equal_or_none(batched[0], whole[0])
    assert all(torch.equal(a, b) for a, b in zip(_leaves(batched[1]), _leaves(whole[1])))


@pytest.mark.parametrize("wrong", ["shape", "dtype", "missing"])
def test_a_leafwise_inner_given_a_wrong_state_is_refused_before_any_batch_steps(wrong, monkeypatch):
    """A momentum buffer that does not fit its leaf (the last one, here) is refused as on
    the whole tree: the message names its path in the caller's tree, and a donated state
    is left as it was (run batch by batch, the batches before would have stepped)."""
    monkeypatch.setattr(executor, "_LAYOUTS", {})
    monkeypatch.setattr(executor, "CACHE_BATCH_BYTES", 256)
    gen = torch.Generator().manual_seed(6)
    shapes = [(7, 5), (40,), (3, 4), (64,)]
    params = {f"l{i}": torch.randn(s, generator=gen, dtype=F64) for i, s in enumerate(shapes)}
    tx = holotx.lars(0.1, momentum=0.9, weight_decay=0.1, dampening=0.5)
    state = tx.init(params)
    inner = state[0].inner
    inner.trace["l3"] = {"shape": torch.zeros(63, dtype=F64), "dtype": torch.zeros(64, dtype=torch.float32),
                         "missing": None}[wrong]
    before = _clones(_leaves((inner.trace, inner.count)))
    with pytest.raises(ValueError, match=r"state\.trace .*\['l3'\]"), torch.no_grad():
        tx.update(_clones(params), state, params, donate=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _leaves((inner.trace, inner.count))))


def test_a_layout_is_decided_once_for_leaves_described_alike(monkeypatch):
    """How a step's leaves are grouped and batched follows from their shapes, devices,
    dtypes and classes and the context: decided at the first step and kept, decided again
    for leaves that differ in any of these or for another batch size (and an integer
    update is refused whatever was decided before)."""
    calls: list[int] = []
    original = executor.Plan.batches
    monkeypatch.setattr(executor, "_LAYOUTS", {})
    monkeypatch.setattr(executor.Plan, "batches", lambda self, idx, leaves: calls.append(
        len(idx)) or original(self, idx, leaves))
    tx = holotx.adamw(0.1, weight_decay=0.1)
    params = _params()

    def steps(params, n=3):
        state = tx.init(params)
        for _ in range(n):
            _, state = tx.update(_clones(params), state, params)
        return len(calls)

    assert steps(params) == 1  # (adamw's three rules, three steps: one decision)
    assert steps(params) == 1
    assert steps({k: v.float() for k, v in params.items()}) == 2
    assert steps({k: v.reshape(-1, 1) for k, v in params.items()}) == 3
    class Marked(torch.Tensor):  # (updates of another class: their clones keep it)
        pass

    assert steps({k: v.as_subclass(Marked) for k, v in params.items()}) == 4
    monkeypatch.setattr(executor, "CACHE_BATCH_BYTES", 64)
    assert steps(params, 1) > 4
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        holotx.scale(2.0).update({k: v.long() for k, v in params.items()}, holotx.EmptyState())


def test_the_adapter_begins_every_group_before_it_finishes_any():
    """Two param groups: the schedule raises for the second group's step; the first
    group's params and state are unchanged too."""
    from holotx.adapters import TransformOptimizer

    calls: list[int] = []
    raise_at: list[int] = []
    tx = holotx.adamw(interrupting_schedule(raise_at, calls, Interrupted))
    gen = torch.Generator().manual_seed(2)
    first = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    second = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    opt = TransformOptimizer([{"params": [first]}, {"params": [second]}], tx)

    def step():
        for p in (first, second):
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
        opt.step()

    def snapshot():
        state = [x.clone() for x in _leaves(opt.state_dict())]
        return [first.detach().clone(), second.detach().clone(), *state]

    step()
    before = snapshot()
    raise_at.append(len(calls) + 2)  # the second group's evaluation
    with pytest.raises(Interrupted):
        step()
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a group stepped before the failing one"


# ------------------------------------------------------------ the final scalings handed over

def _lars_setup():
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64),
              "none": torch.randn(2, generator=gen, dtype=F64)}
    grads = [{"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64),
              "none": None} for _ in range(4)]
    return params, grads


def test_a_trust_ratio_before_the_learning_rate_is_handed_over():
    """LARS: the per-tensor ratios and the learning rate both go to the caller, which
    applies ``p += lr * r * b`` to the momentum buffer itself (no scaled copy of it)."""
    params, grads = _lars_setup()
    tx = holotx.lars(0.1, momentum=0.9, weight_decay=1e-2)
    state = tx.init(params)
    updates, new_state, factor, _ = executor.run(tx, _clones(grads[0]), state, params, donate=True,
                                                 hand_over_scale=True)
    trace = new_state[0].inner.trace
    assert updates["w"] is trace["w"]
    assert updates["b"] is trace["b"]
    assert isinstance(factor, list)
    assert len(factor) == 3
    leaves = holotx.tree.flatten(grads[0])[0]
    for f, g in zip(factor, leaves):
        assert (f is None) == (g is None)
        if f is not None:
            assert len(f) == 2
            assert f[1] == -0.1
    # Pure, the same step gives the product.
    expected, _ = tx.update(_clones(grads[0]), tx.init(params), params)
    for key in ("w", "b"):
        applied = updates[key] * executor.leaf_factor(factor[sorted(params).index(key)], F64)
        # (an absolute floor at the updates' scale, for an element near zero)
        torch.testing.assert_close(applied, expected[key], rtol=1e-14,
                                   atol=1e-15 * float(expected[key].abs().max()))


@pytest.mark.parametrize("name", ["lars", "lamb", "ralars", "lookahead_lars", "lookahead_lamb"])
def test_a_handed_over_trust_ratio_steps_as_the_pure_update(name):
    """Donated (ratios and lr handed over, applied per tensor, through Lookahead's sync
    too) and pure steps agree to rounding, None gradients included."""
    params, grads = _lars_setup()
    base = {"lars": lambda: holotx.lars(0.1, momentum=0.9, weight_decay=1e-2),
            "lamb": lambda: holotx.lamb(0.1, weight_decay=1e-2),
            "ralars": lambda: holotx.ralars(0.1, weight_decay=1e-2)}
    build = base.get(name) or (lambda: holotx.lookahead(base[name.split("_")[1]](), sync_period=2))
    tx = build()
    donated, pure = make_step(tx, donate=True), make_step(tx)
    p_don, s_don = _clones(params), tx.init(params)
    p_pure, s_pure = _clones(params), tx.init(params)
    for g in grads:
        p_don, s_don = donated(p_don, _clones(g), s_don)
        p_pure, s_pure = pure(p_pure, _clones(g), s_pure)
        for key in params:
            torch.testing.assert_close(p_don[key], p_pure[key], rtol=1e-13, atol=1e-15)
    assert torch.equal(p_don["none"], params["none"])


def test_a_chain_asks_its_trailing_scalings_and_the_transform_before_them():
    params, grads = _lars_setup()
    asked: list[str] = []

    def spy(name, inner):
        def update(updates, state, params=None, **extra):
            if executor.scale_requested():
                asked.append(name)
            return executor.call(inner, updates, state, params, **extra)

        return holotx.base.own_transform(inner.init, update)

    tx = holotx.chain(spy("adam", holotx.scale_by_adam()), spy("clip", holotx.clip_by_global_norm(1.0)),
                      holotx.scale(2.0), holotx.scale_by_lr(0.1))
    state = tx.init(params)
    _, _, factor, _ = executor.run(tx, _clones(grads[0]), state, params, donate=True, hand_over_scale=True)
    # clip is asked (it hands nothing over: it scales itself), adam is not: a scaling
    # handed over by adam would be applied after clip, which is no scaling.
    assert asked == ["clip"]
    assert factor == pytest.approx(-0.2, rel=1e-15)


def test_scale_factor_and_leaf_factor():
    assert executor.scale_factor([]) is None
    assert executor.scale_factor([2.0, -0.5]) == -1.0
    combined = executor.scale_factor([[0.5, None, 3.0], -0.1, [2.0, 1.0, None]])
    assert combined == [(0.5, -0.1, 2.0), None, None]
    # float64: the product in double; float32: as a float32 tensor multiplies.
    assert executor.leaf_factor((0.1, 3.0), F64) == 0.1 * 3.0
    f32 = (torch.tensor(0.1, dtype=torch.float32) * torch.tensor(3.0, dtype=torch.float32)).item()
    assert executor.leaf_factor((0.1, 3.0), torch.float32) == f32
    assert executor.leaf_factor((torch.tensor(0.1, dtype=torch.float32), 3.0), torch.float32) == f32
    assert executor.leaf_factor((1e30, 1e30), torch.float32) == float("inf")
    assert executor.leaf_factor(0.25, torch.float32) == 0.25


def test_apply_updates_takes_a_factor_per_leaf():
    params = {"a": torch.ones(2, dtype=F64), "b": torch.ones(3, dtype=F64), "c": torch.ones(1, dtype=F64)}
    updates = {"a": torch.full((2,), 2.0, dtype=F64), "b": torch.full((3,), 4.0, dtype=F64), "c": None}
    out = holotx.apply_updates(params, updates, scale=[0.5, (0.25, torch.tensor(2.0, dtype=F64)), None])
    assert torch.equal(out["a"], torch.full((2,), 2.0, dtype=F64))
    assert torch.equal(out["b"], torch.full((3,), 3.0, dtype=F64))
    assert torch.equal(out["c"], params["c"])
    holotx.apply_updates(params, updates, inplace=True, scale=[0.5, (0.25, 2.0), None])
    assert torch.equal(params["b"], torch.full((3,), 3.0, dtype=F64))
    with pytest.raises(ValueError, match="scale has 2 entries for 3 leaves"):
        holotx.apply_updates(params, updates, scale=[1.0, 1.0])


# -- host decisions: a compiled step specialised on what the host knows -----------------

def _donated_step(tx, params, grads, state, decisions):
    """A donated step (state written in place, as the fused adapter's), given decisions."""
    updates, state, factor, _ = executor.run(tx, grads, state, params, donate=True, donate_updates=True,
                                             decisions=decisions)
    holotx.apply_updates(params, updates, inplace=True, scale=factor)
    return state


def _run_windows(tx: Any, step: Any, decide: bool, steps: int = 9) -> tuple[Any, Any]:
    params = _params()
    state = tx.init(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = holotx.tree.map(lambda p: torch.randn(p.shape, generator=gen, dtype=F64), params)
        decisions = executor.decisions(tx, state, params) if decide else {}
        state = step(tx, params, grads, state, decisions)
    return params, state


@pytest.mark.parametrize("name", ["lookahead", "scout"])
def test_decisions_are_the_wrappers_sync_flags(name):
    """A deciding pass over a wrapper's state records, per count, whether the coming step
    synchronises; nothing else of the step runs, and a transform without host decisions
    gives none."""
    tx = getattr(holotx, name)(holotx.sgd(0.1), sync_period=2)
    params = _params()
    state = tx.init(params)
    before = _clones(state)
    counts = holotx.tree.flatten(state.count)[0]
    assert executor.decisions(tx, state, params) == {id(c): False for c in counts}
    assert _equal(state, before)
    for c in counts:
        c.fill_(1)
    assert executor.decisions(tx, state, params) == {id(c): True for c in counts}
    adamw = holotx.adamw(1e-2)
    assert executor.decisions(adamw, adamw.init(params), params) == {}


def test_decide_computes_nothing_outside_a_deciding_pass():
    def values():
        raise AssertionError("computed outside a deciding pass")

    executor.decide(values)  # outside any step
    tx = holotx.lookahead(holotx.sgd(0.1), sync_period=2)
    params = _params()
    state = tx.init(params)
    for donate in (False, True):  # an eager step reads its flags itself
        tx.update(holotx.tree.map(torch.ones_like, params), state, params, donate=donate)


@pytest.mark.parametrize("name", ["lookahead", "scout"])
def test_a_compiled_donated_step_given_decisions_has_a_graph_per_decision(name):
    """Compiled, with the decisions made on the host before each call, a wrapper's donated
    step has one graph for the steps that synchronise and one for those that do not, and
    equals the eager step over three windows. Without decisions, one graph computes both
    and selects with torch.where, as before."""
    import torch._dynamo.testing

    tx = getattr(holotx, name)(holotx.adam(0.05), sync_period=3)
    eager = _run_windows(tx, _donated_step, decide=True)
    for decide, graphs in ((True, 2), (False, 1)):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        got = _run_windows(tx, torch.compile(_donated_step, backend=counter, fullgraph=True), decide=decide)
        assert counter.frame_count == graphs, (decide, counter.frame_count)
        for a, b in zip(holotx.tree.flatten(eager)[0], holotx.tree.flatten(got)[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch._dynamo.reset()


def test_an_eager_step_reads_its_own_flags_whatever_it_is_given():
    """Eager, the flags are read from the counts: a stale decision (the previous step's)
    passed to a donated step changes nothing."""
    tx = holotx.lookahead(holotx.sgd(0.1), sync_period=2)
    runs = []
    for stale in (False, True):
        params = _params()
        state = tx.init(params)
        for k in range(4):
            grads = holotx.tree.map(lambda p, k=k: torch.full_like(p, k + 1.0), params)
            decisions = {id(c): k % 2 == 0 for c in holotx.tree.flatten(state.count)[0]} if stale else {}
            state = _donated_step(tx, params, grads, state, decisions)
        runs.append(params)
    assert _equal(runs[0], runs[1])


def test_a_pure_step_ignores_decisions():
    """Decisions are keyed by the identity of state tensors, which a pure step replaces:
    given to one, they would match nothing at the next step (a compiled step would
    recompile at every step). A pure step ignores them and computes its flags itself."""
    tx = holotx.lookahead(holotx.sgd(0.1), sync_period=2)
    params = _params()
    state = tx.init(params)
    decisions = {id(c): True for c in holotx.tree.flatten(state.count)[0]}  # wrong on purpose
    grads = holotx.tree.map(torch.ones_like, params)
    updates, _, _, _ = executor.run(tx, grads, state, params, decisions=decisions)
    expected, _ = tx.update(grads, state, params)
    assert _equal(updates, expected)


MIDDLES = {
    "trace": lambda: holotx.trace(0.5),
    # (combinators that read the updates without the step's memory of them)
    "masked": lambda: holotx.masked(holotx.trace(0.5), {"w": True}),
    "partition": lambda: holotx.partition({"a": holotx.trace(0.5)}, {"w": "a"}),
}


@pytest.mark.parametrize("middle", sorted(MIDDLES))
def test_a_step_keeps_no_intermediate_updates_alive(middle):
    """A step remembers the trees it flattened, so that the updates one transform hands the
    next are not flattened again; the next transform's read forgets them, and so does the
    next transform's making its own (a combinator may read them without that memory), so a
    chain's intermediate updates are freed as they are used (a pure step would otherwise
    hold one fresh param-sized tree per transform until it ends)."""
    import gc
    import weakref

    made: list[Any] = []
    real_made = executor.Plan.made

    def recording(plan, t, leaves, spec, *rest):
        made.append([weakref.ref(x) for x in leaves])
        return real_made(plan, t, leaves, spec, *rest)

    seen_dead: list[bool] = []

    def check(updates, state, params=None):
        gc.collect()
        seen_dead.append(all(r() is None for r in made[0]))
        return holotx.scale(1.0).update(updates, state, params)

    probe = holotx.scale(1.0)
    probe_update = executor.register(lambda u, s, p=None, **extra: check(u, s, p))
    # (trace's updates are its new momentum, fresh in a pure step: the scaled gradient it
    # read is dead once it has run)
    tx = holotx.chain(holotx.scale(2.0), MIDDLES[middle](),
                      holotx.GradientTransformation(probe.init, probe_update))
    params = {"w": torch.ones(1000)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(executor.Plan, "made", recording)
        updates, _ = tx.update({"w": torch.ones(1000)}, tx.init(params), params)
    assert seen_dead == [True], "the first transform's updates were still alive when the third ran"
    torch.testing.assert_close(updates["w"], torch.full((1000,), 2.0))


@pytest.mark.parametrize(("bad", "message"), [
    (lambda c: 3, r"state.count at \['w'\] is a int, not a tensor"),
    (lambda c: None, r"state.count has no entry at \['w'\], where updates has a tensor"),
    (lambda c: c.to("meta"), r"state.count at \['w'\] has device meta where updates has cpu"),
])
def test_a_bad_step_count_is_named_and_changes_nothing(bad, message):
    """Step counts line up with the updates (a tensor wherever the updates have one, on
    their device): checked in one pass when they do, by the full check, which names the
    path, when they do not; the step raises before anything is written."""
    tx = holotx.adam(0.1)
    params = {"w": torch.ones(3), "b": torch.ones(2)}
    state = tx.init(params)
    adam_state = state[0]
    broken = adam_state._replace(count={**adam_state.count, "w": bad(adam_state.count["w"])})
    state = (broken, *state[1:])
    before = [x.clone() for x in holotx.tree.flatten(state)[0] if isinstance(x, torch.Tensor)
              and x.device.type == "cpu"]
    grads = {"w": torch.ones(3), "b": torch.ones(2)}
    with pytest.raises(ValueError, match=message):
        tx.update(grads, state, params, donate=True)
    after = [x for x in holotx.tree.flatten(state)[0]
             if isinstance(x, torch.Tensor) and x.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


class Duck:
    """Not a tensor, with a tensor's shape, device and dtype."""

    def __init__(self, t: torch.Tensor) -> None:
        self.shape, self.device, self.dtype = t.shape, t.device, t.dtype

    def __repr__(self) -> str:
        return "Duck"


def test_leaves_that_look_like_tensors_are_refused_by_name():
    """The step compares each leaf's (shape, device, dtype) with the updates' to skip the
    checks leaf by leaf; something that has those attributes without being a tensor (a
    NumPy 2 array, a stand-in) still gets the full checks, which name it, before anything
    is written."""
    np = pytest.importorskip("numpy")
    params = {"w": torch.zeros(3), "b": torch.zeros(2)}
    grads = {"w": torch.ones(3), "b": torch.ones(2)}
    sgd = holotx.sgd(0.1)  # (reads no params: only the step's own check sees them)
    sgd_state = sgd.init(params)
    with pytest.raises(ValueError, match=r"params at \['b'\] is a ndarray, not a tensor"):
        sgd.update(grads, sgd_state, {"w": params["w"], "b": np.zeros(2, dtype=np.float32)})
    tx = holotx.scale_by_adam()
    state = tx.init(params)
    broken = state._replace(nu={"w": Duck(params["w"]), "b": state.nu["b"]})
    with pytest.raises(ValueError, match=r"state.nu at \['w'\] is a Duck, not a tensor"):
        tx.update(grads, broken, params, donate=True)
    assert int(broken.count["w"]) == 0
    assert torch.equal(broken.mu["w"], torch.zeros(3))


def test_the_first_bad_leaf_is_named_as_before():
    """A state missing an entry and another with a wrong shape: the shape is named first,
    as the checks always ran (every state's leaves, then the params, then the entries)."""
    tx = holotx.scale_by_adam()
    params = {"w": torch.zeros(3), "b": torch.zeros(2)}
    state = tx.init(params)
    broken = state._replace(mu={"w": None, "b": state.mu["b"]}, nu={"w": state.nu["w"], "b": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"state.nu at \['b'\] has shape \(5,\) where updates has \(2,\)"):
        tx.update({"w": torch.ones(3), "b": torch.ones(2)}, broken, params)


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """The names of the torch functions called while it is active; ``pow(number, ...)`` for
    a power of a Python number (a bias correction's ``beta ** t``, with a tensor ``t``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        if name == "pow" and args and isinstance(args[0], (int, float)):
            name = "pow(number, ...)"
        self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["adamw", "adabelief", "tadam", "adamp", "adan"])
def test_an_eager_cpu_step_takes_its_bias_corrections_from_counts_read_on_the_host(name):
    """Plain eager on a CPU, counts that agree are read once and the bias corrections are
    Python floats, as torch.optim computes them: no tensor op per step for them (a dozen
    tiny ops, a quarter of a small model's step). A leaf whose count differs, or a beta
    given as a tensor, keeps the tensor formula, and every way gives the same step (the
    two ``pow``s may differ by an ulp)."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=F64), "b": torch.randn(3, dtype=F64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]
    as_tensor = torch.tensor(0.9, dtype=F64)
    rest = (0.92, 0.99) if name == "adan" else (0.999,)  # (Adan has three betas)
    ways = {"floats": getattr(holotx, name)(lr=0.1, betas=(0.9, *rest)),
            "tensor beta": getattr(holotx, name)(lr=0.1, betas=(as_tensor, *rest))}
    results = {}
    for way, tx in ways.items():
        state, ps = tx.init(params), dict(params)
        for g in grads:
            with _TorchCalls() as calls:
                updates, state = tx.update(g, state, ps)
            ps = holotx.apply_updates(ps, updates)
            assert ("pow(number, ...)" in calls.names) == (way == "tensor beta")
        results[way] = ps
    for k in params:
        torch.testing.assert_close(results["floats"][k], results["tensor beta"][k], rtol=1e-14, atol=1e-15)
    # Counts that differ (one leaf skipped a step) are stacked: the tensor formula.
    tx = ways["floats"]
    state = tx.init(params)
    _, state = tx.update({"w": grads[0]["w"], "b": None}, state, params)
    with _TorchCalls() as calls:
        tx.update(grads[1], state, params)
    assert "pow(number, ...)" in calls.names


@pytest.mark.parametrize("field", ["mu", "count"])
@pytest.mark.parametrize("donate", [False, True])
def test_a_state_with_a_subtree_for_a_leaf_is_named_and_changes_nothing(field, donate):
    """A subtree of a state where the updates have a leaf is named as a difference in
    structure, before anything is written."""
    params = {"w": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    tx = holotx.adamw()
    state = tx.init(params)
    inner = getattr(state[0], field)
    bad = {"w": {"x": inner["w"]}, "b": inner["b"]}
    state = (state[0]._replace(**{field: bad}), *state[1:])
    before = [t.clone() for t in holotx.tree.flatten(state)[0] if t is not None]
    with pytest.raises(ValueError, match=rf"state\.{field} does not match the structure of updates: "
                                         rf"state\.{field} lacks \['w'\]; state\.{field} has \['w'\]\['x'\]"):
        tx.update({"w": torch.ones(2, dtype=F64), "b": torch.ones(3, dtype=F64)}, state, params,
                  donate=donate)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in holotx.tree.flatten(state)[0]
                                                         if t is not None], strict=True))


def test_a_state_in_another_kind_of_dict_is_refused():
    """Structures are compared node type and all: a state built from an ``OrderedDict``
    does not match updates in a plain dict (the values would line up by key, but the
    step would hand back a state of another type)."""
    from collections import OrderedDict

    params = {"w": torch.zeros(2, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    tx = holotx.adamw()
    state = tx.init(OrderedDict(params))
    with pytest.raises(ValueError, match=r"state\.count does not match the structure of updates"):
        tx.update({k: torch.ones_like(v) for k, v in params.items()}, state, params)


def test_the_quick_flatten_of_a_known_structure_agrees_with_flatten_or_declines():
    """``tree.leaves_like`` gives ``flatten``'s leaves for a one-level dict, list or tuple of
    tensors and ``None`` of the expected structure (keys in any order), and declines (``None``:
    the caller flattens, and names any difference) whatever else it is given."""
    from collections import OrderedDict

    a, b = torch.zeros(2), torch.nn.Parameter(torch.ones(3))
    for ref, same in [({"b": a, "a": b, "c": None}, {"c": None, "a": b, "b": a}),
                      ([a, None, b], [a, None, b]), ((a, b), (a, b)), ({}, {})]:
        spec = holotx.tree.structure(ref)
        assert holotx.tree.leaves_like(same, spec) == holotx.tree.flatten(same)[0]
    spec = holotx.tree.structure({"w": a, "b": b})
    for other in [OrderedDict(w=a, b=b), {"w": a}, {"w": a, "b": b, "c": a}, {"w": {"x": a}, "b": b},
                  {"w": a, "b": 1.0}, [a, b], {"w": a, "b": [b]}]:
        assert holotx.tree.leaves_like(other, spec) is None
    assert holotx.tree.leaves_like((a, b), holotx.tree.structure([a, b])) is None
    assert holotx.tree.leaves_like({"w": {"x": a}}, holotx.tree.structure({"w": {"x": a}})) is None
    # nested=True: any depth, each dict's values by key whatever its kind; leaves still checked
    nested = holotx.tree.structure({"s": ({"w": a, "b": b}, None)})
    assert holotx.tree.leaves_like({"s": (OrderedDict(b=b, w=a), a)}, nested, nested=True) == [b, a, a]
    assert holotx.tree.leaves_like({"s": ({"w": a, "b": b}, None)}, nested) is None
    assert holotx.tree.leaves_like({"s": ({"w": a, "b": 1.0}, None)}, nested, nested=True) is None
    assert holotx.tree.leaves_like({"s": [{"w": a, "b": b}, None]}, nested, nested=True) is None
    # (a one-level spec with a leaf that is not a tensor: the tree's leaves are checked)
    assert holotx.tree.leaves_like({"w": a}, holotx.tree.structure({"w": 1})) == [a]


@pytest.mark.parametrize("name", ["adamw", "adabelief", "tadam", "adamp", "adan"])
def test_host_bias_corrections_take_an_int_beta_and_counts_of_any_dtype(name):
    """The host formula gives floats for an int beta (0: no second-moment memory), and counts
    that are not integers (a state converted to float64 as a whole) keep the tensor
    formula: both step as the floats and the int64 counts do."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=F64), "b": torch.randn(3, dtype=F64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(3)]

    def run(tx, convert=lambda state: state):
        state, ps = tx.init(params), dict(params)
        for g in grads:
            updates, state = tx.update(g, convert(state), ps)
            ps = holotx.apply_updates(ps, updates)
        return ps

    factory = getattr(holotx, name)
    first = (0.5, 0.9) if name == "adan" else (0.5,)  # (the last beta is the one under a square root)
    want = run(factory(lr=0.1, betas=(*first, 0.0)))
    as_float64 = lambda state: holotx.tree.map(lambda t: t.double(), state)
    int_beta, float_counts = factory(lr=0.1, betas=(*first, 0)), factory(lr=0.1, betas=(*first, 0.0))
    for got in (run(int_beta), run(float_counts, as_float64)):
        for k in params:
            torch.testing.assert_close(got[k], want[k], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_cached_scalar_keeps_the_sign_of_zero(dtype):
    """Plain eager on a CPU, Python scalars become cached 0-d tensors (and a list of equal
    ones, one tensor): a zero keeps its sign, in a list too, as torch's kernels keep it."""
    xs = [torch.ones(3, dtype=dtype), torch.ones(3, dtype=dtype)]
    for s in (0.0, -0.0, 0.0, [0.0, -0.0], [-0.0, 0.0], [-0.0, -0.0], [0.0, 0.0]):
        for ours, theirs in zip(ops.mul(xs, s), torch._foreach_mul(xs, s)):
            assert torch.equal(ours.signbit(), theirs.signbit()), s


def _ema_of_state_kind(make_state: Callable[[Any], Any]) -> Any:
    """A holotx transform whose state, built by ``make_state(mu)``, keeps an EMA ``mu``."""
    from holotx.base import own_transform
    from holotx.executor import multi_tensor_update

    def update(updates, state, params=None, **extra):
        def kernel(g, mu, _p):
            mu = holotx.ops.lerp_(mu, g, 0.1)
            return mu, mu
        new_updates, (mu,) = multi_tensor_update(kernel, updates, (state.mu,), state_names=("mu",))
        return new_updates, make_state(mu)

    return own_transform(lambda params: make_state(holotx.tree.zeros_like(params)), update)


class _StateThatIteratesNothing(NamedTuple):
    mu: Any

    def __iter__(self):  # (optree reads a NamedTuple's slots, not its __iter__)
        return iter(())


class _StateKeepingMoreInItsDict(collections.namedtuple("_Base", "count")):
    """A NamedTuple subclass whose instances keep ``mu`` in their ``__dict__``, registered
    with optree to flatten it too."""


def _with_mu(mu: Any) -> _StateKeepingMoreInItsDict:
    state = _StateKeepingMoreInItsDict(0)
    state.mu = mu
    return state


@pytest.mark.parametrize("kind", ["iterates_nothing", "keeps_more_in_its_dict"])
def test_a_pure_step_writes_no_tensor_of_an_unusual_state_class(kind):
    """Every tensor the flattened state holds is the caller's, however its NamedTuple
    iterates or what it keeps besides its fields (found in review: a walk over the state's
    fields that trusted ``__iter__`` let a pure step overwrite them)."""
    if kind == "iterates_nothing":
        tx = _ema_of_state_kind(_StateThatIteratesNothing)
    else:
        import warnings

        import optree

        # (optree warns of a NamedTuple registered anew; a second run finds it registered)
        with warnings.catch_warnings(), contextlib.suppress(ValueError):
            warnings.simplefilter("ignore")
            optree.register_pytree_node(
                _StateKeepingMoreInItsDict, lambda s: ((s.count, s.mu), None, ("count", "mu")),
                lambda _, children: _with_mu(children[1]),
                namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"))
        tx = _ema_of_state_kind(_with_mu)
    state = tx.init({"w": torch.zeros(3, dtype=F64)})
    _, new_state = tx.update({"w": torch.ones(3, dtype=F64)}, state)
    assert torch.equal(state.mu["w"], torch.zeros(3, dtype=F64))
    assert torch.allclose(new_state.mu["w"], torch.full((3,), 0.1, dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", ["adamw", "tadam", "lars", "adamp", "lookahead_adamw", "scout_lamb"])
def test_a_traced_step_flattens_its_updates_once(name, monkeypatch):
    """Dynamo runs optree's flattening as Python, building a structure node by node (most
    of the tracing time of a small step): a traced step flattens only the updates it is
    given, and reads every other tree of the same structure (params, each state buffer,
    the updates one transform hands the next) by a walk of that structure. Its result is
    eager's."""
    import optree

    flattened = []

    def counting_flatten(*args, **kwargs):
        flattened.append(1)
        return optree.tree_flatten(*args, **kwargs)

    counting = type("CountingOptree", (), {name: staticmethod(getattr(optree, name))
                                           for name in ("tree_unflatten", "tree_leaves")})
    counting.PyTreeSpec = optree.PyTreeSpec
    counting.tree_flatten = staticmethod(counting_flatten)
    monkeypatch.setattr(holotx.tree, "optree", counting)
    wrapper, _, inner = name.rpartition("_")
    tx = getattr(holotx, inner)(1e-2)
    if wrapper:
        tx = getattr(holotx, wrapper)(tx)
    params = {"w": torch.linspace(-1.0, 1.0, 6, dtype=F64).reshape(2, 3), "b": torch.ones(2, dtype=F64)}
    grads = {"w": torch.full((2, 3), 0.5, dtype=F64), "b": torch.tensor([0.25, -1.0], dtype=F64)}
    state = tx.init(params)
    compiled = torch.compile(tx.update, fullgraph=True, backend="eager")
    flattened.clear()  # (init's)
    updates, new_state = compiled(grads, state, params)
    assert len(flattened) == 1
    eager = holotx.tree.leaves(tx.update(grads, state, params))
    for a, b in zip(holotx.tree.leaves((updates, new_state)), eager, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_traced_tree_walks_agree_with_optree_or_decline():
    """Traced, ``tree.leaves`` walks dicts (string keys, in optree's sorted order), lists,
    tuples and NamedTuples itself and gives optree's leaves, whatever the leaves are;
    ``tree.leaves_like`` takes only a tree whose every container is of the structure's
    class (no other kind of dict, as ``flatten`` compares them), with tensor or ``None``
    leaves, and declines anything else (``None``: the caller flattens, and names any
    difference)."""
    from collections import OrderedDict

    class Pair(NamedTuple):
        first: Any
        second: Any

    class SubPair(Pair):
        pass

    a, b, c = torch.zeros(2), torch.ones(3), torch.full((1,), 2.0)
    trees = [
        {"z": a, "a": [b, None, (c, 1.5)], "m": Pair(None, {"y": True, "x": "s"})},
        OrderedDict(z=a, a=b),  # (insertion order: optree's own flattening)
        {2: a, 1: b},  # (keys that are not strings: optree's own flattening)
        SubPair(a, b),  # (a NamedTuple's subclass: optree's own flattening)
        [None, 3, {}],
        a,
    ]

    def read(trees):
        return [holotx.tree.leaves(t) for t in trees]

    traced = torch.compile(read, fullgraph=True, backend="eager")(trees)
    for got, t in zip(traced, trees, strict=True):
        want = optree.tree_leaves(t, none_is_leaf=True)
        assert len(got) == len(want)
        for x, y in zip(got, want):
            assert (torch.equal(x, y) if isinstance(y, torch.Tensor) else x == y and type(x) is type(y))

    ref = {"s": (Pair(a, b), None), "t": [c]}
    matching = {"t": [c], "s": (Pair(b, a), None)}
    others = [
        {"s": (Pair(a, b), None)},  # a key fewer
        {"s": (Pair(a, b), None), "t": [c], "u": a},  # a key more
        OrderedDict(s=(Pair(a, b), None), t=[c]),  # another kind of dict
        {"s": (SubPair(a, b), None), "t": [c]},  # another NamedTuple class
        {"s": [Pair(a, b), None], "t": [c]},  # a list for a tuple
        {"s": (Pair(a, b), None), "t": [c, c]},  # a list of another length
        {"s": (Pair(a, 1.0), None), "t": [c]},  # a leaf that is not a tensor
        {"s": (Pair(a, [b]), None), "t": [c]},  # a subtree for a leaf
    ]

    def like(ref, matching, others):
        spec = holotx.tree.structure(ref)
        return holotx.tree.leaves_like(matching, spec), [holotx.tree.leaves_like(o, spec) for o in others]

    got, declined = torch.compile(like, fullgraph=True, backend="eager")(ref, matching, others)
    want = optree.tree_leaves(matching, none_is_leaf=True)
    assert len(got) == len(want)
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(got, want))
    assert declined == [None] * len(others)

    # A structure made outside the trace is optree's C++ object, which dynamo cannot walk
    # without breaking the graph: declined, and the caller flattens.
    outside = holotx.tree.structure(ref)
    traced = torch.compile(lambda t: holotx.tree.leaves_like(t, outside), fullgraph=True, backend="eager")
    assert traced(matching) is None


@pytest.mark.usefixtures("fresh_dynamo")
def test_traced_trees_keep_eager_key_order_and_box_dicts_without_a_tensor():
    """Traced, a step's results list their dict keys as eager's do (a structure the step
    remembers is reused only for a tree whose dicts have its key order), and a dict that
    holds no tensor (a dtype beside a ``None``: constants to dynamo) is still boxed
    through optree."""
    def reordered(updates, _params):
        return {key: updates[key] for key in reversed(list(updates))}

    params = {"w": torch.ones(2, dtype=F64), "b": torch.ones(1, dtype=F64)}
    grads = {"w": torch.full((2,), -0.5, dtype=F64), "b": torch.full((1,), 0.5, dtype=F64)}
    tx = holotx.chain(holotx.scale(2.0), holotx.stateless(reordered), holotx.scale_by_adam())
    state = tx.init(params)
    eager_updates, eager_state = tx.update(grads, state, params)
    updates, new_state = torch.compile(tx.update, fullgraph=True, backend="eager")(grads, state, params)
    assert list(eager_updates) == list(updates) == ["b", "w"]
    assert list(new_state[2].mu) == list(eager_state[2].mu) == ["b", "w"]

    def round_trip(tree):
        leaves, spec = holotx.tree.flatten(tree)
        return holotx.tree.unflatten(spec, leaves), holotx.tree.leaves(tree)

    tree = {"meta": {"dtype": torch.float32, "scale": None}, "w": torch.ones(1)}
    rebuilt, leaves = torch.compile(round_trip, fullgraph=True, backend="eager")(tree)
    assert rebuilt["meta"] == tree["meta"]
    assert leaves[:2] == [torch.float32, None]
