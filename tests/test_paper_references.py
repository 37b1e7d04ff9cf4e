"""Specification: in the default mode (``compat=None``) holotx's lars, lamb, ralars, tadam,
adabelief, adamp, adan and ademamix compute their papers' algorithms.

The oracle is ``tests/numpy_reference.py``: one plain float64 NumPy class per algorithm,
written from the paper and its official implementation (the equations and the choices the
default mode makes are listed there), sharing no code with holotx. holotx (float64 torch
tensors in a dict) and the reference run side by side from the same initial parameters for
``STEPS`` steps, and after *every* step the check compares:

* every parameter;
* every field of the optimizer's block state, found by type in holotx's state (a
  ``TraceState`` inside LARS's ``TrustRatioState``, ``ScaleByAdamState`` for LAMB, RaLars and
  AdamP, ``ScaleByTAdamState``, ``ScaleByBeliefState``, ``ScaleByAdanState``,
  ``ScaleByAdEMAMixState``): the moments, ``nu_max`` (``None`` without amsgrad), the per-leaf
  step counts (0-d int64), TAdam's ``weight_sum`` (0-d float64) and Adan's ``prev_grad``. The
  block's fields must be exactly the reference's state keys, so no state goes unchecked.

Inputs. Parameters of shapes ``(1,)``, ``(7,)``, ``(3, 4)``, a conv weight ``(4, 3, 3, 3)``,
an all-zero ``(2, 3)`` and a ``(6,)`` whose gradient is exactly zero on every third step (the
first included) and always in its first entry (``0 / (0 + eps)``, decaying-but-untouched
moments, LARS/LAMB's ratio-1 branches).

* **open loop**: seeded random gradients at scales 1e-3, 1 and 1e3. For AdamP the gradients
  of the two matrices are steered, in turn, orthogonal to each row of the weight (channel
  projection), orthogonal to the weight as a whole (layer projection) and along it (no
  projection);
* **closed loop**: least squares ``||A x - b||^2 + ||A X - B||^2``, the gradient ``2 A^T r``
  computed by each side from its own current parameters (NumPy and torch), so differences
  feed back.

Every configuration declares the branches it exists to cover (a clipped trust ratio, RAdam's
rectified and unrectified steps, AdamP's channel / layer / no projection, AdEMAMix's warm-up
and final phase); the reference records the branches it took and the test checks that the
inputs did reach them.

Tolerance policy (float64, machine epsilon 2.2e-16). An entry passes when::

    |holotx - reference| <= rtol * max(H_i, TENSOR_FLOOR * H)

where ``H_i`` is the largest ``|reference|`` that entry has had so far in the run and ``H``
the largest over the whole tensor so far. Both sides evaluate the same formulas in a
different order (torch's fused ops vs one NumPy line per equation), so each step adds a few
ulp of relative error, and 50 steps accumulate about 1e-14 at most.

* ``rtol = 1e-12`` for the element-wise rules (AdaBelief, Adan, AdEMAMix): every entry is a
  function of that entry's own history only, so its error is a few ulp of the magnitudes it
  has had; ``H_i`` (not ``|reference_i|``) because an entry that crosses zero (a parameter or a
  first moment of a random-sign gradient) keeps the absolute error of the larger values it
  was computed from.
* ``rtol = 1e-10`` for the rules with a norm or a sum (LARS, LAMB, RaLars, TAdam, AdamP):
  those scalars sum over up to 108 entries in different orders on the two sides, and their
  relative rounding error multiplies every entry; the trust ratio also divides by a norm that
  can be small against its terms (``||g|| + wd ||w||`` on zero-gradient steps, ``||u||``).
* ``TENSOR_FLOOR * H`` (``TENSOR_FLOOR = 1e-3``) is the absolute floor for the entries that
  stay tiny against their tensor: there the error is set by what couples entries (the shared
  trust ratio and TAdam weight, ``A^T r`` in the closed loop), i.e. by the tensor's scale.
  ``1e-3 * 1e-12`` keeps that floor at a few ulp of the tensor's largest entry, so it cannot
  hide a wrong formula (a misplaced ``eps`` or bias correction is an error of >= 1e-8 here).
  A tensor that has been exactly zero throughout on the reference side (``H = 0``: the moments
  of a tensor that never had a gradient) must be exactly zero in holotx too.
* In the closed loop the floor is the tensor's scale itself (``CLOSED_LOOP_FLOOR = 1``, a
  norm-wise check): there the two sides' *gradients* already differ by a few ulp of the
  gradient's scale (NumPy's and torch's matrix products sum in different orders), and a
  difference of gradients cancels that into entries far smaller than it (Adan's
  ``g - g_prev``: with ``lr = 1e-2`` consecutive gradients differ by ~1e-3 of themselves, so
  ``diff_avg`` carries an error of ~1e-16 of the *gradient* in entries ~1e-3 of it, far above
  ``rtol`` times the entry). Against the tensor's scale these stay below 1e-13.

Two more runs per algorithm, against the same reference: ``None`` gradients on some leaves
(the leaf is skipped, its step count lags: per-leaf bias corrections), and ``maximize=True``
(the reference fed ``-g``). A last test checks that zero parameters, zero gradients and 0-size
tensors give no NaN or inf in the parameters, updates or state, for all eight in both modes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from numpy_reference import REFERENCES, AdamP, Reference

import holotx
from holotx.tree import find_states

STEPS = 50
GRAD_SCALES = (1e-3, 1.0, 1e3)
ELEMENTWISE_RTOL = 1e-12
NORM_RTOL = 1e-10
TENSOR_FLOOR = 1e-3
CLOSED_LOOP_FLOOR = 1.0

RTOL = {
    "lars": NORM_RTOL,
    "lamb": NORM_RTOL,
    "ralars": NORM_RTOL,
    "tadam": NORM_RTOL,
    "adamp": NORM_RTOL,
    "adabelief": ELEMENTWISE_RTOL,
    "adan": ELEMENTWISE_RTOL,
    "ademamix": ELEMENTWISE_RTOL,
}

# The block state holding each optimizer's moments (looked up on ``holotx`` by name).
STATE_TYPES = {
    "lars": "TraceState",
    "lamb": "ScaleByAdamState",
    "ralars": "ScaleByAdamState",
    "tadam": "ScaleByTAdamState",
    "adabelief": "ScaleByBeliefState",
    "adamp": "ScaleByAdamState",
    "adan": "ScaleByAdanState",
    "ademamix": "ScaleByAdEMAMixState",
}

SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (1,),
    "vector": (7,),
    "matrix": (3, 4),
    "conv": (4, 3, 3, 3),
    "zero_init": (2, 3),
    "sometimes_zero": (6,),
}


# --------------------------------------------------------------------------- configurations

def cfg(name: str, kwargs: dict[str, Any], covers: tuple[str, ...] = ()) -> Any:
    """One configuration: its algorithm is the name's first word; ``covers`` lists the reference
    ``events`` the run must reach at every gradient scale."""
    return pytest.param(name.split("-")[0], kwargs, frozenset(covers), id=name)


CONFIGS = [
    # LARS: default clip (0, 10) clips the conv weight (norm ~10.4); (0.5, 2) clips both ways.
    cfg("lars-plain", dict(lr=1e-2), ("clip_high",)),
    cfg("lars-momentum-wd", dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)),
    cfg("lars-dampening-clip-eta", dict(lr=1e-2, momentum=0.9, dampening=0.5, weight_decay=1e-2,
                                       scale_clip=(0.5, 2.0), trust_coefficient=0.02),
        ("clip_low", "clip_high")),
    cfg("lars-nesterov-eta", dict(lr=1e-1, momentum=0.8, nesterov=True, weight_decay=5e-3,
                                  trust_coefficient=1e-3)),
    # LAMB
    cfg("lamb-plain", dict(lr=1e-2)),
    cfg("lamb-wd-clip", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, scale_clip=(0.5, 2.0)),
        ("clip_low", "clip_high")),
    # RaLars: with b2 = 0.99, rho_t > 4 from t = 5 (rho_4 = 3.96, rho_5 = 4.96).
    cfg("ralars-wd-clip", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, scale_clip=(0.5, 2.0)),
        ("unrectified", "rectified", "clip_low", "clip_high")),
    cfg("ralars-forced", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-3, force_adaptive_momentum=True),
        ("forced_adaptive", "rectified")),
    cfg("ralars-default-betas", dict(lr=1e-2), ("unrectified", "rectified")),
    # TAdam
    cfg("tadam-plain", dict(lr=1e-2)),
    cfg("tadam-dof2.5-wd", dict(lr=1e-2, dof=2.5, weight_decay=1e-2)),
    cfg("tadam-amsgrad", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)),
    # AdaBelief
    cfg("adabelief-plain", dict(lr=1e-2)),
    cfg("adabelief-amsgrad-wd", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    cfg("adabelief-decoupled", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-10, weight_decay=0.1,
                                    decoupled_weight_decay=True)),
    # AdamP: with decoupled (or no) weight decay the steered gradients reach all three branches.
    cfg("adamp-plain", dict(lr=1e-2), ("channel_projection", "layer_projection", "no_projection")),
    cfg("adamp-nesterov-decoupled", dict(lr=1e-2, nesterov=True, weight_decay=0.1, wd_ratio=0.1,
                                         decoupled_weight_decay=True),
        ("channel_projection", "layer_projection", "no_projection")),
    cfg("adamp-amsgrad-coupled-wd", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, weight_decay=1e-2,
                                         delta=0.2),
        ("no_projection",)),
    # Adan
    cfg("adan-plain", dict(lr=1e-2)),
    cfg("adan-wd-amsgrad", dict(lr=1e-2, weight_decay=0.02, amsgrad=True)),
    cfg("adan-betas-eps-wd", dict(lr=1e-2, betas=(0.9, 0.9, 0.999), eps=1e-6, weight_decay=0.1)),
    # AdEMAMix: t_alpha_beta3 = 20 < STEPS, so both the warm-up and the final phase run.
    cfg("ademamix-plain", dict(lr=1e-2), ("final_alpha_beta3",)),
    cfg("ademamix-warmup-decoupled", dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=8.0, t_alpha_beta3=20,
                                          weight_decay=0.1, decoupled_weight_decay=True),
        ("warmup", "final_alpha_beta3")),
    cfg("ademamix-warmup-coupled", dict(lr=1e-2, alpha=2.0, t_alpha_beta3=20, weight_decay=1e-2),
        ("warmup", "final_alpha_beta3")),
]

# One configuration per algorithm for the closed loop: the one with the most options on.
CLOSED_LOOP_CONFIGS = [
    cfg("lars-dampening-clip-eta", dict(lr=1e-2, momentum=0.9, dampening=0.5, weight_decay=1e-2,
                                       scale_clip=(0.5, 2.0), trust_coefficient=0.1)),
    cfg("lars-nesterov", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    cfg("lamb-wd-clip", dict(lr=1e-2, weight_decay=1e-2, scale_clip=(0.5, 2.0))),
    cfg("ralars-wd", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), ("unrectified", "rectified")),
    cfg("tadam-dof-amsgrad", dict(lr=1e-2, dof=2.5, amsgrad=True, weight_decay=1e-2)),
    cfg("adabelief-amsgrad-decoupled", dict(lr=1e-2, amsgrad=True, weight_decay=0.1,
                                            decoupled_weight_decay=True)),
    cfg("adamp-nesterov-decoupled", dict(lr=1e-2, nesterov=True, weight_decay=0.1,
                                         decoupled_weight_decay=True)),
    cfg("adan-wd-amsgrad", dict(lr=1e-2, weight_decay=0.02, amsgrad=True)),
    cfg("ademamix-warmup-decoupled", dict(lr=1e-2, t_alpha_beta3=20, weight_decay=0.1,
                                          decoupled_weight_decay=True), ("warmup", "final_alpha_beta3")),
]


# --------------------------------------------------------------------------- comparison



class Checker:
    """Element-wise relative comparison with the floor of the module docstring."""

    def __init__(self, rtol: float, floor: float = TENSOR_FLOOR) -> None:
        self.rtol, self.floor = rtol, floor
        self.entry_scale: dict[str, np.ndarray] = {}
        self.tensor_scale: dict[str, float] = {}

    def close(self, key: str, actual: Any, expected: Any, step: int) -> None:
        if isinstance(actual, torch.Tensor):
            assert actual.dtype == torch.float64, f"step {step}: {key}: dtype {actual.dtype}"
            actual = actual.detach().numpy()
        actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.float64)
        assert actual.shape == expected.shape, f"step {step}: {key}: shape {actual.shape} != {expected.shape}"
        h_i = self.entry_scale[key] = np.maximum(self.entry_scale.get(key, 0.0), np.abs(expected))
        h = self.tensor_scale[key] = max(self.tensor_scale.get(key, 0.0), float(np.max(h_i, initial=0.0)))
        bound = self.rtol * np.maximum(h_i, self.floor * h)
        err = np.abs(actual - expected)
        bad = ~(err <= bound)  # NaN in holotx fails too
        if bad.any():
            i = np.unravel_index(int(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), np.inf))),
                                 bad.shape)
            raise AssertionError(
                f"step {step}: {key}{list(i)}: holotx {actual[i]!r} vs reference {expected[i]!r}, "
                f"|error| {err[i]:.3e} > bound {bound[i]:.3e} ({int(bad.sum())} of {bad.size} entries off)")


def compare(check: Checker, step: int, algorithm: str, ref: Reference, params: dict[str, torch.Tensor],
            state: Any) -> None:
    """After step ``step`` (1-based): params, moments and counts of holotx equal the reference's."""
    for name, p in params.items():
        check.close(f"param {name!r}", p, ref.params[name], step)

    cls = getattr(holotx, STATE_TYPES[algorithm])
    blocks = find_states(state, cls)
    if algorithm == "lars" and ref.momentum == 0:
        assert blocks == [], "LARS without momentum keeps no momentum buffer"
        return
    assert len(blocks) == 1, f"expected one {cls.__name__} in the state, found {len(blocks)}"
    (block,) = blocks
    ref_fields = set(next(iter(ref.state.values())))
    assert set(cls._fields) == ref_fields, f"{cls.__name__} fields {cls._fields} vs reference {ref_fields}"

    for field in cls._fields:
        tree = getattr(block, field)
        if field == "count" and algorithm == "lars" and ref.dampening == 0:
            assert tree is None, "LARS keeps a step count only where dampening needs it"
            continue
        if all(ref.state[name][field] is None for name in params):
            assert tree is None, f"{field} should be None (the option that needs it is off)"
            continue
        for name in params:
            expected = ref.state[name][field]
            actual = tree[name]
            if field == "count":
                assert actual.dtype == torch.int64, (field, actual)
                assert actual.dim() == 0, (field, actual)
                assert int(actual) == expected, f"step {step}: count {name!r}: {int(actual)} != {expected}"
            else:
                if field == "weight_sum":
                    assert actual.dim() == 0, f"weight_sum {name!r} has shape {tuple(actual.shape)}"
                check.close(f"{field} {name!r}", actual, expected, step)


