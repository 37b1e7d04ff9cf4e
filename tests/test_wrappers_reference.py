r"""Lookahead and Scout (default mode, ``compat=None``) against a float64 NumPy reference.

The reference below is written from the docstrings of :func:`holotx.lookahead` and
:func:`holotx.scout`, not from their code. Per leaf it keeps the step count, the slow
weights, the inner optimizer's state and, explicitly, the list of the inner updates
:math:`u_1, \dots, u_j` of the current window. At the end of a window it computes, with
two-pass (textbook) statistics over that list,

.. math::
    \rho = \frac{\sqrt{\sum_j (u_j - \bar u)^2 / (k-1)}}{\max_j |u_j - \bar u|}

per element, leaves out the elements whose updates were all equal (``max == min``), takes
the mean :math:`c_t` per tensor, leaves out the tensors with no element left, and
synchronises with :math:`\alpha = \max(1 - \operatorname{mean}_t c_t, \text{sync\_rate})`
(``sync_rate`` when no tensor is left): :math:`\phi \mathrel{+}= \alpha(\theta - \phi)` when
:math:`\alpha > 0`, then :math:`\theta = \phi`. holotx keeps O(1) running statistics
instead (Welford's mean and M2, the minimum, the maximum); these tests check that they
give the textbook numbers. The inner optimizers (SGD with momentum 0.9, torch's first
buffer :math:`b_1 = g_1`; AdamW with torch's bias corrections and decoupled decay) are
re-implemented too, since their state follows the wrapped (synchronised) params.

What is compared, after every step (40 steps, float64): params, slow weights, per-leaf
counts, the inner state, the window statistics of the state (``update_mean`` /
``update_m2`` / ``update_min`` / ``update_max``: mean, sum of squared deviations, min and
max of the window's updates so far; ``0, 0, +inf, -inf`` right after a synchronisation)
and the rate itself (read with a spy on :func:`holotx.wrappers.coherence_rate`).

Tolerances (``assert_matches``): element-wise, ``|a - e| <= rtol * (|e| + scale)`` where
``scale`` is the largest finite magnitude in the expected tensor (infinities must match
exactly). A bare element-wise relative error is meaningless where a value is the
cancellation of terms of the tensor's size (an AdamW update whose decay and Adam direction
nearly cancel, a window mean near 0): both sides are then exact only to ``eps * scale``
(in a trial run bare relative errors reached 1.8e-12, on the window means of AdamW, k = 6).
``rtol = 1e-12`` for the element-wise quantities (params, slow weights, counts, inner
state, window statistics): a few thousand ulps for 40 steps of a dozen roundings each,
which the two sides round differently (lerp vs. two-pass mean, folded bias corrections).
``1e-10`` (absolute, the rate being in [0, 1]) for the rate, a reduction: each element's
rho is a ratio of deviations from the window mean, whose relative rounding error is that
of the updates times ``|u| / |u - mean|`` (large for AdamW's nearly constant steps), then
summed over the elements in another order. The params it feeds are still held to
``1e-12``. Worst errors measured (torch 2.13, CPU, all tests): params 1.4e-15, slow
weights 1.2e-15, inner state 7.2e-15 (AdamW's ``mu``), window statistics 9.6e-14 (M2),
rate 4.9e-15.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import holotx
from holotx.flat import FlatLayout, make_step
from holotx.wrappers import coherence_rate

F64 = torch.float64
RTOL = 1e-12
RATE_TOL = 1e-10
STEPS = 40
SHAPES = {"one": (1,), "mat": (3, 4), "conv": (2, 3, 2, 2)}
SCOUT_MODULE = importlib.import_module("holotx.wrappers.scout")


# ------------------------------------------------------------------- NumPy reference

class SGD:
    """``torch.optim.SGD`` without dampening: :math:`b_1 = g_1`, :math:`b_t = \\mu b_{t-1}
    + g_t`, :math:`u = -\\eta b_t` (:math:`u = -\\eta g` without momentum)."""

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        self.lr, self.momentum = lr, momentum

    def init(self, p):
        return {"count": 0, "trace": np.zeros_like(p)}

    def update(self, p, g, st):
        st["count"] += 1
        if self.momentum == 0:
            return -self.lr * g
        st["trace"] = g.copy() if st["count"] == 1 else self.momentum * st["trace"] + g
        return -self.lr * st["trace"]


class AdamW:
    """``torch.optim.AdamW``: bias-corrected moments, ``eps`` outside the square root, and
    ``p *= 1 - lr * wd`` taken as part of the update."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay

    def init(self, p):
        return {"count": 0, "mu": np.zeros_like(p), "nu": np.zeros_like(p)}

    def update(self, p, g, st):
        st["count"] += 1
        t = st["count"]
        st["mu"] = self.b1 * st["mu"] + (1 - self.b1) * g
        st["nu"] = self.b2 * st["nu"] + (1 - self.b2) * g * g
        m_hat = st["mu"] / (1 - self.b1 ** t)
        direction = m_hat / (np.sqrt(st["nu"]) / math.sqrt(1 - self.b2 ** t) + self.eps)
        return -self.lr * self.wd * p - self.lr * direction


