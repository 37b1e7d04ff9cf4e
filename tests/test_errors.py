"""Specification: bad input fails loudly, early, and says where.

1. Invalid hyperparameters raise ``ValueError`` when the transform is *built*, and the
   message names the offending argument (as torch.optim does).
2. A gradient tree that does not line up with the state or the params (keys, nesting,
   shapes, dtypes, devices) raises ``ValueError`` whose message contains the offending path,
   written as Python would index it (``['layer']['w']``). Nothing broadcasts silently: a
   ``(3,)`` gradient for a ``(1, 3)`` parameter is an error, not a broadcast.
3. :func:`holotx.apply_updates` with mismatched trees raises, naming the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import holotx
from holotx import transforms as T
from holotx.flat import make_step

F64 = torch.float64

# --------------------------------------------------------------------------- 1. hyperparameters

# (id, constructor call, words the message must contain)
INVALID_HYPERPARAMETERS: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    # learning rates
    ("sgd-negative-lr", lambda: holotx.sgd(lr=-0.1), ("lr",)),
    ("sgd-nan-lr", lambda: holotx.sgd(lr=math.nan), ("lr",)),
    ("sgd-string-lr", lambda: holotx.sgd(lr="0.1"), ("lr",)),
    ("adam-negative-lr", lambda: holotx.adam(lr=-1e-3), ("lr",)),
    ("adamw-negative-lr", lambda: holotx.adamw(lr=-1e-3), ("lr",)),
    ("radam-negative-lr", lambda: holotx.radam(lr=-1e-3), ("lr",)),
    ("scale_by_lr-negative", lambda: T.scale_by_lr(-1.0), ("lr",)),
    # betas must lie in [0, 1): 1.0 itself is out (bias correction 1 - 1**t = 0)
    ("adam-beta1-one", lambda: holotx.adam(betas=(1.0, 0.999)), ("betas",)),
    ("adam-beta2-one", lambda: holotx.adam(betas=(0.9, 1.0)), ("betas",)),
    ("adam-beta1-negative", lambda: holotx.adam(betas=(-0.1, 0.999)), ("betas",)),
    ("adam-beta2-above-one", lambda: holotx.adam(betas=(0.9, 1.5)), ("betas",)),
    ("adam-betas-wrong-length", lambda: holotx.adam(betas=(0.9,)), ("betas",)),
    ("adamw-beta2-one", lambda: holotx.adamw(betas=(0.9, 1.0)), ("betas",)),
    ("radam-beta1-one", lambda: holotx.radam(betas=(1.0, 0.999)), ("betas",)),
    ("scale_by_adam-b1-one", lambda: T.scale_by_adam(b1=1.0), ("b1",)),
    ("scale_by_adam-b2-negative", lambda: T.scale_by_adam(b2=-0.5), ("b2",)),
    ("scale_by_radam-b2-one", lambda: T.scale_by_radam(b2=1.0), ("b2",)),
    # eps
    ("adam-negative-eps", lambda: holotx.adam(eps=-1e-8), ("eps",)),
    ("adamw-negative-eps", lambda: holotx.adamw(eps=-1e-8), ("eps",)),
    ("radam-negative-eps", lambda: holotx.radam(eps=-1e-8), ("eps",)),
    # weight decay
    ("sgd-negative-weight_decay", lambda: holotx.sgd(weight_decay=-1e-4), ("weight_decay",)),
    ("adam-negative-weight_decay", lambda: holotx.adam(weight_decay=-1e-4), ("weight_decay",)),
    ("adamw-negative-weight_decay", lambda: holotx.adamw(weight_decay=-1e-4), ("weight_decay",)),
    ("radam-negative-weight_decay", lambda: holotx.radam(weight_decay=-1e-4), ("weight_decay",)),
    ("add_decayed_weights-negative", lambda: T.add_decayed_weights(-1.0), ("weight_decay",)),
    # momentum
    ("sgd-negative-momentum", lambda: holotx.sgd(momentum=-0.9), ("momentum",)),
    ("sgd-dampening-above-one", lambda: holotx.sgd(momentum=0.9, dampening=1.5), ("dampening",)),
    ("sgd-nesterov-with-dampening", lambda: holotx.sgd(momentum=0.9, dampening=0.1, nesterov=True),
     ("nesterov", "dampening")),
    # torch.optim.SGD raises here too: Nesterov momentum needs a momentum.
    ("sgd-nesterov-without-momentum", lambda: holotx.sgd(lr=0.1, nesterov=True), ("nesterov", "momentum")),
    ("trace-nesterov-without-momentum", lambda: T.trace(momentum=0.0, nesterov=True),
     ("nesterov", "momentum")),
    ("trace-negative-momentum", lambda: T.trace(momentum=-0.5), ("momentum",)),
    # clipping
    ("clip-zero-max_norm", lambda: T.clip_by_global_norm(0.0), ("max_norm",)),
    ("clip-negative-max_norm", lambda: T.clip_by_global_norm(-1.0), ("max_norm",)),
    # combinators
    ("multi_steps-every_k-zero", lambda: holotx.multi_steps(holotx.sgd(0.1), every_k=0), ("every_k",)),
    ("multi_steps-every_k-negative", lambda: holotx.multi_steps(holotx.sgd(0.1), every_k=-2), ("every_k",)),
    ("multi_steps-every_k-float", lambda: holotx.multi_steps(holotx.sgd(0.1), every_k=1.5), ("every_k",)),
    ("apply_if_finite-negative", lambda: holotx.apply_if_finite(holotx.sgd(0.1), max_consecutive_errors=-1),
     ("max_consecutive_errors",)),
    ("named_chain-duplicate-names",
     lambda: holotx.named_chain(("decay", T.add_decayed_weights(0.1)), ("decay", T.scale(2.0))),
     ("names", "decay")),
    ("chain-not-a-transform", lambda: holotx.chain(T.scale(1.0), lambda g: g), ("chain",)),
    # wrappers: Holocron's checks (sync_rate in [0, 1], sync_period a positive int), and more
    *[(f"{w.__name__}-{name}", (lambda w=w, kw=kw: w(holotx.sgd(0.1), **kw)), (arg,))
      for w in (holotx.lookahead, holotx.scout)
      for name, kw, arg in [
          ("sync_rate-negative", {"sync_rate": -0.1}, "sync_rate"),
          ("sync_rate-above-one", {"sync_rate": 1.5}, "sync_rate"),
          ("sync_rate-nan", {"sync_rate": math.nan}, "sync_rate"),
          ("sync_rate-string", {"sync_rate": "0.5"}, "sync_rate"),
          ("sync_rate-schedule", {"sync_rate": holotx.linear_schedule(0.5, 1.0, 10)}, "sync_rate"),
          ("sync_period-zero", {"sync_period": 0}, "sync_period"),
          ("sync_period-negative", {"sync_period": -6}, "sync_period"),
          ("sync_period-float", {"sync_period": 6.0}, "sync_period"),
          ("sync_period-bool", {"sync_period": True}, "sync_period"),
          ("sync_period-tensor", {"sync_period": torch.tensor(6)}, "sync_period"),
          ("compat-unknown", {"compat": "holocron-0.2"}, "compat"),
      ]],
    ("lookahead-not-a-transform", lambda: holotx.lookahead(lambda g: g), ("lookahead",)),
    ("scout-not-a-transform", lambda: holotx.scout(holotx.sgd), ("scout",)),
    ("scale_by_schedule-not-callable", lambda: T.scale_by_schedule(3.0), ("schedule",)),
    # Holocron's eight: its constructors' checks, and more where a value would give nonsense
    ("lars-negative-lr", lambda: holotx.lars(lr=-1e-3), ("lr",)),
    ("lars-negative-momentum", lambda: holotx.lars(momentum=-0.9), ("momentum",)),
    ("lars-negative-weight_decay", lambda: holotx.lars(weight_decay=-1e-4), ("weight_decay",)),
    ("lars-nesterov-without-momentum", lambda: holotx.lars(nesterov=True), ("nesterov", "momentum")),
    ("lars-nesterov-with-dampening", lambda: holotx.lars(momentum=0.9, dampening=0.5, nesterov=True),
     ("nesterov", "dampening")),
    ("lars-dampening-above-one", lambda: holotx.lars(momentum=0.9, dampening=2.0), ("dampening", "2.0")),
    ("lars-scale_clip-inverted", lambda: holotx.lars(scale_clip=(10.0, 1.0)), ("scale_clip", "low <= high")),
    ("lars-holocron-scale_clip-inverted", lambda: holotx.lars(scale_clip=(10.0, 1.0), compat="holocron"),
     ("scale_clip",)),
    ("lars-negative-trust_coefficient", lambda: holotx.lars(trust_coefficient=-1.0), ("trust_coefficient",)),
    ("lamb-scale_clip-inverted", lambda: holotx.lamb(scale_clip=(2.0, 1.0)), ("scale_clip", "(2.0, 1.0)")),
    ("lamb-scale_clip-negative", lambda: holotx.lamb(scale_clip=(-1.0, 1.0)), ("scale_clip[0]",)),
    ("lamb-scale_clip-not-a-pair", lambda: holotx.lamb(scale_clip=10.0), ("scale_clip",)),
    ("lamb-beta1-one", lambda: holotx.lamb(betas=(1.0, 0.999)), ("betas[0]",)),
    ("lamb-negative-eps", lambda: holotx.lamb(eps=-1e-8), ("eps",)),
    ("ralars-beta2-one", lambda: holotx.ralars(betas=(0.9, 1.0)), ("betas[1]",)),
    ("ralars-scale_clip-inverted", lambda: holotx.ralars(scale_clip=(3.0, 2.0)), ("scale_clip",)),
    ("tadam-dof-zero", lambda: holotx.tadam(dof=0), ("dof", "0")),
    ("tadam-dof-negative", lambda: holotx.tadam(dof=-2.0), ("dof",)),
    ("tadam-beta1-zero", lambda: holotx.tadam(betas=(0.0, 0.999)), ("b1",)),
    ("tadam-negative-weight_decay", lambda: holotx.tadam(weight_decay=-0.1), ("weight_decay",)),
    ("adabelief-beta2-one", lambda: holotx.adabelief(betas=(0.9, 1.0)), ("betas[1]",)),
    ("adabelief-negative-eps", lambda: holotx.adabelief(eps=-1.0), ("eps",)),
    ("adamp-negative-delta", lambda: holotx.adamp(delta=-0.1), ("delta",)),
    ("adamp-negative-wd_ratio", lambda: holotx.adamp(wd_ratio=-0.1), ("wd_ratio",)),
    ("adamp-negative-weight_decay", lambda: holotx.adamp(weight_decay=-0.1), ("weight_decay",)),
    ("adan-two-betas", lambda: holotx.adan(betas=(0.98, 0.92)), ("betas", "3")),
    ("adan-beta3-one", lambda: holotx.adan(betas=(0.98, 0.92, 1.0)), ("betas[2]",)),
    ("adan-negative-lr", lambda: holotx.adan(lr=-1.0, weight_decay=0.1), ("lr",)),
    ("ademamix-beta3-one", lambda: holotx.ademamix(betas=(0.9, 0.999, 1.0)), ("betas[2]",)),
    ("ademamix-negative-alpha", lambda: holotx.ademamix(alpha=-1.0), ("alpha",)),
    ("ademamix-t_alpha_beta3-zero", lambda: holotx.ademamix(t_alpha_beta3=0), ("t_alpha_beta3",)),
    ("ademamix-t_alpha_beta3-float", lambda: holotx.ademamix(t_alpha_beta3=10.5), ("t_alpha_beta3",)),
    ("lamb-unknown-compat", lambda: holotx.lamb(compat="Holocron-0.2"), ("compat", "'Holocron-0.2'")),
    ("tadam-unknown-compat", lambda: holotx.tadam(compat="torch"), ("compat",)),
    ("scale_by_adamp-unknown-projection", lambda: T.scale_by_adamp(projection="layer"), ("projection",)),
    ("scale_by_trust_ratio-inner-not-a-transform", lambda: T.scale_by_trust_ratio(inner=T.trace),
     ("inner",)),
    # non-finite values: one step would make the params non-finite
    ("sgd-inf-lr", lambda: holotx.sgd(lr=math.inf), ("lr", "finite")),
    ("adam-inf-lr", lambda: holotx.adam(lr=-math.inf), ("lr",)),
    ("adamw-inf-weight_decay", lambda: holotx.adamw(weight_decay=math.inf), ("weight_decay", "finite")),
    ("tadam-inf-dof", lambda: holotx.tadam(dof=math.inf), ("dof", "finite")),
    ("adam-inf-eps", lambda: holotx.adam(eps=math.inf), ("eps",)),
    ("sgd-inf-momentum", lambda: holotx.sgd(0.1, momentum=math.inf), ("momentum",)),
    # bool options are True or False, never read by truthiness
    ("adam-amsgrad-string", lambda: holotx.adam(amsgrad="no"), ("amsgrad", "'no'")),
    ("adamw-amsgrad-int", lambda: holotx.adamw(amsgrad=0), ("amsgrad",)),
    ("sgd-nesterov-string", lambda: holotx.sgd(0.1, momentum=0.9, nesterov="no"), ("nesterov",)),
    ("lars-nesterov-string", lambda: holotx.lars(momentum=0.9, nesterov="False"), ("nesterov",)),
    ("adam-maximize-string", lambda: holotx.adam(maximize="yes"), ("maximize",)),
    ("lamb-maximize-none", lambda: holotx.lamb(maximize=None), ("maximize",)),
    ("lars-trust_ratio_mask-string", lambda: holotx.lars(trust_ratio_mask="False"), ("mask",)),
    ("tadam-amsgrad-string", lambda: holotx.tadam(amsgrad="no"), ("amsgrad",)),
    ("adabelief-decoupled-string", lambda: holotx.adabelief(decoupled_weight_decay="yes"),
     ("decoupled_weight_decay",)),
    ("adamp-nesterov-string", lambda: holotx.adamp(nesterov="yes"), ("nesterov",)),
    ("ademamix-decoupled-int", lambda: holotx.ademamix(decoupled_weight_decay=1),
     ("decoupled_weight_decay",)),
    ("radam-decoupled-string", lambda: holotx.radam(decoupled_weight_decay="no"),
     ("decoupled_weight_decay",)),
    ("ralars-force-string", lambda: holotx.ralars(force_adaptive_momentum="no"),
     ("force_adaptive_momentum",)),
    ("adan-amsgrad-string", lambda: holotx.adan(amsgrad="no"), ("amsgrad",)),
    ("scale_by_adam-bias_correction-string", lambda: T.scale_by_adam(bias_correction="no"),
     ("bias_correction",)),
    # tensors: 0-d, and in range where their value can be read (a plain CPU tensor)
    ("adam-1d-tensor-lr", lambda: holotx.adam(lr=torch.tensor([0.1, 0.2])), ("lr", "0-d", "(2,)")),
    ("adam-1d-tensor-beta", lambda: holotx.adam(betas=(torch.tensor([0.9]), 0.999)), ("betas[0]", "0-d")),
    ("adam-negative-tensor-lr", lambda: holotx.adam(lr=torch.tensor(-0.1)), ("lr", ">= 0")),
    ("adam-tensor-beta-one", lambda: holotx.adam(betas=(torch.tensor(1.0), 0.999)), ("betas[0]",)),
    ("adamw-nan-tensor-weight_decay", lambda: holotx.adamw(weight_decay=torch.tensor(math.nan)),
     ("weight_decay", "NaN")),
    ("sgd-bool-tensor-lr", lambda: holotx.sgd(lr=torch.tensor(True)), ("lr", "torch.bool")),
    ("adam-complex-tensor-lr", lambda: holotx.adam(lr=torch.tensor(0.1 + 0j)), ("lr", "real")),
    # a schedule where none is taken (only lr takes one)
    ("adamw-weight_decay-schedule", lambda: holotx.adamw(weight_decay=lambda count: 0.01),
     ("weight_decay", "schedule")),
    ("adam-eps-schedule", lambda: holotx.adam(eps=holotx.constant_schedule(1e-8)), ("eps", "schedule")),
    ("adam-beta-schedule", lambda: holotx.adam(betas=(lambda count: 0.9, 0.999)), ("betas[0]", "schedule")),
    ("sgd-momentum-schedule", lambda: holotx.sgd(0.1, momentum=lambda count: 0.9), ("momentum",)),
    ("lars-trust_coefficient-schedule", lambda: holotx.lars(trust_coefficient=lambda c: 1.0),
     ("trust_coefficient",)),
    ("ademamix-alpha-schedule", lambda: holotx.ademamix(alpha=lambda c: 5.0), ("alpha", "schedule")),
    # wrong types
    ("adam-none-eps", lambda: holotx.adam(eps=None), ("eps",)),
    ("adam-list-lr", lambda: holotx.adam(lr=[0.1]), ("lr",)),
    ("sgd-bool-lr", lambda: holotx.sgd(lr=True), ("lr",)),
]


@pytest.mark.parametrize(("make", "words"), [c[1:] for c in INVALID_HYPERPARAMETERS],
                         ids=[c[0] for c in INVALID_HYPERPARAMETERS])
def test_invalid_hyperparameter_raises_value_error_naming_it(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value), f"{word!r} not in message {str(info.value)!r}"


@pytest.mark.parametrize("make", [
    lambda: holotx.sgd(lr="0.1"),
    lambda: holotx.adam(amsgrad="no"),
    lambda: holotx.adamw(weight_decay=lambda count: 0.01),
    lambda: holotx.adam(eps=None),
    lambda: holotx.lars(trust_ratio_mask="False"),
], ids=["string-lr", "string-flag", "schedule", "none", "string-mask"])
def test_a_wrong_type_is_a_type_error_too(make):
    """torch.optim raises TypeError for a value of the wrong type: so does holotx, with
    an error that is a ValueError too (like every other bad hyperparameter)."""
    with pytest.raises(TypeError):
        make()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "radam", "lars", "lamb", "ralars", "tadam",
                                  "adabelief", "adamp", "adan", "ademamix"])
def test_numpy_scalars_are_numbers(name):
    """NumPy scalars are taken as the numbers they hold (torch.optim takes them): the
    same steps, bit for bit, as with the Python floats they round to."""
    import numpy as np

    make = getattr(holotx, name)
    given = make(np.float32(0.1), weight_decay=np.float32(0.01))
    floats = make(float(np.float32(0.1)), weight_decay=float(np.float32(0.01)))
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=gen, dtype=F64)}
    _assert_same_steps(given, floats, params, gen)
    if name in ("adam", "adamw", "radam", "lamb", "ralars", "tadam", "adabelief", "adamp"):
        betas = (np.float32(0.9), np.float32(0.99))
        floats = make(0.1, betas=tuple(float(b) for b in betas))
        _assert_same_steps(make(0.1, betas=betas), floats, params, gen)


def _assert_same_steps(a, b, params, gen, steps=3):
    """``a`` and ``b`` give the same updates, bit for bit, on the same drawn grads."""
    state_a, state_b = a.init(params), b.init(params)
    for _ in range(steps):
        grads = {"w": torch.randn(3, 2, generator=gen, dtype=F64)}
        u_a, state_a = a.update(grads, state_a, params)
        u_b, state_b = b.update(grads, state_b, params)
        assert torch.equal(u_a["w"], u_b["w"])


@pytest.mark.parametrize("value", [math.nan, -0.1, math.inf, "0.1", None, torch.tensor(-1.0)],
                         ids=["nan", "negative", "inf", "string", "none", "negative-tensor"])
def test_a_bad_lr_from_a_schedule_names_lr_and_changes_nothing(value):
    """A schedule's value is checked in the step's first phase, before any buffer is
    written: the donated step raises naming lr, and params and state are as they were."""

    def schedule(count):
        return value if int(count) == 1 else 1e-3

    tx = holotx.adamw(lr=schedule)
    params = {"w": torch.randn(3, dtype=F64)}
    state = tx.init(params)
    step = make_step(tx, donate=True)
    params, state = step(params, {"w": torch.randn(3, dtype=F64)}, state)
    before = [x.clone() for x in holotx.tree.flatten((params, state))[0] if isinstance(x, torch.Tensor)]
    with pytest.raises(ValueError, match="lr schedule returned"):
        step(params, {"w": torch.randn(3, dtype=F64)}, state)
    after = [x for x in holotx.tree.flatten((params, state))[0] if isinstance(x, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize(("key", "value", "word"), [
    ("amsgrad", "no", "amsgrad"), ("lr", math.nan, "lr"), ("lr", -1.0, "lr"),
    ("weight_decay", math.inf, "weight_decay"), ("maximize", "yes", "maximize")])
def test_an_edited_param_group_is_checked_before_any_group_steps(key, value, word):
    from holotx.adapters import TransformOptimizer

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=gen, dtype=F64, requires_grad=True) for _ in range(2)]
    opt = TransformOptimizer([{"params": [params[0]]}, {"params": [params[1]]}], holotx.adamw, lr=0.1)
    for p in params:
        p.grad = torch.randn(3, generator=gen, dtype=F64)
    opt.step()
    opt.param_groups[1][key] = value
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError) as info:
        opt.step()
    assert word in str(info.value)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state_before.items())


@pytest.mark.parametrize("make", [
    lambda: holotx.sgd(lr=0.0, momentum=0.0, dampening=1.0, weight_decay=0.0),
    lambda: holotx.sgd(lr=0.1, momentum=0.9, nesterov=True),
    lambda: holotx.adam(lr=0.0, betas=(0.0, 0.0), eps=0.0),
    lambda: holotx.adamw(lr=1e-3, betas=(0.999999, 0.999999), weight_decay=0.0),
    lambda: holotx.radam(lr=1e-3, weight_decay=0.5, decoupled_weight_decay=True),
    lambda: holotx.multi_steps(holotx.sgd(0.1), every_k=1),
    lambda: holotx.apply_if_finite(holotx.sgd(0.1), max_consecutive_errors=0),
    lambda: holotx.adamw(lr=holotx.linear_schedule(1e-3, 0.0, 10)),
    lambda: holotx.lars(lr=0.0, momentum=0.0, scale_clip=(0.0, 0.0), trust_coefficient=0.0),
    lambda: holotx.lamb(lr=1, scale_clip=(1.0, 1.0), compat="holocron"),
    lambda: holotx.tadam(dof=1e-6, betas=(1e-6, 0.0)),
    lambda: holotx.adan(lr=holotx.linear_schedule(1e-3, 0.0, 10), weight_decay=0.02),
    lambda: holotx.ademamix(t_alpha_beta3=1, alpha=0.0),
    lambda: holotx.lookahead(holotx.sgd(0.1), sync_rate=0, sync_period=1),
    lambda: holotx.scout(holotx.sgd(0.1), sync_rate=1, sync_period=1, compat="holocron"),
    lambda: holotx.lookahead(holotx.sgd(0.1), sync_rate=torch.tensor(0.5)),
], ids=["sgd-edges", "sgd-nesterov", "adam-zeros", "adamw-betas-near-one", "radam-decoupled",
        "multi_steps-1", "apply_if_finite-0", "adamw-schedule", "lars-edges", "lamb-int-lr",
        "tadam-small-dof", "adan-schedule-prox", "ademamix-edges", "lookahead-edges", "scout-edges",
        "lookahead-tensor-rate"])
def test_boundary_values_are_accepted(make):
    """The edges of each valid range are valid (lr = 0, betas = 0, dampening = 1, ...)."""
    assert isinstance(make(), holotx.GradientTransformation)


# --------------------------------------------------------------------------- 2. grads vs state/params

def make_params() -> dict:
    return {
        "layer": {"w": torch.randn(2, 3, dtype=F64), "b": torch.randn(3, dtype=F64)},
        "head": {"w": torch.randn(1, 3, dtype=F64)},
    }


def good_grads() -> dict:
    return {
        "layer": {"w": torch.randn(2, 3, dtype=F64), "b": torch.randn(3, dtype=F64)},
        "head": {"w": torch.randn(1, 3, dtype=F64)},
    }


def _missing_key(g):
    del g["layer"]["w"]
    return g, "['layer']['w']"


def _extra_key(g):
    g["layer"]["extra"] = torch.randn(3, dtype=F64)
    return g, "['layer']['extra']"


def _dict_becomes_list(g):
    g["layer"] = [g["layer"]["b"], g["layer"]["w"]]
    return g, "['layer']"


def _wrong_shape(g):
    g["layer"]["w"] = torch.randn(3, 2, dtype=F64)
    return g, "['layer']['w']"


def _would_broadcast(g):
    g["head"]["w"] = torch.randn(3, dtype=F64)  # (3,) for a (1, 3) param
    return g, "['head']['w']"


def _wrong_dtype(g):
    g["layer"]["b"] = g["layer"]["b"].float()
    return g, "['layer']['b']"


def _wrong_device(g):
    g["layer"]["w"] = torch.empty(2, 3, dtype=F64, device="meta")
    return g, "['layer']['w']"


MISMATCHES = {
    "missing-key": _missing_key,
    "extra-key": _extra_key,
    "dict-becomes-list": _dict_becomes_list,
    "wrong-shape": _wrong_shape,
    "would-broadcast": _would_broadcast,
    "wrong-dtype": _wrong_dtype,
    "wrong-device-meta": _wrong_device,
}

# Transforms with per-parameter state: the state was built from the params, so every
# mismatch above is a mismatch against the state.
STATEFUL = {
    "sgd-momentum": lambda: holotx.sgd(0.1, momentum=0.9),
    "adam": lambda: holotx.adam(1e-3),
    "adamw-amsgrad": lambda: holotx.adamw(1e-3, amsgrad=True),
    "radam": lambda: holotx.radam(1e-3),
    "trace": lambda: T.trace(0.9),
    "lars-momentum": lambda: holotx.lars(0.1, momentum=0.9),
    "lamb": lambda: holotx.lamb(1e-3),
    "tadam": lambda: holotx.tadam(1e-3),
    "adamp": lambda: holotx.adamp(1e-3),
    "adan": lambda: holotx.adan(1e-3),
    "lookahead": lambda: holotx.lookahead(holotx.sgd(0.1, momentum=0.9)),
    "scout": lambda: holotx.scout(holotx.adam(1e-3)),
}


def _meta_supported() -> bool:
    try:
        torch.empty(1, device="meta")
    except Exception:
        return False
    return True


@pytest.mark.parametrize("mismatch", list(MISMATCHES))
@pytest.mark.parametrize("make_tx", list(STATEFUL.values()), ids=list(STATEFUL))
def test_grads_not_matching_state_raise_naming_path(make_tx, mismatch):
    if mismatch == "wrong-device-meta" and not _meta_supported():
        pytest.skip("this torch build has no 'meta' device to fake a second device with")
    params = make_params()
    tx = make_tx()
    state = tx.init(params)
    tx.update(good_grads(), state, params)  # control: the well-formed tree is accepted
    grads, path = MISMATCHES[mismatch](good_grads())
    with pytest.raises(ValueError) as info:
        tx.update(grads, state, params)
    assert path in str(info.value), f"{path} not in {str(info.value)!r}"


@pytest.mark.parametrize("mismatch", ["missing-key", "extra-key", "dict-becomes-list", "wrong-shape",
                                      "would-broadcast", "wrong-dtype", "wrong-device-meta"])
def test_grads_not_matching_params_raise_naming_path(mismatch):
    """A transform that reads the params (weight decay) checks the grads against them."""
    if mismatch == "wrong-device-meta" and not _meta_supported():
        pytest.skip("this torch build has no 'meta' device to fake a second device with")
    tx = T.add_decayed_weights(0.1)
    params = make_params()
    state = tx.init(params)
    tx.update(good_grads(), state, params)
    grads, path = MISMATCHES[mismatch](good_grads())
    with pytest.raises(ValueError) as info:
        tx.update(grads, state, params)
    assert path in str(info.value), f"{path} not in {str(info.value)!r}"


@pytest.mark.parametrize("mismatch", ["missing-key", "extra-key", "wrong-shape", "would-broadcast"])
def test_params_not_matching_grads_raise_naming_path(mismatch):
    """The same checks the other way round: well-formed grads, params that do not fit."""
    tx = holotx.adamw(1e-3, weight_decay=0.1)
    params = make_params()
    state = tx.init(params)
    bad_params, path = MISMATCHES[mismatch](make_params())
    with pytest.raises(ValueError) as info:
        tx.update(good_grads(), state, bad_params)
    assert path in str(info.value), f"{path} not in {str(info.value)!r}"


def test_tuple_vs_list_at_same_path_names_path():
    """Same paths, different container (tuple vs list): still a mismatch, and still located."""
    params = {"layer": (torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64))}
    tx = holotx.adam(1e-3)
    state = tx.init(params)
    grads = {"layer": [torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)]}
    with pytest.raises(ValueError) as info:
        tx.update(grads, state, params)
    assert "['layer']" in str(info.value), str(info.value)


def test_state_from_other_params_raises_naming_path():
    """A state built for different params is rejected, naming the leaf it lacks."""
    tx = holotx.adam(1e-3)
    params = make_params()
    state = tx.init({"layer": params["layer"]})
    with pytest.raises(ValueError) as info:
        tx.update(good_grads(), state, params)
    assert "['head']['w']" in str(info.value)


@pytest.mark.parametrize("mismatch", ["missing-key", "extra-key", "wrong-shape", "would-broadcast"])
def test_plain_sgd_step_never_broadcasts(mismatch):
    """Stateless SGD (no params read in ``update``): the full step, update + apply, raises."""
    tx = holotx.sgd(0.1)
    params = make_params()
    state = tx.init(params)
    grads, path = MISMATCHES[mismatch](good_grads())

    def full_step():
        updates, _ = tx.update(grads, state, params)
        return holotx.apply_updates(params, updates)

    with pytest.raises(ValueError) as info:
        full_step()
    assert path in str(info.value), f"{path} not in {str(info.value)!r}"


def test_none_gradients_are_not_a_mismatch():
    """A ``None`` leaf means "no gradient": accepted, its update is None, its state kept."""
    tx = holotx.adam(1e-3)
    params = make_params()
    state = tx.init(params)
    grads = good_grads()
    grads["head"]["w"] = None
    updates, new_state = tx.update(grads, state, params)
    assert updates["head"]["w"] is None
    (adam_state,) = [s for s in new_state if isinstance(s, T.ScaleByAdamState)]
    assert torch.equal(adam_state.mu["head"]["w"], torch.zeros(1, 3, dtype=F64))


# --------------------------------------------------------------------------- 3. apply_updates

@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize("mismatch", ["missing-key", "extra-key", "dict-becomes-list", "wrong-shape",
                                      "would-broadcast", "wrong-device-meta"])
def test_apply_updates_mismatch_raises_naming_path(mismatch, inplace):
    if mismatch == "wrong-device-meta" and not _meta_supported():
        pytest.skip("this torch build has no 'meta' device to fake a second device with")
    params = make_params()
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in params.items()}
    updates, path = MISMATCHES[mismatch](good_grads())
    with pytest.raises(ValueError) as info:
        holotx.apply_updates(params, updates, inplace=inplace)
    assert path in str(info.value), f"{path} not in {str(info.value)!r}"
    for k, v in params.items():  # the check runs before anything is written
        for n, t in v.items():
            assert torch.equal(t, before[k][n])


# --------------------------------------------------------------------------- 4. trees and dtypes

def _snapshot(*trees):
    return [x.clone() for t in trees for x in holotx.tree.flatten(t)[0] if isinstance(x, torch.Tensor)]


def _unchanged(before, *trees):
    after = [x for t in trees for x in holotx.tree.flatten(t)[0] if isinstance(x, torch.Tensor)]
    return len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("leaf", [1.0, "g", [1.0, 2.0]], ids=["float", "str", "list"])
@pytest.mark.parametrize("name", ["sgd", "adam", "lamb", "tadam", "lookahead"])
def test_a_leaf_that_is_not_a_tensor_is_named(name, leaf):
    make = {"sgd": lambda: holotx.sgd(0.1, momentum=0.9), "adam": lambda: holotx.adam(0.1),
            "lamb": lambda: holotx.lamb(0.1), "tadam": lambda: holotx.tadam(0.1),
            "lookahead": lambda: holotx.lookahead(holotx.adam(0.1))}[name]
    params = make_params()
    tx = make()
    state = tx.init(params)
    grads = good_grads()
    grads["head"]["w"] = leaf
    before = _snapshot(params, state)
    with pytest.raises(ValueError, match=r"\['head'\]\['w'\]"):
        tx.update(grads, state, params, donate=True)
    assert _unchanged(before, params, state)


@pytest.mark.parametrize("name", ["sgd", "adam", "lamb", "tadam", "adan", "lookahead"])
def test_a_state_from_another_transform_or_swapped_arguments_is_named(name):
    make = {"sgd": lambda: holotx.sgd(0.1, momentum=0.9), "adam": lambda: holotx.adam(0.1),
            "lamb": lambda: holotx.lamb(0.1), "tadam": lambda: holotx.tadam(0.1),
            "adan": lambda: holotx.adan(0.1), "lookahead": lambda: holotx.lookahead(holotx.adam(0.1))}[name]
    params = make_params()
    tx = make()
    state = tx.init(params)
    other = (holotx.scale_by_adam(),) if name == "sgd" else (T.trace(0.9), T.scale(1.0))
    other_state = holotx.chain(*other).init(params)
    with pytest.raises(ValueError, match="state"):
        tx.update(good_grads(), other_state, params)
    with pytest.raises(ValueError, match=r"wrong order|does not match"):
        tx.update(good_grads(), params, state)  # state and params swapped
    tx.update(good_grads(), state, params)  # control


# (transform with an option that keeps a state field, the same with the option off, the
# field, the option's words in the message)
OPTIONAL_FIELDS = {
    "scale_by_adam": (lambda: T.scale_by_adam(amsgrad=True), lambda: T.scale_by_adam(), "nu_max", "amsgrad"),
    "adamw": (lambda: holotx.adamw(0.1, amsgrad=True), lambda: holotx.adamw(0.1), "nu_max", "amsgrad"),
    "adamp": (lambda: holotx.adamp(0.1, amsgrad=True), lambda: holotx.adamp(0.1), "nu_max", "amsgrad"),
    "adabelief": (lambda: holotx.adabelief(0.1, amsgrad=True), lambda: holotx.adabelief(0.1), "nu_max",
                  "amsgrad"),
    "tadam": (lambda: holotx.tadam(0.1, amsgrad=True), lambda: holotx.tadam(0.1), "nu_max", "amsgrad"),
    "adan-amsgrad": (lambda: holotx.adan(0.1, amsgrad=True), lambda: holotx.adan(0.1), "nu_max", "amsgrad"),
    "adan-previous-grad": (lambda: T.scale_by_adan(track_previous_grad=True),
                           lambda: T.scale_by_adan(track_previous_grad=False), "prev_grad",
                           "track_previous_grad"),
    "radam": (lambda: T.scale_by_adam(amsgrad=True), lambda: T.scale_by_radam(), "nu_max", "RAdam"),
    "trace": (lambda: T.trace(0.9, dampening=0.1), lambda: T.trace(0.9), "count", "dampening"),
    "sgd": (lambda: holotx.sgd(0.1, momentum=0.9, dampening=0.5), lambda: holotx.sgd(0.1, momentum=0.9),
            "count", "dampening"),
    "lars": (lambda: holotx.lars(0.1, momentum=0.9), lambda: holotx.lars(0.1, momentum=0.0), "inner",
             "inner=None"),
}


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize(("case", "direction"), [
    (case, direction) for case in OPTIONAL_FIELDS for direction in ("kept-not-given", "given-not-kept")
    # (RAdam keeps no optional field; LARS's momentum refuses a state without its buffer as
    # another class's: test_a_state_of_another_class_is_refused_...)
    if not (case in ("radam", "lars") and direction == "kept-not-given")])
def test_a_state_made_with_other_options_is_refused_naming_the_field(case, direction, donate):
    """A state whose optional buffer says another variant (an AMSGrad state for Adam
    without it, a momentum state without step counts for a dampened one) used to run that
    variant silently, or fail inside a kernel: it is refused by field and option, by a
    transform whose init never ran, with nothing changed."""
    with_field, without_field, field, option = OPTIONAL_FIELDS[case]
    kept = direction == "kept-not-given"
    made, stepped = (without_field, with_field) if kept else (with_field, without_field)
    params = make_params()
    state = made().init(params)
    before = _snapshot(params, state)
    words = "is None, but this transform keeps it" if kept else "keeps none"
    with pytest.raises(ValueError, match=rf"state\.{field} .*{words} \({option}"):
        stepped().update(good_grads(), state, params, donate=donate)
    assert _unchanged(before, params, state)
    made().update(good_grads(), state, params)  # control: the transform it was made by steps it


def _all_labelled_a(params):
    return holotx.tree.map(lambda _: "a", params)


def _first_writes_then_second_refuses():
    """(chain, its state): the first transform of a donated chain would write its buffer,
    the second's state is refused."""
    first = T.trace(0.9)
    for second, state_of_second in [
        (T.scale_by_adam(amsgrad=True), T.scale_by_adam()),  # an optional field
        (T.scale_by_adam(), T.trace(0.9)),  # another transform's state
        (holotx.chain(T.scale(1.0), T.scale(2.0)), holotx.chain(T.scale(1.0))),  # a chain's length
        (holotx.named_chain(("a", T.scale(1.0))), holotx.named_chain(("b", T.scale(1.0)))),  # its names
        (holotx.partition({"a": T.trace(0.5), "b": T.trace(0.5)}, _all_labelled_a),
         holotx.partition({"a": T.trace(0.5)}, _all_labelled_a)),  # its labels
    ]:
        yield holotx.chain(first, second), lambda p, s=state_of_second: (first.init(p), s.init(p))


