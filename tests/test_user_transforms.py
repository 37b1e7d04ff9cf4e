"""Transforms written by users, as optax's are: math in plain torch ops over trees, no
knowledge of donation, of the deferred learning rate or of any other execution policy.
Every way holotx runs a step must give them what the pure step gives:

* ``tx.update`` then ``apply_updates`` (the reference);
* ``make_step(tx)`` and ``make_step(tx, donate=True)``, eager and compiled (aot_eager);
* the adapter, ``TransformOptimizer(params, tx)``, with and without ``donate_grads``.

The wrappers below post-process their inner transform's updates (clip them), one passing
its ``**extra`` on to the inner transform and one not; before the deferred learning rate was
addressed to one transform, the donated step handed the inner chain's lr past the forwarding
wrapper, which then clipped unscaled updates (0.15 off after three AdamW steps).

Tolerance: float64, each param within 1e-12 of the reference relative to its largest
magnitude (the donated step multiplies the learning rate in as it applies the update,
``p + lr * u`` in one pass, where the reference rounds ``lr * u`` first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch._dynamo

import holotx
from holotx.adapters import TransformOptimizer
from holotx.flat import make_step

F64 = torch.float64
STEPS = 4
RTOL = 1e-12


class MomentumState(NamedTuple):
    velocity: Any


def user_momentum(beta: float) -> holotx.GradientTransformation:
    """Heavy-ball momentum as a user writes it: new state from torch ops, inputs never written."""

    def init(params):
        return MomentumState(holotx.tree.map(torch.zeros_like, params))

    def update(updates, state, params=None, **extra):
        velocity = holotx.tree.map(lambda v, g: beta * v + g, state.velocity, updates)
        return velocity, MomentumState(velocity)

    return holotx.GradientTransformation(init, update)


def clip_inner(inner: holotx.GradientTransformation, bound: float, *,
               forward_extra: bool) -> holotx.GradientTransformation:
    """Run ``inner``, then clip its updates elementwise to ``[-bound, bound]``."""

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None, **extra):
        inner_updates, state = inner.update(updates, state, params, **(extra if forward_extra else {}))
        return holotx.tree.map(lambda u: u.clamp(-bound, bound), inner_updates), state

    return holotx.GradientTransformation(init, update)


CASES: dict[str, Callable[[], holotx.GradientTransformation]] = {
    "momentum_then_lr": lambda: holotx.chain(user_momentum(0.9), holotx.scale_by_lr(0.1)),
    "clip_forwarding_adamw": lambda: clip_inner(holotx.adamw(0.5), 0.1, forward_extra=True),
    "clip_not_forwarding_adamw": lambda: clip_inner(holotx.adamw(0.5), 0.1, forward_extra=False),
    "clip_forwarding_lamb_schedule": lambda: clip_inner(
        holotx.lamb(holotx.linear_schedule(0.5, 0.1, 3)), 0.05, forward_extra=True),
    "clip_forwarding_lookahead": lambda: clip_inner(holotx.lookahead(holotx.adamw(0.5), sync_period=2), 0.1,
                                                    forward_extra=True),
    "lookahead_of_clip_forwarding": lambda: holotx.lookahead(
        clip_inner(holotx.adamw(0.5), 0.1, forward_extra=True), sync_period=2),
    "chain_of_clip_forwarding_then_momentum": lambda: holotx.chain(
        clip_inner(holotx.sgd(0.5), 0.1, forward_extra=True), user_momentum(0.5)),
    "inject_then_clip_forwarding": lambda: clip_inner(holotx.inject_hyperparams(holotx.adamw)(lr=0.5), 0.1,
                                                      forward_extra=True),
}


def make_params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 4, generator=gen, dtype=F64), "b": torch.randn(4, generator=gen, dtype=F64)}


def grads_seq() -> list[dict[str, torch.Tensor]]:
    return [make_params(100 + k) for k in range(STEPS)]


def reference(tx: holotx.GradientTransformation) -> list[dict[str, torch.Tensor]]:
    params, state, out = make_params(), tx.init(make_params()), []
    for grads in grads_seq():
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        out.append(params)
    return out


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    for k in expected:
        err = (actual[k].detach() - expected[k]).abs().max().item()
        bound = RTOL * expected[k].abs().max().item()
        assert err <= bound, f"{what} at {k}: {err:.3e} off the pure step (> {bound:.3e})"


def run_make_step(tx, *, donate: bool, compiled: bool) -> list[dict[str, torch.Tensor]]:
    step = make_step(tx, donate=donate)
    if compiled:
        step = torch.compile(step, backend="aot_eager", fullgraph=True)
    params, state, out = make_params(), tx.init(make_params()), []
    for grads in grads_seq():
        given = {k: v.clone() for k, v in grads.items()}
        params, state = step(params, given, state)
        if not donate:
            assert all(torch.equal(given[k], grads[k]) for k in grads), "the step wrote into the grads"
        out.append({k: v.clone() for k, v in params.items()})
    return out


def run_adapter(tx, *, donate_grads: bool) -> list[dict[str, torch.Tensor]]:
    params = {k: v.clone().requires_grad_() for k, v in make_params().items()}
    opt = TransformOptimizer(list(params.values()), tx, donate_grads=donate_grads)
    out = []
    for grads in grads_seq():
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
        if not donate_grads:
            assert all(torch.equal(p.grad, grads[k]) for k, p in params.items()), "the step wrote into .grad"
        out.append({k: v.detach().clone() for k, v in params.items()})
    return out


@pytest.mark.parametrize("path", ["make_step", "make_step_donated", "compiled", "compiled_donated",
                                  "adapter", "adapter_donate_grads"])
@pytest.mark.parametrize("name", list(CASES))
def test_user_transform_is_right_on_every_path(name, path):
    expected = reference(CASES[name]())
    tx = CASES[name]()
    if path.startswith("adapter"):
        got = run_adapter(tx, donate_grads=path.endswith("donate_grads"))
    else:
        torch._dynamo.reset()
        got = run_make_step(tx, donate=path.endswith("donated"), compiled=path.startswith("compiled"))
    for k, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, f"{name} via {path}, step {k + 1}")


def test_the_learning_rate_is_still_folded_for_holotx_chains():
    """The hand-over still happens where it is safe: a chain ending in the learning rate,
    run by the donated step, gives its factor to the step (one pass fewer)."""
    from holotx import executor

    tx = holotx.adamw(0.5)
    params = make_params()
    with torch.no_grad():
        _, _, factor, _ = executor.run(tx, grads_seq()[0], tx.init(params), params, donate=True,
                                       donate_updates=True, hand_over_scale=True)
    assert factor == -0.5
    wrapped = clip_inner(holotx.adamw(0.5), 0.1, forward_extra=True)
    with torch.no_grad():
        _, _, factor, _ = executor.run(wrapped, grads_seq()[0], wrapped.init(params), params, donate=True,
                                       donate_updates=True, hand_over_scale=True)
    assert factor is None, "a request addressed to the user's wrapper reached the chain inside it"


def doubling_in_place() -> holotx.GradientTransformation:
    """A user's transform that edits the container it was given (a dict, or the adapter's
    list) and returns it."""

    def update(updates, state, params=None, **extra):
        for k in updates.keys() if isinstance(updates, dict) else range(len(updates)):
            updates[k] = updates[k] * 2
        return updates, state

    return holotx.GradientTransformation(lambda params: holotx.EmptyState(), update)


@pytest.mark.parametrize("path", ["pure", "make_step_donated", "adapter"])
def test_a_container_changed_in_place_by_a_user_transform_is_read_again(path):
    """A step flattens each tree once and remembers its leaves (the updates one holotx
    transform hands the next are not flattened again); a user's transform run in between
    may change that very dict in place, and the next transform must see the new leaves."""
    tx = holotx.chain(holotx.scale_by_adam(), doubling_in_place(), holotx.scale_by_lr(0.1))
    expected = reference(holotx.chain(holotx.scale_by_adam(), holotx.scale(2.0), holotx.scale_by_lr(0.1)))
    if path == "pure":
        got = reference(tx)
    elif path == "adapter":
        got = run_adapter(tx, donate_grads=False)
    else:
        got = run_make_step(tx, donate=True, compiled=False)
    for k, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, f"{path}, step {k + 1}")


def params_times_ten() -> holotx.GradientTransformation:
    """A user's transform that edits the params dict it was given, in place."""

    def update(updates, state, params=None, **extra):
        params["w"] = params["w"] * 10
        return updates, state

    return holotx.GradientTransformation(lambda params: holotx.EmptyState(), update)


@pytest.mark.parametrize("nested", [False, True])
def test_a_params_dict_changed_by_a_user_transform_is_read_again(nested):
    """The step remembers the params it flattened; a user's transform that changes the
    dict makes every step forget, the ones it runs within too (apply_if_finite runs its
    inner chain in a step of its own): the weight decay after it decays the new values."""
    inner = holotx.apply_if_finite(holotx.chain(params_times_ten()), 3) if nested else params_times_ten()
    tx = holotx.chain(inner, holotx.add_decayed_weights(1.0))
    params = {"w": torch.ones(2, dtype=F64)}
    updates, _ = tx.update({"w": torch.zeros(2, dtype=F64)}, tx.init(params), params)
    torch.testing.assert_close(updates["w"], torch.full((2,), 10.0, dtype=F64))
