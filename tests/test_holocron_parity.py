"""Specification: holotx's Holocron-compatible mode (``compat="holocron"``) reproduces pylocron 0.3.0.

For LARS, LAMB, RaLars, TAdam, AdaBelief, AdamP, Adan and AdEMAMix, pylocron's
``torch.optim.Optimizer`` (imported and run, never re-implemented here) and the holotx transform
are run side by side from the same initial parameters for ``STEPS`` = 50 steps, and after *every*
step the test compares the parameters and *every* entry of pylocron's ``opt.state[p]`` with its
holotx counterpart. The holotx block state is found by type (walking the state pytree):

=============  ===========================  ==================================================
optimizer      holotx block state           pylocron ``opt.state[p]`` -> holotx field
=============  ===========================  ==================================================
LARS           ``TraceState`` (inside       ``momentum_buffer`` -> ``trace``; the block exists
               ``TrustRatioState``)         only with momentum > 0; ``count`` (dampening only)
                                            is the number of steps the leaf had a gradient
LAMB, RaLars   ``ScaleByAdamState``         ``step`` -> ``count``, ``exp_avg`` -> ``mu``,
                                            ``exp_avg_sq`` -> ``nu``; ``local_lr`` (the trust
                                            ratio, a diagnostic holotx does not keep) is
                                            *recomputed* from holotx's values (below)
TAdam          ``ScaleByTAdamState``        ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` ->
                                            ``mu``/``nu``/``nu_max``; ``W_t`` (shape (1,), param
                                            dtype) -> ``weight_sum`` (0-d float64)
AdaBelief      ``ScaleByBeliefState``       ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` ->
                                            ``mu``/``nu``/``nu_max``
AdamP          ``ScaleByAdamState``         as AdaBelief
Adan           ``ScaleByAdanState``         ``exp_avg`` -> ``mu``, ``exp_avg_sq`` -> ``diff_avg``,
                                            ``exp_avg_delta`` -> ``nu``, ``max_exp_avg_delta`` ->
                                            ``nu_max``; pylocron's ``prev_grad`` stays all zeros
                                            (its bug) and holotx keeps none (``None``)
AdEMAMix       ``ScaleByAdEMAMixState``     ``exp_avg``/``exp_avg_sq``/``exp_avg_slow`` ->
                                            ``mu``/``nu``/``mu_slow``
=============  ===========================  ==================================================

``step`` is compared with the per-leaf ``count`` (a 0-d int64 tensor). A pylocron state key that
this table does not map fails the test, so no state tensor goes unchecked. While a leaf has never
had a gradient pylocron has no state for it; holotx must then hold its initial state (count 0,
zero moments, ``weight_sum = b1 / (1 - b1)``). Where amsgrad is off, holotx keeps no ``nu_max``.
LAMB/RaLars ``local_lr``: holotx's trust ratio is read off its own step, ``r = ||update|| / (lr *
||u||)``, with ``u`` the pre-trust-ratio direction rebuilt from holotx's moments, count and
previous params (``u = 0`` must give a zero update; pylocron then stores 1), and compared with
pylocron's through the reciprocal ``1 / r = ||u|| / phi``: ``u`` can nearly cancel (a (1,) tensor
whose ``m / sqrt(v)`` passes near zero or near ``-wd * theta``), so ``r`` itself carries both
sides' rounding amplified by ``1 / ||u||`` (2e-4 in float32 for some seeds, a conditioning effect,
not a disagreement), while ``||u||`` is as well determined as the moments are.

Gradients:

* **open loop**: the same seeded random gradients go to both (pylocron gets a clone: its LARS
  writes the weight decay into ``p.grad``), at scales 1e-3, 1 and 1e3; holotx's grads must come
  back unmodified;
* **closed loop**: least squares, and a small conv + MLP; each side computes its gradients with
  torch autograd from its *own* current parameters (pylocron: ``loss.backward()``, holotx:
  ``torch.autograd.grad``), so differences feed back.

Every parameter set holds a ``(1,)`` tensor, a 4-D conv weight, an all-zero tensor (LAMB/LARS
ratio 1, AdamP's zero normal), a tensor whose gradient is sometimes exactly zero (all of it on
every third step, one entry always), and one whose gradient is ``None`` on some steps (the first
two among them, so its state starts late and its count lags): pylocron skips it, holotx must too.
The configurations are the ones the reference page singles out for parity: LARS momentum /
dampening / nesterov / weight decay (and its ignored ``scale_clip``), LAMB/RaLars ``scale_clip``,
amsgrad for TAdam, AdaBelief, AdamP and Adan, RaLars ``force_adaptive_momentum`` around its switch
(rho_t > 4: step 5 with the default beta2, step 8 with beta2 = 0.64; both branches are asserted to
occur), TAdam ``dof`` (None and numbers), AdamP ``delta`` with projections that happen on some steps
and not on others (asserted; anti-aligned gradients are projected by Holocron's signed cosine) and
AdEMAMix ``alpha``. Two parameter groups with different lr, weight decay and betas (pylocron: param
group dicts; holotx: ``holotx.partition`` with a prefix of the params tree as labels) are run for
every optimizer; LARS/LAMB/RaLars ``scale_clip``, RaLars ``force_adaptive_momentum`` and AdamP
``delta`` are per optimizer in pylocron, so both holotx groups get the same value.

Tolerance policy: each tensor is compared norm-wise, ``max|holotx - pylocron| <= RTOL * S`` with
``S`` the largest ``max|pylocron|`` that tensor has had so far in the run (exactly-zero reference
tensors must be matched to within denormals). Both libraries evaluate the same formulas with the
same float64 Python scalars but not always in the same order, so an entry that passes near zero
carries an absolute error of a few ulp *of the tensor's scale*: an element-wise relative check
would fail spuriously there, and the running maximum keeps that scale for a tensor that later
shrinks. ``RTOL``: float64 1e-12 for the element-wise rules (AdaBelief, Adan, AdEMAMix), 1e-10
for the rules built on norms or sums (LARS, LAMB, RaLars, TAdam, AdamP), where a reduction's
rounding depends on its order and the trust ratio multiplies every element by it; float32 1e-5
for a subset (a few float32 ulp, 1.2e-7, per step over 50 steps, well below what a wrong formula
gives). The worst relative error met per optimizer is printed at the end of the module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pylocron
import pytest
import torch
import torch.nn.functional as F

import holotx
from holotx.tree import find_states

hoptim = pylocron.import_optim()

STEPS = 50
GRAD_SCALES = (1e-3, 1.0, 1e3)
RTOL_ELEMENTWISE = 1e-12
RTOL_REDUCTION = 1e-10
RTOL_FLOAT32 = 1e-5
ABS_FLOOR = 1e-300

# ------------------------------------------------------------------------------ optimizers


@dataclasses.dataclass(frozen=True)
class Algo:
    """One optimizer: pylocron's class, holotx's factory and state class (by name, looked up when
    run), the float64 tolerance, and the pylocron state key -> holotx state field mapping."""

    ref: type[torch.optim.Optimizer]
    factory: str
    state_cls: str
    rtol: float
    fields: dict[str, str]
    per_optimizer: tuple[str, ...] = ()


ADAM_FIELDS = {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"}
ALGOS: dict[str, Algo] = {
    "lars": Algo(hoptim.LARS, "lars", "TraceState", RTOL_REDUCTION, {"momentum_buffer": "trace"},
                 ("scale_clip",)),
    "lamb": Algo(hoptim.LAMB, "lamb", "ScaleByAdamState", RTOL_REDUCTION,
                 {"exp_avg": "mu", "exp_avg_sq": "nu"}, ("scale_clip",)),
    "ralars": Algo(hoptim.RaLars, "ralars", "ScaleByAdamState", RTOL_REDUCTION,
                   {"exp_avg": "mu", "exp_avg_sq": "nu"}, ("scale_clip", "force_adaptive_momentum")),
    "tadam": Algo(hoptim.TAdam, "tadam", "ScaleByTAdamState", RTOL_REDUCTION, ADAM_FIELDS),
    "adabelief": Algo(hoptim.AdaBelief, "adabelief", "ScaleByBeliefState", RTOL_ELEMENTWISE, ADAM_FIELDS),
    "adamp": Algo(hoptim.AdamP, "adamp", "ScaleByAdamState", RTOL_REDUCTION, ADAM_FIELDS, ("delta",)),
    "adan": Algo(hoptim.Adan, "adan", "ScaleByAdanState", RTOL_ELEMENTWISE,
                 {"exp_avg": "mu", "exp_avg_sq": "diff_avg", "exp_avg_delta": "nu",
                  "max_exp_avg_delta": "nu_max"}),
    "ademamix": Algo(hoptim.AdEMAMix, "ademamix", "ScaleByAdEMAMixState", RTOL_ELEMENTWISE,
                     {"exp_avg": "mu", "exp_avg_sq": "nu", "exp_avg_slow": "mu_slow"}),
}
# pylocron state keys handled outside ``Algo.fields``: compared (step, W_t), recomputed (local_lr),
# or checked to be all zeros with no holotx counterpart (Adan's never-updated prev_grad).
SPECIAL_KEYS = {"step", "W_t", "local_lr", "prev_grad"}

# Per optimizer: (id, kwargs given identically to both sides). The same kwarg names in both.
CONFIGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # LARS keeps gamma outside its momentum buffer: once a closed loop's gradients shrink (the MLP's
    # output temperature decays), gamma * buffer explodes (1e12 at lr=0.02). Small lrs keep 50 steps tame.
    "lars": [
        ("plain", dict(lr=5e-3)),
        ("wd", dict(lr=5e-3, weight_decay=0.1)),
        ("mom", dict(lr=2e-3, momentum=0.9)),
        ("mom-wd", dict(lr=2e-3, momentum=0.9, weight_decay=0.05)),
        ("damp", dict(lr=2e-3, momentum=0.9, dampening=0.5)),
        ("damp-wd", dict(lr=2e-3, momentum=0.8, dampening=0.3, weight_decay=0.05)),
        ("nesterov", dict(lr=2e-3, momentum=0.9, nesterov=True)),
        ("nesterov-wd", dict(lr=2e-3, momentum=0.9, nesterov=True, weight_decay=0.05)),
        # scale_clip is ignored by pylocron's LARS (and by holotx's Holocron mode): ||theta|| >> 0.1.
        ("clip-ignored", dict(lr=2e-3, momentum=0.5, scale_clip=(0.0, 0.1))),
    ],
    "lamb": [
        ("default", dict(lr=1e-2)),
        ("wd", dict(lr=1e-2, weight_decay=0.1)),
        # (0.5, 2): the conv weight's norm (~10) is clipped down, the (1,) tensor's (< 0.5) and the
        # zero tensor's (0) up to 0.5, so a zero tensor gets ratio 0.5/||u||, not 1.
        ("clip-wd", dict(lr=1e-2, weight_decay=0.05, scale_clip=(0.5, 2.0))),
        ("betas-eps", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    ],
    "ralars": [
        ("default", dict(lr=1e-2)),
        ("force", dict(lr=1e-2, force_adaptive_momentum=True)),
        ("wd", dict(lr=1e-2, weight_decay=0.1)),
        ("force-wd", dict(lr=1e-2, weight_decay=0.1, force_adaptive_momentum=True)),
        # beta2 = 0.64: rho_inf = 4.56, rho_t > 4 from step 8 (|rho_t - 4| >= 0.088 on every step).
        ("late", dict(lr=1e-2, betas=(0.9, 0.64))),
        ("late-force-clip", dict(lr=1e-2, betas=(0.9, 0.64), weight_decay=0.01,
                                 force_adaptive_momentum=True, scale_clip=(0.5, 2.0))),
    ],
    "tadam": [
        ("default", dict(lr=1e-2)),
        ("ams", dict(lr=1e-2, amsgrad=True)),
        ("dof2", dict(lr=1e-2, dof=2.0)),
        ("ams-dof0.5-wd", dict(lr=1e-2, amsgrad=True, dof=0.5, weight_decay=0.1)),
        ("wd-betas", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))),
    ],
    "adabelief": [
        ("default", dict(lr=1e-2)),
        ("ams", dict(lr=1e-2, amsgrad=True)),
        ("wd", dict(lr=1e-2, weight_decay=0.1)),
        ("ams-wd-betas", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-10)),
    ],
    "adamp": [
        ("default", dict(lr=1e-2)),
        ("ams", dict(lr=1e-2, amsgrad=True)),
        ("wd", dict(lr=1e-2, weight_decay=0.1)),
        # delta = 0: only anti-aligned gradients (signed cos < 0) are projected.
        ("delta0", dict(lr=1e-2, delta=0.0)),
        ("delta1-ams-wd", dict(lr=1e-2, delta=1.0, amsgrad=True, weight_decay=0.05)),
    ],
    "adan": [
        ("default", dict(lr=1e-2)),
        ("ams", dict(lr=1e-2, amsgrad=True)),
        ("wd", dict(lr=1e-2, weight_decay=0.1)),
        ("ams-wd-betas", dict(lr=1e-2, amsgrad=True, weight_decay=0.05, betas=(0.9, 0.9, 0.999))),
    ],
    "ademamix": [
        ("default", dict(lr=1e-2)),
        ("alpha0-wd", dict(lr=1e-2, alpha=0.0, weight_decay=0.1)),
        ("alpha2-betas", dict(lr=1e-2, alpha=2.0, betas=(0.8, 0.99, 0.95))),
        ("alpha8-wd", dict(lr=1e-2, alpha=8.0, weight_decay=0.1, betas=(0.9, 0.999, 0.99))),
    ],
}
ALL_CONFIGS = [(a, cid, kw) for a, rows in CONFIGS.items() for cid, kw in rows]
ALL_IDS = [f"{a}-{cid}" for a, cid, _ in ALL_CONFIGS]

# Two param groups per optimizer: (per-optimizer kwargs, group "a" kwargs, group "b" kwargs).
GROUPS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "lars": (dict(scale_clip=(0.0, 0.5)),
             dict(lr=0.02, momentum=0.9, dampening=0.2, weight_decay=0.05),
             dict(lr=0.005, momentum=0.5, nesterov=True, weight_decay=0.0)),
    "lamb": (dict(scale_clip=(0.5, 2.0)),
             dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1),
             dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0, eps=1e-6)),
    "ralars": (dict(force_adaptive_momentum=True, scale_clip=(0.1, 5.0)),
               dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0),
               dict(lr=3e-3, betas=(0.8, 0.64), weight_decay=0.1)),
    "tadam": (dict(),
              dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, amsgrad=True),
              dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0, dof=2.0)),
    "adabelief": (dict(),
                  dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, amsgrad=True),
                  dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0)),
    "adamp": (dict(delta=0.2),
              dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1),
              dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0, amsgrad=True)),
    "adan": (dict(),
             dict(lr=1e-2, betas=(0.98, 0.92, 0.99), weight_decay=0.05, amsgrad=True),
             dict(lr=3e-3, betas=(0.9, 0.9, 0.999), weight_decay=0.0)),
    "ademamix": (dict(),
                 dict(lr=1e-2, betas=(0.9, 0.999, 0.9999), weight_decay=0.1, alpha=5.0),
                 dict(lr=3e-3, betas=(0.8, 0.99, 0.95), weight_decay=0.0, alpha=2.0)),
}

# float32 subset: one configuration per optimizer, open loop at scale 1.
FLOAT32_CONFIGS = [
    ("lars", "nesterov-wd"), ("lamb", "clip-wd"), ("ralars", "late-force-clip"), ("tadam", "ams-dof0.5-wd"),
    ("adabelief", "ams-wd-betas"), ("adamp", "delta1-ams-wd"), ("adan", "ams-wd-betas"),
    ("ademamix", "alpha8-wd"),
]

# Worst relative error met, per optimizer (and per optimizer in float32), printed at the end.
WORST: dict[str, tuple[float, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report(request):
    """One intra-op thread for these tiny tensors (with two threads, a busy machine stalls conv2d's
    thread pool for ~20 ms a call), restored afterwards; then print the worst errors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    pylocron.report_worst(request.config,
                          "holocron parity, worst |holotx - pylocron| / running max|pylocron|:", WORST)