@pytest.mark.parametrize("case", range(5), ids=["optional-field", "state-type", "chain-length",
                                                 "named-chain-keys", "partition-labels"])
def test_a_donated_chain_refuses_a_later_transforms_state_before_the_first_writes(case):
    """The state's form (type, optional fields, a chain's length or names) is checked for
    every transform of the tree in the step's prepare phase: the momentum before the
    refused transform has not moved its buffer."""
    tx, make_state = list(_first_writes_then_second_refuses())[case]
    params = make_params()
    tx.init(params)  # (records the state types)
    state = make_state(params)
    state[0].trace["head"]["w"].fill_(1.0)
    before = _snapshot(params, state)
    with pytest.raises(ValueError, match="state"):
        make_step(tx, donate=True)(params, good_grads(), state)
    assert _unchanged(before, params, state)


def test_a_trust_ratio_keeps_a_stateless_inner_and_refuses_lars_momentum_missing():
    """An inner that keeps nothing (clipping, a scale) has an EmptyState: kept, not refused.
    LARS with momentum given the state of LARS without: refused by its momentum's class."""
    params = make_params()
    for inner in (holotx.clip_by_global_norm(1.0), T.scale(1.0), holotx.identity()):
        tx = holotx.scale_by_trust_ratio(inner=inner)
        tx.update(good_grads(), tx.init(params), params)
    state = holotx.lars(0.1, momentum=0.0).init(params)
    before = _snapshot(params, state)
    with pytest.raises(ValueError, match=r"state is a EmptyState, not the TraceState"):
        holotx.lars(0.1, momentum=0.9).update(good_grads(), state, params, donate=True)
    assert _unchanged(before, params, state)


