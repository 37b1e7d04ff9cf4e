"""Specification tests for holotx.schedules.

Every schedule is checked against an independent float64 formula written here
with ``math``/NumPy, for Python-int counts and for int32/int64 tensor counts,
eagerly, under ``torch.compile(fullgraph=True)`` and under ``torch.func.vmap``.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from holotx.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    warmup_cosine_decay_schedule,
)

FAR = 10**6  # a count far past the end of every schedule below
REL_TOL = 1e-12  # schedule vs. independent reference formula
PATH_REL_TOL = 4e-16  # Python-int path vs. tensor path (~1 ulp)


def _counts(*boundaries: int) -> list[int]:
    """0, 1, every boundary and its neighbours, and a count far past the end."""
    out = {0, 1, FAR}
    for b in boundaries:
        out.update(c for c in (b - 1, b, b + 1) if c >= 0)
    return sorted(out)


# ---------------------------------------------------------------------------
# Independent reference formulas (float64, NumPy / math)
# ---------------------------------------------------------------------------


def ref_polynomial(init, end, power, steps, begin=0):
    def f(n):
        t = np.clip(np.float64(n) - begin, 0.0, steps)
        return float(end + (init - end) * np.power(1.0 - t / steps, power))

    return f


def ref_cosine(init, steps, alpha=0.0, exponent=1.0):
    def f(n):
        t = min(n, steps)
        cos = 0.5 * (1.0 + np.cos(np.pi * t / steps))
        return float(init * ((1.0 - alpha) * np.power(cos, exponent) + alpha))

    return f


def ref_exponential(init, steps, rate, begin=0, staircase=False, end=None):
    def f(n):
        t = max(n - begin, 0)
        p = math.floor(t / steps) if staircase else t / steps
        with np.errstate(over="ignore"):
            v = init * np.power(np.float64(rate), p)
        if end is not None:
            v = max(v, end) if rate < 1 else min(v, end)
        return float(v)

    return f


def ref_piecewise(init, boundaries_and_scales):
    def f(n):
        scales = [s for b, s in sorted(boundaries_and_scales.items()) if n >= b]
        return float(init * np.prod(scales, dtype=np.float64))

    return f


def ref_warmup_cosine(init, peak, warmup, total, end=0.0, exponent=1.0):
    decay = total - warmup

    def f(n):
        if n < warmup:
            return init + (peak - init) * n / warmup
        t = min(n - warmup, decay)
        cos = 0.5 * (1.0 + math.cos(math.pi * t / decay))
        return end + (peak - end) * cos**exponent

    return f


# (id, schedule, reference, counts)
CASES: list[tuple[str, Callable, Callable[[int], float], list[int]]] = [
    ("constant", constant_schedule(0.25), lambda n: 0.25, _counts()),
    ("constant-neg", constant_schedule(-3), lambda n: -3.0, _counts()),
    (
        "linear",
        linear_schedule(1.0, 0.0, 100),
        ref_polynomial(1.0, 0.0, 1.0, 100),
        _counts(50, 100),
    ),
    (
        "linear-warmup-begin",
        linear_schedule(1e-4, 0.3, 37, transition_begin=10),
        ref_polynomial(1e-4, 0.3, 1.0, 37, 10),
        _counts(10, 47),
    ),
    (
        "linear-zero-steps",
        linear_schedule(0.7, 0.1, 0),
        lambda n: 0.7,
        _counts(),
    ),
    (
        "polynomial",
        polynomial_schedule(0.5, 0.01, 2.5, 90, transition_begin=5),
        ref_polynomial(0.5, 0.01, 2.5, 90, 5),
        _counts(5, 50, 95),
    ),
    (
        "polynomial-negative-steps",
        polynomial_schedule(0.5, 0.01, 2, -3),
        lambda n: 0.5,
        _counts(),
    ),
    (
        "cosine",
        cosine_decay_schedule(0.1, 1000),
        ref_cosine(0.1, 1000),
        _counts(500, 1000),
    ),
    (
        "cosine-alpha-exponent",
        cosine_decay_schedule(2.0, 77, alpha=0.05, exponent=1.7),
        ref_cosine(2.0, 77, 0.05, 1.7),
        _counts(38, 77),
    ),
    (
        "exponential",
        exponential_decay(1.0, 10, 0.9),
        ref_exponential(1.0, 10, 0.9),
        _counts(10, 100),
    ),
    (
        "exponential-staircase-begin-end",
        exponential_decay(0.3, 7, 0.5, transition_begin=3, staircase=True, end_value=0.02),
        ref_exponential(0.3, 7, 0.5, 3, True, 0.02),
        _counts(3, 10, 17, 24, 31),
    ),
    (
        "exponential-growth-capped",
        exponential_decay(1e-3, 5, 1.5, end_value=0.1),
        ref_exponential(1e-3, 5, 1.5, 0, False, 0.1),
        _counts(5, 50, 60),
    ),
    (
        "piecewise",
        piecewise_constant_schedule(0.1, {30: 0.1, 10: 0.5, 20: 2.0}),
        ref_piecewise(0.1, {30: 0.1, 10: 0.5, 20: 2.0}),
        _counts(10, 20, 30),
    ),
    (
        "piecewise-boundary-zero",
        piecewise_constant_schedule(1.0, {0: 0.3, 4: 0.0}),
        ref_piecewise(1.0, {0: 0.3, 4: 0.0}),
        _counts(4),
    ),
    (
        "piecewise-none",
        piecewise_constant_schedule(0.4),
        lambda n: 0.4,
        _counts(),
    ),
    (
        "warmup-cosine",
        warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, end_value=1e-3),
        ref_warmup_cosine(0.0, 1.0, 10, 110, 1e-3),
        _counts(5, 10, 60, 110),
    ),
    (
        "warmup-cosine-exponent",
        warmup_cosine_decay_schedule(1e-5, 0.02, 3, 40, exponent=2.0),
        ref_warmup_cosine(1e-5, 0.02, 3, 40, 0.0, 2.0),
        _counts(3, 20, 40),
    ),
    (
        "warmup-cosine-no-warmup",
        warmup_cosine_decay_schedule(0.0, 1.0, 0, 50, end_value=0.1),
        ref_warmup_cosine(0.0, 1.0, 0, 50, 0.1),
        _counts(25, 50),
    ),
]

CASE_IDS = [c[0] for c in CASES]
INT_DTYPES = [torch.int32, torch.int64]


def assert_matches(got: float, want: float, rel: float = REL_TOL) -> None:
    assert abs(got - want) <= rel * abs(want), (got, want)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "schedule", "ref", "counts"), CASES, ids=CASE_IDS)
def test_int_count_gives_python_float_equal_to_formula(name, schedule, ref, counts):
    for n in counts:
        value = schedule(n)
        assert type(value) is float, (n, type(value))
        assert_matches(value, ref(n))


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize(("name", "schedule", "ref", "counts"), CASES, ids=CASE_IDS)
def test_tensor_count_gives_0d_float64_equal_to_formula(name, schedule, ref, counts, dtype):
    for n in counts:
        value = schedule(torch.tensor(n, dtype=dtype))
        assert isinstance(value, torch.Tensor)
        assert value.shape == ()
        assert value.dtype == torch.float64
        assert value.device == torch.device("cpu")
        assert_matches(value.item(), ref(n))
        # Python-int and tensor paths evaluate the same expression.
        assert_matches(value.item(), schedule(n), rel=PATH_REL_TOL)


def test_lars_polynomial_decay_formula():
    """Holocron's LARS docs: lr * (1 - t / T) ** 2 == polynomial_schedule(lr, 0, 2, T)."""
    lr, big_t = 0.2, 250
    schedule = polynomial_schedule(lr, 0.0, 2, big_t)
    for t in [0, 1, 100, 249, 250, 251, 1000]:
        want = lr * (1 - min(t, big_t) / big_t) ** 2
        assert_matches(schedule(t), want)
        assert_matches(schedule(torch.tensor(t)).item(), want)


