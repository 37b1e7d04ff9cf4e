"""Elementwise math over lists of tensors: one call, all leaves.

Each op takes lists of tensors (all leaves of a tree, or one device/dtype group of them)
and scalars that are Python numbers or 0-d tensors. The math layer writes a rule in these
ops and says only what it means:

* ``mul(xs, s)``, ``lerp(xs, ys, w)``, ... compute a new value and leave every operand as
  it was;
* ``mul_(xs, s)``, ``lerp_(xs, ys, w)``, ... compute the new value *of* ``xs``: the math
  uses the returned list and never reads the old ``xs`` again (``mu = ops.lerp_(mu, g,
  1 - b1)``). Whether the result is written into ``xs``'s memory is not the math's
  decision: :mod:`holotx.executor` allows it only for buffers that belong to the step
  (donated by the caller, or made by the step), never under vmap or while autograd
  records;
* ``sqrt_into(xs, dead)``, ``sub_into``, ``mul_into``, ``div_into`` and ``copy_into``
  name a list ``dead`` whose values the math no longer needs: the result may take its
  memory (``out=``), as the executor allows.

The pure and the in-place path are one formula: an in-place foreach kernel runs the same
arithmetic as its out-of-place twin, so the results are bit-identical.

Dispatch (decided by the executor's plan, see ``executor.TORCH_GAPS``): ``torch._foreach_*``
kernels where they apply; one ordinary op per leaf under vmap, where a foreach overload
does not take a tensor scalar, and for a tensor scalar that requires grad.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Number
from typing import Union

import torch

from holotx.executor import Plan, current, is_wrapper, is_wrapper_type

Scalar = Union[float, int, torch.Tensor]
TensorList = list[torch.Tensor]

__all__ = [
    "accumulation_dtype",
    "add",
    "add_",
    "add_scalar",
    "add_scalar_",
    "addcdiv",
    "addcdiv_",
    "addcmul",
    "addcmul_",
    "copy",
    "copy_into",
    "div",
    "div_",
    "div_into",
    "dots",
    "fill",
    "fill_",
    "foreach_supported",
    "host_scalars_ok",
    "in_memory",
    "into",
    "is_wrapper",
    "is_wrapper_type",
    "lerp",
    "lerp_",
    "lerp_rows",
    "lerp_rows_",
    "maximum",
    "maximum_",
    "minimum",
    "minimum_",
    "mul",
    "mul_",
    "mul_into",
    "mul_rows",
    "mul_rows_",
    "norms",
    "realize",
    "sqrt",
    "sqrt_",
    "sqrt_into",
    "state_as_updates",
    "store",
    "sub_into",
    "sums",
]


def foreach_supported(xs: Sequence[torch.Tensor]) -> bool:
    """Whether ``torch._foreach_*`` kernels can run on ``xs`` here (not under vmap)."""
    return current().foreach(xs)


def realize(x: torch.Tensor) -> torch.Tensor:
    """A reduction's value as a plain tensor: a ``DTensor`` (a per-shard partial result) is
    brought to its whole-tensor value by its collective, so it can join plain per-step
    scalars and state (step counts, Scout's rate, TAdam's weights). Other tensors as
    they are."""
    return x.full_tensor() if is_wrapper(x) else x


def in_memory(x: torch.Tensor) -> torch.Tensor:
    """``x``, a short vector of per-tensor values that every element of its tensor reads
    (a trust ratio), computed once into memory. Compiled, inductor would otherwise inline
    it into the loop over the elements and evaluate it again for every vector of them (two
    square roots and a division per 16 values: a quarter of LAMB's compiled step); a
    scatter it always stores, so that loop loads the value instead. Eager, ``x`` itself."""
    if not current().compiling:
        return x
    return torch.zeros_like(x).index_add_(0, torch.arange(x.shape[0], device=x.device), x)


def host_scalars_ok(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether per-step scalars may be read to Python here: eager, no functorch
    transform, on the CPU (no device sync), plain tensors (a ``DTensor`` scalar is a
    collective's result, read through the collective), and nothing needs their gradient."""
    return current().host_scalars(tensors)


def _scalar_ok(s: object) -> bool:
    """Foreach ``Scalar`` overloads take numbers; 0-d tensors only where a Tensor overload exists."""
    return isinstance(s, Number)


def _tensor_scalar_ok(s: object) -> bool:
    """A scalar for the foreach ``Tensor`` overloads: a number, or a 0-d tensor (or a list
    of them, one per tensor) that does not need a gradient (TORCH_GAPS:
    foreach_tensor_scalar_backward)."""
    if isinstance(s, list):
        return not any(isinstance(x, torch.Tensor) and x.requires_grad for x in s)
    return not (isinstance(s, torch.Tensor) and s.requires_grad)


def _done(xs: TensorList, out: TensorList, inplace: bool) -> TensorList:
    return xs if inplace else list(out)


def _pair(pure):
    """The public pure op and its replacing twin, from one implementation
    ``fn(plan, inplace, xs, *args)``."""
    name = pure.__name__.lstrip("_")

    def op(xs, *args, **kwargs):
        return pure(current(), False, xs, *args, **kwargs)

    def op_(xs, *args, **kwargs):
        plan = current()
        inplace = plan.may_write(xs)
        out = pure(plan, inplace, xs, *args, **kwargs)
        # Written in place under compile, the result is the list it was given, not a new
        # list of the same tensors: there what may be written is known by that list's
        # identity (Plan.mark_state), and the next replacing op must find it. (Eager
        # steps go by the tensors' ids and need no such check per op.)
        if inplace and plan.compiling and len(out) == len(xs) and all(o is x for o, x in zip(out, xs)):
            return xs
        return out

    op.__name__, op_.__name__ = name, name + "_"
    op.__qualname__, op_.__qualname__ = name, name + "_"
    op.__doc__ = pure.__doc__
    op_.__doc__ = (f"The new value of ``xs`` by :func:`{name}`: the old ``xs`` is not read again, and "
                   "the executor decides whether the result is written into its memory.")
    return op, op_


_SCALARS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _cpu_scalar(plan: Plan, xs: TensorList, s: object) -> object:
    """``s`` for a foreach kernel: in plain eager mode on the CPU, a Python number (or a
    list of equal ones, one per tensor: bias corrections once every leaf has the same
    step count) becomes a 0-d tensor of the float32 or float64 lists' dtype (an int, of
    int64 lists: step counts), kept for reuse (TORCH_GAPS: foreach_python_scalar_cpu).
    The kernel computes with the same value (a Python scalar is taken in the lists'
    dtype), so the results are the same. Anything else as it is."""
    kind = type(s)
    if kind is list:
        # (list.count compares by ==: an int among equal floats has the same value, but a
        # -0.0 among 0.0s has another sign, which a product keeps)
        if not s or type(s[0]) is not float or s.count(s[0]) != len(s) or (
                not s[0] and len(set(map(repr, s))) > 1):
            return s
        s = s[0]
        kind = float
    elif kind is int:
        if abs(s) > 2**53:
            return s
    elif kind is not float:
        return s
    x = xs[0]
    dtype = x.dtype
    if not (dtype is torch.float32 or dtype is torch.float64 or (dtype is torch.int64 and kind is int)):
        return s
    if not plan.host_scalars((x,)):
        return s
    # (a zero's sign and a NaN are told apart by repr: 0.0 == -0.0, and a NaN equals nothing)
    key = (s, dtype) if s and s == s else (repr(s), dtype)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 512:  # a schedule's value changes at every step
            _SCALARS.clear()
        try:
            t = torch.scalar_tensor(s, dtype=dtype)  # (a third of torch.tensor's time)
        except RuntimeError:  # out of the dtype's range: torch.tensor rounds it to inf, as the kernel would
            t = torch.tensor(s, dtype=dtype)
        _SCALARS[key] = t
    return t


def _mul(plan: Plan, inplace: bool, xs: TensorList, s: Scalar | TensorList) -> TensorList:
    """``x * s`` for a scalar, a 0-d tensor, or a list of tensors ``s`` (same shapes, or
    0-d: one scalar per ``x``)."""
    if plan.foreach(xs) and _tensor_scalar_ok(s):
        fn = torch._foreach_mul_ if inplace else torch._foreach_mul
        return _done(xs, fn(xs, _cpu_scalar(plan, xs, s)), inplace)
    ss = s if isinstance(s, list) else [s] * len(xs)
    return [x.mul_(y) if inplace else x * y for x, y in zip(xs, ss)]


def _div(plan: Plan, inplace: bool, xs: TensorList, s: Scalar | TensorList) -> TensorList:
    """``x / s`` for a scalar, a 0-d tensor, or a list of tensors ``s``."""
    if plan.foreach(xs) and _tensor_scalar_ok(s):
        fn = torch._foreach_div_ if inplace else torch._foreach_div
        return _done(xs, fn(xs, _cpu_scalar(plan, xs, s)), inplace)
    ss = s if isinstance(s, list) else [s] * len(xs)
    return [x.div_(y) if inplace else x / y for x, y in zip(xs, ss)]


def _add_scalar(plan: Plan, inplace: bool, xs: TensorList, s: Scalar | TensorList) -> TensorList:
    """``x + s`` for a scalar or 0-d tensor ``s``, or a list of 0-d tensors, one per ``x``."""
    if plan.foreach(xs):
        fast = _cpu_scalar(plan, xs, s)
        if isinstance(fast, torch.Tensor) and fast is not s:
            # alpha= picks the Tensor overload; without it a 0-d tensor is read as a Scalar.
            fn = torch._foreach_add_ if inplace else torch._foreach_add
            return _done(xs, fn(xs, fast, alpha=1), inplace)
    if isinstance(s, list):
        if plan.foreach(xs) and _tensor_scalar_ok(s):
            fn = torch._foreach_add_ if inplace else torch._foreach_add
            return _done(xs, fn(xs, s), inplace)
        return [x.add_(y) if inplace else x + y for x, y in zip(xs, s)]
    # TORCH_GAPS: foreach_add_tensor_under_compile (the per-leaf form fuses to the same
    # code, and takes each step's value).
    tensor_under_compile = isinstance(s, torch.Tensor) and plan.compiling
    if plan.foreach(xs) and _tensor_scalar_ok(s) and not tensor_under_compile:
        fn = torch._foreach_add_ if inplace else torch._foreach_add
        return _done(xs, fn(xs, s), inplace)
    return [x.add_(s) if inplace else x + s for x in xs]


def _add(plan: Plan, inplace: bool, xs: TensorList, ys: TensorList, alpha: Scalar = 1) -> TensorList:
    """``x + alpha * y``."""
    if plan.foreach(xs) and _scalar_ok(alpha):
        fn = torch._foreach_add_ if inplace else torch._foreach_add
        return _done(xs, fn(xs, ys, alpha=alpha), inplace)
    if isinstance(alpha, torch.Tensor):
        return [x.add_(y * alpha) if inplace else x + y * alpha for x, y in zip(xs, ys)]
    return [x.add_(y, alpha=alpha) if inplace else x.add(y, alpha=alpha) for x, y in zip(xs, ys)]


def _lerp(plan: Plan, inplace: bool, xs: TensorList, ys: TensorList,
          weight: Scalar | list[float] | TensorList) -> TensorList:
    """``x + weight * (y - x)``, e.g. an EMA ``m <- lerp(m, g, 1 - beta)``. ``weight`` is a
    scalar, or one per tensor (Python floats, or 0-d tensors)."""
    per_tensor = isinstance(weight, list)
    if plan.foreach(xs) and (_scalar_ok(weight) or (per_tensor and all(map(_scalar_ok, weight)))):
        fn = torch._foreach_lerp_ if inplace else torch._foreach_lerp
        return _done(xs, fn(xs, ys, weight), inplace)
    ws = weight if per_tensor else [weight] * len(xs)
    return [_lerp_one(x, y, w, inplace) for x, y, w in zip(xs, ys, ws)]


def _lerp_one(x: torch.Tensor, y: torch.Tensor, w: Scalar, inplace: bool) -> torch.Tensor:
    """One leaf's lerp. A tensor weight must have the values' dtype (a per-step scalar is
    float64): it takes it, as a Python float weight is taken (rounded to the values'
    dtype); for half types the lerp runs in float32 and rounds once, as torch's kernels
    compute with a Python float weight (in float32, their opmath type)."""
    if isinstance(w, torch.Tensor) and w.dtype != x.dtype:
        if x.dtype in (torch.float16, torch.bfloat16):
            out = torch.lerp(x.float(), y.float(), w.float()).to(x.dtype)
            return x.copy_(out) if inplace else out
        w = w.to(x.dtype)
    return x.lerp_(y, w) if inplace else torch.lerp(x, y, w)


def _addcmul(plan: Plan, inplace: bool, xs: TensorList, a: TensorList, b: TensorList,
             value: Scalar | list[Scalar] = 1) -> TensorList:
    """``x + value * a * b``; ``value`` a scalar, or one per tensor (Python numbers or 0-d
    tensors)."""
    per_tensor = isinstance(value, list)
    # TORCH_GAPS: foreach_addcmul_scalarlist_dtensor.
    foreach = plan.foreach(xs) and not (per_tensor and is_wrapper(xs[0]))
    if foreach and (_scalar_ok(value) or (per_tensor and all(map(_scalar_ok, value)))):
        fn = torch._foreach_addcmul_ if inplace else torch._foreach_addcmul
        return _done(xs, fn(xs, a, b, value), inplace)
    if per_tensor:
        return [x.add_(p * q * v) if inplace else x + p * q * v for x, p, q, v in zip(xs, a, b, value)]
    if isinstance(value, torch.Tensor):
        return [x.add_(p * q * value) if inplace else x + p * q * value for x, p, q in zip(xs, a, b)]
    return [x.addcmul_(p, q, value=value) if inplace else torch.addcmul(x, p, q, value=value)
            for x, p, q in zip(xs, a, b)]


def _addcdiv(plan: Plan, inplace: bool, xs: TensorList, a: TensorList, b: TensorList,
             value: Scalar = 1) -> TensorList:
    """``x + value * a / b``."""
    if plan.foreach(xs) and _scalar_ok(value):
        fn = torch._foreach_addcdiv_ if inplace else torch._foreach_addcdiv
        return _done(xs, fn(xs, a, b, value), inplace)
    if isinstance(value, torch.Tensor):
        return [x.add_(p / q * value) if inplace else x + p / q * value for x, p, q in zip(xs, a, b)]
    return [x.addcdiv_(p, q, value=value) if inplace else torch.addcdiv(x, p, q, value=value)
            for x, p, q in zip(xs, a, b)]


def _sqrt(plan: Plan, inplace: bool, xs: TensorList) -> TensorList:
    """``sqrt(x)``; where differentiated, with a derivative of 0 (not infinity) at 0.

    A second moment that is exactly 0 (a zero gradient: a dead ReLU unit, a masked
    entry) has a zero derivative itself, and the infinite derivative of the square root
    there would make it 0 * inf = NaN in a meta-gradient, as in every Adam-like rule.
    0 is the subgradient of ``sqrt(v) = |g| sqrt(1 - b2)`` at ``g = 0``. Values are
    unchanged."""
    if plan.differentiated(xs):
        # Only exact zeros are replaced (a NaN or a negative input still gives NaN).
        return [torch.where(x == 0, 0.0, torch.where(x == 0, 1.0, x).sqrt()) for x in xs]
    if plan.foreach(xs):
        fn = torch._foreach_sqrt_ if inplace else torch._foreach_sqrt
        return _done(xs, fn(xs), inplace)
    return [x.sqrt_() if inplace else x.sqrt() for x in xs]


def _maximum(plan: Plan, inplace: bool, xs: TensorList, ys: TensorList) -> TensorList:
    """Elementwise ``max(x, y)`` (NaN propagates, as in ``torch.maximum``)."""
    if plan.foreach(xs):
        fn = torch._foreach_maximum_ if inplace else torch._foreach_maximum
        return _done(xs, fn(xs, ys), inplace)
    return [x.copy_(torch.maximum(x, y)) if inplace else torch.maximum(x, y) for x, y in zip(xs, ys)]


def _minimum(plan: Plan, inplace: bool, xs: TensorList, ys: TensorList) -> TensorList:
    """Elementwise ``min(x, y)`` (NaN propagates, as in ``torch.minimum``)."""
    if plan.foreach(xs):
        fn = torch._foreach_minimum_ if inplace else torch._foreach_minimum
        return _done(xs, fn(xs, ys), inplace)
    return [x.copy_(torch.minimum(x, y)) if inplace else torch.minimum(x, y) for x, y in zip(xs, ys)]


def _mul_rows(plan: Plan, inplace: bool, xs: TensorList, fs: TensorList) -> TensorList:
    """``x * f`` with each ``x`` seen as ``(rows, -1)`` and ``f`` of shape ``(rows, 1)``:
    one factor per row (per-tensor factors over an aligned flat buffer)."""
    del plan
    if inplace:
        for x, f in zip(xs, fs):
            if x.numel():  # an empty buffer has no rows to view
                x.view(f.shape[0], -1).mul_(f)
        return xs
    return [(x.reshape(f.shape[0], -1) * f).reshape(x.shape) if x.numel() else x.clone()
            for x, f in zip(xs, fs)]


def _lerp_rows(plan: Plan, inplace: bool, xs: TensorList, ys: TensorList, ws: TensorList) -> TensorList:
    """``x + w * (y - x)`` with ``x`` and ``y`` seen as ``(rows, -1)`` and ``w`` of shape
    ``(rows, 1)``: one weight per row (per-tensor weights over an aligned flat buffer).
    A ``w`` of another dtype than ``x`` (float32 weights for half-precision buffers, as a
    Python-float weight is kept by the per-tensor ops) is applied in its dtype, the result
    rounded once."""
    del plan
    out = []
    for x, y, w in zip(xs, ys, ws):
        if not x.numel():  # an empty buffer has no rows to view
            out.append(x if inplace else x.clone())
            continue
        x2, y2 = x.view(w.shape[0], -1), y.reshape(w.shape[0], -1)
        if w.dtype != x.dtype:
            value = torch.lerp(x2.to(w.dtype), y2.to(w.dtype), w).to(x.dtype)
            if inplace:
                x2.copy_(value)
                out.append(x)
            else:
                out.append(value.reshape(x.shape))
        elif inplace:
            x2.lerp_(y2, w)
            out.append(x)
        else:
            out.append(torch.lerp(x2, y2, w).reshape(x.shape))
    return xs if inplace else out


def _fill(plan: Plan, inplace: bool, xs: TensorList, value: float) -> TensorList:
    """Tensors like ``xs`` filled with ``value``."""
    del plan
    return [x.fill_(value) if inplace else torch.full_like(x, value) for x in xs]


mul, mul_ = _pair(_mul)
fill, fill_ = _pair(_fill)
mul_rows, mul_rows_ = _pair(_mul_rows)
div, div_ = _pair(_div)
add_scalar, add_scalar_ = _pair(_add_scalar)
add, add_ = _pair(_add)
lerp, lerp_ = _pair(_lerp)
lerp_rows, lerp_rows_ = _pair(_lerp_rows)
addcmul, addcmul_ = _pair(_addcmul)
addcdiv, addcdiv_ = _pair(_addcdiv)
sqrt, sqrt_ = _pair(_sqrt)
maximum, maximum_ = _pair(_maximum)
minimum, minimum_ = _pair(_minimum)


def sub_into(xs: TensorList, ys: TensorList, dead: TensorList | None) -> TensorList:
    """``x - y``, in the memory of ``dead`` (values the math no longer needs; may be
    ``xs``) where the executor allows, else fresh."""
    plan = current()
    if not plan.may_write_into(dead, xs, ys):
        return _add(plan, False, xs, ys, -1)
    return [torch.sub(x, y, out=o) for x, y, o in zip(xs, ys, dead)]


def mul_into(xs: TensorList, s: Scalar | list[float] | TensorList, dead: TensorList | None) -> TensorList:
    """``x * s`` (``s`` a scalar or one per tensor), in the memory of ``dead`` where the
    executor allows, else fresh."""
    plan = current()
    if not plan.may_write_into(dead, xs, s if isinstance(s, list) else [s]):
        return _mul(plan, False, xs, s)
    ss = s if isinstance(s, list) else [s] * len(xs)
    return [torch.mul(x, y, out=o) for x, y, o in zip(xs, ss, dead)]


def sqrt_into(xs: TensorList, dead: TensorList | None) -> TensorList:
    """``sqrt(x)`` in the memory of ``dead`` (e.g. incoming updates already read) where
    the executor allows, else fresh: no scratch allocation, which on a CPU also spares
    the page faults of a fresh buffer."""
    plan = current()
    if not plan.may_write_into(dead, xs):
        return _sqrt(plan, False, xs)
    return [torch.sqrt(x, out=o) for x, o in zip(xs, dead)]


def div_into(xs: TensorList, ys: TensorList) -> TensorList:
    """``x / y``, the divisor ``ys`` dead (usually a scratch denominator): its memory
    takes the quotient where the executor allows. On a CPU each leaf gets
    ``torch.div(x, y, out=y)``; foreach kernels have no ``out=``, so elsewhere this is a
    fresh foreach division."""
    plan = current()
    # An out= op has no derivative: not while autograd records the numerators either.
    if plan.may_write(ys) and ys[0].device.type == "cpu" and not plan.differentiated(xs):
        return [torch.div(x, y, out=y) for x, y in zip(xs, ys)]
    return _div(plan, False, xs, ys)


def copy_into(src: TensorList, dead: TensorList) -> TensorList:
    """A copy of ``src`` that shares no memory with it: written into ``dead`` where the
    executor allows, else fresh clones."""
    plan = current()
    if not plan.may_write(dead):
        return [x.clone() for x in src]
    return _copy(plan, dead, src)


def into(fn, *args: object, dead: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` for a torch function taking ``out=``, written into ``dead`` (one
    tensor whose value the math no longer needs) where the executor allows, else fresh."""
    if current().may_write_into([dead], [a for a in args if isinstance(a, torch.Tensor)]):
        return fn(*args, out=dead)
    return fn(*args)


def state_as_updates(values: TensorList, dead: TensorList) -> TensorList:
    """A transform's updates that are the value of its new state (a momentum buffer). The
    state tensors themselves in a pure step (the step made them, and its caller may
    share them, as optax's immutable arrays are shared), and in a step whose caller only
    reads the updates (``make_step``, the adapter: ``p += lr * u``). Where the caller
    donated the state and keeps the updates as its own (it may write into them, e.g. a
    flat grad buffer it refills), a copy: into ``dead`` (values no longer needed) where
    the executor allows, else fresh."""
    plan = current()
    if not plan.state_donated or plan.updates_read_only:
        return values
    return copy_into(values, dead)


def store(values: TensorList, dead: TensorList) -> TensorList:
    """``values``, written into ``dead`` where the executor allows (donated state keeps
    its buffers), else ``values`` as they are."""
    plan = current()
    if not plan.may_write(dead):
        return values
    return _copy(plan, dead, values)


def copy(dst: TensorList, src: TensorList) -> TensorList:
    """Write ``src`` into ``dst`` and return ``dst``: for a caller that owns ``dst`` (the
    adapter's wrappers), not for the math layer, whose writes the executor decides."""
    return _copy(current(), dst, src)


def _copy(plan: Plan, dst: TensorList, src: TensorList) -> TensorList:
    # TORCH_GAPS: foreach_copy_dtensor.
    if plan.foreach(dst) and not is_wrapper(dst[0]):
        torch._foreach_copy_(dst, src)
        return dst
    return [d.copy_(s) for d, s in zip(dst, src)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to reduce tensors of ``dtype`` in: float32 for half types (their own
    precision is too coarse for a sum of millions of values), else ``None`` (their own)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def norms(xs: TensorList, dtype: torch.dtype | None = None, ord: float = 2) -> TensorList:
    """The ``ord``-norm (default L2) of each tensor, as 0-d tensors (no host sync),
    accumulated and returned in ``dtype`` if given (e.g. float32 for bfloat16 tensors).
    ``ord=1`` of a non-negative tensor is its sum."""
    if current().foreach(xs):
        return list(torch._foreach_norm(xs, ord, dtype))
    return [torch.linalg.vector_norm(x, ord, dtype=dtype) for x in xs]


def dots(xs: TensorList, ys: TensorList, dtype: torch.dtype | None = None) -> TensorList:
    """The sum of ``x * y`` over each pair of tensors, as 0-d tensors (no host sync),
    computed in ``dtype`` if given (each value upcast before the product, as a foreach norm
    upcasts before squaring). One pass reading both and no product buffer: ``torch.dot``
    over the flattened tensors, or over a ``DTensor``'s local shards, whose dots sum to the
    whole tensor's (a partial result, as a norm's)."""
    if dtype is not None:
        xs, ys = [x.to(dtype) for x in xs], [y.to(dtype) for y in ys]
    if is_wrapper(xs[0]):
        return [_sharded_dot(x, y) for x, y in zip(xs, ys)]
    return [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]


def _sharded_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dot`` of two ``DTensor``s laid out alike: each rank's dot of its shards, pending a
    sum over the sharded mesh dimensions (``Partial``), replicated over the others. Any
    other pair (a partial operand, two layouts), the sum of the product."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if type(x) is not DTensor or type(y) is not DTensor or x.placements != y.placements \
            or any(p.is_partial() for p in x.placements):
        return (x * y).sum()
    local = torch.dot(x.to_local().reshape(-1), y.to_local().reshape(-1))
    placements = [Partial() if p.is_shard() else Replicate() for p in x.placements]
    return DTensor.from_local(local, x.device_mesh, placements, run_check=False)


def sums(xs: TensorList, dtype: torch.dtype | None = None) -> TensorList:
    """The sum of each tensor, as 0-d tensors (no host sync), accumulated in ``dtype``
    if given. There is no foreach sum; a per-tensor sum is a plain reduction, cheaper
    than a 1-norm."""
    return [x.sum(dtype=dtype) for x in xs]