@pytest.mark.parametrize("second", ["scale_by_adam", "trace", "lookahead", "masked", "inject_hyperparams"])
def test_a_state_of_another_class_is_refused_before_any_math_though_init_never_ran(second):
    """A state loaded into a fresh process meets transforms whose init never ran: each
    declares its state's class, so a state of another class in the second place of a
    donated chain is refused by name before the first transform writes its buffer (it
    used to fail with an AttributeError after)."""
    make = {"scale_by_adam": T.scale_by_adam, "trace": lambda: T.trace(0.5),
            "lookahead": lambda: holotx.lookahead(holotx.sgd(0.1)),
            "masked": lambda: holotx.masked(holotx.sgd(0.1), True),
            "inject_hyperparams": lambda: holotx.inject_hyperparams(holotx.adam)(lr=0.1)}[second]
    params = make_params()
    first = T.trace(0.9)
    state = (first.init(params), holotx.chain(T.trace(0.1), T.scale(1.0)).init(params))
    state[0].trace["head"]["w"].fill_(1.0)
    before = _snapshot(params, state)
    with pytest.raises(ValueError, match=r"state is a tuple, not the \w+State this transform's init returns"):
        make_step(holotx.chain(first, make()), donate=True)(params, good_grads(), state)
    assert _unchanged(before, params, state)