def test_linear_is_polynomial_with_power_one():
    lin = linear_schedule(0.3, 0.05, 20, transition_begin=4)
    poly = polynomial_schedule(0.3, 0.05, 1, 20, transition_begin=4)
    for n in range(30):
        assert lin(n) == poly(n)
        assert torch.equal(lin(torch.tensor(n)), poly(torch.tensor(n)))


def test_piecewise_scale_applies_from_the_boundary_step():
    schedule = piecewise_constant_schedule(1.0, {5: 0.1})
    assert schedule(4) == 1.0
    assert schedule(5) == pytest.approx(0.1, rel=1e-15)
    assert schedule(torch.tensor(4)).item() == 1.0
    assert schedule(torch.tensor(5)).item() == pytest.approx(0.1, rel=1e-15)


def test_join_evaluates_each_schedule_on_steps_since_its_boundary():
    def make_identity(offset: float):
        def schedule(count):
            if isinstance(count, torch.Tensor):
                return count.to(torch.float64) + offset
            return float(count) + offset

        return schedule

    joined = join_schedules(
        [make_identity(0.0), make_identity(100.0), make_identity(200.0)], [3, 7]
    )
    want = {0: 0.0, 2: 2.0, 3: 100.0, 6: 103.0, 7: 200.0, 9: 202.0}
    for n, v in want.items():
        assert joined(n) == v
        assert joined(torch.tensor(n)).item() == v


