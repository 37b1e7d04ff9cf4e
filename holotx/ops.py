"""Elementwise math over lists of tensors: one call, all leaves.

Each op takes lists of tensors (all leaves of a tree, or one device/dtype group of them),
scalars that are Python numbers or 0-d tensors, and an ``inplace`` flag. ``inplace=True``
is a permission, not an order: the op overwrites the first list when that is safe, and
the caller always uses the returned list. Transforms write their math once in these ops
and pass ``inplace=donate`` (or ``inplace=True`` for tensors they created themselves),
which is how the pure and the donated path share one implementation.

In-place is not safe, and is skipped, under ``torch.func.vmap`` (a batched operand cannot
be written into an unbatched tensor) and while autograd records the op (an in-place write
can destroy a value saved for backward; under ``torch.func.grad`` torch 2.13 then gives a
wrong gradient without an error, e.g. ``_foreach_sqrt`` then ``_foreach_div_``).

Dispatch: ``torch._foreach_*`` kernels where they apply; a loop of ordinary tensor ops
per leaf under vmap (foreach ops have no batching rule), where a foreach overload does not
accept a tensor scalar, and for a tensor scalar that requires grad (the backward of
``_foreach_mul(list, tensor)`` with respect to the tensor fails in torch 2.13). Both
compute the same formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number
from typing import Union

import torch
import torch._C._functorch as _functorch

Scalar = Union[float, int, torch.Tensor]
TensorList = list[torch.Tensor]

__all__ = [
    "accumulation_dtype",
    "add",
    "add_scalar",
    "addcdiv",
    "addcmul",
    "copy",
    "div",
    "div_into",
    "foreach_supported",
    "host_scalars_ok",
    "is_wrapper",
    "is_wrapper_type",
    "lerp",
    "maximum",
    "may_overwrite",
    "minimum",
    "mul",
    "mul_into",
    "norms",
    "realize",
    "sqrt",
    "sqrt_into",
    "sub_into",
    "sums",
]


def _functorch_transforms() -> set[object]:
    stack = _functorch.get_interpreter_stack()
    return {i.key() for i in stack} if stack else set()


def _under_vmap_eager() -> bool:
    return _functorch.TransformType.Vmap in _functorch_transforms()


def may_overwrite(xs: Sequence[torch.Tensor], inplace: bool) -> bool:
    """Whether an op given ``inplace`` may really write into ``xs``: not under vmap,
    and not while autograd records (a functorch grad transform, or grad mode with an
    operand that requires grad)."""
    if not inplace or not xs:
        return inplace
    if torch.compiler.is_compiling():
        if _functorch.is_batchedtensor(xs[0]):
            return False
    elif _functorch_transforms() - {_functorch.TransformType.Functionalize}:
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))


def foreach_supported(xs: Sequence[torch.Tensor]) -> bool:
    """Whether ``torch._foreach_*`` kernels can run on ``xs`` here (not under vmap)."""
    if not xs:
        return False
    if torch.compiler.is_compiling():
        # Dynamo cannot call the interpreter-stack query; a batched leaf is what matters.
        return not _functorch.is_batchedtensor(xs[0])
    return not _under_vmap_eager()


def is_wrapper(x: object) -> bool:
    """Whether ``x`` is a tensor subclass that wraps others (a ``DTensor``): it has no
    storage of its own to read, and no ``.tolist()``."""
    return is_wrapper_type(type(x))


def is_wrapper_type(cls: type) -> bool:
    """:func:`is_wrapper` for a class: a tensor subclass that flattens into inner tensors
    (what ``torch.utils._python_dispatch.is_traceable_wrapper_subclass`` asks of an
    instance, asked once of its class)."""
    return cls is not torch.Tensor and hasattr(cls, "__tensor_flatten__")


def realize(x: torch.Tensor) -> torch.Tensor:
    """A reduction's value as a plain tensor: a ``DTensor`` (a per-shard partial result) is
    brought to its whole-tensor value by its collective, so it can join plain per-step
    scalars and state (step counts, Scout's rate, TAdam's weights). Other tensors as
    they are."""
    return x.full_tensor() if is_wrapper(x) else x


def host_scalars_ok(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether per-step scalars may be read to Python here: plain eager mode (no compile,
    no functorch transform), on the CPU (no device sync), plain tensors (a ``DTensor``
    scalar is a collective's result, read through the collective), and nothing needs
    their gradient."""
    if torch.compiler.is_compiling() or _functorch.get_interpreter_stack():
        return False
    if any(t.device.type != "cpu" or is_wrapper(t) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _is_tensor(s: object) -> bool:
    return isinstance(s, torch.Tensor)


def _scalar_ok(s: object) -> bool:
    """Foreach ``Scalar`` overloads take numbers; 0-d tensors only where a Tensor overload exists."""
    return isinstance(s, Number)


def _tensor_scalar_ok(s: object) -> bool:
    """A scalar for the foreach ``Tensor`` overloads: a number, or a 0-d tensor (or a list
    of them, one per tensor) that does not need a gradient (their backward to the scalar
    is broken in torch 2.13)."""
    if isinstance(s, list):
        return not any(isinstance(x, torch.Tensor) and x.requires_grad for x in s)
    return not (isinstance(s, torch.Tensor) and s.requires_grad)


def _done(xs: TensorList, out: TensorList, inplace: bool) -> TensorList:
    return xs if inplace else list(out)


def mul(xs: TensorList, s: Scalar | TensorList, *, inplace: bool = False) -> TensorList:
    """``x * s`` for a scalar, a 0-d tensor, or a list of tensors ``s`` (same shapes, or
    0-d: one scalar per ``x``)."""
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs) and _tensor_scalar_ok(s):
        fn = torch._foreach_mul_ if inplace else torch._foreach_mul
        return _done(xs, fn(xs, s), inplace)
    ss = s if isinstance(s, list) else [s] * len(xs)
    return [x.mul_(y) if inplace else x * y for x, y in zip(xs, ss)]