@pytest.mark.parametrize("inner", ["adam-amsgrad", "sgd-dampened", "adan"])
@pytest.mark.parametrize("router", ["masked", "partition", "empty-tuple"])
def test_a_transform_given_no_leaf_keeps_nothing_and_is_not_refused(router, inner):
    """Masked away from a bare tensor, a transform's init gets params ``None`` and every field
    of its state is ``None``, the fields its options keep too: a state of nothing, not one
    made with other options. Over params that are an empty tuple, each field is ``()``."""
    make = {"adam-amsgrad": lambda: holotx.adam(0.1, amsgrad=True),
            "sgd-dampened": lambda: holotx.sgd(0.1, momentum=0.9, dampening=0.5),
            "adan": lambda: holotx.adan(0.1)}[inner]
    if router == "empty-tuple":
        tx = make()
        assert tx.update((), tx.init(()), ())[0] == ()
        return
    tx = (holotx.masked(make(), False) if router == "masked"
          else holotx.partition({"a": holotx.sgd(0.1), "b": make()}, "a"))
    params = torch.ones(3, dtype=F64)
    updates, _ = tx.update(torch.ones(3, dtype=F64), tx.init(params), params)
    expected = torch.ones(3, dtype=F64) if router == "masked" else torch.full((3,), -0.1, dtype=F64)
    assert torch.equal(updates, expected)