def scout_rate(windows: list[np.ndarray], sync_rate: float) -> float:
    """The docstring's rate from the windows (each ``(k, *shape)``: the k updates of one
    tensor), with two-pass statistics."""
    per_tensor = []
    for w in windows:
        k = w.shape[0]
        varied = w.max(axis=0) > w.min(axis=0)  # all equal: 0/0, left out
        if not varied.any():
            continue  # no element left: the tensor is left out of C
        w = w[:, varied]
        dev = w - w.sum(axis=0) / k
        std = np.sqrt((dev * dev).sum(axis=0) / (k - 1))
        per_tensor.append(float(np.mean(std / np.abs(dev).max(axis=0))))
    if not per_tensor:
        return sync_rate
    return max(1 - sum(per_tensor) / len(per_tensor), sync_rate)


class Reference:
    """Lookahead (``adaptive=False``, rate ``sync_rate``) or Scout (``adaptive=True``)
    around a NumPy inner rule. A ``None`` gradient skips its leaf: no inner step, no
    count, no window entry."""

    def __init__(self, params, inner, sync_rate: float, sync_period: int, *, adaptive: bool) -> None:
        self.inner, self.sync_rate, self.k, self.adaptive = inner, sync_rate, sync_period, adaptive
        self.params = {n: np.array(p, dtype=np.float64) for n, p in params.items()}
        self.slow = {n: p.copy() for n, p in self.params.items()}
        self.count = dict.fromkeys(self.params, 0)
        self.window: dict[str, list[np.ndarray]] = {n: [] for n in self.params}
        self.inner_state = {n: inner.init(p) for n, p in self.params.items()}

    def step(self, grads) -> float | None:
        """One step; returns the rate when some leaf synchronised, else ``None``."""
        stepped = []
        for n, g in grads.items():
            if g is None:
                continue
            self.count[n] += 1
            u = self.inner.update(self.params[n], np.asarray(g, dtype=np.float64), self.inner_state[n])
            self.window[n].append(u)
            self.params[n] = self.params[n] + u
            stepped.append(n)
        ends = [n for n in stepped if self.count[n] % self.k == 0]
        if not ends:
            return None
        rate = (scout_rate([np.stack(self.window[n]) for n in ends], self.sync_rate) if self.adaptive
                else self.sync_rate)
        for n in ends:
            if rate > 0:
                self.slow[n] = self.slow[n] + rate * (self.params[n] - self.slow[n])
            self.params[n] = self.slow[n].copy()
            self.window[n] = []
        return rate

    def stats(self, n: str) -> dict[str, np.ndarray]:
        """Two-pass statistics of leaf ``n``'s window so far, named as ScoutState's fields."""
        p = self.params[n]
        if not self.window[n]:
            return {"update_mean": np.zeros_like(p), "update_m2": np.zeros_like(p),
                    "update_min": np.full_like(p, np.inf), "update_max": np.full_like(p, -np.inf)}
        w = np.stack(self.window[n])
        mean = w.sum(axis=0) / len(w)
        return {"update_mean": mean, "update_m2": ((w - mean) ** 2).sum(axis=0),
                "update_min": w.min(axis=0), "update_max": w.max(axis=0)}


