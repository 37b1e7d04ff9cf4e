"""Train a small MLP on two interleaved spirals with every holotx optimizer.

    python examples/demo.py                 # the default run (`make demo`), well under a minute
    python examples/demo.py --quick         # a few steps, for the tests
    python examples/demo.py --steps 3000 --ways functional inplace

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

Same math, so both ways give the same numbers (to float32 rounding).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import holotx
from holotx.flat import make_step

from common import make_model, spirals

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


# ---------------------------------------------------------------- ways to run

@dataclass
class Result:
    optimizer: str
    way: str
    initial_loss: float
    train_loss: float
    test_accuracy: float
    ms_per_step: float


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


def train(name: str, make_tx, way: str, task: Task, log_every: int) -> Result:
    evaluate = make_evaluate(task)
    initial_loss, _ = evaluate(dict(task.model.named_parameters()))
    timed = [0.0]
    last = [time.perf_counter()]

    def report(step: int, params) -> None:
        timed[0] += time.perf_counter() - last[0]  # evaluation below is not timed
        if step % log_every == 0 or step == len(task.batches):
            loss, acc = evaluate(params)
            print(f"  {name:<30} {way:<10} step {step:>5}  train loss {loss:.4f}  test acc {acc:6.1%}",
                  flush=True)
        last[0] = time.perf_counter()

    torch.manual_seed(SEED)
    params = WAYS[way](make_tx(), task, report)
    loss, acc = evaluate(params)
    return Result(name, way, initial_loss, loss, acc, timed[0] / len(task.batches) * 1e3)


def print_table(results: list[Result]) -> None:
    header = f"{'optimizer':<30} {'way':<10} {'train loss':>10} {'test acc':>9} {'ms/step':>8}"
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(f"{r.optimizer:<30} {r.way:<10} {r.train_loss:10.4f} {r.test_accuracy:9.1%} "
              f"{r.ms_per_step:8.3f}")
    print(f"(train loss at the start: {results[0].initial_loss:.4f}; ms/step is the whole "
          "training step: forward, backward and optimizer)", flush=True)


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
    log_every = max(1, steps // 5)
    results = []
    for name, make_tx in opts.items():
        for way in args.ways:
            results.append(train(name, make_tx, way, task, log_every))
    print_table(results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