@pytest.mark.parametrize("name", ["adamw", "lars", "lamb", "ralars", "adamp"])
@pytest.mark.parametrize("router", ["masked", "partition"])
def test_a_rule_that_reads_params_routed_no_leaf_of_a_bare_tensor_steps_nothing(router, name):
    """Over params that are one bare tensor, a transform that gets no leaf is given updates
    and params ``None``: a rule that reads params has nothing to step there, and used to
    raise that it needs params. Params given as ``None`` to updates that have a tensor
    still raise."""
    def make():
        return getattr(holotx, name)(0.1, weight_decay=0.1)

    tx = holotx.masked(make(), False) if router == "masked" else holotx.partition(
        {"a": holotx.sgd(0.1), "b": make()}, "a")
    params = torch.ones(3, dtype=F64)
    state = tx.init(params)
    for donate in (False, True):
        updates, state = tx.update(torch.ones(3, dtype=F64), state, params, donate=donate)
        expected = torch.ones(3, dtype=F64) if router == "masked" else torch.full((3,), -0.1, dtype=F64)
        assert torch.equal(updates, expected)
    with pytest.raises(ValueError, match="needs params"):
        make().update(good_grads(), make().init(make_params()), None)


def test_a_state_without_the_field_is_named_as_another_transforms():
    """A transform whose init never ran given another transform's state: the state's class
    is named (declared by the transform), not a field said to be missing."""
    params = make_params()
    with pytest.raises(ValueError, match="state is a TraceState, not the ScaleByAdamState"):
        T.scale_by_adam(amsgrad=True).update(good_grads(), T.trace(0.9).init(params), params)


