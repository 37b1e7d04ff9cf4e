"""Every holotx transform, through the one shared harness (``tests/harness.py``).

``CASES`` is the registry: each entry is a name and a zero-argument factory, plus a flag
where a transform legitimately needs one (see :class:`harness.Case`). Registering a new
transform is one line, and every check of the contract then runs on it::

    Case("lamb", lambda: holotx.lamb(1e-2, weight_decay=0.1), needs_params=True),

Hyperparameters are chosen so that each transform does something non-trivial within the
few steps a check runs (bias corrections far from 1, clipping active, momentum buffers
past their first step, schedules that move) and stays smooth for the finite-difference
check (see ``harness.check_grad``).
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    DTYPES,
    Affine,
    Case,
    InjectCase,
    check_chain_composition,
    check_compile,
    check_donated,
    check_dtensor,
    check_grad,
    check_inject,
    check_inject_grad,
    check_inject_no_retrace,
    check_none_gradients,
    check_params_usage,
    check_pure,
    check_structure,
    check_vmap,
)

import holotx

# Masks and labels over the params tree of harness.make_params (encoder / head / gain / pair / bulk).
# Every form routes some leaves each way, and a None-gradient leaf lands on both sides.
MASK_TREE = {
    "encoder": {"conv": True, "norm": Affine(False, True)},
    "head": [True, False],
    "gain": True,
    "pair": (False, True),
    "bulk": True,
}
MASK_PREFIX = {"encoder": False, "head": True, "gain": True, "pair": False, "bulk": True}


def mask_fn(params):
    """Matrices and kernels only: the usual "decay weights, not biases" mask."""
    return holotx.tree.map(lambda p: p.ndim >= 2, params)


LABELS_PREFIX = {"encoder": "adam", "head": "sgd", "gain": "sgd", "pair": "frozen", "bulk": "adam"}


def labels_fn(params):
    return holotx.tree.map(lambda p: "adam" if p.ndim >= 2 else "sgd", params)


def partition_transforms():
    return {
        "adam": holotx.adamw(1e-2, betas=(0.8, 0.95), weight_decay=0.1),
        "sgd": holotx.sgd(0.1, momentum=0.9),
        "frozen": holotx.set_to_zero(),
    }


def adam_block():
    """Betas well below the defaults so the bias corrections matter within 3 steps."""
    return holotx.scale_by_adam(0.8, 0.95)


def nonlinear_map(updates, params):
    """A stateless, params-free, smooth, nonlinear map (``g * sigmoid(g)``)."""
    del params
    return holotx.tree.map(lambda g: g * torch.sigmoid(g), updates)


def params_map(updates, params):
    """A stateless map that reads the params: ``g + 0.1 * p * g``."""
    if params is None:  # the function given to stateless owns this check
        raise ValueError("params_map needs params")
    return holotx.tree.map(lambda g, p: g + 0.1 * p * g, updates, params)


LR_SCHEDULE = holotx.linear_schedule(0.1, 0.02, 4)
RADAM = {"steps": 7}
WRAPPED = {"needs_params": True, "steps": 7, "sync_updates": True}
# Scout: one rate from all leaves, so float32 rounding reaches the float64 leaves; and the
# window's sum of squared deviations cancels (Adam's updates barely vary over 3 steps),
# which takes eager and fused float32 evaluations ~10 ulps of its scale apart.
SCOUT = {**WRAPPED, "global_rtol": 1e-5}  # two syncs (k = 2 or 3), and a window left open

CASES = [
    # ---- building blocks
    Case("identity", holotx.identity),
    Case("stateless", lambda: holotx.stateless(nonlinear_map)),
    Case("stateless_params", lambda: holotx.stateless(params_map), needs_params=True),
    Case("scale", lambda: holotx.scale(-0.5)),
    Case("scale_by_lr", lambda: holotx.scale_by_lr(0.1)),
    Case("scale_by_lr_schedule", lambda: holotx.scale_by_lr(LR_SCHEDULE)),
    Case("scale_by_schedule", lambda: holotx.scale_by_schedule(holotx.exponential_decay(1.0, 1, 0.5))),
    Case("clip_by_global_norm", lambda: holotx.clip_by_global_norm(1.0)),
    Case("set_to_zero", holotx.set_to_zero),
    Case("trace", lambda: holotx.trace(0.9)),
    Case("trace_nesterov", lambda: holotx.trace(0.9, nesterov=True)),
    Case("trace_dampening", lambda: holotx.trace(0.9, dampening=0.3)),
    Case("add_decayed_weights", lambda: holotx.add_decayed_weights(0.1), needs_params=True),
    Case("add_decayed_weights_mask", lambda: holotx.add_decayed_weights(0.1, mask=MASK_PREFIX),
         needs_params=True),
    Case("scale_by_adam", adam_block),
    Case("scale_by_adam_amsgrad", lambda: holotx.scale_by_adam(0.8, 0.95, amsgrad=True)),
    Case("scale_by_radam", lambda: holotx.scale_by_radam(0.9, 0.95), **RADAM),
    Case("scale_by_trust_ratio", lambda: holotx.scale_by_trust_ratio(scale_clip=(0.0, 10.0)),
         needs_params=True),
    Case("scale_by_trust_ratio_lars", lambda: holotx.scale_by_trust_ratio(
        0.5, weight_decay=0.1, inner=holotx.trace(0.9), mask=MASK_PREFIX), needs_params=True),
    Case("scale_by_tadam", lambda: holotx.scale_by_tadam(0.8, 0.95)),
    Case("scale_by_tadam_amsgrad_dof", lambda: holotx.scale_by_tadam(0.8, 0.95, amsgrad=True, dof=2.5)),
    Case("scale_by_belief", lambda: holotx.scale_by_belief(0.8, 0.95, amsgrad=True)),
    # delta=10 projects every tensor of the harness (its cosines are <= 1 < 10 / sqrt(dim)).
    Case("scale_by_adamp", lambda: holotx.scale_by_adamp(0.8, 0.95, delta=10.0, weight_decay=0.1),
         needs_params=True),
    Case("scale_by_adamp_holocron",
         lambda: holotx.scale_by_adamp(0.8, 0.95, delta=10.0, projection="holocron"), needs_params=True),
    Case("scale_by_adan", lambda: holotx.scale_by_adan(0.8, 0.9, 0.95, amsgrad=True)),
    Case("scale_by_ademamix", lambda: holotx.scale_by_ademamix(0.8, 0.95, 0.99, 2.0, t_alpha_beta3=2)),
    # ---- aliases
    Case("sgd", lambda: holotx.sgd(0.1)),
    Case("sgd_momentum_dampening", lambda: holotx.sgd(0.1, momentum=0.9, dampening=0.2)),
    Case("sgd_nesterov_wd", lambda: holotx.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
         needs_params=True, inductor=True),
    Case("sgd_maximize", lambda: holotx.sgd(0.1, momentum=0.5, maximize=True)),
    Case("adam", lambda: holotx.adam(1e-2, betas=(0.8, 0.95))),
    Case("adam_amsgrad_wd", lambda: holotx.adam(1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True),
         needs_params=True),
    Case("adamw", lambda: holotx.adamw(1e-2, betas=(0.8, 0.95), weight_decay=0.1), needs_params=True,
         inductor=True),
    Case("adamw_schedule", lambda: holotx.adamw(LR_SCHEDULE, weight_decay=0.1), needs_params=True),
    Case("radam", lambda: holotx.radam(1e-2, betas=(0.9, 0.95)), **RADAM),
    Case("radam_decoupled_wd",
         lambda: holotx.radam(1e-2, betas=(0.9, 0.95), weight_decay=0.1, decoupled_weight_decay=True),
         needs_params=True, **RADAM),
    # ---- Holocron's optimizers, in both modes
    Case("lars", lambda: holotx.lars(0.1, momentum=0.9, weight_decay=0.05, nesterov=True), needs_params=True,
         inductor=True),
    Case("lars_holocron_dampening", lambda: holotx.lars(0.1, momentum=0.9, dampening=0.2, compat="holocron"),
         needs_params=True),
    Case("lars_no_momentum_mask", lambda: holotx.lars(0.1, trust_ratio_mask=mask_fn), needs_params=True),
    Case("lamb", lambda: holotx.lamb(1e-2, betas=(0.8, 0.95), weight_decay=0.1), needs_params=True,
         inductor=True),
    Case("lamb_holocron", lambda: holotx.lamb(1e-2, betas=(0.8, 0.95), weight_decay=0.1, compat="holocron"),
         needs_params=True),
    Case("ralars", lambda: holotx.ralars(1e-2, betas=(0.9, 0.95), weight_decay=0.1), needs_params=True,
         **RADAM),
    Case("ralars_force_adaptive", lambda: holotx.ralars(1e-2, betas=(0.9, 0.95), force_adaptive_momentum=True,
                                                         scale_clip=(0.5, 2.0)), needs_params=True, **RADAM),
    Case("tadam", lambda: holotx.tadam(1e-2, betas=(0.8, 0.95), weight_decay=0.1, dof=2.5),
         needs_params=True),
    Case("adabelief", lambda: holotx.adabelief(1e-2, betas=(0.8, 0.95), weight_decay=0.1,
                                               decoupled_weight_decay=True), needs_params=True),
    Case("adabelief_holocron",
         lambda: holotx.adabelief(1e-2, betas=(0.8, 0.95), amsgrad=True, compat="holocron")),
    Case("adamp", lambda: holotx.adamp(1e-2, betas=(0.8, 0.95), weight_decay=0.1, delta=10.0, nesterov=True,
                                       decoupled_weight_decay=True), needs_params=True, inductor=True),
    Case("adamp_holocron", lambda: holotx.adamp(1e-2, betas=(0.8, 0.95), weight_decay=0.1, delta=10.0,
                                                compat="holocron"), needs_params=True),
    Case("adan", lambda: holotx.adan(1e-2, betas=(0.8, 0.9, 0.95), weight_decay=0.1), needs_params=True,
         inductor=True),
    Case("adan_holocron", lambda: holotx.adan(1e-2, betas=(0.8, 0.9, 0.95), weight_decay=0.1, amsgrad=True,
                                              compat="holocron"), needs_params=True),
    Case("ademamix", lambda: holotx.ademamix(1e-2, betas=(0.8, 0.95, 0.99), weight_decay=0.1, t_alpha_beta3=2,
                                             decoupled_weight_decay=True), needs_params=True, inductor=True),
    Case("ademamix_holocron", lambda: holotx.ademamix(1e-2, betas=(0.8, 0.95, 0.99), compat="holocron")),
    Case("adan_schedule", lambda: holotx.adan(LR_SCHEDULE, weight_decay=0.1), needs_params=True),
    # ---- combinators
    Case("chain",
         lambda: holotx.chain(holotx.clip_by_global_norm(1.0), adam_block(), holotx.scale_by_lr(0.1))),
    Case("named_chain", lambda: holotx.named_chain(
        ("clip", holotx.clip_by_global_norm(1.0)), ("adam", adam_block()), ("lr", holotx.scale_by_lr(0.1)))),
    Case("masked_tree", lambda: holotx.masked(holotx.adamw(1e-2, weight_decay=0.1), MASK_TREE),
         needs_params=True),
    Case("masked_prefix", lambda: holotx.masked(holotx.sgd(0.1, momentum=0.9), MASK_PREFIX)),
    Case("masked_callable", lambda: holotx.masked(adam_block(), mask_fn)),
    Case("partition", lambda: holotx.partition(partition_transforms(), LABELS_PREFIX), needs_params=True),
    Case("partition_callable", lambda: holotx.partition(partition_transforms(), labels_fn),
         needs_params=True),
    Case("freeze", lambda: holotx.freeze(MASK_PREFIX)),
    Case("apply_if_finite", lambda: holotx.apply_if_finite(holotx.adam(1e-2, betas=(0.8, 0.95)), 2)),
    Case("multi_steps", lambda: holotx.multi_steps(holotx.adam(1e-2, betas=(0.8, 0.95)), every_k=2)),
    Case("multi_steps_sgd", lambda: holotx.multi_steps(holotx.sgd(0.1), every_k=2)),
    # A chain inside a chain, after a transform that makes fresh updates (clipping): the
    # everyday "clip then optimizer" composition, and the path where a chain donates its
    # intermediate updates to a nested chain.
    Case("chain_clip_sgd_momentum",
         lambda: holotx.chain(holotx.clip_by_global_norm(1.0), holotx.sgd(0.1, momentum=0.9))),
    # ---- wrappers: periods short enough that every check runs across two syncs, and
    # Scout's sync_rate low enough (k = 3: 1 - C <= 0.13) that its adaptive rate decides
    Case("lookahead", lambda: holotx.lookahead(holotx.sgd(0.1, momentum=0.9), 0.5, 2), **WRAPPED),
    Case("lookahead_chain_holocron", lambda: holotx.lookahead(holotx.chain(
        holotx.clip_by_global_norm(1.0), holotx.adamw(1e-2, betas=(0.8, 0.95), weight_decay=0.1)),
        sync_rate=0.8, sync_period=3, compat="holocron"), **WRAPPED, none_is_zero_step=True),
    Case("lookahead_of_scout", lambda: holotx.lookahead(
        holotx.scout(holotx.sgd(0.1, momentum=0.5), 0.0, 2), 0.5, 2), **SCOUT),
    Case("lookahead_masked", lambda: holotx.masked(
        holotx.lookahead(holotx.adam(1e-2, betas=(0.8, 0.95)), 0.5, 2), MASK_TREE), **WRAPPED),
    Case("lookahead_injected_rate", lambda: holotx.inject_hyperparams(
        holotx.lookahead, static_args=("sync_period",))(holotx.sgd(0.1, momentum=0.9), sync_rate=0.5,
                                                        sync_period=2), **WRAPPED),
    Case("scout", lambda: holotx.scout(holotx.adamw(1e-2, betas=(0.8, 0.95), weight_decay=0.1), 0.0, 3),
         **SCOUT, inductor=True),
    Case("scout_period_1", lambda: holotx.scout(holotx.sgd(0.1, momentum=0.9), 0.3, 1), **SCOUT),
    Case("scout_holocron", lambda: holotx.scout(holotx.sgd(0.1, momentum=0.9), 0.0, 3, compat="holocron"),
         **SCOUT, none_is_zero_step=True),
    Case("scout_partition", lambda: holotx.partition(
        {"adam": holotx.scout(holotx.adam(1e-2, betas=(0.8, 0.95)), 0.0, 3), "sgd": holotx.sgd(0.1),
         "frozen": holotx.set_to_zero()}, LABELS_PREFIX), **SCOUT),
    Case("inject_adamw", lambda: holotx.inject_hyperparams(holotx.adamw)(lr=1e-2, weight_decay=0.1),
         needs_params=True),
    Case("inject_adamw_schedule", lambda: holotx.inject_hyperparams(holotx.adamw)(lr=LR_SCHEDULE),
         needs_params=True),
]

INJECT_CASES = [
    InjectCase("sgd", holotx.sgd, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05}),
    InjectCase("sgd_nesterov_maximize", holotx.sgd,
               {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05, "maximize": True}),
    InjectCase("adam", holotx.adam, {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6}),
    InjectCase("adam_amsgrad_wd", holotx.adam,
               {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1, "amsgrad": True}),
    InjectCase("adamw", holotx.adamw, {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    InjectCase("radam", holotx.radam, {"lr": 1e-2, "betas": (0.9, 0.95)}),
    InjectCase("radam_decoupled_wd", holotx.radam,
               {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "decoupled_weight_decay": True}),
    InjectCase("adamw_schedule", holotx.adamw, {"lr": LR_SCHEDULE, "weight_decay": 0.1}, lr_is_schedule=True),
    InjectCase("lars", holotx.lars,
               {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "trust_coefficient": 0.5}),
    InjectCase("lamb", holotx.lamb, {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    InjectCase("ralars", holotx.ralars, {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}),
    InjectCase("tadam", holotx.tadam, {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    InjectCase("adabelief", holotx.adabelief, {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6}),
    InjectCase("adamp", holotx.adamp, {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1, "delta": 10.0,
                                       "decoupled_weight_decay": True, "wd_ratio": 0.5}),
    InjectCase("adan", holotx.adan, {"lr": 1e-2, "betas": (0.8, 0.9, 0.95), "weight_decay": 0.1}),
    InjectCase("ademamix", holotx.ademamix, {"lr": 1e-2, "betas": (0.8, 0.95, 0.99), "alpha": 2.0,
                                             "t_alpha_beta3": 4}),
]


def _params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


NOT_TRANSFORMS = {"apply_updates", "global_norm", *holotx.schedules.__all__}
"""Public callables of ``holotx`` that do not build a GradientTransformation."""
CASE_PREFIX = {"inject_hyperparams": "inject_"}
"""Where a factory's cases are not named after it."""


