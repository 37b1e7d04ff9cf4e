"""Specification of the combinators (chain, named_chain, masked, partition, freeze,
apply_if_finite, multi_steps) and of ``apply_updates``.

Tolerances: routing a leaf through a combinator must not change its arithmetic, so a
combinator and the plain transform it wraps are compared *bitwise* (``torch.equal``): the
same elementwise kernels see the same values in the same order. The one exception is
``multi_steps`` against an arithmetic mean of the gradients, which is a different formula
(running mean vs. sum / k); see that test for its tolerance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import holotx
from holotx import transforms as T
from holotx.tree import flatten

F64 = torch.float64


def params_tree(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc": {"w": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)},
        "dec": {"w": torch.randn(4, 2, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64)},
    }


def grad_stream(n: int, seed: int = 1) -> list[dict]:
    return [params_tree(seed + 100 * i) for i in range(n)]


def assert_trees_equal(a: Any, b: Any) -> None:
    la, sa = flatten(a)
    lb, sb = flatten(b)
    assert sa == sb, (sa, sb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), (x, y)
            assert x.dtype == y.dtype, (x.dtype, y.dtype)
            assert torch.equal(x, y), (x, y)
        else:
            assert x == y, (x, y)


def run(tx: holotx.GradientTransformation, params: Any, grads: list[Any]):
    """Run ``tx`` over ``grads``; return the final params, state and the list of updates."""
    state = tx.init(params)
    history = []
    for g in grads:
        updates, state = tx.update(g, state, params)
        history.append(updates)
        params = holotx.apply_updates(params, updates)
    return params, state, history


def sub(tree: dict, key: str) -> dict:
    return {key: tree[key]}


# --------------------------------------------------------------------------- chain

def test_chain_applies_in_order_and_keeps_a_tuple_of_states():
    params = params_tree()
    g = grad_stream(1)[0]
    a = holotx.chain(T.add_decayed_weights(0.5), T.scale(2.0))  # 2 (g + 0.5 p)
    b = holotx.chain(T.scale(2.0), T.add_decayed_weights(0.5))  # 2 g + 0.5 p
    ua, sa = a.update(g, a.init(params), params)
    ub, _ = b.update(g, b.init(params), params)
    w, p = g["enc"]["w"], params["enc"]["w"]
    assert torch.equal(ua["enc"]["w"], (w + 0.5 * p) * 2.0)
    assert torch.equal(ub["enc"]["w"], w * 2.0 + 0.5 * p)
    assert isinstance(sa, tuple)
    assert len(sa) == 2


def test_empty_chain_is_identity():
    tx = holotx.chain()
    params = params_tree()
    g = grad_stream(1)[0]
    state = tx.init(params)
    assert state == ()
    u, _ = tx.update(g, state, params)
    assert_trees_equal(u, g)


def test_chain_passes_params_and_extra_keywords_to_every_transform():
    seen = []

    def recorder(tag):
        def update(updates, state, params=None, **extra):
            seen.append((tag, params is not None, extra))
            return updates, state
        return holotx.GradientTransformation(lambda p: holotx.EmptyState(), update)

    tx = holotx.chain(recorder("a"), recorder("b"))
    params = params_tree()
    tx.update(grad_stream(1)[0], tx.init(params), params, donate=False, custom=3)
    assert [tag for tag, _, _ in seen] == ["a", "b"]
    for _, got_params, extra in seen:  # the caller's keywords arrive, and nothing of the executor's
        assert got_params
        assert extra == {"custom": 3}


def test_chain_equals_the_optimizer_it_spells():
    """adamw is chain(scale_by_adam, add_decayed_weights, scale_by_lr): bitwise equal."""
    params, grads = params_tree(), grad_stream(5)
    pa, sa, _ = run(holotx.adamw(1e-2, weight_decay=0.1), params, grads)
    pb, sb, _ = run(holotx.chain(T.scale_by_adam(), T.add_decayed_weights(0.1), T.scale_by_lr(1e-2)),
                    params, grads)
    assert_trees_equal(pa, pb)
    assert_trees_equal(sa, sb)


# --------------------------------------------------------------------------- named_chain

def test_named_chain_state_is_keyed_by_name_and_results_equal_chain():
    params, grads = params_tree(), grad_stream(4)
    named = holotx.named_chain(("adam", T.scale_by_adam()), ("decay", T.add_decayed_weights(0.1)),
                               ("lr", T.scale_by_lr(1e-2)))
    plain = holotx.chain(T.scale_by_adam(), T.add_decayed_weights(0.1), T.scale_by_lr(1e-2))
    pn, sn, _ = run(named, params, grads)
    pp, sp, _ = run(plain, params, grads)
    assert_trees_equal(pn, pp)
    assert isinstance(sn, dict)
    assert list(sn) == ["adam", "decay", "lr"]
    assert isinstance(sn["adam"], T.ScaleByAdamState)
    assert all(int(c) == 4 for c in holotx.tree.flatten(sn["adam"].count)[0])
    assert_trees_equal(sn["adam"], sp[0])


def test_named_chain_rejects_a_state_with_other_names():
    tx = holotx.named_chain(("a", T.scale(1.0)), ("b", T.scale(2.0)))
    params = params_tree()
    with pytest.raises(ValueError, match="named_chain"):
        tx.update(grad_stream(1)[0], {"a": holotx.EmptyState(), "c": holotx.EmptyState()}, params)


# --------------------------------------------------------------------------- masked

MASKS = {
    "pytree": {"enc": {"w": True, "b": False}, "dec": {"w": True, "b": False}},
    "prefix": {"enc": False, "dec": True},
    "callable": lambda p: {k: {n: t.ndim > 1 for n, t in v.items()} for k, v in p.items()},
}


def _mask_leaves(mask, params) -> dict[tuple[str, str], bool]:
    m = mask(params) if callable(mask) else mask
    return {(k, n): (m[k] if isinstance(m[k], bool) else m[k][n]) for k in params for n in params[k]}


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_masked_applies_inner_where_true_and_passes_others_through(mask_kind):
    mask = MASKS[mask_kind]
    params, grads = params_tree(), grad_stream(3)
    keep = _mask_leaves(mask, params)
    tx = holotx.masked(holotx.adam(1e-2), mask)
    state = tx.init(params)
    # Reference: adam alone, on the masked-in leaves only (None elsewhere).
    ref = holotx.adam(1e-2)
    only = lambda t: {k: {n: (t[k][n] if keep[(k, n)] else None) for n in t[k]} for k in t}
    ref_state = ref.init(only(params))
    for g in grads:
        g_before = {k: {n: t.clone() for n, t in v.items()} for k, v in g.items()}
        u, state = tx.update(g, state, params)
        ru, ref_state = ref.update(only(g), ref_state, only(params))
        for (k, n), kept in keep.items():
            if kept:
                assert torch.equal(u[k][n], ru[k][n]), (k, n)
            else:  # untouched: the gradient itself
                assert torch.equal(u[k][n], g[k][n]), (k, n)
        assert_trees_equal(g, g_before)  # the incoming gradients are not modified
    assert isinstance(state, holotx.MaskedState)
    assert_trees_equal(state.inner_state, ref_state)
    (adam_state,) = [s for s in state.inner_state if isinstance(s, T.ScaleByAdamState)]
    for (k, n), kept in keep.items():  # masked-out leaves keep no state
        assert (adam_state.mu[k][n] is None) == (not kept)
        assert (adam_state.nu[k][n] is None) == (not kept)


def test_masked_mask_must_hold_bools():
    params = params_tree()
    with pytest.raises(ValueError, match=r"\['enc'\]"):
        holotx.masked(T.scale(2.0), {"enc": 1, "dec": True}).init(params)


# --------------------------------------------------------------------------- partition

@pytest.mark.parametrize("labels", [
    {"enc": "fast", "dec": "slow"},
    {"enc": {"w": "fast", "b": "fast"}, "dec": {"w": "slow", "b": "slow"}},
    lambda p: {k: ("fast" if k == "enc" else "slow") for k in p},
], ids=["prefix", "full", "callable"])
def test_partition_equals_two_separate_optimizers(labels):
    """Two labels, different lr and weight decay: the same as one optimizer per subtree."""
    fast = lambda: holotx.adamw(1e-2, weight_decay=0.1)
    slow = lambda: holotx.adamw(1e-3, weight_decay=0.0)
    params, grads = params_tree(), grad_stream(5)
    pp, sp, _ = run(holotx.partition({"fast": fast(), "slow": slow()}, labels), params, grads)
    pe, se, _ = run(fast(), sub(params, "enc"), [sub(g, "enc") for g in grads])
    pd, _sd, _ = run(slow(), sub(params, "dec"), [sub(g, "dec") for g in grads])
    assert_trees_equal(pp, {**pe, **pd})
    assert isinstance(sp, holotx.PartitionState)
    assert set(sp.inner_states) == {"fast", "slow"}
    (fast_adam,) = [s for s in sp.inner_states["fast"] if isinstance(s, T.ScaleByAdamState)]
    (ref_adam,) = [s for s in se if isinstance(s, T.ScaleByAdamState)]
    assert fast_adam.mu["dec"]["w"] is None, "a label keeps no state for the other label's leaves"
    assert torch.equal(fast_adam.mu["enc"]["w"], ref_adam.mu["enc"]["w"])


def test_partition_unknown_label_raises_naming_path():
    tx = holotx.partition({"a": holotx.sgd(0.1), "b": holotx.sgd(0.01)}, {"enc": "a", "dec": "c"})
    with pytest.raises(ValueError) as info:
        tx.init(params_tree())
    assert "['dec']" in str(info.value)
    assert "'c'" in str(info.value)


# --------------------------------------------------------------------------- freeze

def test_frozen_params_never_move():
    params, grads = params_tree(), grad_stream(10)
    tx = holotx.chain(holotx.adamw(1e-2, weight_decay=0.1), holotx.freeze({"enc": True, "dec": False}))
    final, _, history = run(tx, params, grads)
    for n in params["enc"]:
        assert torch.equal(final["enc"][n], params["enc"][n])
        assert all(torch.count_nonzero(u["enc"][n]) == 0 for u in history)
    for n in params["dec"]:
        assert not torch.equal(final["dec"][n], params["dec"][n])


# --------------------------------------------------------------------------- apply_if_finite

def _with(g: dict, value: float) -> dict:
    """``g`` with one entry of one leaf replaced by ``value`` (a NaN or an infinity)."""
    out = {k: {n: t.clone() for n, t in v.items()} for k, v in g.items()}
    out["dec"]["b"][1] = value
    return out


def _apply_if_finite_sequence():
    grads = grad_stream(8)
    # finite, NaN, -inf, finite, NaN, NaN, NaN (3rd in a row > max 2: applied), finite
    return [grads[0], _with(grads[1], float("nan")), _with(grads[2], float("-inf")), grads[3],
            _with(grads[4], float("nan")), _with(grads[5], float("inf")), _with(grads[6], float("nan")),
            grads[7]]


# (notfinite_count, last_finite, total_notfinite, skipped) after each step of the sequence
EXPECTED_COUNTERS = [(0, True, 0, False), (1, False, 1, True), (2, False, 2, True), (0, True, 2, False),
                     (1, False, 3, True), (2, False, 4, True), (3, False, 5, False), (0, True, 5, False)]


def _check_apply_if_finite(step_fn):
    params = params_tree()
    tx = holotx.apply_if_finite(holotx.adam(1e-2), max_consecutive_errors=2)
    ref = holotx.adam(1e-2)
    state, ref_state = tx.init(params), ref.init(params)
    for i, (g, (nf, last, total, skipped)) in enumerate(zip(_apply_if_finite_sequence(), EXPECTED_COUNTERS)):
        u, new_state = step_fn(tx, g, state, params)
        assert isinstance(new_state, holotx.ApplyIfFiniteState)
        assert int(new_state.notfinite_count) == nf, i
        assert bool(new_state.last_finite) == last, i
        assert int(new_state.total_notfinite) == total, i
        if skipped:
            for leaf in flatten(u)[0]:
                assert torch.count_nonzero(leaf) == 0, f"step {i}: a skipped step gives zero updates"
            assert_trees_equal(new_state.inner_state, state.inner_state)
        else:
            ru, ref_state = ref.update(g, ref_state, params)
            if i < 6:  # before the forced step the run equals adam on the finite steps alone
                assert_trees_equal(u, ru)
                assert_trees_equal(new_state.inner_state, ref_state)
            else:  # the forced step and after: applied, so the non-finite value got in
                assert not all(bool(torch.isfinite(x).all()) for x in flatten(u)[0])
        state = new_state


def test_apply_if_finite_skips_nonfinite_steps_and_counts_them():
    _check_apply_if_finite(lambda tx, g, s, p: tx.update(g, s, p))


def test_apply_if_finite_needs_no_host_sync_under_compile(fresh_dynamo):
    """``fullgraph=True`` turns any graph break (``.item()``, ``bool(tensor)``) into an error."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = {}

    def step_fn(tx, g, s, p):
        if "f" not in compiled:
            compiled["f"] = torch.compile(lambda g, s, p: tx.update(g, s, p), fullgraph=True, backend=counter)
        return compiled["f"](g, s, p)

    _check_apply_if_finite(step_fn)
    assert counter.frame_count >= 1, "the update really ran compiled"


