"""Specification: ``holotx.lookahead`` and ``holotx.scout`` with ``compat="holocron"`` reproduce
pylocron 0.3.0's ``Lookahead`` and ``Scout`` wrappers.

pylocron's wrapper (imported and run, never re-implemented here) wraps ``torch.optim.SGD(lr,
momentum=0.9)`` or ``torch.optim.AdamW(lr, weight_decay=0.1)``; holotx's wraps ``holotx.sgd`` /
``holotx.adamw`` with the same hyperparameters. Both start from the same params (a list of four
tensors: (4, 3), (5,), (1,) and a conv-like (2, 3, 2, 2)) and get the same gradients, and after
*every* step the test compares

=====================  ============================================  ==============================
what                   pylocron                                      holotx
=====================  ============================================  ==============================
params (fast weights)  the wrapped ``torch.optim`` params            ``apply_updates`` result
slow weights           ``wrapper.param_groups[0]["params"]``         ``state.slow``
fast-step count        ``wrapper.fast_steps``                        every leaf of ``state.count``
SGD momentum           ``base.state[p]["momentum_buffer"]``          ``TraceState.trace``
AdamW moments          ``base.state[p]["exp_avg"/"exp_avg_sq"]``     ``ScaleByAdamState.mu/nu``
AdamW step             ``base.state[p]["step"]``                     ``ScaleByAdamState.count``
=====================  ============================================  ==============================

for every ``sync_period`` k in {1, 2, 6}, ``sync_rate`` r in {0, 0.5, 1}, wrapper and inner
optimizer, over 60 steps of seeded random gradients (open loop), plus a closed loop (a least-squares
loss whose gradient each side computes from its *own* current params with the same function).

Holocron's Scout syncs at the rate ``max(1 - C, r)``, C the mean coherence ratio std/max-deviation of
the window's param changes; an element whose changes are all equal makes C NaN, Python's ``max(nan,
r)`` is NaN, and the step then syncs with *no* outer update (params back on the old slow weights).
Separate tests check that the adaptive rate is really exercised (C recomputed here from snapshots of
pylocron's fast params), that the NaN cases (k = 1, a frozen element) are reproduced in Holocron mode,
and that the default mode (``compat=None``) makes progress in the same situations.

Tolerance: element-wise ``|holotx - pylocron| <= RTOL * (|pylocron| + FLOOR * max|pylocron|)``, the
max taken over the tensor compared. The two sides evaluate the same formulas but round differently
in a few places: holotx lands on the new slow weights as ``params + (slow_new - params)`` where
Holocron copies ``slow_new`` (one more rounding, an ulp of the *params*, not of the slow weights);
torch's ``p.add_(buf, alpha=-lr)`` rounds once where holotx scales, then adds; AdamW's decoupled
decay is applied in another order; Scout's statistics are Welford's running ones in holotx and a
two-pass std over stacked snapshots in Holocron. Each is an ulp of the tensor's *scale*, and they add
up over the run, so an element passing near zero carries a large relative error: hence the absolute
floor, a fraction FLOOR of the tensor's largest magnitude, chosen so that the absolute allowance
RTOL * FLOOR (relative to the scale) exceeds what 60 steps of such roundings add up to: float64
RTOL 1e-12, FLOOR 1e-2 (60 steps of ~1 ulp, 1.1e-16, are 7e-15 < 1e-14); float32 RTOL 1e-5, FLOOR
1e-1 (float32 ulps, 6e-8, accumulating as a random walk over 60 steps, ~5e-7 < 1e-6). Any real
disagreement (a wrong rate, a missed or extra sync, a lost momentum) is off by 1e-3 or more.

One exception, ``RTOL_ILL_CONDITIONED`` = 1e-10 for Scout at r = 0 in the closed loop: there the
gradients are deterministic, so the fast steps of a window are nearly equal (max deviation down to
0.4% of the change) and Holocron's std / max-deviation ratio is ill-conditioned: perturbing pylocron's
own snapshots by one ulp moves its rate by up to 1e-12 (measured), which the loop then feeds back
(7.3e-13 with the seeds used here, up to 3.3e-12 over eight other seeds). With r = 0.5 the rate
is max(1 - C, 0.5) = 0.5 and the closed loop stays at the 1e-12 tolerance.

The worst ratio met per dtype and kind of run is printed at the end of the module. Measured
(float64): open loop 8.6e-15, closed loop 1.4e-13 (7.3e-13 for Scout at r = 0), clipped chain
1.6e-14, adaptive-rate check 8.6e-15, NaN-reset checks 8.7e-16; float32: 8.4e-7.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pylocron
import pytest
import torch

import holotx
from holotx.tree import find_states

hoptim = pylocron.import_optim()

# pylocron's Scout takes torch.std over k = 1 snapshot differences: NaN, with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:std\\(\\). degrees of freedom:UserWarning")

STEPS = 60
SHAPES = ((4, 3), (5,), (1,), (2, 3, 2, 2))
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
RTOL_ILL_CONDITIONED = 1e-10  # float64 closed loop, Scout at r = 0 (see the module docstring)
FLOOR = {torch.float64: 1e-2, torch.float32: 1e-1}
SYNC_PERIODS = (1, 2, 6)
SYNC_RATES = (0.0, 0.5, 1.0)

# Worst |holotx - pylocron| / (|pylocron| + FLOOR * max|pylocron|), per dtype and kind of run,
# printed at the end.
WORST: dict[str, tuple[float, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst(request):
    yield
    pylocron.report_worst(request.config, "lookahead/scout holocron parity, worst |holotx - pylocron| / "
                          "(|ref| + FLOOR max|ref|):", WORST)


# ------------------------------------------------------------------------------ the two sides

WRAPPERS: dict[str, tuple[Callable[..., Any], type]] = {
    "lookahead": (holotx.lookahead, hoptim.Lookahead),
    "scout": (holotx.scout, hoptim.Scout),
}

# inner name -> (torch.optim factory, holotx factory, holotx block state, pylocron key -> holotx field)
INNERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], Callable[[], Any], type | None,
                        dict[str, str]]] = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
            lambda: holotx.sgd(0.05, momentum=0.9),
            holotx.TraceState, {"momentum_buffer": "trace"}),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
              lambda: holotx.adamw(0.01, weight_decay=0.1),
              holotx.ScaleByAdamState, {"exp_avg": "mu", "exp_avg_sq": "nu", "step": "count"}),
    # No momentum, no weight decay: a zero gradient leaves an element exactly where it is.
    "plain-sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1),
                  lambda: holotx.sgd(0.1),
                  None, {}),
}


def initial_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


# A gradient source is called once per step with both sides' params and returns (pylocron's
# gradients, holotx's gradients).
GradSource = Callable[[list[torch.Tensor], list[torch.Tensor]], tuple[list[torch.Tensor], list[torch.Tensor]]]


def gaussian_draws(dtype: torch.dtype, seed: int = 1) -> Callable[[], list[torch.Tensor]]:
    """Seeded Gaussian gradients, a new draw per call."""
    g = torch.Generator().manual_seed(seed)
    return lambda: [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def open_loop(draw: Callable[[], list[torch.Tensor]]) -> GradSource:
    """The same gradients to both sides, whatever their params."""

    def grads(ref_params, params):
        del ref_params, params
        g = draw()
        return [x.clone() for x in g], g

    return grads


def random_grads(dtype: torch.dtype, seed: int = 1) -> GradSource:
    return open_loop(gaussian_draws(dtype, seed))


def least_squares_grads(dtype: torch.dtype, seed: int = 2) -> GradSource:
    """Closed loop: the gradient of sum_t 0.5 ||A_t vec(theta_t) - b_t||^2, each side's from its
    own params by the same function; A_t^T A_t has eigenvalues below ~4, stable at these lrs."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for s in SHAPES:
        n = math.prod(s)
        m = n + 4
        mats.append(((torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(m)).to(dtype),
                     torch.randn(m, generator=g, dtype=torch.float64).to(dtype)))

    def gradient(params):
        return [(a.T @ (a @ p.detach().reshape(-1) - b)).reshape(p.shape) for (a, b), p in zip(mats, params)]

    return lambda ref_params, params: (gradient(ref_params), gradient(params))