def div(xs: TensorList, s: Scalar | TensorList, *, inplace: bool = False) -> TensorList:
    """``x / s`` for a scalar, a 0-d tensor, or a list of tensors ``s``."""
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs) and _tensor_scalar_ok(s):
        fn = torch._foreach_div_ if inplace else torch._foreach_div
        return _done(xs, fn(xs, s), inplace)
    ss = s if isinstance(s, list) else [s] * len(xs)
    return [x.div_(y) if inplace else x / y for x, y in zip(xs, ss)]


def add_scalar(xs: TensorList, s: Scalar | TensorList, *, inplace: bool = False) -> TensorList:
    """``x + s`` for a scalar or 0-d tensor ``s``, or a list of 0-d tensors, one per ``x``."""
    inplace = may_overwrite(xs, inplace)
    if isinstance(s, list):
        if foreach_supported(xs) and _tensor_scalar_ok(s):
            fn = torch._foreach_add_ if inplace else torch._foreach_add
            return _done(xs, fn(xs, s), inplace)
        return [x.add_(y) if inplace else x + y for x, y in zip(xs, s)]
    # Compiled, _foreach_add(list, tensor) bakes the tensor's value into the graph (a
    # recompile when it changes); the per-leaf form fuses to the same code.
    tensor_under_compile = isinstance(s, torch.Tensor) and torch.compiler.is_compiling()
    if foreach_supported(xs) and _tensor_scalar_ok(s) and not tensor_under_compile:
        fn = torch._foreach_add_ if inplace else torch._foreach_add
        return _done(xs, fn(xs, s), inplace)
    return [x.add_(s) if inplace else x + s for x in xs]


def add(xs: TensorList, ys: TensorList, alpha: Scalar = 1, *, inplace: bool = False) -> TensorList:
    """``x + alpha * y``."""
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs) and _scalar_ok(alpha):
        fn = torch._foreach_add_ if inplace else torch._foreach_add
        return _done(xs, fn(xs, ys, alpha=alpha), inplace)
    if _is_tensor(alpha):
        return [x.add_(y * alpha) if inplace else x + y * alpha for x, y in zip(xs, ys)]
    return [x.add_(y, alpha=alpha) if inplace else x.add(y, alpha=alpha) for x, y in zip(xs, ys)]


def lerp(xs: TensorList, ys: TensorList, weight: Scalar | list[float] | TensorList, *,
         inplace: bool = False) -> TensorList:
    """``x + weight * (y - x)``, e.g. an EMA ``m <- lerp(m, g, 1 - beta)``. ``weight`` is a
    scalar, or one per tensor (Python floats, or 0-d tensors)."""
    inplace = may_overwrite(xs, inplace)
    per_tensor = isinstance(weight, list)
    if foreach_supported(xs) and (_scalar_ok(weight) or (per_tensor and all(map(_scalar_ok, weight)))):
        fn = torch._foreach_lerp_ if inplace else torch._foreach_lerp
        return _done(xs, fn(xs, ys, weight), inplace)
    ws = weight if per_tensor else [weight] * len(xs)
    return [x.lerp_(y, w) if inplace else torch.lerp(x, y, w) for x, y, w in zip(xs, ys, ws)]