# --------------------------------------------------------------------------- inputs

def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    params["zero_init"][...] = 0.0
    return params


def steer(g: np.ndarray, w: np.ndarray, step: int) -> np.ndarray:
    """AdamP inputs, by step: ``g`` made orthogonal to every row of ``w`` (channel view
    projects), orthogonal to ``w`` as a whole (rows stay far from orthogonal: layer view
    projects), or pulled along ``w`` (|cos| > 0.8: no projection)."""
    w_norm = math.sqrt(float(np.sum(w * w)))
    if w_norm == 0:
        return g
    mode = step % 3
    if mode == 0:
        rows, w_rows = g.reshape(g.shape[0], -1).copy(), w.reshape(w.shape[0], -1)
        for i in range(rows.shape[0]):
            rows[i] -= float(np.sum(rows[i] * w_rows[i])) / float(np.sum(w_rows[i] ** 2)) * w_rows[i]
        return rows.reshape(g.shape)
    if mode == 1:
        return g - float(np.sum(g * w)) / w_norm**2 * w
    return g + 3 * math.sqrt(float(np.sum(g * g))) / w_norm * w


def open_loop_grads(rng: np.random.Generator, step: int, scale: float,
                    ref: Reference) -> dict[str, np.ndarray]:
    grads = {k: scale * rng.standard_normal(s) for k, s in SHAPES.items()}
    grads["sometimes_zero"][0] = 0.0  # one entry never gets a gradient
    if step % 3 == 0:  # and on every third step (the first included) none of it does
        grads["sometimes_zero"][...] = 0.0
    if isinstance(ref, AdamP):
        for k in ("matrix", "conv"):
            grads[k] = steer(grads[k], ref.params[k], step)
    return grads