# ------------------------------------------------------------------------------ tree helpers


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a/b": leaf}; a flat dict is returned as is (keys unchanged)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/"))
    return out


def unflat(leaves: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in leaves.items():
        *heads, last = path.split("/")
        node = out
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = v
    return out




def field_leaf(block: Any, field: str, name: str) -> Any:
    """``block.<field>`` at leaf ``name``, None where the field (or that leaf) is absent."""
    tree = getattr(block, field)
    return None if tree is None else flat(tree).get(name)


def leaf_block(state: Any, cls: type, key_field: str, name: str) -> Any:
    """The one block of type ``cls`` that holds leaf ``name`` (partition gives one per group,
    each with ``None`` at the other group's leaves), or None."""
    hits = [b for b in find_states(state, cls) if field_leaf(b, key_field, name) is not None]
    assert len(hits) <= 1, f"{name}: leaf held by {len(hits)} {cls.__name__} blocks"
    return hits[0] if hits else None


# ------------------------------------------------------------------------------ comparison


class Checker:
    """Norm-wise relative comparison against each tensor's running max-abs (module docstring)."""

    def __init__(self, rtol: float, report_key: str, run_id: str) -> None:
        self.rtol = rtol
        self.report_key = report_key
        self.run_id = run_id
        self.scale: dict[str, float] = {}
        self.worst = (0.0, "")

    def close(self, key: str, actual: torch.Tensor, expected: torch.Tensor, step: int,
              check_dtype: bool = True) -> None:
        assert actual is not None, f"step {step}: {key}: holotx has no value"
        assert actual.shape == expected.shape, (step, key, actual.shape, expected.shape)
        if check_dtype:
            assert actual.dtype == expected.dtype, (step, key, actual.dtype, expected.dtype)
        a, e = actual.detach().double(), expected.detach().double()
        s = self.scale[key] = max(self.scale.get(key, 0.0), e.abs().max().item() if e.numel() else 0.0)
        err = (a - e).abs().max().item() if e.numel() else 0.0
        rel = err / s if s > 0 else (0.0 if err == 0 else math.inf)
        if rel > self.worst[0]:
            self.worst = (rel, f"{self.run_id} step {step} {key}")
        assert err <= self.rtol * s + ABS_FLOOR, (
            f"step {step}: {key}: max|holotx - pylocron| = {err:.3e} > {self.rtol:.0e} * scale {s:.3e} "
            f"(relative {rel:.3e})")

    def record(self) -> None:
        if self.worst[0] >= WORST.get(self.report_key, (-1.0, ""))[0]:
            WORST[self.report_key] = self.worst


def _norm(x: torch.Tensor) -> float:
    return x.double().pow(2).sum().sqrt().item()


def direction(algo: str, block: Any, name: str, group: dict[str, Any], theta: torch.Tensor,
              force: bool) -> torch.Tensor:
    """LAMB/RaLars direction before the trust ratio, from holotx's moments and count (spec, float64)."""
    mu, nu = field_leaf(block, "mu", name).double(), field_leaf(block, "nu", name).double()
    b1, b2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    if algo == "lamb":
        u = mu / (nu.sqrt() + eps)
    else:
        t = int(field_leaf(block, "count", name))
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / bc2
        if rho_t > 4:
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            u = r_t * (mu / bc1) / ((nu / bc2).sqrt() + eps)
        elif force:
            u = (mu / bc1) / ((nu / bc2).sqrt() + eps)
        else:
            u = mu / bc1
    return u + wd * theta.double()


# ------------------------------------------------------------------------------ the runner

GradFn = Callable[[int, dict[str, torch.Tensor], dict[str, torch.nn.Parameter]],
                  dict[str, torch.Tensor | None]]


@dataclasses.dataclass
class Stats:
    """Coverage counters: AdamP projections / non-projections, RaLars rectified / not."""

    projected: int = 0
    not_projected: int = 0


def run_parity(algo_name: str, run_id: str, p0: dict[str, torch.Tensor],
               groups: dict[str, dict[str, Any]], labels: dict[str, str], common: dict[str, Any],
               grad_fn: GradFn, rtol: float, steps: int = STEPS, report_key: str | None = None) -> Stats:
    """Run pylocron and holotx side by side; compare after every step.

    ``p0``: flat dict path -> initial tensor ("a/conv" paths make a nested holotx tree);
    ``groups``: label -> that group's kwargs; ``labels``: path -> label (a single group when
    ``len(groups) == 1``); ``common``: kwargs given to every group (and pylocron's per-optimizer
    ones). ``grad_fn(step, holotx_params, pylocron_params)`` sets the pylocron params' ``.grad`` and
    returns holotx's grads (flat dict, ``None`` for a skipped leaf).
    """
    algo = ALGOS[algo_name]
    factory = getattr(holotx, algo.factory)
    state_cls = getattr(holotx, algo.state_cls)
    key_field = next(iter(algo.fields.values()))

    tparams = {k: torch.nn.Parameter(v.clone()) for k, v in p0.items()}
    ref_groups = [{"params": [tparams[k] for k in p0 if labels[k] == g], **kw} for g, kw in groups.items()]
    per_opt = {k: v for k, v in common.items() if k in algo.per_optimizer}
    group_common = {k: v for k, v in common.items() if k not in algo.per_optimizer}
    if len(groups) == 1:
        ((_, kw),) = groups.items()
        opt = algo.ref(ref_groups[0]["params"], **group_common, **per_opt, **kw)
        tx = factory(**common, **kw, compat="holocron")
    else:
        for g in ref_groups:
            g.update(group_common)
        opt = algo.ref(ref_groups, **per_opt)
        tx = holotx.partition({g: factory(**common, **kw, compat="holocron") for g, kw in groups.items()},
                              unflat({k.split("/")[0]: labels[k] for k in p0}))
    group_of = {k: g for g in opt.param_groups for k, p in tparams.items()
                if any(p is q for q in g["params"])}

    params = unflat({k: v.clone() for k, v in p0.items()})
    state = tx.init(params)
    check = Checker(rtol, report_key or algo_name, run_id)
    seen = dict.fromkeys(p0, 0)  # steps each leaf had a gradient
    stats = Stats()
    for step in range(1, steps + 1):
        prev = flat(params)
        grads = grad_fn(step - 1, prev, tparams)
        kept = {k: None if g is None else g.clone() for k, g in grads.items()}
        for k, g in grads.items():
            seen[k] += g is not None
            if algo_name == "adamp" and g is not None:  # coverage of Holocron's signed-cosine rule
                g_aug = g.double() + group_of[k]["weight_decay"] * prev[k].double()
                cos = F.cosine_similarity(prev[k].double().view(1, -1), g_aug.view(1, -1)).item()
                if cos < common.get("delta", 0.1) / math.sqrt(g.numel()):
                    stats.projected += 1
                else:
                    stats.not_projected += 1
        opt.step()
        updates, state = tx.update(unflat(grads), state, params)
        params = holotx.apply_updates(params, updates)
        for k, g in kept.items():
            assert (g is None and grads[k] is None) or torch.equal(grads[k], g), f"holotx modified grad {k}"

        new, upd = flat(params), flat(updates)
        for k, tp in tparams.items():
            check.close(f"param {k}", new[k], tp.detach(), step)
            ref_state = opt.state.get(tp, {})
            block = leaf_block(state, state_cls, key_field, k)
            compare_state(check, algo_name, algo, k, step, ref_state, block, group_of[k], seen[k])
            if algo_name in ("lamb", "ralars") and grads[k] is not None:
                u = direction(algo_name, block, k, group_of[k], prev[k],
                              common.get("force_adaptive_momentum", False))
                nu_, nd = _norm(u), _norm(upd[k])
                if nu_ == 0:
                    assert nd == 0, f"step {step}: {k}: zero direction but a non-zero holotx update"
                    ratio = 1.0
                else:
                    assert nd > 0, f"step {step}: {k}: non-zero direction but a zero holotx update"
                    ratio = nd / (group_of[k]["lr"] * nu_)
                check.close(f"1/local_lr {k}", torch.tensor(1 / ratio, dtype=torch.float64),
                            1 / torch.as_tensor(ref_state["local_lr"], dtype=torch.float64), step)
    check.record()
    return stats


def compare_state(check: Checker, algo_name: str, algo: Algo, k: str, step: int, ref_state: dict[str, Any],
                  block: Any, group: dict[str, Any], seen: int) -> None:
    unknown = set(ref_state) - set(algo.fields) - SPECIAL_KEYS
    assert not unknown, f"pylocron state keys not mapped by this test: {unknown}"
    if algo_name == "lars":
        if group["momentum"] == 0:
            assert block is None, "LARS without momentum keeps no momentum buffer"
            assert "momentum_buffer" not in ref_state
            return
        assert block is not None, f"{k}: no TraceState holds this leaf"
        counts = block.count
        if group["dampening"] == 0:
            assert counts is None, "a LARS trace keeps a count only with dampening"
        else:
            count = flat(counts)[k]
            assert count.dtype == torch.int64
            assert count.dim() == 0
            assert int(count) == seen, f"step {step}: {k}: count {int(count)} != {seen} steps with a grad"
    else:
        assert block is not None, f"{k}: no {algo.state_cls} holds this leaf"
        count = field_leaf(block, "count", k)
        assert count.dtype == torch.int64
        assert count.dim() == 0
        assert int(count) == ref_state.get("step", 0) == seen, (
            f"step {step}: {k}: holotx count {int(count)}, pylocron step {ref_state.get('step')}")

    if not ref_state:  # the leaf never had a gradient: pylocron has no state, holotx its initial one
        for field in algo.fields.values():
            v = field_leaf(block, field, k)
            assert v is None or torch.count_nonzero(v) == 0, f"step {step}: {k}: initial {field} is not zero"
        if algo_name == "tadam":
            b1 = group["betas"][0]
            w = field_leaf(block, "weight_sum", k)
            assert w.dtype == torch.float64
            assert w.dim() == 0
            assert abs(w.item() - b1 / (1 - b1)) <= 1e-15 * (b1 / (1 - b1))
        return

    for ref_key, field in algo.fields.items():
        if ref_key in ref_state:
            check.close(f"{ref_key} {k}", field_leaf(block, field, k), ref_state[ref_key], step)
        else:  # amsgrad off in this leaf's group
            assert field_leaf(block, field, k) is None, f"{k}: holotx keeps {field}, pylocron no {ref_key}"
    if algo_name == "tadam":
        w = field_leaf(block, "weight_sum", k)
        ref_w = ref_state["W_t"]
        assert ref_w.shape == (1,)
        assert ref_w.dtype == ref_state["exp_avg"].dtype
        assert w.dtype == torch.float64, w.dtype
        assert w.dim() == 0, w.shape
        check.close(f"W_t {k}", w, ref_w.reshape(()).double(), step)
    if algo_name == "adan":
        assert torch.count_nonzero(ref_state["prev_grad"]) == 0, "pylocron's prev_grad is never updated"
        assert field_leaf(block, "prev_grad", k) is None, "holotx keeps no prev_grad in Holocron mode"


# ------------------------------------------------------------------------------ open loop


@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    zero_init: bool = False
    grad: str = "dense"  # "dense" | "sometimes_zero" | "sometimes_none"


OPEN_LEAVES: dict[str, Leaf] = {
    "scalar": Leaf((1,)),
    "conv": Leaf((4, 3, 3, 3)),
    "matrix": Leaf((5, 7)),
    "zeros": Leaf((3, 4), zero_init=True),
    "sometimes_zero": Leaf((6,), grad="sometimes_zero"),
    "sometimes_none": Leaf((2, 3), grad="sometimes_none"),
}
# Two groups: the params tree is {"a": {...}, "b": {...}} and holotx's labels its prefix
# {"a": "a", "b": "b"}; each group holds a (1,)-or-4-D tensor, a zero one and an irregular one.
GROUP_OF_LEAF = {"conv": "a", "zeros": "a", "sometimes_none": "a",
                 "scalar": "b", "matrix": "b", "sometimes_zero": "b"}


def grad_is_none(step: int) -> bool:
    """0-based step on which the ``sometimes_none`` leaf has no gradient."""
    return step < 2 or step % 4 == 3


def initial_params(dtype: torch.dtype, grouped: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, leaf in OPEN_LEAVES.items():
        x = torch.randn(leaf.shape, generator=gen, dtype=torch.float64)
        path = f"{GROUP_OF_LEAF[name]}/{name}" if grouped else name
        out[path] = (torch.zeros_like(x) if leaf.zero_init else x).to(dtype)
    return out


def open_loop(scale: float, dtype: torch.dtype, seed: int = 1234) -> GradFn:
    """Seeded random gradients, the same for both sides (pylocron gets clones)."""
    gen = torch.Generator().manual_seed(seed)

    def grad_fn(step, params, tparams):
        grads: dict[str, torch.Tensor | None] = {}
        for path in params:
            leaf = OPEN_LEAVES[path.split("/")[-1]]
            g = (scale * torch.randn(leaf.shape, generator=gen, dtype=torch.float64)).to(dtype)
            if leaf.grad == "sometimes_zero":
                g[0] = 0.0
                if step % 3 == 0:
                    g.zero_()
            grads[path] = None if leaf.grad == "sometimes_none" and grad_is_none(step) else g
        for path, tp in tparams.items():
            tp.grad = None if grads[path] is None else grads[path].clone()
        return grads

    return grad_fn


def single(kwargs: dict[str, Any], algo: str, paths) -> tuple[dict, dict, dict]:
    """(groups, labels, common) for one group: per-optimizer kwargs go to ``common``."""
    per_opt = ALGOS[algo].per_optimizer
    common = {k: v for k, v in kwargs.items() if k in per_opt}
    group = {k: v for k, v in kwargs.items() if k not in per_opt}
    return {"all": group}, dict.fromkeys(paths, "all"), common


def check_coverage(algo: str, kwargs: dict[str, Any], stats: Stats,
                   groups: dict[str, dict] | None = None) -> None:
    """The configurations do reach the branches they are meant to test."""
    if algo == "adamp":
        assert stats.projected > 0, stats
        assert stats.not_projected > 0, stats
    if algo == "ralars":
        for g in (groups or {"all": kwargs}).values():
            b2 = g.get("betas", (0.9, 0.999))[1]
            rho_inf = 2 / (1 - b2) - 1
            rho = [rho_inf - 2 * t * b2**t / (1 - b2**t) for t in range(1, STEPS + 1)]
            assert min(rho) <= 4 < max(rho), "both RaLars branches within the run"
            assert min(abs(r - 4) for r in rho) > 1e-3, "no step sits on the switch"


@pytest.mark.parametrize("scale", GRAD_SCALES, ids=lambda s: f"g{s:g}")
@pytest.mark.parametrize(("algo", "cid", "kwargs"), ALL_CONFIGS, ids=ALL_IDS)
def test_open_loop_float64(algo, cid, kwargs, scale):
    """Seeded random gradients at scale 1e-3, 1, 1e3: params and all state every step."""
    p0 = initial_params(torch.float64)
    groups, labels, common = single(kwargs, algo, p0)
    stats = run_parity(algo, f"open-{cid}-g{scale:g}", p0, groups, labels, common,
                       open_loop(scale, torch.float64), ALGOS[algo].rtol)
    check_coverage(algo, kwargs, stats)


@pytest.mark.parametrize("algo", list(GROUPS))
def test_two_param_groups(algo):
    """Two groups with different lr / weight decay / betas (and amsgrad, dof, alpha, momentum):
    pylocron param-group dicts vs ``holotx.partition`` with a prefix of the params tree as labels."""
    common, a, b = GROUPS[algo]
    p0 = initial_params(torch.float64, grouped=True)
    labels = {k: k.split("/")[0] for k in p0}
    groups = {"a": a, "b": b}
    stats = run_parity(algo, "groups", p0, groups, labels, common, open_loop(1.0, torch.float64),
                       ALGOS[algo].rtol)
    check_coverage(algo, {**common}, stats, groups)


@pytest.mark.parametrize(("algo", "cid"), FLOAT32_CONFIGS, ids=[f"{a}-{c}" for a, c in FLOAT32_CONFIGS])
def test_open_loop_float32(algo, cid):
    """float32 params and gradients: every dtype kept, within RTOL_FLOAT32."""
    kwargs = dict(CONFIGS[algo])[cid]
    p0 = initial_params(torch.float32)
    groups, labels, common = single(kwargs, algo, p0)
    run_parity(algo, f"open-f32-{cid}", p0, groups, labels, common, open_loop(1.0, torch.float32),
               RTOL_FLOAT32, report_key=f"{algo} float32")


# ------------------------------------------------------------------------------ closed loop


def lsq_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(6, generator=gen, dtype=dtype),
        "scale": torch.full((1,), 0.5, dtype=dtype),
        "kernel": 0.3 * torch.randn(2, 3, 2, 2, generator=gen, dtype=dtype),
        "zeros": torch.zeros(4, dtype=dtype),
        "gated": torch.randn(3, generator=gen, dtype=dtype),  # gradient exactly zero every third step
        "optional": torch.randn(2, generator=gen, dtype=dtype),  # out of the graph on some steps: None
    }


def lsq_loss(p: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...], gate: float,
             use_optional: bool) -> torch.Tensor:
    x_main, x_s, x_g, x_o, y = data
    z = torch.cat([p["w"], p["kernel"].flatten(), p["zeros"]])
    pred = x_main @ z + p["scale"] * x_s + gate * (x_g @ p["gated"])
    if use_optional:
        pred = pred + x_o @ p["optional"]
    return ((pred - y) ** 2).mean()