def test_a_state_without_a_declared_field_is_named_where_no_class_is_declared():
    """A transform of holotx's own that declares kept fields but no state class, given a
    state without the field before its init ran: named as another transform's state."""
    from typing import NamedTuple

    from holotx.base import own_transform

    class State(NamedTuple):
        extra: object

    tx = own_transform(lambda params: State(None), lambda u, s, p=None, **e: (u, s),
                       kept_fields={"extra": (False, "extra=False")})
    with pytest.raises(ValueError, match="state is a TraceState, which has no field extra"):
        tx.update(good_grads(), T.trace(0.9).init(make_params()), make_params())
    tx.update(good_grads(), State(None), make_params())  # control


def test_a_state_made_with_other_options_is_named_under_a_full_graph_compile():
    params = {"w": torch.ones(3, dtype=F64)}
    step = torch.compile(make_step(holotx.adam(0.1), donate=True), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"scale_by_adam: state\.nu_max holds a dict"):
        step(params, {"w": torch.ones(3, dtype=F64)}, holotx.adam(0.1, amsgrad=True).init(params))


@pytest.mark.parametrize("name", ["adam", "sgd", "scale_by_adam"])
def test_params_are_checked_against_grads_even_where_the_rule_does_not_read_them(name):
    """A (1, 3) gradient for a (3,) parameter is refused though Adam never reads params."""
    tx = {"adam": lambda: holotx.adam(0.1), "sgd": lambda: holotx.sgd(0.1),
          "scale_by_adam": lambda: holotx.scale_by_adam()}[name]()
    params = {"w": torch.randn(3, dtype=F64)}
    state = tx.init({"w": torch.randn(1, 3, dtype=F64)})
    with pytest.raises(ValueError, match=r"params at \['w'\] has shape \(3,\) where updates has \(1, 3\)"):
        tx.update({"w": torch.randn(1, 3, dtype=F64)}, state, params)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("name", ["sgd", "adam", "lars"])
