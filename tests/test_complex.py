"""Complex parameters are stepped as torch.optim steps them: as their real view
(``torch.view_as_real``). For every optimizer, a complex run equals the run on the real
views bit for bit (pure, donated and through the adapter), the caller's gradients are never
written, and holotx's SGD, Adam, AdamW and RAdam equal torch.optim's on complex params."""

from __future__ import annotations

import pytest
import torch

import holotx
from holotx.adapters import TransformOptimizer
from holotx.flat import make_step

C128 = torch.complex128
NAMES = ["sgd", "adam", "adamw", "radam", "lars", "lamb", "ralars", "tadam", "adabelief", "adamp",
         "adan", "ademamix", "lookahead"]


def _factory(name):
    if name == "lookahead":
        return lambda: holotx.lookahead(holotx.adam(1e-2), sync_period=2)
    kw = {"momentum": 0.9} if name in ("sgd", "lars") else {}
    return lambda: getattr(holotx, name)(1e-2, **kw)


def _data(steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=C128),
              "b": torch.randn(3, generator=gen, dtype=C128),
              "real": torch.randn(2, generator=gen, dtype=torch.float64)}
    grads = []
    for t in range(steps):
        g = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
        if t == 2:
            g["b"] = None
        grads.append(g)
    return params, grads


def _real(tree):
    return holotx.tree.map(lambda x: None if x is None else
                           (torch.view_as_real(x).clone() if x.is_complex() else x.clone()), tree)


def _as_real(x):
    return torch.view_as_real(x) if x.is_complex() else x


@pytest.mark.parametrize("path", ["pure", "donated"])
@pytest.mark.parametrize("name", NAMES)
def test_a_complex_run_is_its_real_view_run(name, path):
    tx = _factory(name)()
    params, grads = _data()
    real_params, real_grads = _real(params), [_real(g) for g in grads]
    step = make_step(tx, donate=path == "donated")
    state, real_state = tx.init(params), tx.init(real_params)
    for g, rg in zip(grads, real_grads):
        kept = holotx.tree.map(lambda x: None if x is None else x.clone(), g)
        given = holotx.tree.map(lambda x: None if x is None else x.clone(), g) if path == "donated" else g
        params, state = step(params, given, state)
        real_params, real_state = step(real_params, _real(rg) if path == "donated" else rg, real_state)
        for key in params:
            assert torch.equal(_as_real(params[key]), real_params[key]), key
        if path == "pure":  # the caller's gradients are left as they were
            for key in g:
                assert (g[key] is None) == (kept[key] is None)
                if g[key] is not None:
                    assert torch.equal(g[key], kept[key]), key
    for a, b in zip(holotx.tree.flatten(state)[0], holotx.tree.flatten(real_state)[0]):
        if isinstance(a, torch.Tensor):
            assert torch.equal(_as_real(a), b)


@pytest.mark.parametrize("name", NAMES[:-1])
def test_the_adapter_steps_complex_params_as_their_real_view(name):
    params, grads = _data()
    complex_p = [v.clone().requires_grad_() for v in params.values()]
    real_p = [_as_real(v).clone().requires_grad_() for v in params.values()]
    factory = _factory(name)
    kw = {"momentum": 0.9} if name in ("sgd", "lars") else {}
    opt_c = TransformOptimizer(complex_p, getattr(holotx, name), lr=1e-2, **kw)
    opt_r = TransformOptimizer(real_p, getattr(holotx, name), lr=1e-2, **kw)
    del factory
    for g in grads:
        for p, q, x in zip(complex_p, real_p, g.values()):
            p.grad = None if x is None else x.clone()
            q.grad = None if x is None else _as_real(x).clone()
        opt_c.step()
        opt_r.step()
        for p, q, x in zip(complex_p, real_p, g.values()):
            assert torch.equal(_as_real(p.detach()), q.detach())
            if x is not None:
                assert torch.equal(p.grad, x)


@pytest.mark.parametrize(("torch_cls", "name", "hp"), [
    (torch.optim.SGD, "sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
    (torch.optim.Adam, "adam", {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    (torch.optim.AdamW, "adamw", {"lr": 1e-2}),
    (torch.optim.RAdam, "radam", {"lr": 1e-2}),
], ids=["sgd", "adam", "adamw", "radam"])
def test_complex_params_step_as_in_torch_optim(torch_cls, name, hp):
    params, grads = _data(steps=8)
    theirs = [v.clone().requires_grad_() for v in params.values()]
    ours = [v.clone().requires_grad_() for v in params.values()]
    t_opt = torch_cls(theirs, **hp)
    o_opt = TransformOptimizer(ours, getattr(holotx, name), **hp)
    for g in grads:
        for a, b, x in zip(theirs, ours, g.values()):
            a.grad = None if x is None else x.clone()
            b.grad = None if x is None else x.clone()
        t_opt.step()
        o_opt.step()
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)