# ------------------------------------------------------------------------- helpers

INNERS = {
    # name: (holotx transform, NumPy rule, {reference field: getter of holotx's inner state tree})
    "sgd_momentum": (lambda: holotx.sgd(0.1, momentum=0.9), lambda: SGD(0.1, momentum=0.9),
                     {"trace": lambda s: s[0].trace}),
    "adamw": (lambda: holotx.adamw(0.05, weight_decay=0.1), lambda: AdamW(0.05, weight_decay=0.1),
              {"count": lambda s: s[0].count, "mu": lambda s: s[0].mu, "nu": lambda s: s[0].nu}),
}
STATS = ("update_mean", "update_m2", "update_min", "update_max")


def matching_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    """``max |a - e| / (|e| + scale)``, ``scale`` the largest finite ``|e|``; infinities
    must match exactly."""
    a = actual.detach().to(F64).numpy()
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape
    infinite = np.isinf(e)
    np.testing.assert_array_equal(a[infinite], e[infinite])
    a, e = a[~infinite], e[~infinite]
    if e.size == 0:
        return 0.0
    scale = float(np.abs(e).max())
    if scale == 0:  # all zeros: nothing to be relative to, so exactly
        return 0.0 if np.array_equal(a, e) else math.inf
    return float((np.abs(a - e) / (np.abs(e) + scale)).max())


def assert_matches(actual: torch.Tensor, expected: np.ndarray, what: str, rtol: float = RTOL) -> None:
    err = matching_error(actual, expected)
    assert err <= rtol, f"{what}: error {err:.3g} > {rtol:g}"


def random_params(seed: int, shapes=SHAPES, dtype=F64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=F64).to(dtype) for n, s in shapes.items()}