def test_apply_if_finite_state_counters_are_0d_tensors():
    state = holotx.apply_if_finite(holotx.sgd(0.1), 1).init(params_tree())
    for c in (state.notfinite_count, state.last_finite, state.total_notfinite):
        assert isinstance(c, torch.Tensor)
        assert c.dim() == 0
    assert state.last_finite.dtype == torch.bool
    assert bool(state.last_finite)
    assert int(state.notfinite_count) == int(state.total_notfinite) == 0


# --------------------------------------------------------------------------- multi_steps

def _running_mean(gs: list[dict]) -> dict:
    """optax.MultiSteps' accumulator: ``acc <- acc + (g - acc) / (n + 1)`` from zero."""
    acc = {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in gs[0].items()}
    for n_acc, g in enumerate(gs):
        acc = {k: {n: acc[k][n] + (g[k][n] - acc[k][n]) / float(n_acc + 1) for n in g[k]} for k in g}
    return acc


def test_multi_steps_every_3_is_inner_on_running_mean_with_zeros_between():
    k = 3
    params, grads = params_tree(), grad_stream(9)
    tx = holotx.multi_steps(holotx.adam(1e-2), every_k=k)
    ref = holotx.adam(1e-2)
    state, ref_state = tx.init(params), ref.init(params)
    ref_params = params
    for i, g in enumerate(grads):
        prev_inner = state.inner_state
        u, state = tx.update(g, state, params)
        n_in_window = i % k + 1
        assert int(state.mini_step) == n_in_window % k
        assert int(state.gradient_step) == (i + 1) // k
        if n_in_window < k:
            for leaf in flatten(u)[0]:
                assert torch.count_nonzero(leaf) == 0, f"micro-step {i}: zero updates"
            assert_trees_equal(state.inner_state, prev_inner)
            assert_trees_equal(state.acc_grads, _running_mean(grads[i - n_in_window + 1: i + 1]))
        else:
            mean = _running_mean(grads[i - k + 1: i + 1])
            ru, ref_state = ref.update(mean, ref_state, ref_params)
            assert_trees_equal(u, ru)
            assert_trees_equal(state.inner_state, ref_state)
            assert_trees_equal(state.acc_grads, {kk: {n: torch.zeros_like(t) for n, t in v.items()}
                                                 for kk, v in params.items()})
            ref_params = holotx.apply_updates(ref_params, ru)
        params = holotx.apply_updates(params, u)
    assert_trees_equal(params, ref_params)


