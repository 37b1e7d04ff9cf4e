"""Lookahead and Scout as higher-order transforms: what they promise beyond the harness.

The numbers are checked against pylocron in ``test_wrappers_holocron.py`` and against a
NumPy reference in ``test_wrappers_reference.py``. Here: the limits of the rule (rate 1 is
the inner optimizer, rate 0 goes back to the window's start), composition (inside and
around chains, nested, under ``masked``/``partition``), ``None`` gradients, exact resume
from a saved state, and the fast paths (donated steps, the deferred learning rate).

Tolerances: a synchronising step returns ``slow_new - params``, which ``apply_updates``
adds back, so the params land on the slow weights to one rounding of the params: float64
comparisons of params use 1e-15 relative to the params' scale (a few ulps), everything
else is bit-for-bit.
"""

from __future__ import annotations

import pytest
import torch

import holotx
from holotx import executor
from holotx.flat import make_step

F64 = torch.float64


def make_params(dtype=F64):
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=gen, dtype=dtype),
        "b": torch.randn(3, generator=gen, dtype=dtype),
        "deep": [torch.randn(2, 2, 3, generator=gen, dtype=dtype),
                 torch.randn(1, generator=gen, dtype=dtype)],
    }


def grads_for(params, step):
    """A smooth closed-loop gradient (of a quadratic bowl) plus a little seeded noise."""
    gen = torch.Generator().manual_seed(1000 + step)
    return holotx.tree.map(lambda p: 0.5 * p + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype),
                           params)


def train(tx, steps, params=None, grads_fn=grads_for):
    params = make_params() if params is None else params
    state = tx.init(params)
    history = []
    for step in range(steps):
        updates, state = tx.update(grads_fn(params, step), state, params)
        params = holotx.apply_updates(params, updates)
        history.append((params, state))
    return history


def assert_close(a, b, rtol=1e-15):
    for x, y in zip(holotx.tree.flatten(a)[0], holotx.tree.flatten(b)[0]):
        if x is None or y is None:
            assert x is y
            continue
        scale = max(y.abs().max().item(), 1.0)
        assert (x - y).abs().max().item() <= rtol * scale, (x - y).abs().max().item()


def assert_equal(a, b):
    for x, y in zip(holotx.tree.flatten(a)[0], holotx.tree.flatten(b)[0]):
        assert (x is None and y is None) or torch.equal(x, y)


def test_rate_one_is_the_inner_optimizer():
    inner = train(holotx.adamw(1e-2, weight_decay=0.1), 13)
    for wrapper in (holotx.lookahead, holotx.scout):
        wrapped = train(wrapper(holotx.adamw(1e-2, weight_decay=0.1), sync_rate=1.0, sync_period=3), 13)
        for (p_inner, _), (p_wrapped, s) in zip(inner, wrapped):
            assert_close(p_wrapped, p_inner)


def test_rate_zero_goes_back_to_the_start_of_each_window():
    start = make_params()
    history = train(holotx.lookahead(holotx.sgd(0.1, momentum=0.9), sync_rate=0.0, sync_period=4), 12)
    for step, (params, state) in enumerate(history, start=1):
        if step % 4 == 0:
            assert_close(params, start)
            assert_equal(state.slow, start)
        else:
            assert not torch.equal(params["w"], start["w"])


def test_sync_moves_slow_weights_towards_the_fast_ones_and_params_onto_them():
    """With plain SGD the fast weights of each step are known: ``p - lr * g``."""
    k, rate, lr = 3, 0.3, 0.1
    tx = holotx.lookahead(holotx.sgd(lr), rate, k)
    params = make_params()
    state = tx.init(params)
    slow = make_params()
    for step in range(1, 10):
        grads = grads_for(params, step)
        fast = holotx.tree.map(lambda p, g: p - lr * g, params, grads)
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        if step % k == 0:
            slow = holotx.tree.map(lambda s, f: s + rate * (f - s), slow, fast)
            assert_close(params, slow)
        else:
            assert_close(params, fast)
        assert_close(state.slow, slow)
        assert all(int(c) == step for c in holotx.tree.flatten(state.count)[0])