def gradient_stream(params, seed: int):
    """An endless stream of float64 normal gradients shaped like ``params``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}


def to_numpy(grads):
    return {n: None if g is None else g.numpy() for n, g in grads.items()}


@pytest.fixture
def rates(monkeypatch) -> list:
    """The rate of each Scout step in order (``None`` where no leaf synchronised): a spy
    on ``coherence_rate`` as the scout module calls it."""
    seen: list = []

    def spy(*args, **kwargs):
        rate = coherence_rate(*args, **kwargs)
        seen.append(rate)
        return rate

    monkeypatch.setattr(SCOUT_MODULE, "coherence_rate", spy)
    return seen


def assert_same_as_reference(state, params, ref: Reference, inner_fields, step: int, *, scout: bool) -> None:
    for n in ref.params:
        where = f"step {step}, leaf {n!r}"
        assert int(state.count[n]) == ref.count[n], where
        assert_matches(params[n], ref.params[n], f"params, {where}")
        assert_matches(state.slow[n], ref.slow[n], f"slow, {where}")
        for field, get in inner_fields.items():
            assert_matches(get(state.inner_state)[n], np.asarray(ref.inner_state[n][field]),
                           f"inner {field}, {where}")
        if scout:
            for field, expected in ref.stats(n).items():
                assert_matches(getattr(state, field)[n], expected, f"{field}, {where}")


def assert_rate(got, expected, where: str) -> None:
    if expected is None:
        assert got is None, where
    else:
        assert isinstance(got, float), where  # plain eager on the CPU: a Python float
        assert abs(got - expected) <= RATE_TOL, f"rate at {where}: {got!r} != {expected!r}"


def assert_finite(state, params, *, sync_period: int) -> None:
    """No NaN/inf in the params, slow weights, mean and M2; min/max are finite inside a
    window and exactly +inf/-inf right after a synchronisation."""
    for n, p in params.items():
        for what, x in (("params", p), ("slow", state.slow[n]), ("update_mean", state.update_mean[n]),
                        ("update_m2", state.update_m2[n])):
            assert torch.isfinite(x).all(), f"{what}[{n!r}] is not finite"
        if int(state.count[n]) % sync_period == 0:
            assert torch.all(state.update_min[n] == math.inf), f"update_min[{n!r}] after a reset"
            assert torch.all(state.update_max[n] == -math.inf), f"update_max[{n!r}] after a reset"
        else:
            assert torch.isfinite(state.update_min[n]).all(), f"update_min[{n!r}] inside a window"
            assert torch.isfinite(state.update_max[n]).all(), f"update_max[{n!r}] inside a window"


def run_wrapper(tx, params, grads_seq, steps: int):
    """``steps`` steps of ``tx``; yields ``(step, grads, params, state)`` after each."""
    state = tx.init(params)
    for step in range(1, steps + 1):
        grads = next(grads_seq)
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        yield step, grads, params, state


# ------------------------------------------------------- 1. step by step vs. the reference

CONFIGS = [(k, rate) for k in (1, 2, 3, 6) for rate in (0.0, 0.3, 1.0)]


@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize(("sync_period", "sync_rate"), CONFIGS, ids=[f"k{k}-rate{r}" for k, r in CONFIGS])
def test_scout_matches_reference_every_step(inner, sync_period, sync_rate, rates):
    """40 steps: params, slow weights, counts, inner state, window statistics and rate."""
    tx_factory, ref_factory, inner_fields = INNERS[inner]
    params = random_params(0)
    ref = Reference({n: p.numpy() for n, p in params.items()}, ref_factory(), sync_rate, sync_period,
                    adaptive=True)
    tx = holotx.scout(tx_factory(), sync_rate, sync_period)
    adaptive_syncs = 0
    for step, grads, params, state in run_wrapper(tx, params, gradient_stream(params, 1), STEPS):
        expected_rate = ref.step(to_numpy(grads))
        assert_rate(rates[-1], expected_rate, f"step {step}")
        adaptive_syncs += expected_rate is not None and expected_rate > sync_rate
        assert_same_as_reference(state, params, ref, inner_fields, step, scout=True)
    assert len(rates) == STEPS
    # Coverage: where 1 - C can exceed sync_rate (k >= 3, rate below the bound), it did.
    if sync_period >= 3 and sync_rate < 1 - math.sqrt(sync_period) / (sync_period - 1) - 0.05:
        assert adaptive_syncs > 0


@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize(("sync_period", "sync_rate"), CONFIGS, ids=[f"k{k}-rate{r}" for k, r in CONFIGS])
def test_lookahead_matches_reference_every_step(inner, sync_period, sync_rate):
    """The same reference with the fixed rate ``sync_rate``."""
    tx_factory, ref_factory, inner_fields = INNERS[inner]
    params = random_params(0)
    ref = Reference({n: p.numpy() for n, p in params.items()}, ref_factory(), sync_rate, sync_period,
                    adaptive=False)
    tx = holotx.lookahead(tx_factory(), sync_rate, sync_period)
    for step, grads, params, state in run_wrapper(tx, params, gradient_stream(params, 1), STEPS):
        ref.step(to_numpy(grads))
        assert_same_as_reference(state, params, ref, inner_fields, step, scout=False)


def test_scout_with_none_gradients_matches_reference(rates):
    """A leaf whose gradient is ``None`` is not stepped: its count, window, slow weights
    and inner state stay, so its windows end later, and the rate at a step is taken over
    the leaves that synchronise at that step only."""
    tx_factory, ref_factory, inner_fields = INNERS["adamw"]
    params = random_params(2)
    ref = Reference({n: p.numpy() for n, p in params.items()}, ref_factory(), 0.0, 3, adaptive=True)
    tx = holotx.scout(tx_factory(), 0.0, 3)
    stream = gradient_stream(params, 3)
    skipped = {2: "one", 5: "one", 6: "conv", 11: "mat"}  # step: the leaf with no gradient

    def grads_seq():
        for step in range(1, 19):
            grads = next(stream)
            if step in skipped:
                grads[skipped[step]] = None
            yield grads

    before = None
    for step, grads, params, state in run_wrapper(tx, params, grads_seq(), 18):
        assert_rate(rates[-1], ref.step(to_numpy(grads)), f"step {step}")
        assert_same_as_reference(state, params, ref, inner_fields, step, scout=True)
        if step in skipped:
            n = skipped[step]
            for field in ("slow", *STATS):
                assert torch.equal(getattr(state, field)[n], getattr(before, field)[n]), (step, field)
        before = state
    assert len({int(c) for c in state.count.values()}) > 1  # the leaves really are out of step


# ------------------------------------------------------------------- 2. the 0/0 cases

def scout_and_reference(params, sync_rate, sync_period, compat=None):
    tx = holotx.scout(holotx.sgd(0.1), sync_rate, sync_period, compat=compat)
    ref = Reference({n: p.numpy() for n, p in params.items()}, SGD(0.1), sync_rate, sync_period,
                    adaptive=True)
    return tx, ref


def frozen_element_grads(params, seed):
    """Normal gradients, but ``mat[1, 2]`` always gets exactly 0."""
    for grads in gradient_stream(params, seed):
        grads["mat"][1, 2] = 0.0
        yield grads


def test_frozen_element_is_left_out(rates):
    """(a) An element whose updates are all 0 is left out of its tensor's mean; the rate is
    the reference's, finite, and the step is taken (``1 - C`` > 0 here)."""
    params = random_params(4)
    tx, ref = scout_and_reference(params, 0.0, 3)
    synced = []
    for step, grads, params, state in run_wrapper(tx, params, frozen_element_grads(params, 5), 9):
        expected = ref.step(to_numpy(grads))
        assert_rate(rates[-1], expected, f"step {step}")
        assert_same_as_reference(state, params, ref, {}, step, scout=True)
        assert_finite(state, params, sync_period=3)
        if expected is not None:
            synced.append(expected)
    assert len(synced) == 3
    assert all(0 < r < 1 for r in synced)


