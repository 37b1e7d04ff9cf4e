"""A learning-rate sweep of AdamW in one batched run with ``torch.func.vmap``.

    python examples/sweep.py                          # 16 learning rates, writes sweep.png
    python examples/sweep.py --time --threads 2       # also time it against 16 sequential runs
    python examples/sweep.py --fallback-cost          # what vmap costs the optimizer step
    python examples/sweep.py --quick --dtype float64  # a few steps, for the tests

``holotx.inject_hyperparams(holotx.adamw)(lr=..., weight_decay=...)`` keeps the learning
rate and the weight decay in the optimizer state as 0-d tensors, so a batch of
configurations is a batch of states: ``vmap`` over ``init`` writes one learning rate into
each (log-spaced, default 1e-4 to 1), and a vmapped training step then trains all 16 copies
of the same initial MLP on the same mini-batches of two noisy spirals (generated here from
a seed; nothing is downloaded). The script checks the batched sweep against 16 separate
runs of plain ``holotx.adamw(lr=...)``, prints a table and the best configuration (lowest
test log-loss), and draws the 16 training-loss curves into a PNG with matplotlib (the
``examples`` extra, which ``make venv`` installs; ``--plot ''`` for none): a log y-axis,
dark blue for the smallest learning rate to yellow-green for the largest, the best one
thicker, a legend of the learning rates, the model and data under the title.

The check: batched and separate runs agree to a few ulps per step (a batched matmul may sum
in another order), and stay close where training is stable: at the default 500 steps, up
to lr 1.4e-2, identical in float32 and within 4e-13 in float64. From lr ~0.05 up, training is
chaotic: a change of one ulp in one initial weight moves the final weights by ~1 too
(checked with ``torch.nextafter`` on two separate runs), so the table's last column is
large there. That is the dynamics, not the batching.

Speed (``--time``). The model is small (2-32-32-2, 1,218 parameters, 64 points a step), as
in a real sweep of a small model, so a step costs mostly per-op overhead, which vmap pays
once for all 16 configurations. The training loops alone are timed, after a warm-up (the
first vmapped call in a process costs ~1 s more, once), alternating, best of ``--rounds``.
On a 2-core machine shared with other jobs (load average ~2), 500 steps:

    python examples/sweep.py --time --threads 2   # batched 1.23 s, sequential 8.49 s: 6.9x (rounds 6.4-7.4x)
    python examples/sweep.py --time --threads 1   # batched 1.33 s, sequential 8.62 s: 6.5x (rounds 6.1-6.5x)

A batched step for the 16 takes ~2.5 ms, a single run's step ~1.1 ms. With 2 threads on a
busy machine, torch's tiny parallel ops wait for a core: in one such run both sides were
20-30x slower (63 s and 297 s for the untimed pass) and the ratio ~4.7x.

What vmap costs the optimizer step (``--fallback-cost``). ``torch._foreach_*`` kernels
have no batching rule, so under vmap ``holotx.ops`` runs one ordinary op per leaf instead
(``holotx.ops.foreach_supported`` is False there). One AdamW update of the 16 stacked
copies of this model (6 leaves), 1 thread (2 threads: the same within 5%):

    vmapped (per-leaf ops)                      ~1.05 ms
    vmapped through inject_hyperparams          ~1.18 ms   (the sweep's update)
    the stacked tensors, foreach, no vmap       ~0.36 ms   (same elementwise work, one lr)
    16 separate updates                         ~4.9 ms

So the fallback makes the update ~3x slower than foreach kernels over the same stacked
tensors would be, yet ~4.5x faster than the 16 updates it replaces. The update is ~45% of
the batched step here; at foreach speed the sweep would be ~10x faster than sequential
runs instead of ~6.5x.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import holotx

from common import DTYPES, Params, figure, log_y, make_model, make_step, spirals

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SEED = 0


# ---------------------------------------------------------------- data and model

@dataclass
class Task:
    model: nn.Module
    """The architecture, on the meta device: ``functional_call`` takes the weights."""
    params: Params
    """The one initial model every configuration starts from."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    batches: list[torch.Tensor]
    """Index tensors into the training set, one per step, the same for every run."""


def make_task(steps: int, hidden: int = 32, batch_size: int = 64, n_train: int = 1024, n_test: int = 1024,
              dtype: torch.dtype = torch.float32) -> Task:
    gen = torch.Generator().manual_seed(SEED)
    x_train, y_train = spirals(n_train, 0.1, gen)
    x_test, y_test = spirals(n_test, 0.1, gen)
    torch.manual_seed(SEED)
    model = make_model(hidden).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batches = [torch.randint(0, n_train, (batch_size,), generator=gen) for _ in range(steps)]
    return Task(model.to("meta"), params, x_train.to(dtype), y_train, x_test.to(dtype), y_test, batches)