def test_registry_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_public_transform_is_registered():
    """Every public factory of ``holotx`` has at least one case named after it, so a new
    transform cannot skip the harness: register it in ``CASES``."""
    public = [n for n in holotx.__all__
              if n[0].islower() and callable(getattr(holotx, n)) and n not in NOT_TRANSFORMS]
    missing = [n for n in public if not any(c.name.startswith(CASE_PREFIX.get(n, n)) for c in CASES)]
    assert not missing, f"no harness case for {missing}: add Case(...) lines to CASES"


@pytest.mark.parametrize("tree", ["small", "dense", "dense_big"])
@pytest.mark.parametrize("case", _params(CASES))
def test_pure(case, tree):
    check_pure(case, tree)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", _params(CASES))
def test_structure_and_dtypes(case, dtype):
    check_structure(case, dtype)


@pytest.mark.parametrize("case", _params(CASES))
def test_none_gradients(case):
    check_none_gradients(case)


@pytest.mark.parametrize("case", _params(CASES))
def test_params_usage(case):
    check_params_usage(case)


@pytest.mark.parametrize("case", _params(CASES))
def test_grad_through_steps(case):
    check_grad(case)


@pytest.mark.parametrize("case", _params(CASES))
def test_vmap(case):
    check_vmap(case)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("case", _params(CASES))
