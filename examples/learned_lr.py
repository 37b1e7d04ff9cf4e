"""Learn the learning rate while training: hypergradient descent, differentiated through holotx.

    python examples/learned_lr.py                    # the default run, a few seconds
    python examples/learned_lr.py --quick            # fewer steps, for the tests
    python examples/learned_lr.py --optimizer adam --horizon 5

Hypergradient descent (Baydin et al., 2018, "Online Learning Rate Adaptation with
Hypergradient Descent", https://arxiv.org/abs/1703.04782) changes the learning rate at every
step by the derivative of the current loss with respect to the learning rate used at the
step before: :math:`h_t = \\partial L_t(\\theta_t) / \\partial \\alpha_{t-1}`. The paper
works out :math:`h_t` by hand for SGD and Adam (for SGD,
:math:`\\theta_t = \\theta_{t-1} - \\alpha g_{t-1}` gives :math:`h_t = -g_t \\cdot g_{t-1}`);
here it is a real meta-gradient instead: the optimizer is
``holotx.inject_hyperparams(holotx.sgd)`` (or ``adam``), whose ``lr`` is a 0-d tensor in its
state, and ``torch.func.grad`` differentiates the loss on the current batch through the last
``--horizon`` recorded ``tx.update`` steps, replayed from their params and state with every
learning rate of that window shifted by the same ``delta`` (the derivative is taken at
``delta = 0``, where the replay is the run itself). With ``--horizon 1`` (the paper's) that is
exactly :math:`h_t`, and for any optimizer whose update is ``lr`` times a direction (SGD, Adam)
it equals the closed form :math:`g_t \\cdot u_{t-1} / \\alpha_{t-1}`, which the run checks
and prints; with more steps it also goes through how the earlier steps changed the later
gradients.

The learning rate is then itself updated by a holotx optimizer (the rule, ``--rules``):

- ``additive``: ``holotx.sgd(lr=beta)`` on the learning rate, :math:`\\alpha_t =
  \\alpha_{t-1} - \\beta h_t`, the paper's rule. Its steps scale with the gradients' squared
  norm, so ``beta`` must suit the problem, and far from a good rate it crawls.
- ``log-adam``: ``holotx.adam(lr=beta)`` on :math:`\\log\\alpha` (gradient
  :math:`\\alpha h_t`): Adam normalises the hypergradient, so the rate changes by a factor of
  about :math:`e^{\\pm\\beta}` per step whatever the scale of the loss, and a start that is
  orders of magnitude off is corrected in tens of steps.

The problem is logistic regression on synthetic data (drawn from a seed, nothing is
downloaded), with features of very different scales so that the usable step sizes span a
wide range. Each run starts from a learning rate far too small and one far too large, with
the rate fixed and with each rule; all see the same mini-batches.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import grad

import holotx

SEED = 0

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

OPTIMIZERS: dict[str, Callable[..., holotx.GradientTransformation]] = {"sgd": holotx.sgd, "adam": holotx.adam}
STARTS = {"sgd": (0.01, 30.0), "adam": (1e-4, 10.0)}
"""Per optimizer, a learning rate far too small and one far too large for this problem."""
RULES = {"additive": 1.0, "log-adam": 0.1}
"""Each rule's default ``beta``, the hyper-learning rate."""


# ---------------------------------------------------------------- data and model

@dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor
    batches: list[torch.Tensor]
    """Index tensors into ``x``, one per step, the same for every run."""

    def batch(self, step: int) -> Batch:
        idx = self.batches[step]
        return self.x[idx], self.y[idx]


def make_problem(steps: int, n: int = 2000, dim: int = 20, batch_size: int = 100, seed: int = SEED,
                 dtype: torch.dtype = torch.float32) -> Problem:
    """Labels from a logistic model with random weights; feature ``i`` has standard
    deviation ``10 ** (-1 + 1.5 i / (dim - 1))`` (0.1 to 3.2), so the loss's curvature
    spans three orders of magnitude: a step size safe along the steep directions is slow
    along the flat ones."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.0, 0.5, dim, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) * scales
    w_true = 2.0 * torch.randn(dim, generator=gen, dtype=torch.float64)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w_true)).to(torch.float64)
    batches = [torch.randint(0, n, (batch_size,), generator=gen) for _ in range(steps)]
    return Problem(x.to(dtype), y.to(dtype), batches)


def init_params(dim: int, dtype: torch.dtype = torch.float32) -> Params:
    return {"w": torch.zeros(dim, dtype=dtype), "b": torch.zeros((), dtype=dtype)}


def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the logistic model."""
    return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)


