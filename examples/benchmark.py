"""Per-step cost of holotx optimizers beside torch.optim and Holocron, measured side by side.

    python examples/benchmark.py                       # AdamW, SGD, RAdam; both parameter sets
    python examples/benchmark.py --optimizers holocron --sets resnet50   # Holocron's eight
    python examples/benchmark.py --optimizers wrappers --sets resnet50   # Lookahead, Scout
    python examples/benchmark.py --threads 1 --sets resnet50 --optimizers adamw lamb
    python examples/benchmark.py --threads 1 --sets tiny --no-compile   # fixed cost per step
    python examples/benchmark.py --sets resnet50 --no-compile --optimizers adamw lars \
        --batch-bytes 0 2097152 8388608   # the adapter with eager CPU batches of several sizes
    python examples/benchmark.py --sets resnet50 --no-compile --optimizers lars --peak-memory

For each parameter set (a ResNet-50-shaped list of 161 float32 tensors, 25.6 M values;
1000 small tensors, 5 M values; and "tiny", 10 tensors of 1,000 values, a small model whose
step is fixed cost: run it with ``--threads 1``) and each optimizer, it prints the median ms per step
of torch.optim's implementations (for-loop, foreach, fused, where torch has them), of
Holocron's own class (pylocron 0.3.0, where it has one and it is installed), of kozistr's
pytorch-optimizer (4.1.0, its defaults but the learning rate; where it has the algorithm
and is installed, as ``make`` does), and of holotx's paths:

- pure: ``updates, state = tx.update(...)`` then ``apply_updates``: nothing is mutated;
- donated: the same code told it owns the state and grads (``donate=True``), in place;
- adapter: :class:`holotx.adapters.TransformOptimizer` over the same factory, grads in
  ``.grad`` (it donates its state, not the grads: one fresh buffer per param per step);
  "donate_grads": the same letting the step use the ``.grad`` tensors as scratch, as the
  donated functional step does; "adapter, fused": ``fused=True`` (flat buffers and one
  compiled step; its first step, which compiles, in brackets; a rule without a flat path
  runs unfused there); with ``--adapter-compiled``, also ``torch.compile(opt.step)``;
- flat compiled: the donated step compiled with ``torch.compile`` over one flat buffer per
  dtype (:class:`holotx.flat.FlatLayout`), for elementwise rules; flat segmented compiled:
  the same over a buffer aligned to rows of 256 values, passing ``segments=`` so that
  trust ratios (LARS, LAMB, RaLars), TAdam's weights, AdamP's cosines (per output channel)
  and Scout's coherence reduce per tensor; list compiled (``--list-compiled``, for the
  rules with per-tensor reductions): over the list of tensors, which the compiler unrolls.
  Their first (compiling) step time is in brackets, compiled without inductor's on-disk
  cache unless ``--warm-compile-cache``.

Ratios ("x ref") are to torch's fused kernel, or to Holocron's class where torch has none,
and to the memory-traffic floor. The floor is the time of the passes over memory the rule
cannot do without (AdamW reads p, g, m, v and writes p, m, v: 28 B per float32 param in
one pass; LAMB needs a second pass after its per-tensor norms: 40 B), done by the simplest
kernels with that traffic, compiled by the same compiler and timed interleaved with the
rows, with the same statistic (:func:`floor_step`). The floor row's "x ref" is its ratio
to the same reference as the other rows (torch's fused kernel where torch has one, else
Holocron's class); AdamW's row gives the floor as a ratio to torch's fused AdamW, which
moves its 28 B/param. With ``--no-compile`` the floor is
modelled instead, as the bytes over a bandwidth measured once (:func:`measure_bandwidth`).

With ``--peak-memory`` each eager row also gives the most memory that the tensors its
step's ops return anew take at once ("fresh MiB", one more step run under
:func:`peak_fresh_bytes`): the buffers a step allocates on top of params, grads and state
(a pure step's new params and state included; temporaries inside one kernel are not seen).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import inspect
import itertools
import statistics
import sys
import time
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch._inductor.config
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import holotx
from holotx import executor
from holotx.flat import COMPILE_OPTIONS, FlatLayout, host_decisions, make_step


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 values)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return [*shapes, (1000, 2048), (1000,)]


def small_shapes(n: int = 1000, total: int = 5_000_000) -> list[tuple[int, ...]]:
    """``n`` small tensors of varied sizes (1-D to 3-D) adding up to about ``total`` values."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(n, generator=gen) + 0.05
    sizes = (weights / weights.sum() * total).round().clamp(min=1).long().tolist()
    shapes: list[tuple[int, ...]] = []
    for i, s in enumerate(sizes):
        if i % 3 == 0:
            shapes.append((s,))
        elif i % 3 == 1 and s % 4 == 0:
            shapes.append((4, s // 4))
        else:
            shapes.append((s,))
    return shapes


def tiny_shapes() -> list[tuple[int, ...]]:
    """10 tensors of 1,000 values: a small model (a functional or meta-learning user's),
    where the fixed cost of a step, not memory traffic, sets its time."""
    return [(1000,)] * 10


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "small": small_shapes,
    "tiny": tiny_shapes,
}


def holocron_optim() -> Any | None:
    """Holocron's ``holocron.optim`` (pylocron 0.3.0), imported without running the
    package's ``__init__`` (which needs torchvision), or ``None`` if it is not installed."""
    if "holocron" not in sys.modules:
        spec = importlib.util.find_spec("holocron")
        if spec is None or spec.submodule_search_locations is None:
            return None
        package = types.ModuleType("holocron")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["holocron"] = package
    return importlib.import_module("holocron.optim")


def _holocron(name: str, **kwargs: Any) -> Callable[..., torch.optim.Optimizer] | None:
    optim = holocron_optim()
    if optim is None:
        return None
    return lambda ps: getattr(optim, name)(ps, **kwargs)


def _holocron_wrapper(name: str) -> Callable[..., torch.optim.Optimizer] | None:
    """Holocron's ``name`` wrapper (default sync rate and period) around torch's AdamW."""
    optim = holocron_optim()
    if optim is None:
        return None
    return lambda ps: getattr(optim, name)(torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2))