def lsq_data(gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    n = 16
    shapes = ((n, 6 + 24 + 4), (n,), (n, 3), (n, 2), (n,))
    return tuple(torch.randn(s, generator=gen, dtype=dtype) for s in shapes)


def mlp_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {
        "conv.weight": 0.3 * torch.randn(3, 2, 3, 3, generator=gen, dtype=dtype),
        "conv.bias": 0.1 * torch.randn(3, generator=gen, dtype=dtype),
        "fc.weight": 0.3 * torch.randn(5, 12, generator=gen, dtype=dtype),
        "fc.bias": torch.zeros(5, dtype=dtype),  # the all-zero tensor
        "out.weight": 0.3 * torch.randn(1, 5, generator=gen, dtype=dtype),
        "temperature": torch.ones(1, dtype=dtype),
        "aux": torch.randn(4, generator=gen, dtype=dtype),  # gradient exactly zero every third step
        "skip.weight": 0.1 * torch.randn(1, 12, generator=gen, dtype=dtype),  # unused on some steps: None
    }


def mlp_loss(p: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...], gate: float,
             use_optional: bool) -> torch.Tensor:
    x, y = data
    h = torch.tanh(F.conv2d(x, p["conv.weight"], p["conv.bias"])).flatten(1)
    out = F.linear(torch.tanh(F.linear(h, p["fc.weight"], p["fc.bias"])), p["out.weight"]) * p["temperature"]
    if use_optional:
        out = out + F.linear(h, p["skip.weight"])
    return ((out - y) ** 2).mean() + gate * (p["aux"] ** 2).sum() / 8