def test_parameters_that_are_not_floating_point_are_refused(name, dtype):
    """SGD used to truncate an integer step silently and Adam failed in a foreach kernel:
    integer and bool params are refused by path. (Complex ones are stepped as their real
    view: tests/test_complex.py.)"""
    tx = {"sgd": lambda: holotx.sgd(0.1), "adam": lambda: holotx.adam(0.1),
          "lars": lambda: holotx.lars(0.1)}[name]()
    params = {"ok": torch.randn(2, dtype=F64), "bad": torch.ones(3, dtype=dtype)}
    state = tx.init(params)
    before = _snapshot(params, state)
    with pytest.raises(ValueError, match=r"updates at \['bad'\] has dtype"):
        tx.update({"ok": torch.randn(2, dtype=F64), "bad": torch.ones(3, dtype=dtype)}, state, params,
                  donate=True)
    assert _unchanged(before, params, state)


def test_one_tensor_under_two_paths_is_not_stepped_twice():
    shared = torch.zeros(3, dtype=F64)
    params = {"a": shared, "b": shared}
    updates = {"a": torch.ones(3, dtype=F64), "b": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match=r"\['a'\] and at \['b'\] are the same tensor"):
        holotx.apply_updates(params, updates, inplace=True)
    assert torch.equal(shared, torch.zeros(3, dtype=F64))
    out = holotx.apply_updates(params, updates)  # pure: two new tensors, nothing shared is written
    assert torch.equal(out["a"], torch.ones(3, dtype=F64))
    # A complex param is added to through its real view: the view must not hide the twin.
    shared_c = torch.zeros(3, dtype=torch.complex128)
    ones_c = torch.ones(3, dtype=torch.complex128)
    with pytest.raises(ValueError, match="same tensor"):
        holotx.apply_updates({"a": shared_c, "b": shared_c}, {"a": ones_c, "b": ones_c}, inplace=True)
    assert torch.equal(shared_c, torch.zeros(3, dtype=torch.complex128))