def pytorch_optimizer() -> Any | None:
    """kozistr's ``pytorch_optimizer`` (4.1.0, a test dependency), or ``None`` if it is not
    installed."""
    try:
        return importlib.import_module("pytorch_optimizer")
    except ImportError:
        return None


def _kozistr(name: str, **kwargs: Any) -> Callable[..., torch.optim.Optimizer] | None:
    """pytorch-optimizer's ``name`` with its own defaults but ``kwargs``."""
    module = pytorch_optimizer()
    if module is None:
        return None
    return lambda ps: getattr(module, name)(ps, **kwargs)


def _kozistr_lookahead() -> Callable[..., torch.optim.Optimizer] | None:
    """pytorch-optimizer's Lookahead (k=6, alpha=0.5, as holotx's defaults) around torch's AdamW."""
    module = pytorch_optimizer()
    if module is None:
        return None
    return lambda ps: module.Lookahead(torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2), k=6, alpha=0.5)


@dataclass(frozen=True)
class Algorithm:
    name: str
    holotx: partial[holotx.GradientTransformation]
    """holotx's factory and hyperparameters: ``algo.holotx()`` is the transform, and the
    adapter is ``TransformOptimizer(params, algo.holotx.func, **hyperparameters)``."""
    torch: Callable[..., torch.optim.Optimizer] | None
    torch_variants: tuple[str, ...]
    passes: tuple[tuple[tuple[int, int], ...], ...]
    """The fewest passes over memory the rule allows, per step of its period: for each
    pass, how many param-sized float32 buffers it reads and how many of those it writes.
    One pass for an elementwise rule (AdamW reads p, g, m, v and writes p, m, v: (4, 3));
    for a per-tensor reduction (a norm) before the update, a first pass that reduces (and
    updates the moments) and a second that reads them again. The memory floor is the time
    of the simplest compiled kernels doing exactly these passes (:func:`floor_step`)."""
    holocron: Callable[[], Callable[..., torch.optim.Optimizer] | None] = lambda: None
    """Holocron's own class for the same algorithm, if any (built lazily: pylocron is optional)."""
    peer: Callable[[], Callable[..., torch.optim.Optimizer] | None] = lambda: None
    """kozistr's pytorch-optimizer class for the same algorithm, if any (optional too)."""
    per_tensor: bool = False
    """The rule reduces over each tensor (norms, sums, cosines): it cannot run on one flat
    buffer as if it were a single tensor. Its fastest path is compiled over the list, or
    over an aligned flat buffer with segments where the rule supports them."""
    segments: bool = False
    """The per-tensor reductions (trust ratios, TAdam's weights, AdamP's cosines, Scout's coherence) run
    on an aligned flat buffer given ``segments=`` (:meth:`holotx.flat.FlatLayout.segments`)."""

    @property
    def period(self) -> int:
        """Steps after which the rule repeats (a wrapper's sync period): time is the mean
        over whole periods, so a synchronising step counts as often as it happens."""
        return len(self.passes)

    @property
    def bytes_per_param(self) -> float:
        """float32 bytes moved per parameter and step by :attr:`passes` (mean over a period)."""
        return 4 * sum(r + w for step in self.passes for r, w in step) / self.period


