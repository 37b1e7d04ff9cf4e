"""MAML on sinusoid regression, with a holotx optimizer in the inner loop and in the outer one.

    python examples/maml.py                      # the default run, about 30 s on one core
    python examples/maml.py --quick              # a few seconds, for the tests
    python examples/maml.py --inner adam --first-order
    python examples/maml.py --inner lookahead_adam --inner-steps 4

Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, 2017, https://arxiv.org/abs/1703.03400)
learns an initialisation ``meta_params`` from which a few optimizer steps on a task's
K-shot *support* set give a low loss on the same task's *query* set. The tasks are the
paper's sinusoids, ``y = A sin(x - phase)`` with ``A`` in [0.1, 5], ``phase`` in [0, pi],
``x`` in [-5, 5], drawn here from a seed (nothing is downloaded); the model is a
1-40-40-1 ReLU MLP held as a dict of tensors and run with ``torch.func.functional_call``.

- **Inner loop** (``task_loss``): ``--inner-steps`` steps of any holotx optimizer
  (``--inner``, by name: ``sgd``, ``adam``, ``lamb``, ...; ``lookahead_<name>`` wraps it in
  ``holotx.lookahead(..., sync_period=2)``) from ``meta_params`` on the support set, then
  the MSE on the query set. ``tx.init``, ``tx.update`` and ``holotx.apply_updates`` are
  pure functions of tensors, so the whole loop is one differentiable function of
  ``meta_params``: the meta-gradient goes through every inner step, the optimizer's state
  (Adam's moments, Lookahead's slow weights) included. That is second-order MAML: it
  differentiates through the inner gradients, i.e. Hessian-vector products.
- **First order** (``--first-order``): the inner gradients and the optimizer state are
  detached (``holotx.tree.detach``) before each step, so no second derivative is taken
  and the meta-gradient is the query-loss gradient at the adapted params, passed back
  through what each step still does with the params themselves. For ``sgd`` and ``adam``
  (an update that is a function of the gradient and the state only) that is the identity:
  exactly the paper's first-order approximation (FOMAML). For an update that also reads
  the params (LAMB's trust ratio, weight decay) that dependence is kept; Lookahead's slow
  weights are state, so each synchronisation scales the meta-gradient by ``sync_rate``, a
  constant factor that Adam in the outer loop does not see.
- **Adam and relatives, second order**: a ReLU unit dead on a whole support set has an
  exactly zero gradient, hence a zero second moment, where the square root's derivative is
  infinite. holotx's square root takes the derivative 0 there when it is differentiated
  (the subgradient of ``|g|``), so the meta-gradient stays finite with no ``eps_root``.
- **Task batch**: ``torch.func.vmap`` runs ``task_loss`` over a meta-batch of tasks
  (``--meta-batch``), each with its own inner optimizer state; the meta-gradient is
  ``torch.func.grad`` of the mean query loss.
- **Outer loop**: ``holotx.adam(lr=1e-3)`` on ``meta_params`` with that meta-gradient.

At the end the meta-learned initialisation is evaluated on held-out tasks: query MSE
before adaptation (the initialisation as it is) and after ``--inner-steps`` inner steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

import holotx

SEED = 0

Params = dict[str, torch.Tensor]
TaskBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(support_x, support_y, query_x, query_y)``, each ``(tasks, K, 1)``."""


# ---------------------------------------------------------------- tasks and model

