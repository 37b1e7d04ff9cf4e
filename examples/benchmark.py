"""Per-step cost of holotx optimizers beside torch.optim, measured side by side.

    python examples/benchmark.py                       # both parameter sets, 2 threads
    python examples/benchmark.py --threads 1 --sets resnet50 --optimizers adamw

For each parameter set (a ResNet-50-shaped list of 161 float32 tensors, 25.6 M values;
and 1000 small tensors, 5 M values) and each optimizer, it prints the median ms per step
of torch.optim's implementations (for-loop, foreach, fused, where torch has them) and of
holotx's paths:

- pure: ``updates, state = tx.update(...)`` then ``apply_updates``: nothing is mutated;
- donated: the same code told it owns the state and grads (``donate=True``), in place;
- flat compiled: the donated step compiled with ``torch.compile`` over one flat buffer per
  dtype (:class:`holotx.flat.FlatLayout`), its first (compiling) step time in brackets.

Ratios are to torch's fused kernel and to the memory-traffic floor: the bytes an optimizer
must move per parameter (AdamW reads p, g, m, v and writes p, m, v: 28 B in float32)
times the number of parameters, divided by a bandwidth this script measures itself
(``out = a + b`` over buffers larger than any cache, best of several runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import holotx
from holotx.flat import FlatLayout, make_step


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


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "small": small_shapes,
}


@dataclass(frozen=True)
class Algorithm:
    name: str
    holotx: Callable[[], holotx.GradientTransformation]
    torch: Callable[..., torch.optim.Optimizer] | None
    torch_variants: tuple[str, ...]
    bytes_per_param: int
    """float32 bytes moved per parameter by a one-pass implementation."""


ALGORITHMS: dict[str, Algorithm] = {
    "adamw": Algorithm("AdamW", lambda: holotx.adamw(1e-3, weight_decay=1e-2),
                       lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, **kw),
                       ("for-loop", "foreach", "fused"), 28),
    "adam": Algorithm("Adam", lambda: holotx.adam(1e-3),
                      lambda ps, **kw: torch.optim.Adam(ps, lr=1e-3, **kw),
                      ("for-loop", "foreach", "fused"), 28),
    "sgd": Algorithm("SGD momentum", lambda: holotx.sgd(1e-3, momentum=0.9),
                     lambda ps, **kw: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **kw),
                     ("for-loop", "foreach", "fused"), 20),
    "radam": Algorithm("RAdam", lambda: holotx.radam(1e-3),
                       lambda ps, **kw: torch.optim.RAdam(ps, lr=1e-3, **kw),
                       ("for-loop", "foreach"), 28),
}

TORCH_FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure_bandwidth(numel: int, repeats: int = 7) -> float:
    """Bytes per second of ``out = a + b`` (two reads, one write) over big float32 buffers."""
    n = max(numel, 32_000_000)
    a, b, out = torch.rand(n), torch.rand(n), torch.empty(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 3 * 4 * n / best


def time_steps(step: Callable[[], object], steps: int, warmup: int) -> tuple[float, float]:
    """(first-call seconds, median ms over ``steps`` timed calls after ``warmup``)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) * 1e3


def make_tensors(shapes, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    return params, grads


def bench_torch(algo: Algorithm, variant: str, shapes, steps, warmup):
    params, grads = make_tensors(shapes)
    params = [p.requires_grad_() for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = algo.torch(params, **TORCH_FLAGS[variant])
    return time_steps(opt.step, steps, warmup)


def bench_holotx(algo: Algorithm, path: str, shapes, steps, warmup):
    params, grads = make_tensors(shapes)
    tx = algo.holotx()
    if path == "pure":
        step_fn = make_step(tx)
        box = [params, tx.init(params)]

        def step():
            box[0], box[1] = step_fn(box[0], grads, box[1])

        return time_steps(step, steps, warmup)
    if path == "donated":
        step_fn = make_step(tx, donate=True)
        state = tx.init(params)
        return time_steps(lambda: step_fn(params, grads, state), steps, warmup)
    if path == "flat compiled":
        layout = FlatLayout(params)
        flat_params, flat_grads = layout.flatten(params), layout.flatten(grads)
        state = tx.init(flat_params)
        torch._dynamo.reset()
        step_fn = torch.compile(make_step(tx, donate=True))
        return time_steps(lambda: step_fn(flat_params, flat_grads, state), steps, warmup)
    raise ValueError(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(PARAM_SETS), choices=list(PARAM_SETS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd", "radam"],
                        choices=list(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled paths")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, holotx {holotx.__version__}, {args.threads} thread(s)")
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        bandwidth = measure_bandwidth(numel * 4)
        print(f"\n{set_name}: {len(shapes)} float32 tensors, {numel / 1e6:.2f} M values; "
              f"measured bandwidth {bandwidth / 1e9:.1f} GB/s")
        header = (f"{'optimizer':<13} {'implementation':<24} {'ms/step':>8} {'x fused':>8} "
                  f"{'x floor':>8}  first step")
        print(header)
        print("-" * len(header))
        for key in args.optimizers:
            algo = ALGORITHMS[key]
            floor_ms = algo.bytes_per_param * numel / bandwidth * 1e3
            rows: list[tuple[str, float, float]] = []
            for variant in algo.torch_variants if algo.torch else ():
                first, ms = bench_torch(algo, variant, shapes, args.steps, args.warmup)
                rows.append((f"torch {variant}", ms, first))
            paths = ["pure", "donated"] + ([] if args.no_compile else ["flat compiled"])
            for path in paths:
                first, ms = bench_holotx(algo, path, shapes, args.steps, args.warmup)
                rows.append((f"holotx {path}", ms, first))
            fused = next((ms for label, ms, _ in rows if label == "torch fused"), None)
            for label, ms, first in rows:
                vs_fused = f"{ms / fused:7.2f}x" if fused else f"{'-':>8}"
                first_s = f"[{first:.2f} s]" if "compiled" in label else ""
                print(f"{algo.name:<13} {label:<24} {ms:8.2f} {vs_fused} {ms / floor_ms:7.2f}x  {first_s}")
            print(f"{algo.name:<13} {'memory floor':<24} {floor_ms:8.2f}          "
                  f"({algo.bytes_per_param} B/param)")


if __name__ == "__main__":
    main()