@pytest.mark.parametrize("compat", [None, "holocron"], ids=["default", "holocron"])
def test_frozen_element_in_holocron_mode_discards_the_window(compat, rates):
    """The same run with ``compat="holocron"``: the frozen element's 0/0 makes the rate NaN,
    there is no outer step, and the params go back to the old slow weights (the window's
    steps are thrown away); the default mode takes the step."""
    params = random_params(4)
    tx, _ = scout_and_reference(params, 0.0, 3, compat=compat)
    *_, (step, _, new_params, state) = run_wrapper(tx, params, frozen_element_grads(params, 5), 3)
    assert step == 3
    assert math.isnan(rates[-1]) == (compat == "holocron")
    for n in params:
        if compat == "holocron":
            assert torch.equal(state.slow[n], params[n])
        else:
            assert not torch.allclose(state.slow[n], params[n])
        # the params land on the slow weights, to the rounding of one addition
        torch.testing.assert_close(new_params[n], state.slow[n], rtol=0, atol=1e-15)


def test_frozen_tensor_is_left_out_of_the_mean(rates):
    """(b) A tensor whose gradient is always 0 counts for nothing: the rate and the other
    leaves are those of the same run without that tensor."""
    params = random_params(6)
    with_frozen = {**params, "frozen": torch.randn(4, 2, dtype=F64)}
    tx, ref = scout_and_reference(with_frozen, 0.0, 3)

    def grads_seq(with_zero):
        for grads in gradient_stream(params, 7):
            yield {**grads, "frozen": torch.zeros(4, 2, dtype=F64)} if with_zero else grads

    runs = zip(run_wrapper(tx, with_frozen, grads_seq(True), 9), run_wrapper(tx, params, grads_seq(False), 9))
    for (step, grads, got, state), (_, _, alone, _) in runs:
        with_rate = rates[-2]
        assert_rate(with_rate, ref.step(to_numpy(grads)), f"step {step}")
        assert_rate(rates[-1], with_rate, f"step {step} without the frozen tensor")
        assert_same_as_reference(state, got, ref, {}, step, scout=True)
        assert_finite(state, got, sync_period=3)
        for n in params:
            # to rounding only: the sum over the tensors is taken over one more (zero) term
            torch.testing.assert_close(got[n], alone[n], rtol=1e-14, atol=0)
    assert all(r is None or r > 0 for r in rates)  # the adaptive rate was used