def to_torch(arrays: dict[str, np.ndarray | None]) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else torch.from_numpy(np.array(v, dtype=np.float64, copy=True))
            for k, v in arrays.items()}


# --------------------------------------------------------------------------- open loop

@pytest.mark.parametrize("scale", GRAD_SCALES, ids=lambda s: f"g{s:g}")
@pytest.mark.parametrize(("algorithm", "kwargs", "covers"), CONFIGS)
def test_open_loop_matches_numpy_reference_every_step(algorithm, kwargs, covers, scale):
    """Seeded random gradients: params and every state field agree after each of 50 steps."""
    p0 = initial_params()
    ref = REFERENCES[algorithm](p0, **kwargs)
    tx = getattr(holotx, algorithm)(**kwargs)
    params = to_torch(p0)
    state = tx.init(params)
    rng = np.random.default_rng(1234)
    check = Checker(RTOL[algorithm])
    for step in range(STEPS):
        grads = open_loop_grads(rng, step, scale, ref)
        updates, state = tx.update(to_torch(grads), state, params)
        params = holotx.apply_updates(params, updates)
        ref.step(grads)
        compare(check, step + 1, algorithm, ref, params, state)
    assert covers <= ref.events, f"inputs never reached {sorted(covers - ref.events)}"
    if isinstance(ref, AdamP):
        assert ref.margin > 1e-6, "a cosine came within 1e-6 of AdamP's threshold: inputs too close to call"