class Pair:
    """pylocron's wrapper around a ``torch.optim`` optimizer and holotx's transform, side by side."""

    def __init__(self, wrapper: str, inner: str, sync_rate: float, sync_period: int, *,
                 dtype: torch.dtype = torch.float64, compat: str | None = "holocron",
                 init: list[torch.Tensor] | None = None, label: str = "open loop", rtol: float | None = None,
                 holotx_inner: Any = None, grad_hook: Callable[[list[torch.Tensor]], None] | None = None):
        make_tx, ref_cls = WRAPPERS[wrapper]
        torch_opt, holotx_opt, self.block_cls, self.fields = INNERS[inner]
        self.init = initial_params(dtype) if init is None else init
        self.ref_params = [p.clone().requires_grad_() for p in self.init]
        self.base = torch_opt(self.ref_params)
        self.ref = ref_cls(self.base, sync_rate=sync_rate, sync_period=sync_period)
        self.grad_hook = grad_hook
        # The fast params after each base step, before the wrapper syncs them (pylocron side).
        self.fast_history: list[list[torch.Tensor]] = []
        self.base.register_step_post_hook(
            lambda *_: self.fast_history.append([p.detach().clone() for p in self.ref_params]))
        self.tx = make_tx(holotx_inner or holotx_opt(), sync_rate, sync_period, compat=compat)
        self.params = [p.clone() for p in self.init]
        self.state = self.tx.init(self.params)
        self.label, self.rtol = label, rtol
        self.id = f"{label} {wrapper}-{inner}-k{sync_period}-r{sync_rate}"

    def step(self, grads_fn: GradSource) -> None:
        ref_grads, grads = grads_fn(self.ref_params, self.params)
        for p, g in zip(self.ref_params, ref_grads):
            p.grad = g
        if self.grad_hook is not None:  # e.g. clipping, on pylocron's side only
            self.grad_hook(self.ref_params)
        self.ref.step()
        given = [None if g is None else g.clone() for g in grads]
        updates, self.state = self.tx.update(grads, self.state, self.params)
        self.params = holotx.apply_updates(self.params, updates)
        for g, g0 in zip(grads, given):
            assert (g is None and g0 is None) or torch.equal(g, g0), "holotx modified its gradients"

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
        assert_close(actual, expected, where, self.label, self.rtol)

    @property
    def ref_slow(self) -> list[torch.Tensor]:
        return self.ref.param_groups[0]["params"]

    def check(self, step: int) -> None:
        """Params, slow weights, counts and the inner optimizer's state, after ``step`` steps."""
        where = f"{self.id} step {step}"
        assert self.ref.fast_steps == step
        for i, c in enumerate(self.state.count):
            assert c.dtype == torch.int64
            assert c.dim() == 0
            assert int(c) == step, f"{where}: count[{i}] = {int(c)}"
        for i in range(len(SHAPES)):
            self.assert_close(self.params[i], self.ref_params[i].detach(), f"{where} params[{i}]")
            self.assert_close(self.state.slow[i], self.ref_slow[i], f"{where} slow[{i}]")
        if self.block_cls is None:  # no inner state to compare
            return
        (block,) = find_states(self.state.inner_state, self.block_cls)
        for i, p in enumerate(self.ref_params):
            ref_state = self.base.state[p]
            assert set(ref_state) == set(self.fields), f"{where}: unmapped torch state {set(ref_state)}"
            for key, field in self.fields.items():
                ours = getattr(block, field)[i]
                if key == "step":
                    assert int(ours) == int(ref_state[key]) == step, f"{where}: {key}[{i}]"
                else:
                    self.assert_close(ours, ref_state[key], f"{where} {key}[{i}]")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, where: str, kind: str,
                 rtol: float | None = None) -> None:
    """Element-wise ``|actual - expected| <= rtol * (|expected| + FLOOR * max|expected|)`` (``rtol``
    defaults to RTOL); the worst ratio is recorded under ``kind`` for the end-of-module report."""
    assert actual.shape == expected.shape, where
    assert actual.dtype == expected.dtype, where
    assert torch.isfinite(actual).all(), f"{where}: holotx has non-finite values {actual}"
    rtol, floor = rtol or RTOL[expected.dtype], FLOOR[expected.dtype]
    scale = expected.abs() + floor * expected.abs().max()
    err = (actual - expected).abs()
    ratio = float((err / scale).max()) if bool((scale > 0).all()) else float(err.max()) * math.inf
    key = f"{str(expected.dtype).replace('torch.', '')} {kind}"
    if ratio > WORST.get(key, (-1.0, ""))[0]:
        WORST[key] = (ratio, where)
    assert bool((err <= rtol * scale).all()), (
        f"{where}: max |holotx - pylocron| / (|ref| + {floor:g} max|ref|) = {ratio:.3e} > {rtol:g}\n"
        f"holotx   {actual}\npylocron {expected}")


