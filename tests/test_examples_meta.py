"""The meta-learning examples run, learn, and compute the meta-gradients they claim to.

``examples/maml.py`` (MAML through holotx inner optimizers) runs in reduced size: the
meta-loss must fall and adaptation must help on held-out tasks, with SGD, Adam and
Lookahead(Adam) inside, second and first order; the task batch run by ``vmap`` must give
the meta-gradient of a Python loop over the same tasks, and first order must be the query
gradient at the adapted params. ``examples/learned_lr.py`` (hypergradient descent) must move
the learning rate the right way from both ends and beat the fixed rate, and its
hypergradient, taken by ``torch.func.grad`` through ``tx.update``, must equal the closed form
(SGD: :math:`-g_t \\cdot g_{t-1}`) and a finite difference through a longer window. Everything
runs on one thread (see tests/test_examples.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from example_scripts import load_example
from torch.func import grad

import holotx


@pytest.fixture(scope="module")
def maml():
    return load_example("maml")


@pytest.fixture(scope="module")
def learned_lr():
    return load_example("learned_lr")


def quarter_means(xs: list[float]) -> tuple[float, float]:
    q = len(xs) // 4
    return sum(xs[:q]) / q, sum(xs[-q:]) / q


# ---------------------------------------------------------------- MAML

def test_maml_quick_meta_loss_falls_and_adaptation_helps(maml, keep_threads, capsys):
    result = maml.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert len(result.meta_losses) == 400
    assert all(math.isfinite(x) for x in result.meta_losses)
    first, last = quarter_means(result.meta_losses)
    assert last < 0.8 * first, (first, last)
    assert result.post_adaptation < result.pre_adaptation
    assert result.post_adaptation < result.init_post_adaptation  # the meta-learned init is better
    assert "iteration   400  meta-loss" in out
    assert "after 3 sgd steps" in out


@pytest.mark.parametrize(("inner", "first_order"), [
    ("adam", False), ("lookahead_adam", False), ("sgd", True), ("adam", True),
])
def test_maml_with_other_inner_optimizers(maml, keep_threads, inner, first_order):
    argv = ["--inner", inner, "--iterations", "150", "--eval-tasks", "50", "--threads", "1"]
    result = maml.main([*argv, "--first-order"] if first_order else argv)
    assert (result.inner, result.first_order) == (inner, first_order)
    assert all(math.isfinite(x) for x in result.meta_losses)
    first, last = quarter_means(result.meta_losses)
    assert last < 0.95 * first, (first, last)
    assert result.post_adaptation < result.pre_adaptation
    assert result.post_adaptation < result.init_post_adaptation


def maml_setup(maml, n_tasks: int = 4):
    model = maml.make_model()
    params = maml.init_params(3, torch.float64)
    tasks = maml.sample_tasks(n_tasks, 10, torch.Generator().manual_seed(5), torch.float64)
    return model, params, tasks


@pytest.mark.parametrize(("inner", "first_order"), [
    ("sgd", False), ("adam", False), ("lookahead_adam", False), ("adam", True),
])
def test_maml_vmapped_meta_gradient_equals_a_loop_over_tasks(maml, inner, first_order):
    model, params, tasks = maml_setup(maml)
    task_loss = maml.make_task_loss(model, maml.make_inner(inner), 3, first_order)
    vmapped, loss = maml.meta_loss_and_grad(task_loss, params, tasks)
    n = tasks[0].shape[0]
    per_task = [grad(task_loss)(params, *(t[i] for t in tasks)) for i in range(n)]
    looped = {k: sum(g[k] for g in per_task) / n for k in params}
    losses = [task_loss(params, *(t[i] for t in tasks)) for i in range(n)]
    assert all(torch.isfinite(g).all() for g in vmapped.values())
    torch.testing.assert_close(loss, sum(losses) / n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vmapped, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_maml_first_order_is_the_query_gradient_at_the_adapted_params(maml, inner):
    """FOMAML: the meta-gradient is the query-loss gradient at the adapted params (the
    adapted params' Jacobian taken as the identity), here for updates that do not read the
    params."""
    model, params, tasks = maml_setup(maml, 1)
    sx, sy, qx, qy = (t[0] for t in tasks)
    tx = maml.make_inner(inner)
    task_loss = maml.make_task_loss(model, tx, 3, first_order=True)
    meta_grad = grad(task_loss)(params, sx, sy, qx, qy)

    adapted, state = params, tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grad(maml.mse, argnums=1)(model, adapted, sx, sy), state, adapted)
        adapted = holotx.apply_updates(adapted, updates)
    expected = grad(maml.mse, argnums=1)(model, adapted, qx, qy)
    torch.testing.assert_close(meta_grad, expected, rtol=1e-12, atol=1e-12)


def test_maml_second_order_adam_is_finite_with_dead_units(maml):
    """A ReLU unit dead on a support set has a zero gradient, hence a zero second moment,
    where sqrt's derivative is infinite: holotx's differentiated sqrt takes 0 there, so
    Adam's second-order meta-gradient stays finite."""
    model, params, tasks = maml_setup(maml, 8)
    meta_grad, loss = maml.meta_loss_and_grad(maml.make_task_loss(model, maml.make_inner("adam"), 3),
                                              params, tasks)
    support_x = tasks[0]  # (task, shot, 1)
    hidden = torch.relu(support_x @ params["0.weight"].T + params["0.bias"])
    assert (hidden == 0).all(dim=1).any(), "no unit is dead on a whole support set: the test tests nothing"
    assert all(torch.isfinite(g).all() for g in meta_grad.values())
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- learned learning rate

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_learned_lr_adapts_from_both_ends_and_beats_the_fixed_rate(learned_lr, keep_threads, capsys,
                                                                   optimizer):
    runs = learned_lr.main(["--quick", "--optimizer", optimizer, "--threads", "1"])
    out = capsys.readouterr().out
    too_small, too_large = learned_lr.STARTS[optimizer]
    by_key = {(r.lr0, r.rule): r for r in runs}
    rules = (None, *learned_lr.RULES)
    assert set(by_key) == {(lr0, rule) for lr0 in (too_small, too_large) for rule in rules}
    for r in runs:
        assert len(r.losses) == len(r.lrs) == 150
        assert all(math.isfinite(x) for x in r.losses)
    for rule in learned_lr.RULES:
        small, large = by_key[too_small, rule], by_key[too_large, rule]
        assert small.lrs[-1] > 2 * too_small, (rule, small.lrs[-1])
        assert large.lrs[-1] < too_large, (rule, large.lrs[-1])
        for lr0, run in ((too_small, small), (too_large, large)):
            fixed = by_key[lr0, None]
            assert fixed.lrs == [lr0] * 150
            assert run.losses[-1] < fixed.losses[-1], (rule, lr0, run.losses[-1], fixed.losses[-1])
        assert max(small.closed_form_error, large.closed_form_error) < 1e-3  # float32
    assert "largest relative difference" in out


def hyper_setup(learned_lr, optimizer: str):
    problem = learned_lr.make_problem(3, dtype=torch.float64)
    tx = holotx.inject_hyperparams(learned_lr.OPTIMIZERS[optimizer])(lr=0.3)
    params = {"w": torch.linspace(-1.0, 1.0, 20, dtype=torch.float64),
              "b": torch.tensor(0.2, dtype=torch.float64)}
    return problem, tx, params, tx.init(params)


def test_sgd_hypergradient_equals_the_closed_form(learned_lr):
    """SGD: :math:`\\theta_t = \\theta_{t-1} - \\alpha g_{t-1}`, so
    :math:`\\partial L_t(\\theta_t)/\\partial\\alpha = -g_t \\cdot g_{t-1}`."""
    problem, tx, params, state = hyper_setup(learned_lr, "sgd")
    lr = torch.tensor(0.3, dtype=torch.float64)
    window = [learned_lr.Step(params, learned_lr.with_lr(state, lr), problem.batch(0), lr)]
    h = learned_lr.hypergradient(tx, window, problem.batch(1))

    g_prev = grad(learned_lr.loss_fn)(params, *problem.batch(0))
    stepped = {k: params[k] - lr * g_prev[k] for k in params}
    g_now = grad(learned_lr.loss_fn)(stepped, *problem.batch(1))
    expected = -sum((g_now[k] * g_prev[k]).sum() for k in params)
    assert abs(float(h - expected)) <= 1e-10 * max(1.0, abs(float(expected))), (float(h), float(expected))
    assert abs(float(expected)) > 1e-3  # not trivially zero


def test_adam_hypergradient_equals_the_closed_form(learned_lr):
    """For one step of any update that is ``lr`` times a direction: :math:`g_t \\cdot u_{t-1} / \\alpha`."""
    problem, tx, params, state = hyper_setup(learned_lr, "adam")
    # A step first, so that the moments are not zero.
    updates, state = tx.update(grad(learned_lr.loss_fn)(params, *problem.batch(0)), state, params)
    params = holotx.apply_updates(params, updates)
    lr = torch.tensor(0.05, dtype=torch.float64)
    state = learned_lr.with_lr(state, lr)
    window = [learned_lr.Step(params, state, problem.batch(1), lr)]
    h = learned_lr.hypergradient(tx, window, problem.batch(2))

    updates, _ = tx.update(grad(learned_lr.loss_fn)(params, *problem.batch(1)), state, params)
    g_now = grad(learned_lr.loss_fn)(holotx.apply_updates(params, updates), *problem.batch(2))
    expected = learned_lr.closed_form(g_now, updates, lr)
    assert abs(float(h - expected)) <= 1e-10 * max(1.0, abs(float(expected)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_hypergradient_through_a_window_matches_a_finite_difference(learned_lr, optimizer):
    problem, tx, params, state = hyper_setup(learned_lr, optimizer)
    lrs = [torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)]
    window = []
    for t, lr in enumerate(lrs):
        state = learned_lr.with_lr(state, lr)
        window.append(learned_lr.Step(params, state, problem.batch(t), lr))
        updates, state = tx.update(grad(learned_lr.loss_fn)(params, *problem.batch(t)), state, params)
        params = holotx.apply_updates(params, updates)
    h = learned_lr.hypergradient(tx, window, problem.batch(2))
    eps = 1e-6
    loss = lambda d: float(learned_lr.loss_after_window(tx, window, problem.batch(2),
                                                        torch.tensor(d, dtype=torch.float64)))
    assert loss(0.0) == float(learned_lr.loss_fn(params, *problem.batch(2)))  # the replay is the run
    finite_difference = (loss(eps) - loss(-eps)) / (2 * eps)
    assert float(h) == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)


def test_learned_lr_runs_with_a_longer_horizon(learned_lr, keep_threads, capsys):
    runs = learned_lr.main(["--steps", "40", "--horizon", "3", "--rules", "log-adam", "--threads", "1"])
    assert len(runs) == 4
    assert all(math.isnan(r.closed_form_error) for r in runs)  # only checked with horizon 1
    small = next(r for r in runs if r.rule == "log-adam" and r.lr0 == learned_lr.STARTS["sgd"][0])
    assert small.lrs[-1] > small.lr0
    assert "through 3 step(s)" in capsys.readouterr().out
