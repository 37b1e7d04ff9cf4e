"""Train a small MLP on two interleaved spirals with every holotx optimizer.

    python examples/demo.py                 # the default run (`make demo`), about a minute
    python examples/demo.py --quick         # a few steps (`make demo ARGS=--quick`)
    python examples/demo.py --steps 3000 --ways functional inplace --plot curves.png

The data (two noisy 2-D spirals, 2 classes) is generated here from a seed; nothing is
downloaded. Every optimizer starts from the same initial weights and sees the same
mini-batches, so the runs differ only in the optimizer.

A "way to run" is how the training loop drives the optimizer (the ``WAYS`` dict):

- ``functional``: params are a dict of tensors; ``torch.func.grad_and_value`` over
  ``torch.func.functional_call`` gives the grads; ``tx.update`` and
  ``holotx.apply_updates`` give new params. Nothing is mutated.
- ``inplace``: a classic ``nn.Module`` and ``loss.backward()``; the step is
  ``holotx.flat.make_step(tx, donate=True)``, which updates the parameters and the
  optimizer state in place.

Same math, so both ways give the same numbers (to float32 rounding), until a run is
chaotic enough for that rounding to grow (LARS and RaLARS here, by the end).

It prints a table (final training loss, test accuracy, ms per step) and draws the loss
curves into a PNG (``demo.png`` in the current folder; ``--plot PATH``, or ``--plot ''``
for none) with matplotlib, the ``examples`` extra that ``make venv`` installs: the loss on
the whole training set every few steps, one panel per family of optimizers.

While it trains, one progress line is redrawn in place on a terminal; when the output is
not a terminal (a pipe, a log file), a plain line is printed as each run ends instead.

Time: 30 runs of 1,500 steps (15 optimizers, two ways) take about a minute on one idle core
(one thread, the default: 60 to 62 s of CPU time, measured with ``taskset -c 0`` on a 2-core
machine), longer when other jobs share the cores (73 to 115 s there, with four to six
running); the script prints how long it took. ``--quick`` takes about 10 s.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import holotx
from holotx.flat import make_step

from common import figure, log_y, make_model, spirals

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SEED = 0


# ---------------------------------------------------------------- data and model

@dataclass
class Task:
    model: nn.Module
    """The model with the shared initial weights (each run starts from a copy)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    batches: list[torch.Tensor]
    """Index tensors into the training set, one per step, the same for every run."""


def make_task(steps: int, batch_size: int = 128, n_train: int = 1024, n_test: int = 1024) -> Task:
    gen = torch.Generator().manual_seed(SEED)
    x_train, y_train = spirals(n_train, 0.1, gen)
    x_test, y_test = spirals(n_test, 0.1, gen)
    torch.manual_seed(SEED)
    model = make_model()
    batches = [torch.randint(0, n_train, (batch_size,), generator=gen) for _ in range(steps)]
    return Task(model, x_train, y_train, x_test, y_test, batches)


# ---------------------------------------------------------------- optimizers