@pytest.mark.parametrize(("algorithm", "kwargs", "covers"), CLOSED_LOOP_CONFIGS)
def test_none_gradients_skip_their_leaf(algorithm, kwargs, covers):
    """A ``None`` gradient (the ``(7,)`` vector's, on steps 2, 6, 10, ...; the ``(6,)``
    tensor's, on the first five steps) skips that leaf: no update, state kept, and its step
    count -- hence its bias corrections, RaLars's rectification, AdEMAMix's warm-up, Adan's
    first-step ``g_prev`` -- lags the other leaves'."""
    p0 = initial_params()
    ref = REFERENCES[algorithm](p0, **kwargs)
    tx = getattr(holotx, algorithm)(**kwargs)
    params = to_torch(p0)
    state = tx.init(params)
    rng = np.random.default_rng(77)
    check = Checker(RTOL[algorithm])
    for step in range(STEPS):
        grads: dict[str, np.ndarray | None] = dict(open_loop_grads(rng, step, 1.0, ref))
        if step % 4 == 1:
            grads["vector"] = None
        if step < 5:
            grads["sometimes_zero"] = None
        updates, state = tx.update(to_torch(grads), state, params)
        params = holotx.apply_updates(params, updates)
        ref.step(grads)
        compare(check, step + 1, algorithm, ref, params, state)
    assert ref.state["vector"]["count"] == STEPS - STEPS // 4 - (STEPS % 4 > 1)
    assert ref.state["sometimes_zero"]["count"] == STEPS - 5


