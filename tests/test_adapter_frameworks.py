"""What the frameworks' param groups need from the adapter: one gradient clip over every
group (``max_grad_norm``), and trust ratios only where the weight decay is non-zero
(``always_adapt=False``, apex's and timm's convention for LAMB and LARS)."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch

import holotx
from holotx.adapters import TransformOptimizer, create_optimizer

STEPS = 5


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (4,), (2, 3, 2), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


def _grads(k: int, params) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    # Large enough that the global norm is well above the clip at every step.
    return [3.0 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]


def _clones(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _run_adapter(opt, params) -> list[torch.Tensor]:
    for k in range(STEPS):
        for p, g in zip(params, _grads(k, params)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def _run_functional(tx, params) -> list[torch.Tensor]:
    ps = [p.detach().clone() for p in params]
    state = tx.init(ps)
    for k in range(STEPS):
        updates, state = tx.update(_grads(k, params), state, ps)
        ps = holotx.apply_updates(ps, updates)
    return ps


def _two_groups(params, **extra):
    return [{"params": params[:2], **extra}, {"params": params[2:], **extra}]


FACTORIES = {
    "adamw": functools.partial(holotx.adamw, 1e-2, weight_decay=0.1),
    "lamb": functools.partial(holotx.lamb, 1e-2, weight_decay=0.1),
    "sgd": functools.partial(holotx.sgd, 1e-2, momentum=0.9),
}


# -- max_grad_norm: one clip over every group ------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_max_grad_norm_clips_all_groups_together(name, max_norm):
    """Two groups with max_grad_norm step exactly as a functional run of
    chain(clip_by_global_norm, tx) over all the params (the clip bites at 0.5 and not at
    1e3), and leave the caller's .grad tensors as they were."""
    params = _params()
    factory = FACTORIES[name]
    expected = _run_functional(holotx.chain(holotx.clip_by_global_norm(max_norm), factory()), params)
    mine = _clones(params)
    opt = TransformOptimizer(_two_groups(mine), factory, max_grad_norm=max_norm)
    got = _run_adapter(opt, mine)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14 * max(1.0, e.abs().max().item()))
    last = _grads(STEPS - 1, params)
    assert all(torch.equal(p.grad, g) for p, g in zip(mine, last))  # .grad not written


def test_per_group_clip_is_not_the_global_clip():
    """The control: the clip given inside the transform clips each group by its own norm,
    which is what max_grad_norm exists to avoid (so the test above can fail)."""
    params = _params()
    tx = holotx.chain(holotx.clip_by_global_norm(0.5), FACTORIES["adamw"]())
    expected = _run_functional(tx, params)
    mine = _clones(params)
    per_group = TransformOptimizer(_two_groups(mine), tx, lr=1.0)
    got = _run_adapter(per_group, mine)
    assert max((g - e).abs().max().item() for e, g in zip(expected, got)) > 1e-6


def test_max_grad_norm_with_one_group_equals_the_clip_in_the_transform():
    params = _params()
    a, b = _clones(params), _clones(params)
    keyword = TransformOptimizer(a, FACTORIES["lamb"], max_grad_norm=0.5)
    inside = TransformOptimizer(b, holotx.chain(holotx.clip_by_global_norm(0.5), FACTORIES["lamb"]()))
    for x, y in zip(_run_adapter(keyword, a), _run_adapter(inside, b)):
        assert torch.equal(x, y)


def test_max_grad_norm_skips_params_without_grad_and_counts_every_group():
    """A param with no gradient neither steps nor counts in the norm; the norm is still
    over the other groups' gradients."""
    params = _params()
    mine = _clones(params)
    opt = TransformOptimizer(_two_groups(mine), FACTORIES["sgd"], max_grad_norm=0.5)
    grads = _grads(0, params)
    for p, g in zip(mine, grads):
        p.grad = g.clone()
    mine[1].grad = None
    before = mine[1].detach().clone()
    opt.step()
    assert torch.equal(mine[1], before)
    norm = torch.linalg.vector_norm(torch.stack([grads[i].norm() for i in (0, 2, 3)]))
    factor = 0.5 / norm
    for i in (0, 2, 3):  # SGD's first step with momentum: p - lr * g * factor
        expected = params[i].detach() - 1e-2 * (grads[i] * factor)
        torch.testing.assert_close(mine[i].detach(), expected, rtol=0, atol=1e-15)


def test_max_grad_norm_fused_equals_unfused():
    """fused=True takes the global norm too (a graph input), without falling back."""
    params = _params()
    a, b = _clones(params), _clones(params)
    unfused = TransformOptimizer(_two_groups(a), FACTORIES["adamw"], max_grad_norm=0.5)
    fused = TransformOptimizer(_two_groups(b), FACTORIES["adamw"], max_grad_norm=0.5, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no group falls back to unfused
        got = _run_adapter(fused, b)
    for x, y in zip(_run_adapter(unfused, a), got):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-13 * max(1.0, x.abs().max().item()))


