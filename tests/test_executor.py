"""The executor decides how a step runs; the math layer only says what it computes.

* The math layer (``holotx/transforms``, ``optimizers``, ``wrappers``, the combinators,
  the hyperparameters) names no execution policy: no donation or in-place flags, no
  storage reads, no context detection, no ``out=``, and of the executor only the
  composition calls (run a wrapped transform, pass on or honour the final scaling).
* What may be written is decided by identity, once per step: never a tensor the caller
  did not donate, never a state a transform returned (a pure momentum's buffer is its
  updates too), never anything a user's transform saw or returned.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Any, NamedTuple

import pytest
import torch

import holotx
from holotx import executor, ops
from holotx.flat import make_step

ROOT = pathlib.Path(holotx.__file__).parent
MATH_LAYER = sorted([*ROOT.glob("transforms/*.py"), *ROOT.glob("optimizers/*.py"),
                     *ROOT.glob("wrappers/*.py"), ROOT / "combine.py", ROOT / "hyperparams.py",
                     ROOT / "schedules.py"])
POLICY_NAMES = {"donate", "donate_updates", "inplace", "owns_memory", "final_scale", "FINAL_SCALE",
                "is_compiling", "_functorch", "get_interpreter_stack", "data_ptr", "untyped_storage",
                "storage_offset", "may_write", "may_write_into", "mark_state"}
COMPOSITION_CALLS = {"call", "call_pure", "redirect_scale", "take_scale", "scale_request_to"}
F64 = torch.float64


@pytest.mark.parametrize("path", MATH_LAYER, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_math_layer_names_no_execution_policy(path):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in POLICY_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Attribute):
            if node.attr in POLICY_NAMES:
                found.append(node.attr)
            if isinstance(node.value, ast.Name) and node.value.id == "executor" \
                    and node.attr not in COMPOSITION_CALLS:
                found.append(f"executor.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in POLICY_NAMES | {"out"}:
            found.append(f"{node.arg}=")
        elif isinstance(node, ast.arg) and node.arg in POLICY_NAMES:
            found.append(f"argument {node.arg}")
    assert not found, f"{path.name} names execution policy: {sorted(set(found))}"


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.randn(3, generator=gen, dtype=F64)}


def _clones(tree: Any) -> Any:
    return holotx.tree.map(torch.clone, tree)


def _equal(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(holotx.tree.flatten(a)[0], holotx.tree.flatten(b)[0]))


def test_a_pure_momentum_buffer_is_not_scaled_through_its_updates():
    """Pure, a momentum's updates are its new buffer: the learning rate after it must not
    scale the state through them."""
    params, grads = _params(), _params()
    tx = holotx.sgd(0.5, momentum=0.9)
    _, state = tx.update(grads, tx.init(params), params)
    trace_state = next(s for s in state if isinstance(s, holotx.TraceState))
    assert _equal(trace_state.trace, grads)


class Remembered(NamedTuple):
    last: Any


def remember_last() -> holotx.GradientTransformation:
    """A user's transform that keeps its incoming updates in its state and returns them."""

    def init(params):
        return Remembered(holotx.tree.map(torch.zeros_like, params))

    def update(updates, state, params=None, **extra):
        return updates, Remembered(updates)

    return holotx.GradientTransformation(init, update)


@pytest.mark.parametrize("donate", [False, True])
def test_nothing_a_user_transform_saw_is_written(donate):
    params, grads = _params(), _params()
    tx = holotx.chain(holotx.scale(3.0), remember_last(), holotx.scale(-0.5))
    step = make_step(tx, donate=donate)
    state = tx.init(params)
    with torch.no_grad():
        _, state = step(_clones(params), _clones(grads), state)
    assert _equal(state[1].last, holotx.tree.map(lambda g: 3.0 * g, grads))


def test_a_donated_step_writes_the_donated_buffers_in_place():
    params, grads = _params(), _params()
    tx = holotx.adam(0.1)
    state = tx.init(params)
    mu = state[0].mu
    with torch.no_grad():
        _, new_state = tx.update(grads, state, params, donate=True)
    assert new_state[0].mu["w"] is mu["w"], "a donated moment was not updated in place"
    _, pure_state = tx.update(grads, tx.init(params), params)
    assert pure_state[0].mu["w"] is not state[0].mu["w"]


def test_ops_outside_a_step_write_nothing():
    xs = [torch.ones(3)]
    out = ops.mul_(xs, 2.0)
    assert out[0] is not xs[0]
    assert torch.equal(xs[0], torch.ones(3))


def test_an_owned_step_writes_what_it_is_given():
    xs, keep = [torch.ones(3)], [torch.ones(3)]
    with executor.owned_step(keep):
        assert ops.mul_(xs, 2.0)[0] is xs[0]
        assert ops.mul_(keep, 2.0)[0] is not keep[0]
    assert torch.equal(xs[0], torch.full((3,), 2.0))
    assert torch.equal(keep[0], torch.ones(3))