def test_multi_steps_equals_inner_on_arithmetic_mean():
    """Against ``(g1 + g2 + g3) / 3``: the running mean rounds differently by a few ulp, and
    SGD is linear in the gradient, so params agree to 1e-14 relative (a few ulp, with margin)."""
    k = 3
    params, grads = params_tree(), grad_stream(6)
    final, _, _ = run(holotx.multi_steps(holotx.sgd(0.1, momentum=0.9), every_k=k), params, grads)
    means = [{kk: {n: sum(g[kk][n] for g in grads[j:j + k]) / k for n in grads[0][kk]} for kk in grads[0]}
             for j in range(0, len(grads), k)]
    ref, _, _ = run(holotx.sgd(0.1, momentum=0.9), params, means)
    for (a, b) in zip(flatten(final)[0], flatten(ref)[0]):
        assert (a - b).abs().max() <= 1e-14 * b.abs().max()


def test_multi_steps_every_1_is_the_inner_transform():
    params, grads = params_tree(), grad_stream(4)
    pa, _, _ = run(holotx.multi_steps(holotx.adam(1e-2), every_k=1), params, grads)
    pb, _, _ = run(holotx.adam(1e-2), params, grads)
    assert_trees_equal(pa, pb)


def test_multi_steps_none_gradient_adds_nothing():
    params = params_tree()
    tx = holotx.multi_steps(holotx.sgd(0.1), every_k=3)
    g1, g2 = grad_stream(2)
    state = tx.init(params)
    _, state = tx.update(g1, state, params)
    acc_b = state.acc_grads["dec"]["b"].clone()
    g2["dec"]["b"] = None
    _, state = tx.update(g2, state, params)
    assert torch.equal(state.acc_grads["dec"]["b"], acc_b)