def test_create_optimizer_passes_max_grad_norm_on():
    """create_optimizer's decay and no-decay groups are clipped together: the step equals
    that of the same optimizer without the clip given the gradients clipped by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1)).double()
    twin = copy.deepcopy(model)
    opt = create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1, max_grad_norm=0.1)
    ref = create_optimizer(twin, "adamw", lr=1e-2, weight_decay=0.1)
    assert len(opt.param_groups) == 2  # decay and no-decay
    for _ in range(3):
        x = torch.randn(8, 3, dtype=torch.float64)
        for m in (model, twin):
            m.zero_grad()
            m(x).pow(2).sum().backward()
        grads = [p.grad for p in twin.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert norm > 0.1
        for g in grads:
            g.mul_(0.1 / norm)
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):  # (the norms sum in another order)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14 * max(1.0, q.abs().max().item()))


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "1.0", [1.0]])
def test_max_grad_norm_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="max_grad_norm"):
        TransformOptimizer(_params(), holotx.adamw, max_grad_norm=bad)


def test_max_grad_norm_survives_pickling():
    import io

    params = _params()
    opt = TransformOptimizer(_two_groups(params), FACTORIES["adamw"], max_grad_norm=0.5)
    twin = copy.deepcopy(opt)
    assert twin._max_grad_norm == 0.5
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    assert buffer.tell() > 0


# -- always_adapt=False: trust ratios only where the weight decay is non-zero --------------


@pytest.mark.parametrize("factory", [holotx.lamb, holotx.lars, holotx.ralars])
def test_always_adapt_false_is_a_plain_step_without_weight_decay(factory):
    """Without weight decay, always_adapt=False is the rule with every trust ratio 1
    (trust_ratio_mask=False), bit for bit; with weight decay it changes nothing."""
    params = _params()
    plain = _run_functional(factory(1e-2, always_adapt=False), params)
    masked = _run_functional(factory(1e-2, trust_ratio_mask=False), params)
    adapted = _run_functional(factory(1e-2), params)
    assert all(torch.equal(x, y) for x, y in zip(plain, masked))
    assert any(not torch.equal(x, y) for x, y in zip(plain, adapted))
    decayed = _run_functional(factory(1e-2, weight_decay=0.1, always_adapt=False), params)
    default = _run_functional(factory(1e-2, weight_decay=0.1), params)
    assert all(torch.equal(x, y) for x, y in zip(decayed, default))


def test_lamb_always_adapt_false_without_decay_is_adam():
    """apex's and timm's LAMB without decay is Adam: equal to torch.optim.Adam."""
    params = _params()
    mine = _run_functional(holotx.lamb(1e-2, always_adapt=False), params)
    ref = _clones(params)
    opt = torch.optim.Adam(ref, lr=1e-2)
    for x, y in zip(mine, _run_adapter(opt, ref)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)


def test_always_adapt_false_in_the_frameworks_groups():
    """The HF Trainer's and timm's groups carry only weight_decay: with always_adapt=False
    the no-decay group steps without trust ratios, the decay group with them."""
    params = _params()
    mine = _clones(params)
    groups = [{"params": mine[:2], "weight_decay": 0.1}, {"params": mine[2:], "weight_decay": 0.0}]
    opt = TransformOptimizer(groups, holotx.lamb, lr=1e-2, always_adapt=False)
    got = _run_adapter(opt, mine)

    # Each group's functional run, with the gradients the adapter's params got.
    def split_run(tx, idx):
        ps = [params[i].detach().clone() for i in idx]
        state = tx.init(ps)
        for k in range(STEPS):
            grads = _grads(k, params)
            updates, state = tx.update([grads[i] for i in idx], state, ps)
            ps = holotx.apply_updates(ps, updates)
        return ps

    decay = split_run(holotx.lamb(1e-2, weight_decay=0.1), [0, 1])
    plain = split_run(holotx.lamb(1e-2, trust_ratio_mask=False), [2, 3])
    for x, y in zip(decay + plain, got):  # (the adapter applies the ratio with the lr: rounding)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-14 * max(1.0, x.abs().max().item()))


def test_always_adapt_is_checked():
    with pytest.raises(ValueError, match="always_adapt"):
        holotx.lamb(always_adapt="no")


def test_max_grad_norm_with_state_dtype_clips_the_upcast_gradients():
    """bfloat16 params with float32 state: the norm is over the gradients as the
    transform sees them (upcast), as one group with the clip in its chain computes it."""
    params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    a = [torch.nn.Parameter(p.detach().clone()) for p in params]
    b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    keyword = TransformOptimizer(_two_groups(a), FACTORIES["adamw"], max_grad_norm=0.5,
                                 state_dtype=torch.float32)
    inside = TransformOptimizer(b, holotx.chain(holotx.clip_by_global_norm(0.5), FACTORIES["adamw"]()),
                                state_dtype=torch.float32)
    for k in range(STEPS):
        for pa, pb, g in zip(a, b, _grads(k, params)):
            pa.grad = g.to(torch.bfloat16)
            pb.grad = g.to(torch.bfloat16)
        keyword.step()
        inside.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_max_grad_norm_under_torch_compile_equals_eager():
    params = _params()
    a, b = _clones(params), _clones(params)
    eager = TransformOptimizer(_two_groups(a), FACTORIES["adamw"], max_grad_norm=0.5)
    compiled = TransformOptimizer(_two_groups(b), FACTORIES["adamw"], max_grad_norm=0.5)
    step = torch.compile(compiled.step, backend="eager")
    for k in range(3):
        for pa, pb, g in zip(a, b, _grads(k, params)):
            pa.grad = g
            pb.grad = g.clone()
        eager.step()
        step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-14 * max(1.0, x.abs().max().item()))