def sample_tasks(n: int, k: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                 k_query: int | None = None) -> TaskBatch:
    """``n`` sinusoid tasks, each with ``k`` support and ``k_query`` (default ``k``) query
    points drawn independently from the same curve ``A sin(x - phase)``."""
    k_query = k if k_query is None else k_query
    amplitude = torch.empty(n, 1, 1, dtype=torch.float64).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n, 1, 1, dtype=torch.float64).uniform_(0.0, math.pi, generator=generator)

    def points(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.empty(n, m, 1, dtype=torch.float64).uniform_(-5.0, 5.0, generator=generator)
        return x.to(dtype), (amplitude * torch.sin(x - phase)).to(dtype)

    return (*points(k), *points(k_query))


def make_model(hidden: int = 40) -> nn.Module:
    """The paper's regressor, 1 -> 40 -> 40 -> 1 with ReLUs. Only its structure is used:
    the weights are always passed in by ``functional_call``."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


def init_params(seed: int = SEED, dtype: torch.dtype = torch.float32) -> Params:
    """``make_model()``'s default (Kaiming-uniform) initialisation for ``seed``, as a dict of
    plain tensors (no ``requires_grad``: ``torch.func`` does the differentiating)."""
    torch.manual_seed(seed)
    return {k: v.detach().to(dtype) for k, v in make_model().named_parameters()}


def mse(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()


# ---------------------------------------------------------------- inner optimizers

INNER_LR = {"sgd": 0.01, "lamb": 0.05, "lars": 0.05}
"""Inner learning rates that suit this problem; every other optimizer gets 0.01."""


def make_inner(name: str, lr: float | None = None) -> holotx.GradientTransformation:
    """A holotx optimizer by its factory's name (``sgd``, ``adam``, ``lamb``, ...), at
    ``lr`` (default from ``INNER_LR``); ``lookahead_<name>`` wraps it in
    ``holotx.lookahead(..., sync_period=2)``, so that a 3-step inner loop synchronises once."""
    base = name.removeprefix("lookahead_")
    factory = getattr(holotx.optimizers, base, None) if base in holotx.optimizers.__all__ else None
    if factory is None:
        raise ValueError(f"unknown optimizer {name!r}; have {sorted(holotx.optimizers.__all__)} "
                         "and their lookahead_ forms")
    tx = factory(lr=INNER_LR.get(base, 0.01) if lr is None else lr)
    return holotx.lookahead(tx, sync_period=2) if name.startswith("lookahead_") else tx


# ---------------------------------------------------------------- MAML

def make_task_loss(model: nn.Module, tx: holotx.GradientTransformation, inner_steps: int,
                   first_order: bool = False) -> Callable[..., torch.Tensor]:
    """``task_loss(meta_params, support_x, support_y, query_x, query_y)``: the query MSE
    after ``inner_steps`` steps of ``tx`` from ``meta_params`` on the support set. One task,
    unbatched: ``vmap`` it over a task batch, ``grad`` it for a meta-gradient."""
    support_grad = grad(lambda p, x, y: mse(model, p, x, y))

    def task_loss(meta_params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                  query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        params = meta_params
        state = tx.init(params)
        for _ in range(inner_steps):
            grads = support_grad(params, support_x, support_y)
            if first_order:
                grads, state = holotx.tree.detach(grads), holotx.tree.detach(state)
            updates, state = tx.update(grads, state, params)
            params = holotx.apply_updates(params, updates)
        return mse(model, params, query_x, query_y)

    return task_loss


def meta_loss_and_grad(task_loss: Callable[..., torch.Tensor], meta_params: Params,
                       tasks: TaskBatch) -> tuple[Params, torch.Tensor]:
    """The meta-gradient (of the mean query loss over the task batch) and that mean,
    with the tasks run side by side by ``vmap`` (``meta_params`` shared by all)."""

    def mean_loss(mp: Params) -> torch.Tensor:
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(mp, *tasks).mean()

    return grad_and_value(mean_loss)(meta_params)


def evaluate(model: nn.Module, task_loss: Callable[..., torch.Tensor], meta_params: Params,
             tasks: TaskBatch) -> tuple[float, float]:
    """Mean query MSE over ``tasks`` before adaptation (``meta_params`` as they are) and
    after the inner loop on each task's support set."""
    query_x, query_y = tasks[2:]
    pre = vmap(lambda qx, qy: mse(model, meta_params, qx, qy))(query_x, query_y).mean()
    post = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(meta_params, *tasks).mean()
    return float(pre), float(post)


@dataclass
class MAMLResult:
    inner: str
    first_order: bool
    meta_losses: list[float]
    """The mean post-adaptation query loss of each iteration's task batch, before its update."""
    pre_adaptation: float
    """Held-out tasks: query MSE of the meta-learned initialisation, not adapted."""
    post_adaptation: float
    """Held-out tasks: query MSE after the inner loop on each task's support set."""
    init_post_adaptation: float
    """The same, from the random initialisation before meta-training (the baseline)."""
    seconds: float


def train(*, inner: str = "sgd", inner_lr: float | None = None, inner_steps: int = 3,
          first_order: bool = False, iterations: int = 4000, meta_batch: int = 8,
          k_shot: int = 10, outer_lr: float = 1e-3, eval_tasks: int = 500, log_every: int = 200,
          dtype: torch.dtype = torch.float32, seed: int = SEED) -> MAMLResult:
    """Meta-train from ``seed`` and evaluate on ``eval_tasks`` held-out tasks (drawn from a
    generator of their own, so they are the same tasks whatever the training run)."""
    model = make_model()
    meta_params = init_params(seed, dtype)
    task_loss = make_task_loss(model, make_inner(inner, inner_lr), inner_steps, first_order)
    held_out = sample_tasks(eval_tasks, k_shot, torch.Generator().manual_seed(seed + 1), dtype)
    _, init_post = evaluate(model, task_loss, meta_params, held_out)

    outer = holotx.adam(lr=outer_lr)
    outer_state = outer.init(meta_params)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for it in range(1, iterations + 1):
        tasks = sample_tasks(meta_batch, k_shot, gen, dtype)
        meta_grads, loss = meta_loss_and_grad(task_loss, meta_params, tasks)
        updates, outer_state = outer.update(meta_grads, outer_state, meta_params)
        meta_params = holotx.apply_updates(meta_params, updates)
        losses.append(float(loss))
        if it % log_every == 0 or it == iterations:
            recent = losses[-log_every:]
            print(f"  iteration {it:>5}  meta-loss {sum(recent) / len(recent):.4f} "
                  f"(mean of the last {len(recent)})", flush=True)
    seconds = time.perf_counter() - start
    pre, post = evaluate(model, task_loss, meta_params, held_out)
    return MAMLResult(inner, first_order, losses, pre, post, init_post, seconds)


def main(argv: list[str] | None = None) -> MAMLResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner", default="sgd",
                        help="inner optimizer: a holotx factory's name (sgd, adam, lamb, ...) or "
                             "lookahead_<name>")
    parser.add_argument("--inner-lr", type=float, default=None, help="inner learning rate (default: "
                        f"{INNER_LR} per optimizer, else 0.01)")
    parser.add_argument("--inner-steps", type=int, default=3, help="inner steps per task")
    parser.add_argument("--first-order", action="store_true",
                        help="detach the inner gradients and optimizer state (no second derivatives)")
    parser.add_argument("--iterations", type=int, default=4000, help="outer (meta) steps")
    parser.add_argument("--meta-batch", type=int, default=8, help="tasks per outer step")
    parser.add_argument("--k-shot", type=int, default=10, help="support (and query) points per task")
    parser.add_argument("--outer-lr", type=float, default=1e-3, help="the outer Adam's learning rate")
    parser.add_argument("--eval-tasks", type=int, default=500, help="held-out tasks for the final evaluation")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--quick", action="store_true",
                        help="400 iterations, 100 held-out tasks (for the tests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more do not help a model this small)")
    args = parser.parse_args(argv)
    iterations, eval_tasks = (400, 100) if args.quick else (args.iterations, args.eval_tasks)
    if iterations < 1 or args.inner_steps < 1 or args.meta_batch < 1 or args.k_shot < 1:
        parser.error("--iterations, --inner-steps, --meta-batch and --k-shot must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        make_inner(args.inner)
    except ValueError as e:
        parser.error(str(e))

    print(f"holotx {holotx.__version__}, torch {torch.__version__}, {args.threads} thread(s): MAML on "
          f"sinusoids, {'first' if args.first_order else 'second'}-order, inner {args.inner} x "
          f"{args.inner_steps}, {args.meta_batch} tasks of {args.k_shot} shots per step, "
          f"{iterations} steps", flush=True)
    result = train(inner=args.inner, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                   first_order=args.first_order, iterations=iterations,
                   meta_batch=args.meta_batch, k_shot=args.k_shot, outer_lr=args.outer_lr,
                   eval_tasks=eval_tasks, log_every=max(1, iterations // 10),
                   dtype=getattr(torch, args.dtype), seed=args.seed)
    steps = f"after {args.inner_steps} {args.inner} steps"
    rows = {"meta-learned init, not adapted": result.pre_adaptation,
            f"meta-learned init, {steps}": result.post_adaptation,
            f"random init, {steps}": result.init_post_adaptation}
    width = max(map(len, rows))
    print(f"\nquery MSE on {eval_tasks} held-out tasks ({args.k_shot} support and query points each):")
    for label, value in rows.items():
        print(f"  {label:<{width}}  {value:.4f}")
    print(f"({result.seconds:.1f} s of meta-training, {result.seconds / iterations * 1e3:.1f} ms per step)",
          flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