def losses(task: Task, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each configuration (stacked ``params``) on ``(x, y)``."""
    with torch.no_grad():
        logits = vmap(functional_call, in_dims=(None, 0, None))(task.model, params, (x,))
        return vmap(F.cross_entropy, in_dims=(0, None))(logits, y)


# ---------------------------------------------------------------- the sweep, batched and not

def sweep_batched(task: Task, lrs: torch.Tensor, weight_decay: float,
                  record_every: int | None = None) -> tuple[Params, list[int], torch.Tensor]:
    """Train one copy of the model per learning rate in ``lrs``, all in one vmapped step.

    Returns the stacked final params and, with ``record_every``, the steps at which the
    whole training set's loss was recorded and those losses, shape ``(len(steps), len(lrs))``.
    """
    n = len(lrs)
    tx = holotx.inject_hyperparams(holotx.adamw)(lr=1e-3, weight_decay=weight_decay)
    template = tx.init(task.params)
    dims = holotx.tree.batch_dims(template)

    def init(lr: torch.Tensor) -> holotx.InjectHyperparamsState:
        state = tx.init(task.params)
        return state._replace(hyperparams={**state.hyperparams, "lr": lr})

    hp_dtype = template.hyperparams["lr"].dtype
    state = vmap(init, out_dims=dims)(lrs.to(hp_dtype))
    step = vmap(make_step(task.model, tx), in_dims=(0, dims, None, None), out_dims=(0, dims, 0))
    params = {k: v.expand(n, *v.shape) for k, v in task.params.items()}  # the same start for all
    steps, curves = [], []
    for i, idx in enumerate(task.batches):
        if record_every and i % record_every == 0:
            steps.append(i)
            curves.append(losses(task, params, task.x_train, task.y_train))
        params, state, _ = step(params, state, task.x_train[idx], task.y_train[idx])
    if record_every:
        steps.append(len(task.batches))
        curves.append(losses(task, params, task.x_train, task.y_train))
    return params, steps, torch.stack(curves) if curves else torch.empty(0, n)


def run_single(task: Task, lr: float, weight_decay: float) -> Params:
    """One run of plain ``holotx.adamw``, no vmap: what the sweep replaces."""
    tx = holotx.adamw(lr=lr, weight_decay=weight_decay)
    step = make_step(task.model, tx)
    params = task.params
    state = tx.init(params)
    for idx in task.batches:
        params, state, _ = step(params, state, task.x_train[idx], task.y_train[idx])
    return params


def sweep_sequential(task: Task, lrs: torch.Tensor, weight_decay: float) -> Params:
    """The same sweep as :func:`sweep_batched`, one run after the other; params stacked."""
    finals = [run_single(task, lr, weight_decay) for lr in lrs.tolist()]
    return {k: torch.stack([p[k] for p in finals]) for k in task.params}


def time_sweep(task: Task, lrs: torch.Tensor, weight_decay: float,
               rounds: int) -> tuple[list[float], list[float]]:
    """Seconds for the batched sweep and for the sequential runs (training loops only),
    ``rounds`` of each, alternating, after one untimed warm-up of each."""
    warm = Task(task.model, task.params, task.x_train, task.y_train, task.x_test, task.y_test,
                task.batches[:3])
    sweep_batched(warm, lrs, weight_decay)
    sweep_sequential(warm, lrs[:1], weight_decay)
    batched, sequential = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        sweep_batched(task, lrs, weight_decay)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        sweep_sequential(task, lrs, weight_decay)
        sequential.append(time.perf_counter() - start)
    return batched, sequential


def fallback_cost(task: Task, n: int, repeats: int = 200) -> dict[str, float]:
    """Microseconds for one AdamW update of ``n`` stacked copies of the model's params:
    vmapped (per-leaf ops; plain, and through ``inject_hyperparams`` as in the sweep),
    over the stacked tensors without vmap (foreach kernels, the same elementwise work)
    and as ``n`` separate updates."""
    gen = torch.Generator().manual_seed(SEED)
    dtype = task.x_train.dtype
    params = {k: torch.randn(n, *v.shape, generator=gen, dtype=dtype) for k, v in task.params.items()}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()}
    tx = holotx.adamw(lr=1e-3)
    dims = holotx.tree.batch_dims(tx.init(task.params))
    vstate = vmap(tx.init, out_dims=dims)(params)
    vupdate = vmap(tx.update, in_dims=(0, dims, 0), out_dims=(0, dims))
    inject = holotx.inject_hyperparams(holotx.adamw)(lr=1e-3, weight_decay=1e-2)
    idims = holotx.tree.batch_dims(inject.init(task.params))
    lrs = torch.full((n,), 1e-3, dtype=torch.float64)

    def inject_init(lr: torch.Tensor) -> holotx.InjectHyperparamsState:
        state = inject.init(task.params)
        return state._replace(hyperparams={**state.hyperparams, "lr": lr})

    istate = vmap(inject_init, out_dims=idims)(lrs)
    iupdate = vmap(inject.update, in_dims=(0, idims, 0), out_dims=(0, idims))
    state = tx.init(params)
    singles = [({k: v[i] for k, v in grads.items()}, {k: v[i] for k, v in params.items()}) for i in range(n)]
    single_states = [tx.init(p) for _, p in singles]

    def each() -> None:
        for (g, p), s in zip(singles, single_states):
            tx.update(g, s, p)

    def best(fn: Callable[[], Any], k: int) -> float:
        for _ in range(max(1, k // 10)):
            fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(k):
                fn()
            times.append((time.perf_counter() - start) / k)
        return min(times) * 1e6

    return {"vmapped (per-leaf ops)": best(lambda: vupdate(grads, vstate, params), repeats),
            "vmapped, inject_hyperparams (sweep's)": best(lambda: iupdate(grads, istate, params), repeats),
            "stacked tensors, foreach, no vmap": best(lambda: tx.update(grads, state, params), repeats),
            f"{n} separate updates": best(each, max(1, repeats // n))}


# ---------------------------------------------------------------- the plot

def plot_curves(path: Path, steps: Sequence[int], curves: torch.Tensor, lrs: Sequence[float], *,
                best: int | None = None, about: str = "") -> Figure:
    """Loss curves (``curves[i, j]``: config ``j`` at ``steps[i]``) into the PNG ``path``,
    800 x 480 pixels: a log y-axis, one colour per learning rate from dark blue (smallest)
    to yellow-green (largest), a legend of the learning rates (the ``best`` one drawn
    thicker and marked; a run whose loss became non-finite is marked "diverged", its curve
    stops there), and ``about`` (the model and data) under the title. Returns the figure."""
    from matplotlib import colormaps

    fig = figure(8, 4.8)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for j, lr in enumerate(lrs):
        curve = curves[:, j].tolist()
        label = f"{lr:.1e}"
        if not all(math.isfinite(v) for v in curve):
            label += " (diverged)"
        if j == best:
            label += " (best test loss)"
        ax.plot(steps, curve, color=cmap(0.9 * j / max(1, len(lrs) - 1)), label=label,
                linewidth=2.6 if j == best else 1.2, zorder=3 if j == best else 2)
    log_y(ax)
    ax.set_xlim(0, max(1, steps[-1]) if steps else 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("training-set loss (cross-entropy, nats, log scale)")
    ax.grid(True, which="major", color="0.85")
    ax.grid(True, which="minor", axis="y", color="0.94")
    ax.set_title(f"AdamW learning-rate sweep: {len(lrs)} runs in one vmap" + (f"\n{about}" if about else ""),
                 fontsize=10)
    fig.legend(title="learning rate", loc="outside right upper", fontsize=8, title_fontsize=8)
    fig.savefig(path)
    return fig


# ---------------------------------------------------------------- driver

@dataclass
class Result:
    lrs: list[float]
    weight_decay: float
    steps: list[int]
    """Steps at which the training-set losses were recorded."""
    curves: torch.Tensor
    """Training-set loss of each configuration at each recorded step, ``(len(steps), len(lrs))``."""
    test_loss: list[float]
    test_accuracy: list[float]
    best: int
    """Index of the best configuration (lowest test log-loss)."""
    max_abs_diff: list[float] | None
    """Per configuration, the largest |batched - separate| over the final params."""
    plot: Path | None
    batched_seconds: float | None = None
    sequential_seconds: float | None = None
    fallback_us: dict[str, float] | None = None


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=int, default=16, help="how many learning rates")
    parser.add_argument("--lr-range", type=float, nargs=2, default=(1e-4, 1.0), metavar=("MIN", "MAX"))
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=32, help="width of the MLP's two hidden layers")
    parser.add_argument("--record-every", type=int, default=10, help="steps between recorded losses")
    parser.add_argument("--quick", action="store_true", help="30 steps, 4 learning rates (for tests)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--plot", default="sweep.png", help="PNG to write ('' for none)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the separate runs that check the batched sweep")
    parser.add_argument("--time", action="store_true", help="time the batched sweep against sequential runs")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (the best is kept)")
    parser.add_argument("--fallback-cost", action="store_true",
                        help="measure a vmapped AdamW update against foreach kernels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    n, steps = (4, 30) if args.quick else (args.lrs, args.steps)
    if n < 1 or steps < 1 or args.record_every < 1 or args.rounds < 1:
        parser.error("--lrs, --steps, --record-every and --rounds must be >= 1")
    if not 0 < args.lr_range[0] <= args.lr_range[1]:
        parser.error("--lr-range needs 0 < MIN <= MAX")
    torch.set_num_threads(args.threads)
    task = make_task(steps, hidden=args.hidden, dtype=DTYPES[args.dtype])
    lrs = torch.logspace(math.log10(args.lr_range[0]), math.log10(args.lr_range[1]), n, dtype=torch.float64)
    n_params = sum(v.numel() for v in task.params.values())
    print(f"holotx {holotx.__version__}, torch {torch.__version__}, {args.threads} thread(s), {args.dtype}: "
          f"AdamW sweep over {n} learning rates in [{args.lr_range[0]:g}, {args.lr_range[1]:g}], weight "
          f"decay {args.weight_decay:g}; MLP with {n_params:,} parameters, {steps} steps of "
          f"{len(task.batches[0])} points", flush=True)

    start = time.perf_counter()
    params, rec_steps, curves = sweep_batched(task, lrs, args.weight_decay, args.record_every)
    print(f"batched sweep (vmap): {time.perf_counter() - start:.2f} s (with loss recording)", flush=True)
    diffs = None
    if args.check:
        start = time.perf_counter()
        reference = sweep_sequential(task, lrs, args.weight_decay)
        diffs = [max(float((params[k][j] - reference[k][j]).abs().max()) for k in params) for j in range(n)]
        print(f"{n} separate runs:     {time.perf_counter() - start:.2f} s; max |batched - separate| over "
              f"the final params {max(diffs):.3g}", flush=True)
    test_loss = losses(task, params, task.x_test, task.y_test)
    with torch.no_grad():
        logits = vmap(functional_call, in_dims=(None, 0, None))(task.model, params, (task.x_test,))
        test_acc = (logits.argmax(dim=-1) == task.y_test).to(logits.dtype).mean(dim=1)
    best = int(torch.nan_to_num(test_loss, nan=math.inf).argmin())

    print(f"\n{'lr':>9} {'train loss':>10} {'test loss':>10} {'test acc':>9}" + ("  |batched-separate|"
                                                                             if diffs else ""))
    for j, lr in enumerate(lrs.tolist()):
        mark = " <- best" if j == best else ""
        diff = f"  {diffs[j]:18.2g}" if diffs else ""
        print(f"{lr:9.2e} {float(curves[-1, j]):10.4f} {float(test_loss[j]):10.4f} {float(test_acc[j]):9.1%}"
              f"{diff}{mark}")
    print(f"best configuration: lr={lrs[best].item():.3g}, weight_decay={args.weight_decay:g} (test loss "
          f"{float(test_loss[best]):.4f}, test accuracy {float(test_acc[best]):.1%})", flush=True)

    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        hidden = args.hidden
        plot_curves(plot, rec_steps, curves, lrs.tolist(), best=best,
                    about=f"MLP 2-{hidden}-{hidden}-2 ({n_params:,} parameters) on two spirals, "
                          f"{len(task.batches[0])} points a step,\nweight decay {args.weight_decay:g}, "
                          f"{args.dtype}; loss over the whole training set ({len(task.x_train):,} points)")
        print(f"loss curves written to {plot}")
    result = Result(lrs.tolist(), args.weight_decay, rec_steps, curves, test_loss.tolist(), test_acc.tolist(),
                    best, diffs, plot)
    if args.time:
        bs, ss = time_sweep(task, lrs, args.weight_decay, args.rounds)
        b, s = result.batched_seconds, result.sequential_seconds = min(bs), min(ss)
        print(f"\ntiming ({steps} steps, best of {args.rounds}, {args.threads} thread(s)): batched sweep "
              f"{b:.3f} s ({b / steps * 1e3:.2f} ms/step for all {n}), {n} sequential runs {s:.3f} s "
              f"({s / steps / n * 1e3:.2f} ms/step each): {s / b:.1f}x faster batched", flush=True)
        print("  each round, batched / sequential: " + ", ".join(f"{x:.2f} s / {y:.2f} s ({y / x:.1f}x)"
                                                               for x, y in zip(bs, ss)), flush=True)
    if args.fallback_cost:
        result.fallback_us = fallback_cost(task, n)
        print(f"\none AdamW update of {n} stacked copies of the model ({args.threads} thread(s)):")
        for name, us in result.fallback_us.items():
            print(f"  {name:<38} {us:9.0f} us")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