@pytest.mark.parametrize(("algorithm", "kwargs", "covers"), CLOSED_LOOP_CONFIGS)
def test_maximize_is_the_reference_on_negated_gradients(algorithm, kwargs, covers):
    """``maximize=True`` fed ``g`` is the reference fed ``-g`` (torch.optim's convention: the
    gradient is negated first, so the state holds the moments of ``-g``)."""
    p0 = initial_params()
    ref = REFERENCES[algorithm](p0, **kwargs)
    tx = getattr(holotx, algorithm)(maximize=True, **kwargs)
    params = to_torch(p0)
    state = tx.init(params)
    rng = np.random.default_rng(5)
    check = Checker(RTOL[algorithm])
    for step in range(STEPS):
        grads = open_loop_grads(rng, step, 1.0, ref)
        updates, state = tx.update(to_torch(grads), state, params)
        params = holotx.apply_updates(params, updates)
        ref.step({k: -g for k, g in grads.items()})
        compare(check, step + 1, algorithm, ref, params, state)


# --------------------------------------------------------------------------- closed loop

def least_squares_problem(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"A": rng.standard_normal((8, 5)) / math.sqrt(8), "b": rng.standard_normal(8),
            "B": rng.standard_normal((8, 3)), "x": rng.standard_normal(5), "X": rng.standard_normal((5, 3))}