def addcmul(xs: TensorList, a: TensorList, b: TensorList, value: Scalar | list[Scalar] = 1, *,
            inplace: bool = False) -> TensorList:
    """``x + value * a * b``; ``value`` a scalar, or one per tensor (Python numbers or 0-d
    tensors)."""
    inplace = may_overwrite(xs, inplace)
    per_tensor = isinstance(value, list)
    # _foreach_addcmul's ScalarList overload has no DTensor sharding rule in torch 2.13
    # (pinned in tests/test_torch_workarounds.py).
    foreach = foreach_supported(xs) and not (per_tensor and is_wrapper(xs[0]))
    if foreach and (_scalar_ok(value) or (per_tensor and all(map(_scalar_ok, value)))):
        fn = torch._foreach_addcmul_ if inplace else torch._foreach_addcmul
        return _done(xs, fn(xs, a, b, value), inplace)
    if per_tensor:
        return [x.add_(p * q * v) if inplace else x + p * q * v for x, p, q, v in zip(xs, a, b, value)]
    if _is_tensor(value):
        return [x.add_(p * q * value) if inplace else x + p * q * value for x, p, q in zip(xs, a, b)]
    return [x.addcmul_(p, q, value=value) if inplace else torch.addcmul(x, p, q, value=value)
            for x, p, q in zip(xs, a, b)]


def addcdiv(xs: TensorList, a: TensorList, b: TensorList, value: Scalar = 1, *,
            inplace: bool = False) -> TensorList:
    """``x + value * a / b``."""
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs) and _scalar_ok(value):
        fn = torch._foreach_addcdiv_ if inplace else torch._foreach_addcdiv
        return _done(xs, fn(xs, a, b, value), inplace)
    if _is_tensor(value):
        return [x.add_(p / q * value) if inplace else x + p / q * value for x, p, q in zip(xs, a, b)]
    return [x.addcdiv_(p, q, value=value) if inplace else torch.addcdiv(x, p, q, value=value)
            for x, p, q in zip(xs, a, b)]


def _differentiated(xs: Sequence[torch.Tensor]) -> bool:
    """Whether autograd records ops on ``xs`` here: a functorch grad or jvp transform,
    or grad mode with an operand that requires grad."""
    if not torch.compiler.is_compiling() and _functorch_transforms() & {
            _functorch.TransformType.Grad, _functorch.TransformType.Jvp}:
        return True
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def sqrt(xs: TensorList, *, inplace: bool = False) -> TensorList:
    """``sqrt(x)``; where differentiated, with a derivative of 0 (not infinity) at 0.

    A second moment that is exactly 0 (a zero gradient: a dead ReLU unit, a masked
    entry) has a zero derivative itself, and the infinite derivative of the square root
    there would make it 0 * inf = NaN in a meta-gradient, as in every Adam-like rule.
    0 is the subgradient of ``sqrt(v) = |g| sqrt(1 - b2)`` at ``g = 0``. Values are
    unchanged."""
    if _differentiated(xs):
        # Only exact zeros are replaced (a NaN or a negative input still gives NaN).
        return [torch.where(x == 0, 0.0, torch.where(x == 0, 1.0, x).sqrt()) for x in xs]
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs):
        fn = torch._foreach_sqrt_ if inplace else torch._foreach_sqrt
        return _done(xs, fn(xs), inplace)
    return [x.sqrt_() if inplace else x.sqrt() for x in xs]


def _may_write_into(out: TensorList | None, *inputs: Sequence[object]) -> bool:
    """Whether an ``*_into`` op may write its result into ``out``: given, safe to
    overwrite, in eager mode (compiled, the compiler plans its own buffers, and a write
    into an input would become an extra pass at the end of the graph), and not recorded
    by autograd (an ``out=`` op has no derivative)."""
    if out is None or torch.compiler.is_compiling() or not may_overwrite(out, True):
        return False
    return not _differentiated([x for xs in inputs for x in xs if isinstance(x, torch.Tensor)])


def sub_into(xs: TensorList, ys: TensorList, out: TensorList | None) -> TensorList:
    """``x - y``, written into ``out`` (buffers the caller may overwrite; ``out`` may be
    ``xs``) where that is safe in eager mode, else fresh (see :func:`sqrt_into`)."""
    if not _may_write_into(out, xs, ys):
        return add(xs, ys, alpha=-1)
    return [torch.sub(x, y, out=o) for x, y, o in zip(xs, ys, out)]