def test_join_skips_zero_length_segments():
    joined = join_schedules(
        [constant_schedule(1.0), constant_schedule(2.0), constant_schedule(3.0)], [4, 4]
    )
    assert [joined(n) for n in (3, 4, 5)] == [1.0, 3.0, 3.0]
    assert [joined(torch.tensor(n)).item() for n in (3, 4, 5)] == [1.0, 3.0, 3.0]


def test_warmup_cosine_endpoints():
    schedule = warmup_cosine_decay_schedule(0.01, 1.0, 10, 100, end_value=0.05)
    assert schedule(0) == pytest.approx(0.01, rel=1e-15)
    assert schedule(10) == pytest.approx(1.0, rel=1e-15)
    assert schedule(100) == pytest.approx(0.05, rel=1e-15)
    assert schedule(10**9) == pytest.approx(0.05, rel=1e-15)


def test_exponential_end_value_bounds_growth_and_decay():
    decay = exponential_decay(1.0, 1, 0.5, end_value=0.2)
    growth = exponential_decay(1.0, 1, 2.0, end_value=5.0)
    assert [decay(n) for n in range(4)] == [1.0, 0.5, 0.25, 0.2]
    assert [growth(n) for n in range(4)] == [1.0, 2.0, 4.0, 5.0]
    # Overflow goes to the bound, not to an error, on both paths.
    assert growth(10**6) == 5.0
    assert growth(torch.tensor(10**6)).item() == 5.0