ONE_PASS = (((4, 3),),)
"""Read p, g and two moments, write p and the moments: 28 B/param (AdamW, torch's fused kernel)."""
TWO_PASSES = (((4, 2), (3, 1)),)
"""A per-tensor reduction before the update (LAMB, RaLars, AdamP): read p, g, m, v, write
m, v and reduce; then read p, m, v and write p. 40 B/param."""

ALGORITHMS: dict[str, Algorithm] = {
    "adamw": Algorithm("AdamW", partial(holotx.adamw, 1e-3, weight_decay=1e-2),
                       lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, **kw),
                       ("for-loop", "foreach", "fused"), ONE_PASS),
    "adam": Algorithm("Adam", partial(holotx.adam, 1e-3),
                      lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw),
                      ("for-loop", "foreach", "fused"), ONE_PASS),
    "sgd": Algorithm("SGD momentum", partial(holotx.sgd, 1e-3, momentum=0.9),
                     lambda ps, **kw: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **kw),
                     ("for-loop", "foreach", "fused"), (((3, 2),),)),
    "radam": Algorithm("RAdam", partial(holotx.radam, 1e-3),
                       lambda ps, **kw: torch.optim.RAdam(ps, lr=1e-3, **kw),
                       ("for-loop", "foreach"), ONE_PASS),
    # Holocron's eight, default hyperparameters (LARS with momentum, so it keeps a buffer).
    "lars": Algorithm("LARS", partial(holotx.lars, 1e-3, momentum=0.9), None, (), (((2, 0), (3, 2)),),
                      lambda: _holocron("LARS", lr=1e-3, momentum=0.9),
                      lambda: _kozistr("LARS", lr=1e-3, momentum=0.9), per_tensor=True, segments=True),
    "lamb": Algorithm("LAMB", partial(holotx.lamb, 1e-3), None, (), TWO_PASSES,
                      lambda: _holocron("LAMB", lr=1e-3), lambda: _kozistr("Lamb", lr=1e-3),
                      per_tensor=True, segments=True),
    "ralars": Algorithm("RaLars", partial(holotx.ralars, 1e-3), None, (), TWO_PASSES,
                        lambda: _holocron("RaLars", lr=1e-3), per_tensor=True, segments=True),
    "tadam": Algorithm("TAdam", partial(holotx.tadam, 1e-3), None, (), (((3, 0), (4, 3)),),
                       lambda: _holocron("TAdam", lr=1e-3), per_tensor=True, segments=True),
    "adabelief": Algorithm("AdaBelief", partial(holotx.adabelief, 1e-3), None, (), ONE_PASS,
                           lambda: _holocron("AdaBelief", lr=1e-3), lambda: _kozistr("AdaBelief", lr=1e-3)),
    "adamp": Algorithm("AdamP", partial(holotx.adamp, 1e-3), None, (), TWO_PASSES,
                       lambda: _holocron("AdamP", lr=1e-3), lambda: _kozistr("AdamP", lr=1e-3),
                       per_tensor=True, segments=True),
    "adan": Algorithm("Adan", partial(holotx.adan, 1e-3), None, (), (((6, 5),),),
                      lambda: _holocron("Adan", lr=1e-3), lambda: _kozistr("Adan", lr=1e-3)),
    "ademamix": Algorithm("AdEMAMix", partial(holotx.ademamix, 1e-3), None, (), (((5, 4),),),
                          lambda: _holocron("AdEMAMix", lr=1e-3), lambda: _kozistr("AdEMAMix", lr=1e-3)),
    # The wrappers around AdamW, default sync rate 0.5 and period 6. Lookahead's sync step
    # also reads and writes the slow weights, in AdamW's pass: (5, 4) once in 6 steps,
    # 28 + 8/6 B. Scout reads and writes four running statistics every step, (8, 7), and
    # its sync step needs a second pass over the params and slow weights once the rate, a
    # reduction over all tensors, is known: (5 * 60 + 76) / 6 B.
    "lookahead_adamw": Algorithm("Lookahead(AdamW)",
                                 partial(holotx.lookahead, holotx.adamw(1e-3, weight_decay=1e-2)), None, (),
                                 (((4, 3),),) * 5 + (((5, 4),),), lambda: _holocron_wrapper("Lookahead"),
                                 _kozistr_lookahead),
    "scout_adamw": Algorithm("Scout(AdamW)", partial(holotx.scout, holotx.adamw(1e-3, weight_decay=1e-2)),
                             None, (), (((8, 7),),) * 5 + (((8, 7), (2, 2)),),
                             lambda: _holocron_wrapper("Scout"), per_tensor=True, segments=True),
}