@pytest.mark.parametrize("sync_rate", [0.0, 0.3], ids=["rate0", "rate0.3"])
def test_all_constant_updates_give_sync_rate(sync_rate, rates):
    """(c) Constant gradients with plain SGD: every element's updates are equal, no tensor is
    left, and the rate is ``sync_rate`` exactly (0: back to the slow weights)."""
    params = random_params(8)

    def constant_grads():
        while True:
            yield {n: torch.full(p.shape, 0.25 * (i + 1), dtype=F64)
                   for i, (n, p) in enumerate(params.items())}

    tx, ref = scout_and_reference(params, sync_rate, 3)
    for step, grads, got, state in run_wrapper(tx, params, constant_grads(), 9):
        expected = ref.step(to_numpy(grads))
        if step % 3 == 0:
            assert rates[-1] == expected == sync_rate
        assert_same_as_reference(state, got, ref, {}, step, scout=True)
        assert_finite(state, got, sync_period=3)


@pytest.mark.parametrize("sync_rate", [0.0, 0.3, 1.0], ids=["rate0", "rate0.3", "rate1"])
def test_sync_period_one_is_lookahead_bit_for_bit(sync_rate, rates):
    """(d) With k = 1 every element is constant over its window of one: Scout is Lookahead."""
    params = random_params(9)
    scout_run = run_wrapper(holotx.scout(holotx.sgd(0.1, momentum=0.9), sync_rate, 1), params,
                            gradient_stream(params, 10), 10)
    lookahead_run = run_wrapper(holotx.lookahead(holotx.sgd(0.1, momentum=0.9), sync_rate, 1), params,
                                gradient_stream(params, 10), 10)
    for (step, _, got, state), (_, _, expected, la_state) in zip(scout_run, lookahead_run):
        assert rates[-1] == sync_rate
        for n in params:
            assert torch.equal(got[n], expected[n]), (step, n)
            assert torch.equal(state.slow[n], la_state.slow[n]), (step, n)
        assert_finite(state, got, sync_period=1)


# ----------------------------------------------------------------- 3. coherence_rate

def sums(ratio_sum, count):
    """One leaf's entry: the sum of rho over its elements and how many had rho defined."""
    return torch.tensor(ratio_sum, dtype=F64), torch.tensor(count, dtype=torch.int64)


def rate_of(leaf_sums, flags, sync_rate=0.0, *, holocron=False):
    return coherence_rate(leaf_sums, flags, sync_rate, holocron=holocron, device=torch.device("cpu"))


def test_coherence_rate_on_hand_computed_sums():
    """``sums[i]`` is ``(sum of rho, number of elements where it is defined)`` per leaf
    (one value per tensor of a flat buffer); ``flags`` says whose window ends."""
    two = [sums(1.5, 3), sums(0.8, 1)]  # c = 0.5 and 0.8: C = 0.65, whatever the sizes
    assert rate_of(two, [True, True]) == pytest.approx(0.35, abs=1e-15)
    assert isinstance(rate_of(two, [True, True]), float)  # eager on the CPU: a Python float
    assert rate_of(two, [True, True], 0.5) == 0.5  # the floor wins
    assert rate_of(two, [True, False]) == pytest.approx(0.5, abs=1e-15)  # only leaves that synchronise
    # A tensor with no defined element is left out of C, not counted as c = 0.
    assert rate_of([sums(1.5, 3), sums(0.0, 0)], [True, True]) == pytest.approx(0.5, abs=1e-15)
    # No tensor left: sync_rate exactly; where C > 1 the rate is the floor too.
    assert rate_of([sums(0.0, 0), sums(0.0, 0)], [True, True], 0.3) == 0.3
    assert rate_of([sums(2.8, 2)], [True]) == 0.0
    # A leaf whose window does not end has no entry (None); no entry at all: None.
    assert rate_of([None, sums(0.6, 2)], [False, True]) == pytest.approx(0.7, abs=1e-15)
    assert rate_of([None, None], [False, False], 0.3) is None
    # One flat buffer with three segments, the middle one all padding.
    flat = (torch.tensor([1.5, 0.0, 0.8], dtype=F64), torch.tensor([3, 0, 1]))
    assert rate_of([flat], [True]) == pytest.approx(0.35, abs=1e-15)


