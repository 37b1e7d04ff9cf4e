"""The optimizer-level Lookahead and Scout of ``holotx.adapters``: they leave the base
optimizer's defaults alone, their ``state`` is a live view (what a state-dict hook writes
stays written), and ``torch.compile(opt.step)`` steps them as eager mode does."""

from __future__ import annotations

import copy

import pytest
import torch

import holotx
from holotx.adapters import Lookahead, Scout, TransformOptimizer

F64 = torch.float64
WRAPPERS = {"lookahead": Lookahead, "scout": Scout}


def _setup(wrapper, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True),
              torch.randn(3, generator=gen, dtype=F64, requires_grad=True)]
    base = TransformOptimizer(params, holotx.adamw, lr=1e-2)
    return params, base, WRAPPERS[wrapper](base, sync_period=2)


def _grads(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)]
            for _ in range(steps)]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapping_leaves_the_base_defaults_and_checkpoint_as_they_were(wrapper):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, generator=gen, dtype=F64, requires_grad=True)]
    base = TransformOptimizer(params, holotx.adamw, lr=1e-2)
    defaults = copy.deepcopy(base.defaults)
    WRAPPERS[wrapper](base)
    assert base.defaults == defaults


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_the_state_is_a_live_view(wrapper):
    params, base, opt = _setup(wrapper)
    for g in _grads(3):
        for p, x in zip(params, g):
            p.grad = x
        opt.step()
    p = params[0]
    entry = opt.state[p]
    keys = set(entry)
    assert {"mu", "nu", "count", f"{wrapper}_slow", f"{wrapper}_count"} <= keys
    assert p in opt.state
    assert len(opt.state) == 2
    # What is written through the view lands where the key belongs, and stays.
    opt.state[p]["note"] = torch.tensor(1.0)
    assert torch.equal(base.state[p]["note"], torch.tensor(1.0))
    slow = opt.state[p][f"{wrapper}_slow"]
    opt.state[p][f"{wrapper}_slow"] = slow * 2
    assert torch.equal(opt.state[p][f"{wrapper}_slow"], slow * 2)
    assert f"{wrapper}_slow" not in base.state[p]
    del opt.state[p]["note"]
    assert "note" not in base.state[p]
    # A state-dict hook that edits the state: its edit is there afterwards.

    def hook(optimizer):
        optimizer.state[params[1]][f"{wrapper}_count"] = torch.tensor(7)

    opt.register_state_dict_pre_hook(hook)
    saved = opt.state_dict()
    assert int(opt.state[params[1]][f"{wrapper}_count"]) == 7
    assert int(saved["state"][1][f"{wrapper}_count"]) == 7
    with pytest.raises(KeyError):
        opt.state[p]["absent"]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_compiled_step_equals_the_eager_one(wrapper):
    eager_p, _, eager = _setup(wrapper)
    compiled_p, _, compiled = _setup(wrapper)
    step = torch.compile(compiled.step, backend="eager")
    for g in _grads(5):
        for p, q, x in zip(eager_p, compiled_p, g):
            p.grad = x.clone()
            q.grad = x.clone()
        eager.step()
        step()
        for p, q in zip(eager_p, compiled_p):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_step_hooks_fire_once_per_step(wrapper):
    """torch's global step hooks fire once per user step (for the wrapper), the base
    optimizer's own hooks once too."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params, base, opt = _setup(wrapper)
    seen: list[tuple[str, str]] = []
    def log(what):
        return lambda optimizer, args, kwargs: seen.append((what, type(optimizer).__name__))

    handles = [register_optimizer_step_pre_hook(log("global pre")),
               register_optimizer_step_post_hook(log("global post")),
               base.register_step_pre_hook(log("base pre")), base.register_step_post_hook(log("base post"))]
    try:
        for p, x in zip(params, _grads(1)[0]):
            p.grad = x
        opt.step()
    finally:
        for h in handles:
            h.remove()
    name = WRAPPERS[wrapper].__name__
    assert seen == [("global pre", name), ("base pre", "TransformOptimizer"),
                    ("base post", "TransformOptimizer"), ("global post", name)]


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_key_that_is_not_a_param_is_kept_as_torch_keeps_it(wrapper):
    """torch.optim's state takes any key (a state-dict hook may store ``state["note"] = 1``)
    and its ``state_dict()`` carries it: so does the wrapper's, in the base's state."""
    _, base, opt = _setup(wrapper)

    def hook(optimizer):
        optimizer.state["note"] = 1

    opt.register_state_dict_pre_hook(hook)
    saved = opt.state_dict()
    assert saved["state"]["note"] == 1
    assert opt.state["note"] == 1
    assert base.state["note"] == 1
    assert "note" in opt.state
    assert "note" in repr(opt.state)
    opt.state["flag"] = True
    assert opt.state["flag"] is True
    del opt.state["flag"]
    assert "flag" not in opt.state
    assert "flag" not in base.state


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_base_step_that_raises_leaves_the_wrappers_state(wrapper):
    """The slow weights are taken at a param's first step that runs: a base step that
    raises (a sparse gradient) creates no state, and a param changed before the next
    step starts its slow weights from there."""
    params, _, opt = _setup(wrapper)
    for p, x in zip(params, _grads(1)[0]):
        p.grad = x
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0
    assert not opt.state_dict()["state"]
    with torch.no_grad():
        params[0].mul_(2.0)
    start = params[0].detach().clone()
    params[1].grad = params[1].grad.to_dense()
    opt.step()
    assert torch.equal(opt.state[params[0]][f"{wrapper}_slow"], start)


@pytest.mark.parametrize("compat", [None, "holocron"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_complex_param_steps_as_its_real_view(wrapper, compat):
    """As torch.optim steps a complex param (and holotx.scout does): bit for bit the run
    on its real view, Scout's statistics kept per real number; the state dict loads back."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(4, 3, generator=gen, dtype=torch.complex128, requires_grad=True)
    r = torch.view_as_real(c).detach().clone().requires_grad_()
    opts = [WRAPPERS[wrapper](TransformOptimizer([x], holotx.sgd, lr=0.1, momentum=0.9), sync_period=2,
                              compat=compat) for x in (c, r)]
    for _ in range(5):
        g = torch.randn(4, 3, 2, generator=gen, dtype=F64)
        c.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        for opt in opts:
            opt.step()
        assert torch.equal(torch.view_as_real(c.detach()), r.detach())
    saved = opts[0].state_dict()
    again = WRAPPERS[wrapper](TransformOptimizer([c], holotx.sgd, lr=0.1, momentum=0.9), sync_period=2,
                              compat=compat)
    again.load_state_dict(saved)
    for key, value in saved["state"][0].items():
        assert torch.equal(again.state[c][key], value), key