def mlp_data(gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return torch.randn(8, 2, 4, 4, generator=gen, dtype=dtype), torch.randn(8, 1, generator=gen, dtype=dtype)


PROBLEMS = {"lsq": (lsq_params, lsq_loss, lsq_data), "mlp": (mlp_params, mlp_loss, mlp_data)}


def closed_loop(problem: str, dtype: torch.dtype) -> GradFn:
    """Each side's gradients by torch autograd from its own current params, on the same data."""
    _, loss_fn, data_fn = PROBLEMS[problem]
    gen = torch.Generator().manual_seed(99)

    def grad_fn(step, params, tparams):
        data = data_fn(gen, dtype)
        gate = 0.0 if step % 3 == 0 else 1.0
        use_optional = not grad_is_none(step)
        for tp in tparams.values():
            tp.grad = None
        loss_fn(tparams, data, gate, use_optional).backward()
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        names = list(leaves)
        gs = torch.autograd.grad(loss_fn(leaves, data, gate, use_optional), [leaves[k] for k in names],
                                 allow_unused=True)
        grads = dict(zip(names, gs))
        optional = "optional" if problem == "lsq" else "skip.weight"
        gated = "gated" if problem == "lsq" else "aux"
        assert (grads[optional] is None) == (tparams[optional].grad is None) == (not use_optional)
        if gate == 0.0:
            assert torch.count_nonzero(grads[gated]) == 0
            assert torch.count_nonzero(tparams[gated].grad) == 0
        return grads

    return grad_fn


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize(("algo", "cid", "kwargs"), ALL_CONFIGS, ids=ALL_IDS)
def test_closed_loop_float64(algo, cid, kwargs, problem):
    """Least squares and a small conv + MLP, gradients from each side's own params."""
    p0 = PROBLEMS[problem][0]()
    groups, labels, common = single(kwargs, algo, p0)
    stats = run_parity(algo, f"{problem}-{cid}", p0, groups, labels, common,
                       closed_loop(problem, torch.float64), ALGOS[algo].rtol)
    check_coverage(algo, kwargs, stats)