def test_compile(case):
    check_compile(case, backend="aot_eager")


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("case", _params([c for c in CASES if c.inductor]))
def test_compile_inductor(case):
    check_compile(case, backend="inductor")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", _params(CASES))
def test_donated_equals_pure(case, dtype):
    check_donated(case, dtype)


@pytest.mark.parametrize("case", _params(CASES))
def test_donated_state_only_leaves_the_grads(case):
    check_donated(case, "float32", "dense_big", state_only=True)


@pytest.mark.parametrize("case", _params(CASES))
def test_dtensor(case, one_process_mesh):
    check_dtensor(case, one_process_mesh)


@pytest.mark.parametrize("tree", ["dense", "dense_big"])
@pytest.mark.parametrize("case", _params(CASES))
def test_same_inside_a_chain(case, tree):
    check_chain_composition(case, tree)


@pytest.mark.parametrize("case", _params(INJECT_CASES))
def test_inject_hyperparams_equivalence(case):
    check_inject(case)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("case", _params(INJECT_CASES))
def test_inject_hyperparams_no_retrace(case):
    check_inject_no_retrace(case)


@pytest.mark.parametrize("case", _params(INJECT_CASES))
def test_inject_hyperparams_grad(case):
    check_inject_grad(case)


@pytest.mark.parametrize("inplace", [False, True])
def test_updates_apply_to_dtensors_among_plain_tensors(inplace, one_process_mesh):
    """A tree of params where some are DTensors (FSDP2's sharded params) and some plain
    tensors: a step groups them apart, and so does ``apply_updates``, pure or in place,
    with one factor or one per leaf; the adapter too."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from holotx.adapters import TransformOptimizer

    def full(n, value):
        return torch.full((n,), value, dtype=torch.float64)

    def trees():
        sharded = distribute_tensor(full(4, 1.0), one_process_mesh, [Shard(0)])
        sharded_grad = distribute_tensor(full(4, 0.5), one_process_mesh, [Shard(0)])
        return {"a": sharded, "b": full(3, 1.0)}, {"a": sharded_grad, "b": full(3, 0.5)}

    for scale, (fa, fb) in ((None, (1.0, 1.0)), (2.0, (2.0, 2.0)), ([2.0, 3.0], (2.0, 3.0))):
        params, grads = trees()
        new = holotx.apply_updates(params, grads, inplace=inplace, scale=scale)
        assert (new is params) == inplace
        assert torch.equal(new["a"].full_tensor(), full(4, 1 + 0.5 * fa))
        assert torch.equal(new["b"], full(3, 1 + 0.5 * fb))
    params, grads = trees()
    weights = [torch.nn.Parameter(params["a"]), torch.nn.Parameter(params["b"])]
    for w, g in zip(weights, grads.values()):
        w.grad = g
    TransformOptimizer(weights, holotx.sgd, lr=0.1).step()
    assert torch.equal(weights[0].detach().full_tensor(), full(4, 0.95))
    assert torch.equal(weights[1].detach(), full(3, 0.95))