@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_inner_state_carries_on_across_syncs(wrapper):
    """The momentum buffer is never reset: it is the running trace of the gradients fed."""
    tx = wrapper(holotx.sgd(0.1, momentum=0.9), 0.5, 2)
    params = make_params()
    state = tx.init(params)
    buffer = None
    for step in range(7):
        grads = grads_for(params, step)
        buffer = grads if buffer is None else holotx.tree.map(lambda b, g: 0.9 * b + g, buffer, grads)
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        trace = holotx.tree.find_states(state.inner_state, holotx.TraceState)[0].trace
        assert_close(trace, buffer, rtol=1e-15)


def test_scout_sync_period_one_is_lookahead():
    lookahead = train(holotx.lookahead(holotx.adam(1e-2), 0.3, 1), 8)
    scout = train(holotx.scout(holotx.adam(1e-2), 0.3, 1), 8)
    for (p_l, s_l), (p_s, s_s) in zip(lookahead, scout):
        assert_equal(p_s, p_l)
        assert_equal(s_s.slow, s_l.slow)


def test_scout_keeps_four_statistics_per_element_whatever_the_period():
    for k in (2, 6, 50):
        state = holotx.scout(holotx.sgd(0.1), sync_period=k).init(make_params())
        stats = [state.update_mean, state.update_m2, state.update_min, state.update_max]
        per_element = sum(x.numel() for s in stats for x in holotx.tree.flatten(s)[0])
        assert per_element == 4 * sum(p.numel() for p in holotx.tree.flatten(make_params())[0])


# ---------------------------------------------------------------------------- composition

def clip_then(tx):
    return holotx.chain(holotx.clip_by_global_norm(0.5), tx)


@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_inside_a_chain_equals_around_the_same_chain(wrapper):
    """``chain(clip, wrapper(sgd))`` and ``wrapper(chain(clip, sgd))`` are the same rule."""
    inside = train(clip_then(wrapper(holotx.sgd(0.1, momentum=0.9), 0.5, 3)), 10)
    around = train(wrapper(clip_then(holotx.sgd(0.1, momentum=0.9)), 0.5, 3), 10)
    for (p_in, _), (p_out, _) in zip(inside, around):
        assert_equal(p_in, p_out)


def test_nested_wrappers_count_the_inner_wrappers_steps():
    """``lookahead(scout(sgd, k=2), k=3)``: the inner syncs every 2 steps, the outer every 3."""
    history = train(holotx.lookahead(holotx.scout(holotx.sgd(0.1), 0.5, 2), 0.5, 3), 12)
    outer_slow = []
    for step, (params, state) in enumerate(history, start=1):
        inner_count = holotx.tree.flatten(state.inner_state.count)[0][0]
        assert int(inner_count) == step
        if step % 3 == 0:
            assert_close(params, state.slow)
            outer_slow.append(state.slow)
    assert len(outer_slow) == 4
    assert not torch.equal(outer_slow[0]["w"], outer_slow[1]["w"])


@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_under_masked_only_the_selected_leaves_are_wrapped(wrapper):
    mask = {"w": True, "b": False, "deep": [True, False]}
    masked = train(holotx.masked(wrapper(holotx.sgd(0.1, momentum=0.9), 0.5, 2), mask), 6)
    alone = train(wrapper(holotx.sgd(0.1, momentum=0.9), 0.5, 2), 6)
    start = make_params()
    for (p_m, s_m), (p_a, _) in zip(masked, alone):
        # wrapped leaves follow the wrapper; masked-out ones get the raw gradients added
        assert_equal(p_m["w"], p_a["w"])
        assert_equal(p_m["deep"][0], p_a["deep"][0])
        assert s_m.inner_state.slow["b"] is None
    assert not torch.equal(p_m["b"], start["b"])


def test_under_partition_each_group_has_its_own_wrapper():
    labels = {"w": "slow", "b": "fast", "deep": ["slow", "fast"]}
    tx = holotx.partition({"slow": holotx.lookahead(holotx.sgd(0.1), 0.5, 2),
                           "fast": holotx.scout(holotx.sgd(0.2), 0.0, 3)}, labels)
    history = train(tx, 6)
    lookahead_only = train(holotx.lookahead(holotx.sgd(0.1), 0.5, 2), 6)
    for (p, _), (p_l, _) in zip(history, lookahead_only):
        assert_equal(p["w"], p_l["w"])
        assert_equal(p["deep"][0], p_l["deep"][0])
    # Scout's rate averages over the tensors it sees: b and deep[1] only
    _check_partition_scout(history)