def mul_into(xs: TensorList, s: Scalar | list[float] | TensorList, out: TensorList | None) -> TensorList:
    """``x * s`` (``s`` a scalar or one per tensor), written into ``out`` where that is
    safe in eager mode, else fresh (see :func:`sqrt_into`)."""
    if not _may_write_into(out, xs, s if isinstance(s, list) else [s]):
        return mul(xs, s)
    ss = s if isinstance(s, list) else [s] * len(xs)
    return [torch.mul(x, y, out=o) for x, y, o in zip(xs, ss, out)]


def sqrt_into(xs: TensorList, out: TensorList) -> TensorList:
    """``sqrt(x)`` written into ``out`` (buffers the caller may overwrite, e.g. donated
    updates) where that is safe, else into fresh tensors: no scratch allocation, which on
    a CPU also spares the page faults of a fresh buffer. Compiled, a fresh result (see
    :func:`_may_write_into`)."""
    if not _may_write_into(out, xs):
        return sqrt(xs)
    return [torch.sqrt(x, out=o) for x, o in zip(xs, out)]


def maximum(xs: TensorList, ys: TensorList, *, inplace: bool = False) -> TensorList:
    """Elementwise ``max(x, y)`` (NaN propagates, as in ``torch.maximum``)."""
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs):
        fn = torch._foreach_maximum_ if inplace else torch._foreach_maximum
        return _done(xs, fn(xs, ys), inplace)
    return [x.copy_(torch.maximum(x, y)) if inplace else torch.maximum(x, y) for x, y in zip(xs, ys)]


def minimum(xs: TensorList, ys: TensorList, *, inplace: bool = False) -> TensorList:
    """Elementwise ``min(x, y)`` (NaN propagates, as in ``torch.minimum``)."""
    inplace = may_overwrite(xs, inplace)
    if foreach_supported(xs):
        fn = torch._foreach_minimum_ if inplace else torch._foreach_minimum
        return _done(xs, fn(xs, ys), inplace)
    return [x.copy_(torch.minimum(x, y)) if inplace else torch.minimum(x, y) for x, y in zip(xs, ys)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to reduce tensors of ``dtype`` in: float32 for half types (their own
    precision is too coarse for a sum of millions of values), else ``None`` (their own)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def norms(xs: TensorList, dtype: torch.dtype | None = None, ord: float = 2) -> TensorList:
    """The ``ord``-norm (default L2) of each tensor, as 0-d tensors (no host sync),
    accumulated and returned in ``dtype`` if given (e.g. float32 for bfloat16 tensors).
    ``ord=1`` of a non-negative tensor is its sum."""
    if foreach_supported(xs):
        return list(torch._foreach_norm(xs, ord, dtype))
    return [torch.linalg.vector_norm(x, ord, dtype=dtype) for x in xs]


def sums(xs: TensorList, dtype: torch.dtype | None = None) -> TensorList:
    """The sum of each tensor, as 0-d tensors (no host sync), accumulated in ``dtype``
    if given. There is no foreach sum; a per-tensor sum is a plain reduction, cheaper
    than a 1-norm."""
    return [x.sum(dtype=dtype) for x in xs]


def copy(dst: TensorList, src: TensorList) -> TensorList:
    """Write ``src`` into ``dst`` and return ``dst``. (``_foreach_copy_`` has no DTensor
    sharding rule in torch 2.13: DTensors are copied one by one; pinned in
    tests/test_torch_workarounds.py.)"""
    if foreach_supported(dst) and not is_wrapper(dst[0]):
        torch._foreach_copy_(dst, src)
        return dst
    return [d.copy_(s) for d, s in zip(dst, src)]


def div_into(xs: TensorList, ys: TensorList, *, inplace: bool = False) -> TensorList:
    """``x / y``, written into ``ys`` when ``inplace`` allows (the divisor is usually a
    scratch denominator): one buffer fewer than :func:`div`. On a CPU each leaf gets
    ``torch.div(x, y, out=y)``; foreach kernels have no ``out=``, so elsewhere this is a
    fresh foreach division."""
    # An out= op has no derivative: not while autograd records the numerators either.
    if may_overwrite(ys, inplace) and ys[0].device.type == "cpu" and not _differentiated(xs):
        return [torch.div(x, y, out=y) for x, y in zip(xs, ys)]
    return div(xs, ys)