@pytest.mark.parametrize("bad", [1.5, True, "3", None])
def test_non_integer_count_is_rejected(bad):
    with pytest.raises(TypeError, match="count"):
        linear_schedule(1.0, 0.0, 10)(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_count_on_cuda_stays_on_cuda():
    schedule = warmup_cosine_decay_schedule(0.0, 1.0, 10, 100)
    value = schedule(torch.tensor(42, device="cuda"))
    assert value.device.type == "cuda"
    assert value.dtype == torch.float64
    assert_matches(value.item(), schedule(42), rel=1e-15)


# ---------------------------------------------------------------------------
# Transforms: torch.compile, vmap, grad
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "schedule", "ref", "counts"), CASES, ids=CASE_IDS)
def test_compiled_fullgraph_matches_eager_without_recompiling(name, schedule, ref, counts):
    counter = CompileCounter()
    compiled = torch.compile(schedule, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in counts:
            count = torch.tensor(n, dtype=torch.int64)
            got = compiled(count)
            assert got.dtype == torch.float64
            assert_matches(got.item(), schedule(count).item(), rel=PATH_REL_TOL)
    assert counter.frame_count == 1


def test_compiled_aot_eager_int32():
    schedule = warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, end_value=1e-3)
    ref = ref_warmup_cosine(0.0, 1.0, 10, 110, 1e-3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(schedule, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in _counts(5, 10, 60, 110):
            assert_matches(compiled(torch.tensor(n, dtype=torch.int32)).item(), ref(n))
    assert counter.frame_count == 1


def test_compiled_with_default_inductor_backend():
    schedule = warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, end_value=1e-3)
    ref = ref_warmup_cosine(0.0, 1.0, 10, 110, 1e-3)
    compiled = torch.compile(schedule, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (0, 7, 10, 60, 200):
            got = compiled(torch.tensor(n))
            assert got.dtype == torch.float64
            assert_matches(got.item(), ref(n))


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize(("name", "schedule", "ref", "counts"), CASES, ids=CASE_IDS)
def test_vmap_over_counts_equals_loop(name, schedule, ref, counts, dtype):
    batch = torch.tensor(counts, dtype=dtype)
    got = torch.func.vmap(schedule)(batch)
    want = torch.stack([schedule(c) for c in batch])
    assert got.shape == (len(counts),)
    assert got.dtype == torch.float64
    # Batched, pow runs in the CPU's vector code; one count at a time, in its scalar code:
    # the two may differ by an ulp, by the CPU's vector width (AVX2 vs AVX-512).
    torch.testing.assert_close(got, want, rtol=PATH_REL_TOL, atol=PATH_REL_TOL * want.abs().max().item())


@pytest.mark.parametrize(("name", "schedule", "ref", "counts"), CASES, ids=CASE_IDS)
def test_usable_inside_torch_func_grad(name, schedule, ref, counts):
    count = torch.tensor(counts[len(counts) // 2])
    x = torch.tensor(3.0, dtype=torch.float64)
    grad = torch.func.grad(lambda x: x * schedule(count))(x)
    assert torch.equal(grad, schedule(count))


# ---------------------------------------------------------------------------
# Hyperparameter validation
# ---------------------------------------------------------------------------


def _const(n):
    return 1.0


INVALID = [
    ("value", lambda: constant_schedule(float("nan"))),
    ("value", lambda: constant_schedule("0.1")),
    ("init_value", lambda: linear_schedule(math.inf, 0.0, 10)),
    ("end_value", lambda: linear_schedule(1.0, None, 10)),
    ("transition_steps", lambda: linear_schedule(1.0, 0.0, 10.0)),
    ("transition_begin", lambda: linear_schedule(1.0, 0.0, 10, transition_begin=-1)),
    ("power", lambda: polynomial_schedule(1.0, 0.0, -1.0, 10)),
    ("power", lambda: polynomial_schedule(1.0, 0.0, float("nan"), 10)),
    ("transition_begin", lambda: polynomial_schedule(1.0, 0.0, 2, 10, transition_begin=2.5)),
    ("init_value", lambda: cosine_decay_schedule(True, 10)),
    ("decay_steps", lambda: cosine_decay_schedule(1.0, 0)),
    ("decay_steps", lambda: cosine_decay_schedule(1.0, -5)),
    ("decay_steps", lambda: cosine_decay_schedule(1.0, 10.0)),
    ("alpha", lambda: cosine_decay_schedule(1.0, 10, alpha=float("nan"))),
    ("exponent", lambda: cosine_decay_schedule(1.0, 10, exponent=0.0)),
    ("transition_steps", lambda: exponential_decay(1.0, 0, 0.5)),
    ("decay_rate", lambda: exponential_decay(1.0, 10, 0.0)),
    ("decay_rate", lambda: exponential_decay(1.0, 10, -0.5)),
    ("transition_begin", lambda: exponential_decay(1.0, 10, 0.5, transition_begin=-3)),
    ("staircase", lambda: exponential_decay(1.0, 10, 0.5, staircase=1)),
    ("end_value", lambda: exponential_decay(1.0, 10, 0.5, end_value=-math.inf)),
    ("init_value", lambda: piecewise_constant_schedule(float("nan"), {1: 0.5})),
    ("boundaries_and_scales", lambda: piecewise_constant_schedule(1.0, {-1: 0.5})),
    ("boundaries_and_scales", lambda: piecewise_constant_schedule(1.0, {2.5: 0.5})),
    ("boundaries_and_scales", lambda: piecewise_constant_schedule(1.0, {2: -0.5})),
    ("boundaries_and_scales", lambda: piecewise_constant_schedule(1.0, {2: math.inf})),
    ("boundaries_and_scales", lambda: piecewise_constant_schedule(1.0, [(2, 0.5)])),
    ("schedules", lambda: join_schedules([], [])),
    ("schedules", lambda: join_schedules([_const, 0.5], [3])),
    ("boundaries", lambda: join_schedules([_const, _const], [])),
    ("boundaries", lambda: join_schedules([_const, _const], [1, 2])),
    ("boundaries", lambda: join_schedules([_const, _const, _const], [5, 3])),
    ("boundaries", lambda: join_schedules([_const, _const], [-1])),
    ("boundaries", lambda: join_schedules([_const, _const], [1.0])),
    ("init_value", lambda: warmup_cosine_decay_schedule(math.nan, 1.0, 1, 10)),
    ("peak_value", lambda: warmup_cosine_decay_schedule(0.0, math.inf, 1, 10)),
    ("warmup_steps", lambda: warmup_cosine_decay_schedule(0.0, 1.0, -1, 10)),
    ("decay_steps", lambda: warmup_cosine_decay_schedule(0.0, 1.0, 10, 10)),
    ("decay_steps", lambda: warmup_cosine_decay_schedule(0.0, 1.0, 10, 5)),
    ("end_value", lambda: warmup_cosine_decay_schedule(0.0, 1.0, 1, 10, end_value="0")),
    ("exponent", lambda: warmup_cosine_decay_schedule(0.0, 1.0, 1, 10, exponent=-1.0)),
]


@pytest.mark.parametrize(
    ("argument", "build"), INVALID, ids=[f"{i}-{a}" for i, (a, _) in enumerate(INVALID)]
)
def test_invalid_hyperparameter_raises_value_error_naming_it(argument, build):
    with pytest.raises(ValueError, match=argument):
        build()


def test_invalid_value_message_names_argument_and_value():
    with pytest.raises(ValueError) as info:
        cosine_decay_schedule(1.0, 0)
    assert str(info.value) == "decay_steps must be a positive integer, got 0"


# ---------------------------------------------------------------------------
# Pickling (an optimizer holding a schedule is saved with torch.save)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize(("name", "schedule", "ref", "counts"), CASES, ids=CASE_IDS)
def test_pickled_schedule_gives_the_same_values(name, schedule, ref, counts, how):
    """Every schedule pickles and deep-copies; the copy gives the same values bit for bit,
    for int and tensor counts, and its ``repr`` is the call that built it."""
    copied = pickle.loads(pickle.dumps(schedule)) if how == "pickle" else copy.deepcopy(schedule)
    assert copied is not schedule
    assert repr(copied) == repr(schedule)
    assert repr(schedule).startswith("holotx.")
    for n in counts:
        assert copied(n) == schedule(n)
        assert torch.equal(copied(torch.tensor(n)), schedule(torch.tensor(n)))


def test_schedule_repr_is_the_call_that_built_it():
    schedule = warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    assert repr(schedule) == ("holotx.warmup_cosine_decay_schedule(init_value=0.0, peak_value=0.001, "
                              "warmup_steps=10, decay_steps=100, end_value=0.0, exponent=1.0)")
    assert repr(linear_schedule(1, 0, 5)) == ("holotx.linear_schedule(init_value=1.0, end_value=0.0, "
                                              "transition_steps=5, transition_begin=0)")