def test_inject_hyperparams_checks_its_numbers_when_built():
    with pytest.raises(ValueError, match="lr"):
        holotx.inject_hyperparams(holotx.adam)(lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        holotx.inject_hyperparams(holotx.adam)(lr=0.1, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="lr"):
        holotx.inject_hyperparams(holotx.adam)(lr=lambda count: -0.1)
    holotx.inject_hyperparams(holotx.adam)(lr=lambda count: 0.1 / (1 + count))  # control


# --------------------------------------------------------------------------- 5. loading checkpoints

def _trained(kind="adamw"):
    from holotx.adapters import Lookahead, Scout, TransformOptimizer

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=gen, dtype=F64, requires_grad=True) for _ in range(2)]
    base = TransformOptimizer(params, holotx.adamw, lr=0.1)
    opt = {"adamw": lambda: base, "lookahead": lambda: Lookahead(base, sync_period=2),
           "scout": lambda: Scout(base, sync_period=2)}[kind]()
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(3, 2, generator=gen, dtype=F64)
        opt.step()
    return opt


def _bad_checkpoints():
    def edit(fn):
        def make(sd):
            fn(sd)
            return sd
        return make

    def str_keys(sd):
        sd["state"] = {str(k): v for k, v in sd["state"].items()}

    def extra_entry(sd):
        sd["state"][7] = dict(sd["state"][0])

    def negative(key):
        return edit(lambda sd: sd["state"][0].__setitem__(key, torch.tensor(-3)))

    def fractional(key):
        return edit(lambda sd: sd["state"][0].__setitem__(key, torch.tensor(2.5)))

    def meta(sd):
        sd["state"][0]["mu"] = torch.empty(3, 2, device="meta", dtype=F64)

    def group(key, value):
        return edit(lambda sd: sd["param_groups"][0].__setitem__(key, value))

    return {
        "none": ("adamw", lambda sd: None, "state_dict"),
        "a-list": ("adamw", lambda sd: [sd], "state_dict"),
        "string-state-keys": ("adamw", edit(str_keys), "JSON"),
        "extra-state-entry": ("adamw", edit(extra_entry), "7"),
        "negative-count": ("adamw", negative("count"), "negative"),
        "fractional-count": ("adamw", fractional("count"), "whole"),
        "meta-tensor": ("adamw", edit(meta), "meta"),
        "maximize-string": ("adamw", group("maximize", "yes"), "maximize"),
        "amsgrad-string": ("adamw", group("amsgrad", "no"), "amsgrad"),
        "lr-nan": ("adamw", group("lr", math.nan), "lr"),
        "lookahead-rate-string": ("lookahead", group("lookahead_sync_rate", "abc"), "sync_rate"),
        "lookahead-rate-5": ("lookahead", group("lookahead_sync_rate", 5.0), "sync_rate"),
        "lookahead-rate-nan": ("lookahead", group("lookahead_sync_rate", math.nan), "sync_rate"),
        "lookahead-float-count": ("lookahead", fractional("lookahead_count"), "whole"),
        "lookahead-negative-count": ("lookahead", negative("lookahead_count"), "negative"),
        "scout-rate-string": ("scout", group("scout_sync_rate", "abc"), "sync_rate"),
        "scout-none": ("scout", lambda sd: None, "state_dict"),
    }


BAD_CHECKPOINTS = _bad_checkpoints()


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_refused_and_nothing_changes(case):
    import copy

    kind, corrupt, word = BAD_CHECKPOINTS[case]
    opt = _trained(kind)
    good = opt.state_dict()
    before = copy.deepcopy(good)
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    bad = corrupt(copy.deepcopy(good))
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(bad)
    assert word in str(info.value), str(info.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    assert all(torch.equal(p.detach(), q) for p, q in
               zip([p for g in opt.param_groups for p in g["params"]], params))
    opt.load_state_dict(good)  # control: the well-formed checkpoint loads