# ---------------------------------------------------------------- the hypergradient

@dataclass
class Step:
    """What a step started from, enough to replay it."""
    params: Params
    state: holotx.InjectHyperparamsState
    batch: Batch
    lr: torch.Tensor


def with_lr(state: holotx.InjectHyperparamsState, lr: torch.Tensor) -> holotx.InjectHyperparamsState:
    return state._replace(hyperparams={**state.hyperparams, "lr": lr})


def loss_after_window(tx: holotx.GradientTransformation, window: Sequence[Step], batch: Batch,
                      shift: torch.Tensor) -> torch.Tensor:
    """The loss on ``batch`` after replaying the steps of ``window`` (oldest first) from the
    first one's params and state, each with its own learning rate plus ``shift``."""
    params, state = window[0].params, window[0].state
    for step in window:
        grads = grad(loss_fn)(params, *step.batch)
        updates, state = tx.update(grads, with_lr(state, step.lr + shift), params)
        params = holotx.apply_updates(params, updates)
    return loss_fn(params, *batch)


def hypergradient(tx: holotx.GradientTransformation, window: Sequence[Step], batch: Batch) -> torch.Tensor:
    """:math:`\\partial L / \\partial\\delta` at :math:`\\delta = 0`, every learning rate of
    the window shifted by :math:`\\delta` (for a window of one step, the derivative with
    respect to the learning rate of the last step): ``torch.func.grad`` through
    ``tx.update``, second derivatives of the loss included when the window is longer."""
    shift = torch.zeros((), dtype=window[-1].lr.dtype)
    return grad(lambda d: loss_after_window(tx, window, batch, d))(shift)


def closed_form(grads: Params, updates: Params, lr: torch.Tensor) -> torch.Tensor:
    """:math:`g_t \\cdot u_{t-1} / \\alpha_{t-1}`: the one-step hypergradient of an
    optimizer whose update is the learning rate times a direction that does not depend on it
    (SGD: :math:`-g_t \\cdot g_{t-1}`)."""
    return sum((grads[k].double() * updates[k].double()).sum() for k in grads) / lr


# ---------------------------------------------------------------- training

@dataclass
class Run:
    optimizer: str
    rule: str | None
    """``None``: the learning rate stays at ``lr0``."""
    lr0: float
    lrs: list[float] = field(default_factory=list)
    """The learning rate each step used."""
    losses: list[float] = field(default_factory=list)
    """The loss on the whole training set after each step."""
    closed_form_error: float = math.nan
    """Largest ``|h - closed form| / |closed form|`` over the run (horizon 1 only)."""

    @property
    def label(self) -> str:
        return "fixed" if self.rule is None else f"HD {self.rule}"


