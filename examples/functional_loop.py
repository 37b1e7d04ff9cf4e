"""A functional training loop: clipping, a warmup-cosine schedule, LAMB and Lookahead.

    python examples/functional_loop.py                 # 1500 steps, eager
    python examples/functional_loop.py --compile       # the step compiled with torch.compile
    python examples/functional_loop.py --quick         # a few steps, for the tests

The task is the two noisy interleaved spirals of ``examples/common.py`` (generated from
a seed; nothing is downloaded), classified by a small MLP. Nothing is mutated: the params
are a dict of tensors, ``torch.func.grad_and_value`` over ``torch.func.functional_call``
gives the gradients and the loss, ``tx.update`` the updates and the new state, and
``holotx.apply_updates`` the new params. The optimizer is one transform::

    lookahead(
        chain(clip_by_global_norm(1.0),
              lamb(lr=warmup_cosine_decay_schedule(0, peak, warmup, steps, end), weight_decay=...)),
        sync_rate=0.5, sync_period=6)

i.e. the gradients are clipped to a global norm of 1, LAMB (Adam's direction scaled per
tensor by its trust ratio) takes a step whose learning rate warms up linearly then decays
along a cosine (the schedule is evaluated at LAMB's own step count, inside the state), and
Lookahead pulls the weights back halfway to its slow weights every 6 steps.

With ``--compile`` the whole step (forward, backward, clipping, LAMB, Lookahead, the
update) is one ``torch.compile``d function of ``(params, state, x, y)``; the first call
compiles it (tens of seconds on 2 cores), then it runs from the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

import holotx

from common import DTYPES, Params, make_model, make_step, spirals

SEED = 0


def make_schedule(steps: int, peak_lr: float) -> holotx.Schedule:
    """Linear warmup from 0 over the first 10% of the steps to ``peak_lr``, then a cosine
    decay to 1% of it at the last step."""
    return holotx.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=max(1, steps // 10), decay_steps=max(2, steps),
        end_value=peak_lr / 100)


def make_optimizer(schedule: holotx.Schedule, weight_decay: float) -> holotx.GradientTransformation:
    """Clip to global norm 1, then LAMB on ``schedule``, all inside Lookahead (alpha 0.5,
    every 6 steps)."""
    inner = holotx.chain(holotx.clip_by_global_norm(1.0), holotx.lamb(lr=schedule, weight_decay=weight_decay))
    return holotx.lookahead(inner, sync_rate=0.5, sync_period=6)


@dataclass
class Result:
    initial_loss: float
    """Training-set loss of the initial weights."""
    train_loss: float
    test_loss: float
    test_accuracy: float
    ms_per_step: float
    """Training steps only (no evaluation), after the first."""
    first_step_seconds: float
    """The first step: it compiles with ``--compile``; eager, torch.func sets itself up."""
    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    """``(step, train loss, test loss, test accuracy)`` at each report."""


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="300 steps (for tests)")
    parser.add_argument("--lr", type=float, default=2e-2, help="peak learning rate of the schedule")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--compile", action="store_true", help="compile the training step with torch.compile")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    steps = 300 if args.quick else args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    gen = torch.Generator().manual_seed(SEED)
    x_train, y_train = spirals(1024, 0.1, gen)
    x_test, y_test = spirals(1024, 0.1, gen)
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    torch.manual_seed(SEED)
    h = args.hidden
    model = make_model(h).to(dtype)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [torch.randint(0, len(x_train), (args.batch_size,), generator=gen) for _ in range(steps)]

    def evaluate(params: Params) -> tuple[float, float, float]:
        with torch.no_grad():
            train_loss = F.cross_entropy(functional_call(model, params, (x_train,)), y_train)
            logits = functional_call(model, params, (x_test,))
            test_loss = F.cross_entropy(logits, y_test)
            accuracy = (logits.argmax(dim=1) == y_test).to(dtype).mean()
        return float(train_loss), float(test_loss), float(accuracy)

    schedule = make_schedule(steps, args.lr)
    tx = make_optimizer(schedule, args.weight_decay)
    step = make_step(model, tx)
    if args.compile:
        step = torch.compile(step)
    n_params = sum(p.numel() for p in params.values())
    print(f"holotx {holotx.__version__}, torch {torch.__version__}, {args.threads} thread(s), {args.dtype}"
          f"{', compiled' if args.compile else ''}: two spirals, MLP with {n_params:,} parameters, {steps} "
          f"steps of {args.batch_size} points; lookahead(chain(clip_by_global_norm(1), lamb(lr=warmup-cosine "
          f"to {args.lr:g}))", flush=True)
    initial_loss = evaluate(params)[0]
    print(f"  step     0  train loss {initial_loss:.4f}", flush=True)

    state = tx.init(params)
    history, timed, first_step = [], 0.0, 0.0
    log_every = max(1, steps // 6)
    for i, idx in enumerate(batches, start=1):
        start = time.perf_counter()
        params, state, _loss = step(params, state, x_train[idx], y_train[idx])
        elapsed = time.perf_counter() - start
        if i == 1:
            first_step = elapsed
            print(f"  (first step: {elapsed:.2f} s, {'compiling' if args.compile else 'one-time set-up'})",
                  flush=True)
        else:
            timed += elapsed
        if i % log_every == 0 or i == steps:
            train_loss, test_loss, acc = evaluate(params)
            history.append((i, train_loss, test_loss, acc))
            print(f"  step {i:>5}  lr {float(schedule(i - 1)):.2e}  train loss {train_loss:.4f}  test loss "
                  f"{test_loss:.4f}  test acc {acc:6.1%}", flush=True)
    train_loss, test_loss, acc = evaluate(params)
    result = Result(initial_loss, train_loss, test_loss, acc, timed / max(1, steps - 1) * 1e3, first_step,
                    history)
    print(f"train loss {initial_loss:.4f} -> {train_loss:.4f}; test loss {test_loss:.4f}, test accuracy "
          f"{acc:.1%}; {result.ms_per_step:.3f} ms/step after the first", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