@pytest.mark.parametrize(("algorithm", "kwargs", "covers"), CLOSED_LOOP_CONFIGS)
def test_closed_loop_least_squares_matches_numpy_reference(algorithm, kwargs, covers):
    """``||A x - b||^2 + ||A X - B||^2``: each side differentiates at its own params every step."""
    pb = least_squares_problem()
    a_np, a_t = pb["A"], torch.from_numpy(pb["A"])
    targets_np = {"x": pb["b"], "X": pb["B"]}
    targets_t = to_torch(targets_np)
    p0 = {"x": pb["x"], "X": pb["X"]}
    ref = REFERENCES[algorithm](p0, **kwargs)
    tx = getattr(holotx, algorithm)(**kwargs)
    params = to_torch(p0)
    state = tx.init(params)
    check = Checker(RTOL[algorithm], CLOSED_LOOP_FLOOR)
    losses = []
    for step in range(STEPS):
        grads_t = {k: 2 * a_t.T @ (a_t @ params[k] - targets_t[k]) for k in params}
        grads_np = {k: 2 * a_np.T @ (a_np @ ref.params[k] - targets_np[k]) for k in ref.params}
        losses.append(sum(float(np.sum((a_np @ ref.params[k] - targets_np[k]) ** 2)) for k in ref.params))
        updates, state = tx.update(grads_t, state, params)
        params = holotx.apply_updates(params, updates)
        ref.step(grads_np)
        compare(check, step + 1, algorithm, ref, params, state)
    assert covers <= ref.events, f"inputs never reached {sorted(covers - ref.events)}"
    assert losses[-1] < losses[0], "the closed loop descends"


# --------------------------------------------------------------------------- NaN / inf

# Options both modes accept (Holocron's signatures), to exercise more code than the defaults.
RICH_KWARGS = {
    "lars": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "lamb": dict(lr=1e-2, weight_decay=1e-2, scale_clip=(0.5, 2.0)),
    "ralars": dict(lr=1e-2, weight_decay=1e-2, force_adaptive_momentum=True),
    "tadam": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adabelief": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamp": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adan": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "ademamix": dict(lr=1e-2, weight_decay=1e-2),
}

DEGENERATE_SHAPES = {"zero_vec": (1,), "zero_mat": (2, 3), "empty": (0,), "empty_rows": (0, 3)}


def tensors_in(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_in(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in tensors_in(v)]
    return []


@pytest.mark.parametrize("grads_kind", ["zero_grads", "random_grads"])
@pytest.mark.parametrize("options", ["defaults", "rich"])
@pytest.mark.parametrize("compat", [None, "holocron"], ids=["default", "holocron"])
@pytest.mark.parametrize("algorithm", list(REFERENCES))
def test_degenerate_inputs_stay_finite(algorithm, compat, options, grads_kind):
    """Zero-initialised params, zero gradients and 0-size tensors: no NaN or inf anywhere in
    5 steps (in params, updates or any state tensor), shapes kept."""
    kwargs = dict(RICH_KWARGS[algorithm]) if options == "rich" else {}
    tx = getattr(holotx, algorithm)(compat=compat, **kwargs)
    params = {k: torch.zeros(s, dtype=torch.float64) for k, s in DEGENERATE_SHAPES.items()}
    state = tx.init(params)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        if grads_kind == "zero_grads":
            grads = {k: torch.zeros_like(p) for k, p in params.items()}
        else:
            grads = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        for k, s in DEGENERATE_SHAPES.items():
            assert tuple(params[k].shape) == s
            assert torch.isfinite(updates[k]).all(), f"step {step + 1}: update {k!r} not finite"
            assert torch.isfinite(params[k]).all(), f"step {step + 1}: param {k!r} not finite"
        for t in tensors_in(state):
            assert torch.isfinite(t).all(), f"step {step + 1}: non-finite state tensor {t}"