def test_coherence_rate_holocron_mode():
    """Holocron's rate: the per-tensor means (``(mean, None)``) averaged, NaN kept."""
    means = [(torch.tensor(0.5, dtype=F64), None), (torch.tensor(0.8, dtype=F64), None)]
    assert rate_of(means, [True, True], holocron=True) == pytest.approx(0.35, abs=1e-15)
    with_nan = [means[0], (torch.tensor(math.nan, dtype=F64), None)]
    assert math.isnan(rate_of(with_nan, [True, True], 0.5, holocron=True))


# ------------------------------------------------------------------- 4. rate bounds

@pytest.mark.parametrize("sync_period", [2, 3, 4, 6, 10], ids=lambda k: f"k{k}")
def test_rate_lies_between_zero_and_the_bound(sync_period, rates):
    r"""With ``sync_rate=0`` the rate lies in :math:`[0, \max(0, 1 - \sqrt k/(k-1))]`
    (:math:`\rho \ge \sqrt k/(k-1)`, so for k = 2 it is 0), for normal, heavy-tailed and
    sparse windows; the identity inner transform makes the updates the gradients."""
    bound = max(0.0, 1 - math.sqrt(sync_period) / (sync_period - 1))
    shapes = {"a": (7,), "b": (4, 5), "c": (2, 2, 3, 1)}
    seen = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        params = random_params(seed, shapes)
        draws = [rng.standard_normal, rng.standard_cauchy,
                 lambda s: rng.standard_normal(s) * (rng.random(s) < 0.3)]
        tx = holotx.scout(holotx.identity(), 0.0, sync_period)
        state = tx.init(params)
        window = {n: [] for n in params}
        for _ in range(sync_period):
            grads = {n: torch.from_numpy(draws[seed % 3](p.shape)) for n, p in params.items()}
            for n, g in grads.items():
                window[n].append(g.numpy())
            _, state = tx.update(grads, state, params)
        rate = rates[-1]
        assert 0.0 <= rate <= bound + 1e-15
        assert abs(rate - scout_rate([np.stack(w) for w in window.values()], 0.0)) <= RATE_TOL
        seen.append(rate)
    if sync_period >= 3:
        assert max(seen) > 0  # the interval is reached into, not only its floor


@pytest.mark.parametrize("sync_period", [3, 4, 6, 10], ids=lambda k: f"k{k}")
def test_rate_bounds_are_attained(sync_period, rates):
    r"""One outlier step and k - 1 equal ones give :math:`\rho = \sqrt k/(k-1)` exactly, the
    largest rate. For even k, steps of +1 and -1 in equal numbers give the largest
    :math:`\rho = \sqrt{k/(k-1)} > 1`: then :math:`1 - C < 0` and the rate is the floor."""
    params = {"w": torch.zeros(3, 2, dtype=F64)}
    tx = holotx.scout(holotx.identity(), 0.1, sync_period)
    state = tx.init(params)
    for j in range(sync_period):
        _, state = tx.update({"w": torch.full((3, 2), 2.0 if j == 1 else -1.0, dtype=F64)}, state, params)
    assert rates[-1] == pytest.approx(1 - math.sqrt(sync_period) / (sync_period - 1), abs=1e-15)
    if sync_period % 2 == 0:
        for j in range(sync_period):
            _, state = tx.update({"w": torch.full((3, 2), (-1.0) ** j, dtype=F64)}, state, params)
        assert rates[-1] == 0.1


# ----------------------------------------------------------------------- 5. bfloat16