def optimizers(steps: int) -> dict[str, Callable[[], holotx.GradientTransformation]]:
    """Every optimizer holotx has so far, with learning rates that suit this problem."""
    return {
        "sgd (momentum 0.9)": lambda: holotx.sgd(lr=0.05, momentum=0.9),
        "adam": lambda: holotx.adam(lr=1e-2),
        "adamw": lambda: holotx.adamw(lr=1e-2, weight_decay=1e-4),
        "radam": lambda: holotx.radam(lr=1e-2),
        "clip + adamw + warmup-cosine": lambda: holotx.chain(
            holotx.clip_by_global_norm(1.0),
            holotx.adamw(lr=holotx.warmup_cosine_decay_schedule(
                init_value=0.0, peak_value=2e-2, warmup_steps=max(1, steps // 10),
                decay_steps=max(2, steps), end_value=1e-4), weight_decay=1e-4),
        ),
        # Holocron's eight, default numerics.
        "lars": lambda: holotx.lars(lr=0.005, momentum=0.9, weight_decay=1e-4),
        "lamb": lambda: holotx.lamb(lr=1e-2, weight_decay=1e-4),
        "ralars": lambda: holotx.ralars(lr=1e-2, weight_decay=1e-4),
        "tadam": lambda: holotx.tadam(lr=3e-2),
        "adabelief": lambda: holotx.adabelief(lr=1e-2),
        "adamp": lambda: holotx.adamp(lr=1e-2, weight_decay=1e-4, decoupled_weight_decay=True),
        "adan": lambda: holotx.adan(lr=1e-2, weight_decay=1e-4),
        "ademamix": lambda: holotx.ademamix(lr=5e-3, t_alpha_beta3=max(1, steps // 2)),
        # Holocron's wrappers, around AdamW.
        "lookahead(adamw)": lambda: holotx.lookahead(holotx.adamw(lr=2e-2, weight_decay=1e-4)),
        "scout(adamw)": lambda: holotx.scout(holotx.adamw(lr=2e-2, weight_decay=1e-4)),
    }


PANELS = {
    "torch.optim's rules, and a chain": ("sgd (momentum 0.9)", "adam", "adamw", "radam",
                                         "clip + adamw + warmup-cosine"),
    "Holocron's eight": ("lars", "lamb", "ralars", "tadam", "adabelief", "adamp", "adan", "ademamix"),
    "Holocron's wrappers, around AdamW": ("lookahead(adamw)", "scout(adamw)"),
}
"""The plot's panels: which optimizers are drawn together (one not listed gets a panel of its own)."""


# ---------------------------------------------------------------- ways to run

@dataclass
class Result:
    optimizer: str
    way: str
    initial_loss: float
    train_loss: float
    test_accuracy: float
    ms_per_step: float
    steps: list[int] = field(default_factory=list)
    """The steps at which the loss curve was recorded (0 is the initial weights)."""
    losses: list[float] = field(default_factory=list)
    """The loss on the whole training set at those steps."""


Evaluate = Callable[[dict[str, torch.Tensor]], tuple[float, float]]
"""``evaluate(params) -> (train loss, test accuracy)`` on the whole sets."""
Way = Callable[[holotx.GradientTransformation, Task, Callable[[int, dict[str, torch.Tensor]], None]],
               dict[str, torch.Tensor]]
"""``way(tx, task, report) -> final params``; calls ``report(step, params)`` as it goes."""


def run_functional(tx, task: Task, report) -> dict[str, torch.Tensor]:
    """Pure loop: params are a dict of plain tensors, nothing is mutated."""
    model = task.model
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    grad_fn = grad_and_value(loss_fn)
    state = tx.init(params)
    for step, idx in enumerate(task.batches, start=1):
        grads, _loss = grad_fn(params, task.x_train[idx], task.y_train[idx])
        updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, updates)
        report(step, params)
    return params


def run_inplace(tx, task: Task, report) -> dict[str, torch.Tensor]:
    """Owner loop: an nn.Module, ``loss.backward()``, and a donated in-place step."""
    model = copy.deepcopy(task.model)
    params = dict(model.named_parameters())
    state = tx.init(params)
    step_fn = make_step(tx, donate=True)
    for step, idx in enumerate(task.batches, start=1):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
        grads = {k: p.grad for k, p in params.items()}
        _, state = step_fn(params, grads, state)
        report(step, params)
    return params


WAYS: dict[str, Way] = {
    "functional": run_functional,
    "inplace": run_inplace,
    # "adapter": run_adapter,  # holotx.adapters.TransformOptimizer, when it lands
}


# ---------------------------------------------------------------- driver

def make_evaluate(task: Task) -> Evaluate:
    def evaluate(params):
        with torch.no_grad():
            train_loss = F.cross_entropy(functional_call(task.model, params, (task.x_train,)), task.y_train)
            logits = functional_call(task.model, params, (task.x_test,))
            accuracy = (logits.argmax(dim=1) == task.y_test).float().mean()
        return float(train_loss), float(accuracy)

    return evaluate


class Progress:
    """How far the demo is, on one line redrawn in place with ``\\r`` when ``stream`` is a
    terminal: a bar over all the runs' steps, the time so far and left, and the run under
    way with its last loss and accuracy; at most once every ``redraw`` seconds, and as each
    run ends. Elsewhere (a pipe, a log file, a test's captured output) a line that would be
    redrawn many times a second only fills the log, so :meth:`update` prints a plain line
    when a run ends, and one every ``every`` seconds during a long run; nothing else."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 20, every: float = 10.0,
                 redraw: float = 0.1):
        self.total, self.width, self.every, self.redraw = max(1, total), width, every, redraw
        self.stream = sys.stdout if stream is None else stream
        self.tty = self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.drawn = 0  # length of the line on screen (terminal), to blank what is left of it

    def update(self, done: int, text: str, end_of_run: bool = False, short: str | None = None) -> None:
        """``done`` steps of ``total`` so far, in all the runs; ``text``: the run under way,
        ``short`` (if given) the same said in fewer characters, for the terminal's line."""
        now = time.perf_counter()
        if self.tty:
            if end_of_run or now - self.last >= self.redraw or done >= self.total:
                self.last = now
                elapsed = now - self.start
                # What is left, once there is enough done to tell (the first steps are slower).
                left = f"~{elapsed / done * (self.total - done):.0f} s" if done >= 0.02 * self.total else "?"
                filled = round(self.width * done / self.total)
                line = (f"{done / self.total:4.0%} [{'#' * filled}{'.' * (self.width - filled)}] "
                        f"{elapsed:.0f} s, {left} left  {text if short is None else short}")
                line = line[:max(20, shutil.get_terminal_size().columns - 1)]  # a wrapped line is not redrawn
                self.stream.write("\r" + line + " " * max(0, self.drawn - len(line)))
                self.stream.flush()
                self.drawn = len(line)
        elif end_of_run or now - self.last >= self.every:
            self.last = now
            self.stream.write(f"  {text}\n")
            self.stream.flush()

    def close(self) -> None:
        """End the redrawn line, so that what is printed next starts on a line of its own."""
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = 0


def train(name: str, make_tx, way: str, task: Task, record_every: int, progress: Progress,
          done_before: int = 0, run: str = "") -> Result:
    """One run; the loss on the whole training set is recorded every ``record_every``
    steps, untimed, and shown by ``progress`` (``done_before``: the steps of earlier runs;
    ``run``: which run this is, e.g. "3/30", for the terminal's line)."""
    evaluate = make_evaluate(task)
    initial_loss, _ = evaluate(dict(task.model.named_parameters()))
    curve_steps, curve = [0], [initial_loss]
    timed = [0.0]
    last = [time.perf_counter()]
    n = len(task.batches)

    def report(step: int, params) -> None:
        timed[0] += time.perf_counter() - last[0]  # evaluation below is not timed
        if step % record_every == 0 or step == n:
            loss, acc = evaluate(params)
            curve_steps.append(step)
            curve.append(loss)
            progress.update(done_before + step, f"{name:<30} {way:<10} step {step:>5}  train loss "
                            f"{loss:.4f}  test acc {acc:6.1%}", end_of_run=step == n,
                            short=f"{run} {name}, {way}: step {step}, loss {loss:.4f}, acc {acc:.1%}")
        last[0] = time.perf_counter()

    torch.manual_seed(SEED)
    params = WAYS[way](make_tx(), task, report)
    loss, acc = evaluate(params)
    return Result(name, way, initial_loss, loss, acc, timed[0] / n * 1e3, curve_steps, curve)


def print_table(results: list[Result]) -> None:
    header = f"{'optimizer':<30} {'way':<10} {'train loss':>10} {'test acc':>9} {'ms/step':>8}"
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(f"{r.optimizer:<30} {r.way:<10} {r.train_loss:10.4f} {r.test_accuracy:9.1%} "
              f"{r.ms_per_step:8.3f}")
    print(f"(train loss at the start: {results[0].initial_loss:.4f}; ms/step is the whole "
          "training step: forward, backward and optimizer)", flush=True)


def same_curve(a: Result | None, b: Result | None, decades: float = 0.05) -> bool:
    """Whether two runs' loss curves are drawn as one line on the plot's log axis: within
    ``decades`` of each other (0.05: 12%, a few pixels) at every recorded step. Adam and
    AdamW here (its weight decay is tiny: 10% apart at most), Lookahead and Scout."""
    return (a is not None and b is not None and a.steps == b.steps
            and all(x > 0 and y > 0 and abs(math.log10(x / y)) <= decades
                    for x, y in zip(a.losses, b.losses)))


def plot_curves(path: Path, results: list[Result], about: str = "") -> Figure:
    """The loss curves of ``results`` into the PNG ``path``: one panel per family of
    optimizers (:data:`PANELS`, those with a result), side by side with one log y-axis,
    one colour per optimizer, the first way run drawn solid and any other dashed over it
    (where both lines show, the ways' rounding has grown apart). A curve drawn over an
    earlier one of its panel that it matches (:func:`same_curve`) says so in the legend.
    Plain AdamW's curve is drawn in grey in the wrappers' panel, to compare. Returns the
    figure."""
    ways = list(dict.fromkeys(r.way for r in results))
    names = list(dict.fromkeys(r.optimizer for r in results))
    panels = {title: [n for n in members if n in names] for title, members in PANELS.items()}
    listed = {n for members in PANELS.values() for n in members}
    panels.update({n: [n] for n in names if n not in listed})
    panels = {title: members for title, members in panels.items() if members}
    by_key = {(r.optimizer, r.way): r for r in results}
    fig = figure(5.0 * len(panels) + 0.5, 5.2)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, members) in zip(axes, panels.items()):
        if "wrappers" in title and ("adamw", ways[0]) in by_key:
            r = by_key["adamw", ways[0]]
            ax.plot(r.steps, r.losses, color="0.6", linewidth=1.2, label="adamw alone")
        for k, name in enumerate(members):
            color = f"C{k}"
            label = name
            first = by_key.get((name, ways[0]))
            twins = [m for m in members[:k] if same_curve(first, by_key.get((m, ways[0])))]
            if twins:  # drawn over it: say so, or the legend shows a colour the plot hides
                label += f" (\u2248 {twins[0]}, over it)"
            for w, way in enumerate(ways):
                if (name, way) in by_key:
                    r = by_key[name, way]
                    ax.plot(r.steps, r.losses, color=color, linewidth=1.4 if w == 0 else 1.0,
                            linestyle="-" if w == 0 else (0, (4, 3)), label=label if w == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_xlim(0, max(r.steps[-1] for r in results))
        ax.grid(True, which="major", color="0.85")
        ax.grid(True, which="minor", axis="y", color="0.94")
        ax.legend(loc="lower left", fontsize=8)
    log_y(axes[0])
    axes[0].set_ylabel("training-set loss (cross-entropy, nats, log scale)")
    style = (f"{ways[0]} way solid, {' and '.join(ways[1:])} dashed over it" if len(ways) > 1
             else f"{ways[0]} way")
    fig.suptitle("holotx demo: training loss of each optimizer on two spirals\n"
                 + (f"{about}; " if about else "") + style, fontsize=10)
    fig.savefig(path)
    return fig


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps per optimizer")
    parser.add_argument("--quick", action="store_true", help="30 steps (for tests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more do not help a model this small, and slow it down "
                             "badly when other processes keep the cores busy)")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS),
                        help="ways to run each optimizer")
    parser.add_argument("--optimizers", nargs="+", default=None, metavar="NAME",
                        help="a subset of the optimizers, by the start of their name")
    parser.add_argument("--plot", default="demo.png", metavar="PATH",
                        help="PNG of the loss curves to write (default demo.png; '' for none)")
    args = parser.parse_args(argv)
    steps = 30 if args.quick else args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    task = make_task(steps)
    opts = optimizers(steps)
    if args.optimizers:
        opts = {k: v for k, v in opts.items() if any(k.startswith(p) for p in args.optimizers)}
        if not opts:
            parser.error(f"no optimizer matches {args.optimizers}; have {list(optimizers(steps))}")
    n_params = sum(p.numel() for p in task.model.parameters())
    print(f"holotx {holotx.__version__}, torch {torch.__version__}, {args.threads} thread(s): "
          f"two spirals, MLP with {n_params:,} parameters, {steps} steps of {len(task.batches[0])} "
          f"points", flush=True)
    start = time.perf_counter()
    record_every = max(1, steps // 60)
    runs = [(name, make_tx, way) for name, make_tx in opts.items() for way in args.ways]
    progress = Progress(len(runs) * steps)
    results = []
    for k, (name, make_tx, way) in enumerate(runs):
        results.append(train(name, make_tx, way, task, record_every, progress, done_before=k * steps,
                             run=f"{k + 1}/{len(runs)}"))
    progress.close()
    print_table(results)
    if args.plot:
        plot_curves(Path(args.plot), results,
                    about=f"MLP with {n_params:,} parameters, {len(task.batches[0])} points a step, the same "
                          f"start and batches for all; loss over the whole training set "
                          f"({len(task.x_train):,} points) every "
                          + (f"{record_every} steps" if record_every > 1 else "step"))
        print(f"loss curves written to {args.plot}")
    print(f"{len(runs)} runs of {steps} steps in {time.perf_counter() - start:.0f} s "
          f"({args.threads} thread(s))", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