def train(problem: Problem, optimizer: str, lr0: float, rule: str | None = None, beta: float | None = None,
          horizon: int = 1) -> Run:
    """Train from zero weights with ``optimizer`` starting at ``lr0``; with a ``rule``,
    adapt the learning rate before each step (from the second on) by the hypergradient."""
    tx = holotx.inject_hyperparams(OPTIMIZERS[optimizer])(lr=lr0)
    params = init_params(problem.x.shape[1], problem.x.dtype)
    state = tx.init(params)
    lr = state.hyperparams["lr"]
    run = Run(optimizer, rule, lr0)
    if rule is not None:
        beta = RULES[rule] if beta is None else beta
        hyper_tx = holotx.adam(lr=beta) if rule == "log-adam" else holotx.sgd(lr=beta)
        key = "log_lr" if rule == "log-adam" else "lr"
        hyper_params = {key: lr.log() if rule == "log-adam" else lr}
        hyper_state = hyper_tx.init(hyper_params)
    window: deque[Step] = deque(maxlen=horizon)
    last_updates = None
    worst = 0.0
    for t in range(len(problem.batches)):
        batch = problem.batch(t)
        grads = grad(loss_fn)(params, *batch)
        if rule is not None and window:
            h = hypergradient(tx, window, batch)
            if horizon == 1:
                reference = closed_form(grads, last_updates, window[-1].lr)
                worst = max(worst, float((h - reference).abs() / reference.abs().clamp_min(1e-30)))
            # d loss / d log(lr) = lr * h: the log-adam rule steps in log space.
            hyper_grads = {key: h * lr if rule == "log-adam" else h}
            hyper_updates, hyper_state = hyper_tx.update(hyper_grads, hyper_state, hyper_params)
            hyper_params = holotx.apply_updates(hyper_params, hyper_updates)
            lr = hyper_params[key].exp() if rule == "log-adam" else hyper_params[key]
        state = with_lr(state, lr)
        window.append(Step(params, state, batch, lr))
        last_updates, state = tx.update(grads, state, params)
        params = holotx.apply_updates(params, last_updates)
        run.lrs.append(float(lr))
        run.losses.append(float(loss_fn(params, problem.x, problem.y)))
    if rule is not None and horizon == 1:
        run.closed_form_error = worst
    return run


def print_table(runs: list[Run], steps: int) -> None:
    marks = sorted({1, steps // 10, steps // 4, steps // 2, steps} - {0})
    header = (f"{'start':>8} {'rule':<13}" + "".join(f"{f'lr@{m}':>10}" for m in marks)
              + "".join(f"{f'loss@{m}':>10}" for m in marks))
    print("\n" + header)
    print("-" * len(header))
    for r in runs:
        print(f"{r.lr0:>8g} {r.label:<13}" + "".join(f"{r.lrs[m - 1]:>10.4g}" for m in marks)
              + "".join(f"{r.losses[m - 1]:>10.4f}" for m in marks))


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--horizon", type=int, default=1,
                        help="steps differentiated through for each hypergradient (1: the paper's)")
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES),
                        help="how the hypergradient updates the learning rate")
    parser.add_argument("--beta", type=float, default=None,
                        help=f"hyper-learning rate, for every rule (default per rule: {RULES})")
    parser.add_argument("--starts", type=float, nargs="+", default=None, metavar="LR",
                        help=f"initial learning rates (default, too small and too large: {STARTS})")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--quick", action="store_true", help="150 steps (for the tests)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more do not help a model this small)")
    args = parser.parse_args(argv)
    steps = 150 if args.quick else args.steps
    if steps < 1 or args.horizon < 1:
        parser.error("--steps and --horizon must be >= 1")
    if args.starts is not None and min(args.starts) <= 0:
        parser.error("--starts must be learning rates > 0")
    torch.set_num_threads(args.threads)
    problem = make_problem(steps, seed=args.seed, dtype=getattr(torch, args.dtype))
    starts = args.starts or STARTS[args.optimizer]
    print(f"holotx {holotx.__version__}, torch {torch.__version__}, {args.threads} thread(s): logistic "
          f"regression, {problem.x.shape[1]} features, {steps} steps of {len(problem.batches[0])} points, "
          f"{args.optimizer}, hypergradient through {args.horizon} step(s)", flush=True)
    start = time.perf_counter()
    runs = []
    for lr0 in starts:
        for rule in (None, *args.rules):
            runs.append(train(problem, args.optimizer, lr0, rule, args.beta, args.horizon))
    print_table(runs, steps)
    if args.horizon == 1:
        worst = max(r.closed_form_error for r in runs if r.rule is not None)
        print(f"\nhypergradient through {args.optimizer}'s update vs the closed form g_t.u_(t-1)/lr_(t-1): "
              f"largest relative difference {worst:.1e} ({args.dtype})")
    print(f"({time.perf_counter() - start:.1f} s for {len(runs)} runs)", flush=True)
    return runs


if __name__ == "__main__":
    main(sys.argv[1:])