SEGMENT_ROW = 256
"""Values per row of an aligned flat buffer: each tensor is padded to whole rows (0.2% more
memory on the ResNet-50 set) so that per-tensor norms are sums over rows."""

HOLOCRON_EIGHT = ["lars", "lamb", "ralars", "tadam", "adabelief", "adamp", "adan", "ademamix"]
WRAPPERS = ["lookahead_adamw", "scout_adamw"]

TORCH_FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure_bandwidth(numel: int, repeats: int = 9) -> float:
    """Bytes per second, the best of ``a += b`` and ``a.copy_(b)`` over two buffers of
    ``2 * numel`` float32 values each, measured once: the floor's model without a
    compiler (``--no-compile``), and the figure printed in each set's title.

    It is a coarse model: measured once, at one moment of a noisy machine, with eager
    kernels of two or three streams, it was up to 1.4x off the time of the optimizers
    it was compared with (a compiled AdamW ran at 0.73x "its floor"). With a compiler the
    floor is instead timed as kernels (:func:`floor_step`), interleaved with the rows.
    """
    a, b = torch.rand(2 * numel), torch.rand(2 * numel)
    best = 0.0
    for op, bytes_moved in ((lambda: a.add_(b), 3 * 4 * 2 * numel), (lambda: a.copy_(b), 2 * 4 * 2 * numel)):
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            best = max(best, bytes_moved / (time.perf_counter() - t0))
    return best


def _traffic_kernel(reads: int, writes: int) -> Callable[..., object]:
    """``kernel(*buffers)``: reads ``reads`` buffers once and writes the first ``writes``
    of them in place (``x += sum of the read-only ones``, or ``+= 1`` when every buffer is
    written), or with ``writes=0`` reduces them to one number: the least a fused loop
    doing that traffic can do. Its own code object, so that dynamo keeps each kind's graph
    apart."""

    def kernel(*xs):
        rest = xs[writes:]
        total = sum(rest[1:], rest[0]) if rest else 1.0
        if writes == 0:
            return total.sum()
        for x in xs[:writes]:
            x.add_(total)
        return None

    return types.FunctionType(kernel.__code__.replace(), kernel.__globals__, f"traffic_{reads}r{writes}w",
                              kernel.__defaults__, kernel.__closure__)