def test_bfloat16_params_keep_float32_statistics():
    """Half-precision params: slow weights in bfloat16, window statistics in float32, and
    a finite result that follows the float64 run to bfloat16's resolution."""
    params = random_params(11, dtype=torch.bfloat16)
    tx = holotx.scout(holotx.adamw(0.05, weight_decay=0.1), 0.0, 3)
    reference = holotx.scout(holotx.adamw(0.05, weight_decay=0.1), 0.0, 3)
    wide = {n: p.to(F64) for n, p in params.items()}
    wide_run = run_wrapper(reference, wide, gradient_stream(params, 12), 8)
    grads_seq = ({n: g.to(torch.bfloat16) for n, g in grads.items()} for grads in gradient_stream(params, 12))
    for (step, _, got, state), (_, _, expected, _) in zip(run_wrapper(tx, params, grads_seq, 8), wide_run):
        for n in params:
            assert got[n].dtype == state.slow[n].dtype == torch.bfloat16
            assert all(getattr(state, f)[n].dtype == torch.float32 for f in STATS)
            # bfloat16 keeps 8 bits: 1/64 is 4 of its relative ulps (worst seen: 0.010 on values up to 2)
            torch.testing.assert_close(got[n].to(F64), expected[n], rtol=1 / 64, atol=1 / 64)
        assert_finite(state, got, sync_period=3)


# ---------------------------------------------------------------------- 6. flat buffers

@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_scout_over_segments_equals_the_tree(donate, rates):
    """An aligned flat buffer with ``segments=`` takes each tensor's own :math:`c_t` (the
    zero padding is constant, hence left out): the tree's steps, to rounding."""
    params = random_params(13, {**SHAPES, "vec": (5,)})
    layout = FlatLayout(params, align=8)
    tx = holotx.scout(holotx.sgd(0.1, momentum=0.9), 0.0, 3)
    flat_step = make_step(tx, donate=donate)
    tree_state, flat_params = tx.init(params), layout.flatten(params)
    flat_state = tx.init(flat_params)
    for step, grads in zip(range(1, 14), gradient_stream(params, 14)):
        updates, tree_state = tx.update(grads, tree_state, params)
        params = holotx.apply_updates(params, updates)
        flat_params, flat_state = flat_step(flat_params, layout.flatten(grads), flat_state,
                                            segments=layout.segments())
        tree_rate, flat_rate = rates[-2:]
        assert (tree_rate is None) == (flat_rate is None) == (step % 3 != 0)
        if tree_rate is not None:
            assert abs(flat_rate - tree_rate) <= RATE_TOL
            assert tree_rate > 0
        for field, flat_tree in (("params", flat_params), *((f, getattr(flat_state, f)) for f in STATS)):
            back = layout.unflatten(flat_tree)
            expected = params if field == "params" else getattr(tree_state, field)
            for n in params:
                assert_matches(back[n], expected[n].numpy(), f"{field}[{n!r}], step {step}")
    gaps = torch.ones_like(flat_params[0], dtype=torch.bool)
    for view in layout.unflatten([gaps]).values():
        view.fill_(False)
    assert torch.count_nonzero(flat_params[0][gaps]) == 0, "the gaps between tensors must stay zero"


def test_flat_buffer_without_segments_is_one_tensor(rates):
    """Without ``segments`` the buffer is one tensor (C is then a mean over all elements):
    another rate, which is why the segments are needed."""
    params = random_params(13, {**SHAPES, "vec": (5,)})
    layout = FlatLayout(params, align=8)
    tx = holotx.scout(holotx.sgd(0.1, momentum=0.9), 0.0, 3)
    flat = layout.flatten(params)
    states = [tx.init(flat), tx.init(flat)]
    for grads in [layout.flatten(g) for g, _ in zip(gradient_stream(params, 14), range(3))]:
        _, states[0] = tx.update(grads, states[0], flat, segments=layout.segments())
        _, states[1] = tx.update(grads, states[1], flat)
    assert abs(rates[-2] - rates[-1]) > 1e-6


def test_segments_are_refused_in_holocron_mode_and_must_match():
    params = {"w": torch.randn(5, 3, dtype=F64), "b": torch.randn(7, dtype=F64)}
    layout = FlatLayout(params, align=4)
    flat = layout.flatten(params)
    holocron = holotx.scout(holotx.sgd(0.1), compat="holocron")
    with pytest.raises(ValueError, match="cannot take flat-buffer segments"):
        holocron.update(flat, holocron.init(flat), flat, segments=layout.segments())
    tx = holotx.scout(holotx.sgd(0.1))
    with pytest.raises(ValueError, match="segments has 2 entries for 1 flat buffers"):
        tx.update(flat, tx.init(flat), flat, segments=layout.segments() * 2)