def run_pair(pair: Pair, grads_fn: GradSource, steps: int = STEPS) -> Pair:
    for step in range(1, steps + 1):
        pair.step(grads_fn)
        pair.check(step)
    return pair


def holocron_rate(window: list[list[torch.Tensor]], sync_rate: float) -> float:
    """Holocron's Scout rate from the k + 1 snapshots of a window (slow weights first), by its
    formula: C = mean over tensors of mean(std_unbiased(u) / max|u - mean u|), u the k changes."""
    ratios = []
    for snaps in zip(*window):
        u = torch.diff(torch.stack(snaps), dim=0)
        max_dev = (u - u.mean(0)).abs().amax(0)
        ratios.append(float((u.std(0) / max_dev).mean()))
    return max(1 - sum(ratios) / len(ratios), sync_rate)


# ------------------------------------------------------------------------------ 1. parity


@pytest.mark.parametrize("sync_rate", SYNC_RATES, ids=lambda r: f"r{r:g}")
@pytest.mark.parametrize("sync_period", SYNC_PERIODS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("wrapper", ["lookahead", "scout"])
def test_open_loop_matches_pylocron(wrapper, inner, sync_period, sync_rate):
    run_pair(Pair(wrapper, inner, sync_rate, sync_period), random_grads(torch.float64))


@pytest.mark.parametrize(("sync_period", "sync_rate"), [(6, 0.5), (6, 0.0), (2, 1.0)],
                         ids=["k6-r0.5", "k6-r0", "k2-r1"])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("wrapper", ["lookahead", "scout"])
def test_closed_loop_matches_pylocron(wrapper, inner, sync_period, sync_rate):
    adaptive = wrapper == "scout" and sync_rate == 0  # ill-conditioned rate (module docstring)
    run_pair(Pair(wrapper, inner, sync_rate, sync_period,
                  label="closed loop, scout r=0" if adaptive else "closed loop",
                  rtol=RTOL_ILL_CONDITIONED if adaptive else None),
             least_squares_grads(torch.float64))


# float32, a few configurations (tolerance: see the module docstring). Scout's float32 rate comes
# from param changes carrying ~6e-8 * |theta| / |u| relative rounding each; with random gradients the
# ratio is well conditioned and the rate moves by ~1e-6 at most, times |theta_k - phi| in the params.
@pytest.mark.parametrize(("wrapper", "inner", "sync_period", "sync_rate"), [
    pytest.param("lookahead", "sgd", 2, 0.5, id="lookahead-sgd-k2-r0.5"),
    pytest.param("lookahead", "adamw", 6, 0.5, id="lookahead-adamw-k6-r0.5"),
    pytest.param("scout", "sgd", 6, 0.0, id="scout-sgd-k6-r0"),
    pytest.param("scout", "adamw", 6, 0.5, id="scout-adamw-k6-r0.5"),
    pytest.param("scout", "sgd", 1, 0.5, id="scout-sgd-k1-r0.5"),
])
def test_float32_matches_pylocron(wrapper, inner, sync_period, sync_rate):
    run_pair(Pair(wrapper, inner, sync_rate, sync_period, dtype=torch.float32, label="float32"),
             random_grads(torch.float32))


def test_clipped_chain_inner_matches_pylocron():
    """A chain as the inner transform: global-norm clipping then SGD with momentum, against
    pylocron's Scout on SGD with ``clip_grad_norm_`` applied to the gradients before each step.

    torch divides by ``norm + 1e-6`` where holotx divides by ``norm``: on a clipped step the two
    factors differ by 1e-6 / norm relative. So the gradients have a norm ~6.5 (below 10: factor
    exactly 1 on both sides) on most steps and ~6.5e9 (the factors agree to 1.5e-16, below one
    rounding) on two steps of each window."""
    draw = gaussian_draws(torch.float64)
    step_no = [0]

    def scaled():
        step_no[0] += 1
        return [x * 1e9 for x in draw()] if step_no[0] % 6 in (2, 3) else draw()

    clipped = []

    def clip(ref_params):
        clipped.append(float(torch.nn.utils.clip_grad_norm_(ref_params, 10.0)) > 10.0)

    inner = holotx.chain(holotx.clip_by_global_norm(10.0), holotx.sgd(0.05, momentum=0.9))
    run_pair(Pair("scout", "sgd", 0.0, 6, holotx_inner=inner, grad_hook=clip, label="clipped chain"),
             open_loop(scaled))
    assert clipped == [step % 6 in (2, 3) for step in range(1, STEPS + 1)]


# ------------------------------------------------------------------------------ 2. adaptive rate


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_scout_adaptive_rate_is_exercised(inner):
    """k = 6, r = 0: Lookahead at rate 0 would put the params back where each window started.
    Scout's rate max(1 - C, 0), with C recomputed here from pylocron's fast params (the k + 1
    snapshots its buffer holds), is positive, and holotx's slow weights and params land on
    phi + rate * (theta_k - phi)."""
    k, r = 6, 0.0
    pair = Pair("scout", inner, r, k, label="adaptive rate")
    grads_fn = random_grads(torch.float64)
    adaptive_syncs = 0
    for step in range(1, STEPS + 1):
        slow_before = [s.clone() for s in pair.ref_slow]
        pair.step(grads_fn)
        pair.check(step)
        if step % k:
            continue
        window = [slow_before, *pair.fast_history[-k:]]
        rate = holocron_rate(window, r)
        # rho >= sqrt(k) / (k - 1) wherever it is defined, so the rate is at most 1 - that.
        assert r <= rate <= 1 - math.sqrt(k) / (k - 1) + 1e-12, f"step {step}: rate {rate}"
        if rate <= r:
            continue
        adaptive_syncs += 1
        for i in range(len(SHAPES)):
            expected = slow_before[i] + rate * (window[-1][i] - slow_before[i])
            pair.assert_close(pair.state.slow[i], expected, f"adaptive step {step} slow[{i}]")
            pair.assert_close(pair.params[i], expected, f"adaptive step {step} params[{i}]")
            # Not where plain Lookahead at rate r = 0 would have put them (the window's start).
            moved = (pair.params[i] - slow_before[i]).abs().max()
            assert moved > 1e-4 * slow_before[i].abs().max(), f"step {step} params[{i}] did not move"
    assert adaptive_syncs > 0
    print(f"{inner}: {adaptive_syncs} of {STEPS // k} syncs at an adaptive rate > {r}")


# ------------------------------------------------------------------------------ 3. NaN cases


def assert_no_nan(tree: Any, what: str) -> None:
    for i, leaf in enumerate(holotx.tree.flatten(tree)[0]):
        if isinstance(leaf, torch.Tensor):
            assert not torch.isnan(leaf).any(), f"{what}: NaN in leaf {i}"


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_scout_k1_never_moves_in_holocron_mode(inner):
    """k = 1: the std of one change is NaN, so Holocron's Scout puts the params back on the
    (never moving) slow weights at every step; holotx's Holocron mode agrees."""
    pair = Pair("scout", inner, 0.5, 1, label="k=1 reset")
    grads_fn = random_grads(torch.float64)
    for step in range(1, 13):
        pair.step(grads_fn)
        pair.check(step)
        for i in range(len(SHAPES)):
            assert torch.equal(pair.ref_params[i].detach(), pair.init[i])
            assert torch.equal(pair.ref_slow[i], pair.init[i])
            assert torch.equal(pair.state.slow[i], pair.init[i])
            pair.assert_close(pair.params[i], pair.init[i], f"k1 step {step} params[{i}]")


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_scout_k1_default_mode_is_lookahead(inner):
    """k = 1 in the default mode: no element varies over a one-step window, C is undefined and the
    rate is sync_rate, so Scout computes exactly what Lookahead does, and moves."""
    make_inner = INNERS[inner][1]
    txs = [holotx.scout(make_inner(), 0.5, 1), holotx.lookahead(make_inner(), 0.5, 1)]
    params = [initial_params(torch.float64), initial_params(torch.float64)]
    states = [tx.init(p) for tx, p in zip(txs, params)]
    draw = gaussian_draws(torch.float64)
    for _ in range(12):
        g = draw()
        for j, tx in enumerate(txs):
            u, states[j] = tx.update([x.clone() for x in g], states[j], params[j])
            params[j] = holotx.apply_updates(params[j], u)
        assert all(torch.equal(a, b) for a, b in zip(*params))
        assert_no_nan(states[0], "default scout k=1")
    assert not torch.equal(params[0][0], initial_params(torch.float64)[0])


def frozen_element_grads(seed: int = 3) -> Callable[[], list[torch.Tensor]]:
    """Gaussian gradients, except element [0, 0] of the (4, 3) tensor: always exactly 0."""
    draw = gaussian_draws(torch.float64, seed)

    def grads():
        g = draw()
        g[0][0, 0] = 0.0
        return g

    return grads


def test_scout_frozen_element_skips_outer_update_in_holocron_mode():
    """Plain SGD (no momentum, no weight decay), k = 6: the frozen element's changes are all
    exactly 0, its 0/0 makes C NaN, and every sync puts the params back on the slow weights of the
    previous window, which therefore never leave the initial params: pylocron and holotx's
    Holocron mode agree."""
    k = 6
    pair = Pair("scout", "plain-sgd", 0.5, k, label="frozen reset")
    grads_fn = open_loop(frozen_element_grads())
    for step in range(1, 4 * k + 1):
        slow_before = [s.clone() for s in pair.ref_slow]
        pair.step(grads_fn)
        pair.check(step)
        assert pair.ref_params[0].detach()[0, 0] == pair.init[0][0, 0]
        if step % k == 0:
            for i in range(len(SHAPES)):
                assert torch.equal(pair.ref_params[i].detach(), slow_before[i])
                assert torch.equal(pair.ref_slow[i], pair.init[i])
                assert torch.equal(pair.state.slow[i], pair.init[i])
                pair.assert_close(pair.params[i], slow_before[i], f"frozen step {step} params[{i}]")
        else:  # inside a window the params do move
            assert not torch.equal(pair.params[1], pair.init[1])


def test_scout_frozen_element_default_mode_makes_progress():
    """The same situation in the default mode: the frozen element is left out of C, the rate is
    max(1 - C, r) >= r > 0, and every sync moves the slow weights; no NaN anywhere."""
    k, r = 6, 0.5
    tx = holotx.scout(holotx.sgd(0.1), r, k)
    params = initial_params(torch.float64)
    state = tx.init(params)
    grads_fn = frozen_element_grads()
    for step in range(1, 4 * k + 1):
        slow_before = [s.clone() for s in state.slow]
        updates, state = tx.update(grads_fn(), state, params)
        params = holotx.apply_updates(params, updates)
        assert_no_nan(params, f"step {step} params")
        assert_no_nan(state, f"step {step} state")
        if step % k == 0:
            for i in range(len(SHAPES)):
                assert_close(params[i], state.slow[i], f"default frozen step {step} params[{i}]",
                             "default-mode sync")
                moved = (state.slow[i] - slow_before[i]).abs().max()
                assert moved > 1e-3, f"step {step}: slow[{i}] did not move"
            # the frozen element itself stays (to the rounding of the sync) where it was
            assert abs(float(params[0][0, 0] - slow_before[0][0, 0])) <= 1e-15


# ------------------------------------------------------------------ 4. params without gradient

def sometimes_none(pattern: str, seed: int = 5) -> GradSource:
    """Random gradients where params[1] has none at a few steps and, with ``"always"``,
    params[2] never has one (an unused parameter)."""
    draw, step = gaussian_draws(torch.float64, seed), [0]

    def grads(ref_params, params):
        del ref_params, params
        step[0] += 1
        g = draw()
        if step[0] in (2, 5, 6, 11, 12, 13):
            g[1] = None
        if pattern == "always":
            g[2] = None
        return [None if x is None else x.clone() for x in g], g

    return grads


@pytest.mark.parametrize("pattern", ["sometimes", "always"])
@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("wrapper", ["lookahead", "scout"])
def test_params_without_gradient_match_pylocron(wrapper, inner, pattern):
    """Holocron counts steps for all params together and synchronises a param that had no
    gradient (its change is zero; Scout's rate then takes that zero change, and an unused
    param makes every rate NaN). Holocron mode does the same: a ``None`` inner update is a
    step that did not move the leaf."""
    pair = Pair(wrapper, inner, 0.0 if wrapper == "scout" else 0.5, 3, label="None gradients")
    grads_fn = sometimes_none(pattern)
    for step in range(1, 31):
        pair.step(grads_fn)
        where = f"{pair.id} {pattern} step {step}"
        assert all(int(c) == step for c in pair.state.count), where
        for i in range(len(SHAPES)):
            pair.assert_close(pair.params[i], pair.ref_params[i].detach(), f"{where} params[{i}]")
            pair.assert_close(pair.state.slow[i], pair.ref_slow[i], f"{where} slow[{i}]")
        (block,) = find_states(pair.state.inner_state, pair.block_cls)
        for i, p in enumerate(pair.ref_params):
            for key, field in pair.fields.items():
                if key in pair.base.state[p]:
                    ours, ref = getattr(block, field)[i], pair.base.state[p][key]
                    if key == "step":
                        assert int(ours) == int(ref), f"{where}: {key}[{i}]"
                    else:
                        pair.assert_close(ours, ref, f"{where} {key}[{i}]")
    if wrapper == "scout" and pattern == "always":  # Holocron's NaN: never an outer step
        assert all(torch.equal(s, p) for s, p in zip(pair.state.slow, pair.init))