def floor_step(algo: Algorithm, numel: int) -> Callable[[], object]:
    """The memory floor of ``algo`` as a step to time beside its implementations: each of
    its passes (:attr:`Algorithm.passes`) as the simplest kernel with that traffic over
    ``numel``-value float32 buffers, compiled by inductor as the rule's own compiled step
    is (one loop, or one per buffer where a pass writes every buffer it reads: the same
    bytes), each pass a graph of its own so that two passes stay two. Every kernel is
    compiled here, so that a sync step's pass is not compiled inside a timed step. Timed
    interleaved with the rule and with the same statistic, it is what the machine, its
    caches and this compiler give for exactly those bytes at that moment."""
    buffers = [torch.rand(numel) for _ in range(max(r for step in algo.passes for r, _ in step))]
    kernels = {rw: torch.compile(_traffic_kernel(*rw), fullgraph=True, dynamic=False)
               for step in algo.passes for rw in step}
    for (r, _), kernel in kernels.items():
        kernel(*buffers[:r])
    steps = itertools.cycle(algo.passes)

    def step() -> None:
        for r, w in next(steps):
            kernels[(r, w)](*buffers[:r])

    return step


def make_tensors(shapes, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    return params, grads


def torch_step(algo: Algorithm, variant: str, shapes) -> Callable[[], object]:
    params, grads = make_tensors(shapes)
    params = [p.requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return algo.torch(params, **TORCH_FLAGS[variant]).step


def holocron_step(algo: Algorithm, shapes) -> Callable[[], object]:
    params, grads = make_tensors(shapes)
    params = [p.requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g  # no weight decay here, so Holocron's LARS leaves p.grad alone
    return algo.holocron()(params).step


def peer_step(algo: Algorithm, shapes) -> Callable[[], object]:
    params, grads = make_tensors(shapes)
    params = [p.requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return algo.peer()(params).step


def holotx_step(algo: Algorithm, path: str, shapes) -> Callable[[], object]:
    params, grads = make_tensors(shapes)
    tx = algo.holotx()
    if path == "pure":
        step_fn = make_step(tx)
        box = [params, tx.init(params)]

        def step():
            box[0], box[1] = step_fn(box[0], grads, box[1])

        return step
    # The donated step writes the state in place, but a leaf may come back anew (TAdam's
    # weight sums): the next step takes the state returned.
    layout, extra = None, {}
    if path == "flat segmented compiled":
        layout = FlatLayout(params, align=SEGMENT_ROW)
        extra = {"segments": layout.segments()}
    elif path == "flat compiled":
        layout = FlatLayout(params)
    if layout is not None:
        params, grads = layout.flatten(params), layout.flatten(grads)
    if path in ("donated", "list compiled", "flat segmented compiled", "flat compiled"):
        step_fn = make_step(tx, donate=True)
        if path != "donated":
            options = {} if layout is None else {"options": COMPILE_OPTIONS}
            step_fn = torch.compile(step_fn, **options)
        box = [tx.init(params)]
        # Compiled, the host decisions (Lookahead's and Scout's sync flags) are made before
        # the graph, which then has one version that synchronises and one that does not.
        decide = path != "donated"

        def donated_step():
            decisions = host_decisions(tx, box[0], params) if decide else None
            _, box[0] = step_fn(params, grads, box[0], decisions=decisions, **extra)

        return donated_step
    raise ValueError(path)


def adapter_step(algo: Algorithm, compiled: bool, shapes, **options: Any) -> Callable[[], object]:
    """A step of :class:`holotx.adapters.TransformOptimizer` built as a user would: the
    factory and its hyperparameters (one param group), the grads in ``.grad``; with
    ``compiled``, ``torch.compile(opt.step)``; ``options`` such as ``donate_grads``."""
    from holotx.adapters import TransformOptimizer

    params, grads = make_tensors(shapes)
    params = [p.requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    factory = algo.holotx.func
    hyperparams = inspect.signature(factory).bind(*algo.holotx.args, **algo.holotx.keywords).arguments
    step = TransformOptimizer(params, factory, **hyperparams, **options).step
    return torch.compile(step) if compiled else step


def with_batch_bytes(step: Callable[[], object], batch_bytes: int) -> Callable[[], object]:
    """``step`` run with the executor's eager CPU batches of ``batch_bytes`` per buffer
    (0: one batch of every leaf), set before each call so that rows with other sizes can
    be interleaved with it."""
    size = batch_bytes or 1 << 62

    def stepped() -> object:
        previous, executor.CACHE_BATCH_BYTES = executor.CACHE_BATCH_BYTES, size
        try:
            return step()
        finally:
            executor.CACHE_BATCH_BYTES = previous

    return stepped


class _FreshBytes(TorchDispatchMode):
    """Counts the storage of every tensor an op returns in memory none of its operands
    had (not an in-place or ``out=`` result, nor a view), for as long as the tensor object
    returned lives (a view of it that outlives it is not followed: an approximation, close
    for an optimizer step's buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {x.untyped_storage().data_ptr() for x in pytree.tree_leaves((args, kwargs))
                if isinstance(x, torch.Tensor)}
        for x in pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in seen:
                seen.add(x.untyped_storage().data_ptr())
                size = x.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(x, self._freed, size)
        return out

    def _freed(self, size: int) -> None:
        self.live -= size


def peak_fresh_bytes(step: Callable[[], object]) -> int:
    """The most bytes of tensors made by one call of ``step`` alive at once (eager steps
    only: a compiled one would compile again under the counting mode)."""
    counter = _FreshBytes()
    with counter:
        step()
    gc.collect()
    return counter.peak


def median_ms(step: Callable[[], object], steps: int, warmup: int, period: int = 1) -> float:
    """The median over ``steps`` timings of the mean time per step over ``period`` steps."""
    for _ in range(warmup * period):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(period):
            step()
        times.append((time.perf_counter() - t0) / period)
    return statistics.median(times) * 1e3


def measure(steps_by_label: dict[str, Callable[[], object]], steps: int, warmup: int,
            rounds: int, period: int = 1) -> dict[str, tuple[float, float]]:
    """{label: (first-call seconds, best over rounds of the median ms per step)}.

    Rounds interleave the implementations, so a slow spell of the machine does not land
    on one of them only."""
    first: dict[str, float] = {}
    for label, step in steps_by_label.items():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        step()
        first[label] = time.perf_counter() - t0
    best = dict.fromkeys(steps_by_label, float("inf"))
    for _ in range(rounds):
        for label, step in steps_by_label.items():
            best[label] = min(best[label], median_ms(step, steps, warmup, period))
    return {label: (first[label], best[label]) for label in steps_by_label}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(PARAM_SETS), choices=list(PARAM_SETS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd", "radam"],
                        choices=[*ALGORITHMS, "holocron", "wrappers"],
                        help="'holocron': Holocron's eight; 'wrappers': Lookahead and Scout around AdamW")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best median counts")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled paths")
    parser.add_argument("--batch-bytes", type=int, nargs="+", default=[],
                        help="also time the adapter with eager CPU batches of leaves of these many bytes "
                             "per buffer (0: no batches), interleaved with the other rows")
    parser.add_argument("--list-compiled", action="store_true",
                        help="also time a per-tensor rule's donated step compiled over the list of tensors")
    parser.add_argument("--adapter-compiled", action="store_true",
                        help="also time torch.compile(opt.step) of the adapter (slow to compile)")
    parser.add_argument("--peak-memory", action="store_true",
                        help="also give each eager row's peak of fresh tensors in one step (MiB)")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="let inductor reuse its on-disk cache (first steps then look cheaper)")
    args = parser.parse_args(argv)
    for group, members in (("holocron", HOLOCRON_EIGHT), ("wrappers", WRAPPERS)):
        if group in args.optimizers:
            i = args.optimizers.index(group)
            args.optimizers[i:i + 1] = members
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        # First-step times are those of a first run on a fresh machine unless asked otherwise.
        with torch._inductor.config.patch(force_disable_caches=not args.warm_compile_cache), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, holotx {holotx.__version__}, {args.threads} thread(s)")
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        bandwidth = measure_bandwidth(numel)
        print(f"\n{set_name}: {len(shapes)} float32 tensors, {numel / 1e6:.2f} M values; "
              f"measured bandwidth {bandwidth / 1e9:.1f} GB/s")
        header = (f"{'optimizer':<16} {'implementation':<31} {'ms/step':>8} {'x ref':>8} "
                  f"{'x floor':>8}  " + ("fresh MiB  " if args.peak_memory else "") + "first step")
        print(header)
        print("-" * len(header))
        for key in args.optimizers:
            algo = ALGORITHMS[key]
            model_floor_ms = algo.bytes_per_param * numel / bandwidth * 1e3
            steps_by_label = {f"torch {v}": torch_step(algo, v, shapes)
                              for v in (algo.torch_variants if algo.torch else ())}
            if algo.holocron() is not None:
                steps_by_label["Holocron (pylocron)"] = holocron_step(algo, shapes)
            if algo.peer() is not None:
                steps_by_label["pytorch-optimizer"] = peer_step(algo, shapes)
            fastest = ("flat segmented compiled" if algo.segments else
                       "list compiled" if algo.per_tensor else "flat compiled")
            compiled = [] if args.no_compile else [fastest]
            if args.list_compiled and algo.per_tensor and not args.no_compile and fastest != "list compiled":
                compiled.append("list compiled")
            for path in ["pure", "donated", *compiled]:
                steps_by_label[f"holotx {path}"] = holotx_step(algo, path, shapes)
            steps_by_label["holotx adapter"] = adapter_step(algo, False, shapes)
            steps_by_label["holotx adapter, donate_grads"] = adapter_step(algo, False, shapes,
                                                                          donate_grads=True)
            if not args.no_compile:
                steps_by_label["holotx adapter, fused"] = adapter_step(algo, False, shapes, fused=True)
            if args.adapter_compiled:
                steps_by_label["holotx adapter compiled"] = adapter_step(algo, True, shapes)
            for batch_bytes in args.batch_bytes:
                mib = batch_bytes % (1 << 20) == 0
                size = f"{batch_bytes >> 20} MiB" if mib else f"{batch_bytes / 1024:g} KiB"
                label = f"adapter, batches {size}" if batch_bytes else "adapter, no batches"
                steps_by_label[f"holotx {label}"] = with_batch_bytes(adapter_step(algo, False, shapes),
                                                                     batch_bytes)
            if not args.no_compile:
                steps_by_label["memory floor"] = floor_step(algo, numel)
            results = measure(steps_by_label, args.steps, args.warmup, args.rounds, algo.period)
            fresh = {label: peak_fresh_bytes(step) / 2**20 for label, step in steps_by_label.items()
                     if args.peak_memory and label not in ("memory floor", "holotx adapter, fused")
                     and "compiled" not in label}
            del steps_by_label
            measured_floor = results.pop("memory floor", None)
            floor_ms = measured_floor[1] if measured_floor else model_floor_ms
            rows = [(label, ms, first) for label, (first, ms) in results.items()]
            fused = next((ms for label, ms, _ in rows if label == "torch fused"), None)
            reference = fused or next((ms for label, ms, _ in rows if label.startswith("Holocron")), None)
            for label, ms, first in rows:
                vs_fused = f"{ms / reference:7.2f}x" if reference else f"{'-':>8}"
                first_s = f"[{first:.2f} s]" if "compiled" in label or "fused" in label else ""
                mib = fresh.get(label)
                memory = "" if not args.peak_memory else (
                    f"{'-':>9}  " if mib is None else f"{mib:9.{3 if mib < 10 else 1}f}  ")
                print(f"{algo.name:<16} {label:<31} {ms:8.{_decimals(ms)}f} {vs_fused} "
                      f"{ms / floor_ms:7.2f}x  {memory}{first_s}")
            how = (f"timed as kernels: {algo.bytes_per_param * numel / floor_ms / 1e6:.1f} GB/s"
                   if measured_floor else "modelled from the measured bandwidth")
            vs_fused = f"{floor_ms / reference:7.2f}x" if reference else f"{'-':>8}"
            print(f"{algo.name:<16} {'memory floor':<31} {floor_ms:8.{_decimals(floor_ms)}f} {vs_fused}"
                  f"          ({algo.bytes_per_param:.3g} B/param) {how}")


def _decimals(ms: float) -> int:
    """Three decimals below a millisecond (the tiny set's steps), two above."""
    return 3 if ms < 1 else 2


if __name__ == "__main__":
    main()