def _check_partition_scout(history):
    """The "fast" group's leaves follow a Scout run over those two leaves alone, fed the
    gradients the full run gave them."""
    params = make_params()
    sub_tx = holotx.scout(holotx.sgd(0.2), 0.0, 3)
    sub = {"b": params["b"], "deep": [None, params["deep"][1]]}
    state = sub_tx.init(sub)
    full = params
    for step, (p_full, _) in enumerate(history):
        g = grads_for(full, step)
        updates, state = sub_tx.update({"b": g["b"], "deep": [None, g["deep"][1]]}, state, sub)
        sub = holotx.apply_updates(sub, updates)
        assert_equal(sub["b"], p_full["b"])
        assert_equal(sub["deep"][1], p_full["deep"][1])
        full = p_full


# ---------------------------------------------------------------------------- None gradients

@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_a_leaf_without_gradient_keeps_its_count_and_syncs_after_its_own_k_steps(wrapper):
    """``b`` has no gradient at step 2: it is not stepped (count, slow weights and Scout's
    statistics unchanged), and it synchronises after its own third step (global step 4)
    while the other leaves synchronise at step 3."""
    k = 3

    def grads_fn(params, step):
        g = grads_for(params, step)
        if step == 1:
            g["b"] = None
        return g

    history = train(wrapper(holotx.sgd(0.1, momentum=0.9), 0.5, k), 6, grads_fn=grads_fn)
    (_, s1), (_, s2), (p3, s3), (p4, s4) = history[:4]
    assert int(s2.count["b"]) == 1
    assert int(s2.count["w"]) == 2
    assert_equal(s2.slow, s1.slow)
    if wrapper is holotx.scout:
        for field in ("update_mean", "update_m2", "update_min", "update_max"):
            assert torch.equal(getattr(s2, field)["b"], getattr(s1, field)["b"])
    assert_close(p3["w"], s3.slow["w"])          # w syncs at global step 3
    assert not torch.equal(s3.slow["w"], s2.slow["w"])
    assert torch.equal(s3.slow["b"], s2.slow["b"])  # b has taken 2 steps: no sync yet
    assert_close(p4["b"], s4.slow["b"])          # b's third step
    assert not torch.equal(s4.slow["b"], s3.slow["b"])


# ---------------------------------------------------------------------------- resume, fast paths

