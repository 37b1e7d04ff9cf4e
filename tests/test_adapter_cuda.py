"""The adapter on a CUDA device: every algorithm and wrapper equals its CPU run, state on
the device (host counts on the CPU), bfloat16 with float32 state, checkpoints across
devices, GradScaler, compile. Skipped where there is no GPU."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import holotx
from holotx.adapters import LAMB, Lookahead, Scout, TransformOptimizer

pytestmark = pytest.mark.cuda

FACTORIES = ["sgd", "adam", "adamw", "radam", "lars", "lamb", "ralars", "tadam", "adabelief", "adamp", "adan",
             "ademamix"]
SHAPES = [(17, 5), (5,), (3, 4, 2)]


def _run(make, device, dtype=torch.float64, steps=9):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in SHAPES]
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad = None if (step + i) % 4 == 0 else g.to(device)
        opt.step()
    return [p.detach().cpu() for p in params], opt


@pytest.mark.parametrize("name", FACTORIES)
def test_every_factory_on_cuda_equals_cpu(name):
    make = lambda ps: TransformOptimizer(ps, getattr(holotx, name), lr=0.01, weight_decay=0.01)
    cpu, _ = _run(make, "cpu")
    cuda, opt = _run(make, "cuda")
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)
    p = opt.param_groups[0]["params"][0]
    for key, value in opt.state[p].items():
        assert value.device.type == "cuda", key


@pytest.mark.parametrize("wrapper", ["lookahead", "scout"])
def test_wrappers_on_cuda_equal_cpu(wrapper):
    tx = getattr(holotx, wrapper)(holotx.adamw(lr=0.01), 0.5, 3)
    cpu, _ = _run(lambda ps: TransformOptimizer(ps, tx), "cpu")
    cuda, opt = _run(lambda ps: TransformOptimizer(ps, tx), "cuda")
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)
    p = opt.param_groups[0]["params"][0]
    assert opt.state[p]["count"].device.type == "cpu"  # host counts: the sync is decided without a sync
    assert opt.state[p]["slow"].device.type == "cuda"


@pytest.mark.parametrize("cls", [Lookahead, Scout])
def test_optimizer_wrappers_on_cuda_equal_cpu(cls):
    make = lambda ps: cls(torch.optim.AdamW(ps, lr=0.01), 0.5, 3)
    cpu, _ = _run(make, "cpu")
    cuda, _ = _run(make, "cuda")
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)


def test_bfloat16_with_float32_state_on_cuda():
    make = lambda ps: LAMB(ps, lr=0.01, state_dtype=torch.float32)
    params, opt = _run(make, "cuda", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in params)
    p = opt.param_groups[0]["params"][0]
    assert opt.state[p]["mu"].dtype == torch.float32
    assert opt.state[p]["mu"].device.type == "cuda"


def test_checkpoint_moves_between_devices():
    make = lambda ps: TransformOptimizer(ps, holotx.adan, lr=0.01)
    _, opt = _run(make, "cuda", steps=4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    params = [p.detach().cpu().requires_grad_() for p in opt.param_groups[0]["params"]]
    cpu_opt = make(params)
    cpu_opt.load_state_dict(torch.load(buffer, weights_only=True))
    for p in params:
        assert all(v.device.type == "cpu" for v in cpu_opt.state[p].values())


def test_grad_scaler_on_cuda_skips_inf_steps():
    model = torch.nn.Linear(4, 2).cuda()
    opt = TransformOptimizer(model.parameters(), holotx.adamw, lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    x = torch.randn(8, 4, device="cuda")
    scaler.scale(model(x).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() < 2.0**8


def test_compiled_step_on_cuda_matches_eager():
    torch._dynamo.reset()
    make = lambda ps: TransformOptimizer(ps, holotx.adamw, lr=0.01)
    torch.manual_seed(0)
    a = [torch.randn(s, device="cuda", requires_grad=True) for s in SHAPES]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a, opt_b = make(a), make(b)
    step = torch.compile(opt_a.step)
    for _ in range(4):
        for p, q in zip(a, b):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        step()
        opt_b.step()
        for group in (*opt_a.param_groups, *opt_b.param_groups):
            group["lr"] *= 0.9
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