# --------------------------------------------------------------------------- apply_updates

class Pair(NamedTuple):
    a: torch.Tensor
    b: Any


def test_apply_updates_pure_returns_new_tree_and_leaves_inputs_alone():
    pair = Pair(torch.randn(1, dtype=F64), torch.randn(2, 2, dtype=F64))
    params = {"x": torch.randn(3, dtype=F64), "ys": [torch.randn(2, dtype=F64), pair]}
    updates = holotx.tree.map(lambda t: torch.randn_like(t), params)
    p_before = holotx.tree.map(torch.clone, params)
    u_before = holotx.tree.map(torch.clone, updates)
    out = holotx.apply_updates(params, updates)
    assert_trees_equal(params, p_before)
    assert_trees_equal(updates, u_before)
    assert_trees_equal(out, holotx.tree.map(lambda p, u: p + u, params, updates))
    assert isinstance(out["ys"][1], Pair)


def test_apply_updates_inplace_writes_into_the_params():
    params = {"w": torch.nn.Parameter(torch.randn(3, 2, dtype=F64)),
              "b": torch.nn.Parameter(torch.randn(2, dtype=F64))}
    ptrs = {k: v.data_ptr() for k, v in params.items()}
    expected = {k: v.detach() + 0.5 for k, v in params.items()}
    with torch.no_grad():
        updates = {k: torch.full_like(v, 0.5) for k, v in params.items()}
        out = holotx.apply_updates(params, updates, inplace=True)
    assert out is params
    for k, v in params.items():
        assert v.data_ptr() == ptrs[k]
        assert isinstance(v, torch.nn.Parameter)
        assert torch.equal(v.detach(), expected[k])


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize(("p_dtype", "u_dtype"), [(torch.float32, F64), (torch.bfloat16, torch.float32),
                                                  (F64, torch.float32)])
def test_apply_updates_keeps_the_param_dtype(p_dtype, u_dtype, inplace):
    """The result has the param's dtype and equals ``p + u.to(p.dtype)`` (the update is cast first)."""
    p = torch.randn(5, dtype=F64).to(p_dtype)
    u = (1e-3 * torch.randn(5, dtype=F64)).to(u_dtype)
    expected = p + u.to(p_dtype)
    out = holotx.apply_updates({"p": p}, {"p": u}, inplace=inplace)["p"]
    assert out.dtype == p_dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
def test_apply_updates_none_update_leaves_param_as_is(inplace):
    params = {"a": torch.randn(3, dtype=F64), "b": torch.randn(2, dtype=F64)}
    b_before = params["b"].clone()
    out = holotx.apply_updates(params, {"a": torch.ones(3, dtype=F64), "b": None}, inplace=inplace)
    assert out["b"] is params["b"]
    assert torch.equal(out["b"], b_before)