@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_resuming_from_a_saved_state_continues_bit_for_bit(wrapper, tmp_path):
    make = lambda: wrapper(holotx.adamw(1e-2, weight_decay=0.1), 0.5, 4)
    history = train(make(), 10)
    params, state = history[5]  # mid-window: the statistics and counts matter
    torch.save({"params": params, "state": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    tx = make()
    params, state = loaded["params"], loaded["state"]
    for step in range(6, 10):
        updates, state = tx.update(grads_for(params, step), state, params)
        params = holotx.apply_updates(params, updates)
        assert_equal(params, history[step][0])
        assert_equal(state, history[step][1])


@pytest.mark.parametrize("name", ["lookahead", "scout", "scout_holocron", "lookahead_of_lamb"])
def test_donated_step_equals_pure_step(name):
    """``make_step(tx, donate=True)`` (in place) gives the pure step's numbers: bit for
    bit for Scout, which needs its inner updates scaled every step; to a rounding for
    Lookahead, whose steps without a sync hand the learning rate back to be applied as
    ``p += factor * u`` (one rounding fewer than ``p + (factor * u)``)."""
    make = {
        "lookahead": lambda: holotx.lookahead(holotx.adamw(1e-2, weight_decay=0.1), 0.5, 3),
        "scout": lambda: holotx.scout(holotx.sgd(0.1, momentum=0.9), 0.2, 3),
        "scout_holocron": lambda: holotx.scout(holotx.sgd(0.1, momentum=0.9), 0.2, 3, compat="holocron"),
        "lookahead_of_lamb": lambda: holotx.chain(holotx.lookahead(holotx.lamb(1e-2), 0.5, 2),
                                                  holotx.scale(1.0)),
    }[name]
    pure_step, donated_step = make_step(make()), make_step(make(), donate=True)
    pure_params = make_params()
    donated_params = holotx.tree.map(torch.clone, pure_params)
    tx = make()
    pure_state, donated_state = tx.init(pure_params), tx.init(donated_params)
    for step in range(7):
        grads = grads_for(pure_params, step)
        pure_params, pure_state = pure_step(pure_params, grads, pure_state)
        donated_params, donated_state = donated_step(donated_params, holotx.tree.map(torch.clone, grads),
                                                     donated_state)
        if name.startswith("lookahead"):
            torch.testing.assert_close(donated_params, pure_params, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(donated_state, pure_state, rtol=1e-14, atol=1e-15)
        else:
            assert_equal(donated_params, pure_params)
            assert_equal(donated_state, pure_state)


def test_lookahead_hands_the_learning_rate_back_only_when_nothing_syncs():
    """Asked for the final scaling (as the donated ``make_step`` asks), a step without a
    sync returns the inner updates unscaled and hands ``-lr`` over; a sync step keeps it
    and returns the real move onto the slow weights."""
    tx = holotx.lookahead(holotx.sgd(0.1), 0.5, 2)
    params = make_params()
    state = tx.init(params)
    grads = grads_for(params, 0)
    updates, state, factor, _ = executor.run(tx, grads, state, params, hand_over_scale=True)
    assert factor == -0.1
    assert_equal(updates, grads)  # sgd without momentum: the unscaled update is the gradient
    updates, state, factor, _ = executor.run(tx, grads, state, params, hand_over_scale=True)
    assert factor is None
    assert_close(holotx.apply_updates(params, updates), state.slow)


def test_update_without_params_is_an_error():
    tx = holotx.scout(holotx.sgd(0.1))
    state = tx.init(make_params())
    with pytest.raises(ValueError, match="scout needs params"):
        tx.update(make_params(), state)


@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_meta_gradient_of_a_tensor_sync_rate_under_autograd(wrapper):
    """A ``sync_rate`` that requires grad, params and grads that do not: plain autograd
    differentiates the final loss through two syncs, and agrees with central differences."""

    def final_loss(rate):
        tx = wrapper(holotx.sgd(0.1, momentum=0.9), rate, 3)
        params = make_params()
        state = tx.init(params)
        for step in range(7):
            updates, state = tx.update(grads_for(params, step), state, params)
            params = holotx.apply_updates(params, updates)
        return sum((p ** 2).sum() for p in holotx.tree.flatten(params)[0])

    rate = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(final_loss(rate), rate)
    h = 1e-6
    with torch.no_grad():
        up, down = final_loss(torch.tensor(0.3 + h, dtype=F64)), final_loss(torch.tensor(0.3 - h, dtype=F64))
    fd = (up - down) / (2 * h)
    assert abs(grad.item() - fd.item()) <= 1e-6 * max(1.0, abs(fd.item()))


def test_counts_live_on_the_host_and_statistics_dtypes_are_checked():
    """Counts are CPU tensors whatever the params' device (the sync decision is read
    without a device sync); Scout's statistics have their own dtype (float32 for bfloat16
    params), and a state whose statistics have another is refused, naming the path."""
    params = {"w": torch.randn(3, dtype=torch.bfloat16)}
    tx = holotx.scout(holotx.sgd(0.1))
    state = tx.init(params)
    assert state.count["w"].device.type == "cpu"
    assert state.update_m2["w"].dtype == torch.float32
    bad = state._replace(update_m2={"w": torch.zeros(3, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=r"state.update_m2 at \['w'\] has dtype torch.bfloat16"):
        tx.update({"w": torch.randn(3, dtype=torch.bfloat16)}, bad, params)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("wrapper", [holotx.lookahead, holotx.scout])
def test_device_path_equals_host_path(wrapper, donate, monkeypatch):
    """On an accelerator (or traced) the sync decision stays a tensor and ``torch.where``
    applies it; on the CPU in eager mode it is read on the host. Forcing the first path on
    the CPU (no per-step scalar may be read) gives the same numbers, bit for bit."""
    make = lambda: wrapper(holotx.adamw(1e-2, weight_decay=0.1), 0.2, 3)
    host = train_with(make(), donate)
    monkeypatch.setattr(holotx.ops, "host_scalars_ok", lambda tensors: False)
    device = train_with(make(), donate)
    for (p_h, s_h), (p_d, s_d) in zip(host, device):
        assert_equal(p_d, p_h)
        assert_equal(s_d, s_h)


def train_with(tx, donate, steps=7):
    step_fn = make_step(tx, donate=donate)
    params = make_params()
    state = tx.init(params)
    history = []
    for step in range(steps):
        params, state = step_fn(params, grads_for(params, step), state)
        history.append((holotx.tree.map(torch.clone, params), holotx.tree.map(torch.clone, state)))
    return history
