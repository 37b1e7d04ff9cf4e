"""The torch 2.13 gaps holotx works around, one test per entry of
:data:`holotx.executor.TORCH_GAPS`. Each test shows the gap (it fails once torch fixes
it, saying which fallback can go) and that holotx's op gives the right value anyway.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch.func import grad, vmap

from holotx import executor, ops

TESTED = {
    "foreach_under_vmap", "foreach_tensor_scalar_backward", "foreach_add_tensor_under_compile",
    "inplace_under_functorch_grad", "foreach_copy_dtensor", "foreach_addcmul_scalarlist_dtensor",
    "interpreter_stack_under_dynamo", "foreach_python_scalar_cpu",
}


def test_every_gap_has_its_test():
    assert set(executor.TORCH_GAPS) == TESTED


def test_foreach_under_vmap():
    """When this fails, vmap can keep the foreach kernels (``Plan.foreach``)."""
    xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        vmap(lambda x: torch._foreach_mul([x], 2.0)[0])(xs)
    assert torch.equal(vmap(lambda x: ops.mul([x], 2.0)[0])(xs), xs * 2)


def test_foreach_tensor_scalar_backward():
    """When this fails, a tensor scalar that requires grad can take the foreach kernels
    (``ops._tensor_scalar_ok``)."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2)]
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inconsistent range"):
        sum(o.sum() for o in torch._foreach_mul(xs, s)).backward()
    sum(o.sum() for o in ops.mul(xs, s)).backward()
    # d/ds sum(s x) = sum(x): a sum, so its rounding is bounded by the sum of |x|.
    scale = sum(x.detach().abs().sum() for x in xs)
    assert torch.allclose(s.grad, sum(x.detach().sum() for x in xs), rtol=0, atol=1e-14 * scale)


def _conversions(fn) -> int:
    """How many dtype conversions (``aten::_to_copy``) running ``fn`` makes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::_to_copy" for e in prof.events())


@pytest.mark.parametrize("op", ["mul", "add", "div"])
def test_foreach_python_scalar_cpu(op):
    """On the CPU, a foreach op given a Python scalar converts it to the list's dtype
    once per tensor; given a 0-d tensor of that dtype, never. When this fails, the cached
    0-d scalars of ``ops._cpu_scalar`` can go. holotx's op gives the same values with
    none of those conversions."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(100, generator=gen) for _ in range(5)]
    torch_op = getattr(torch, f"_foreach_{op}")
    assert _conversions(lambda: torch_op(xs, 0.3)) == len(xs), "torch converts Python scalars once now"
    holotx_op = {"mul": ops.mul, "add": ops.add_scalar, "div": ops.div}[op]
    assert _conversions(lambda: holotx_op(xs, 0.3)) == 0
    for ours, theirs in zip(holotx_op(xs, 0.3), torch_op(xs, 0.3)):
        assert torch.equal(ours, theirs)
    # One value per tensor, all equal (bias corrections at a common step): the same.
    if op == "mul":
        assert _conversions(lambda: ops.mul(xs, [0.3] * len(xs))) == 0
        for ours, theirs in zip(ops.mul(xs, [0.3] * len(xs)), torch_op(xs, [0.3] * len(xs))):
            assert torch.equal(ours, theirs)


def test_foreach_add_tensor_under_compile():
    """Compiled by inductor, ``_foreach_add(list, 0-d tensor)`` keeps the first value it
    saw (no guard, no recompile: later values are silently ignored). When this fails, the
    compiled path can keep the foreach kernel (``ops._add_scalar``)."""
    xs = [torch.zeros(3, dtype=torch.float32)]
    results = {}
    for name, fn in (("torch", lambda xs, t: torch._foreach_add(xs, t)),
                     ("holotx", lambda xs, t: ops.add_scalar(xs, t))):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="inductor", fullgraph=True)
        results[name] = [compiled(xs, torch.tensor(v, dtype=torch.float64))[0] for v in (1.0, 2.0)]
    stale = torch.equal(results["torch"][1], torch.ones(3))
    assert stale, "torch's compiled foreach add takes the new value now"
    assert torch.equal(results["holotx"][0], torch.ones(3))
    assert torch.equal(results["holotx"][1], torch.full((3,), 2.0))


def test_inplace_under_functorch_grad():
    """When this fails, in-place ops can run under torch.func.grad (``Plan.may_write``)."""
    v = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5

    def written_in_place(v):
        d = torch._foreach_sqrt([v])
        torch._foreach_div_(d, 2.0)
        return d[0].sum()

    expected = grad(lambda v: (v.sqrt() / 2).sum())(v)
    assert not torch.allclose(grad(written_in_place)(v), expected), "torch.func.grad is right now"

    def replaced(v):
        with executor.owned_step():  # a step that would write in place where allowed
            d = ops.sqrt([v])
            return ops.div_(d, 2.0)[0].sum()

    assert torch.allclose(grad(replaced)(v), expected, rtol=0, atol=1e-14 * expected.abs().max())


def test_interpreter_stack_under_dynamo():
    """When this fails, the plan can ask the interpreter stack under compile too."""
    import torch._dynamo.exc

    def asks(x):
        return x * (1 if torch._C._functorch.get_interpreter_stack() is None else 2)

    with pytest.raises(torch._dynamo.exc.Unsupported), \
            pytest.warns(UserWarning, match="Dynamo does not know"):
        torch.compile(asks, fullgraph=True, backend="eager")(torch.randn(2))
    torch._dynamo.reset()
    xs = [torch.randn(2)]
    assert torch.equal(torch.compile(lambda xs: ops.mul(xs, 2.0), fullgraph=True, backend="eager")(xs)[0],
                       xs[0] * 2)


def _dtensors(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    return [distribute_tensor(torch.arange(6.0).reshape(3, 2) + k, mesh, [Shard(0)]) for k in range(2)]


def test_foreach_copy_dtensor(one_process_mesh):
    """When this fails, drop the one-by-one DTensor branch of ``ops.copy``."""
    dst, src = _dtensors(one_process_mesh), _dtensors(one_process_mesh)
    with pytest.raises(NotImplementedError, match="_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    out = ops.copy(dst, [s * 2 for s in src])
    assert all(torch.equal(o.full_tensor(), 2 * s.full_tensor()) for o, s in zip(out, src))


def test_foreach_addcmul_scalarlist_dtensor(one_process_mesh):
    """When this fails, drop the DTensor condition on the foreach path of ``ops.addcmul``."""
    xs, a = _dtensors(one_process_mesh), _dtensors(one_process_mesh)
    with pytest.raises(NotImplementedError, match="_foreach_addcmul"):
        torch._foreach_addcmul(xs, a, a, [0.5, 0.25])
    out = ops.addcmul(xs, a, a, [0.5, 0.25])
    for o, x, y, v in zip(out, xs, a, [0.5, 0.25]):
        assert torch.equal(o.full_tensor(), x.full_tensor() + v * y.full_tensor() ** 2)
