"""The batched examples (ensemble, sweep) and the functional loop run, in reduced sizes.

The vmapped runs must equal the same runs done one by one, in float64 to 1e-12 (a batched
matmul may sum in another order, so not bit for bit). The sweep's PNG must be a valid PNG of
the stated size, drawn by matplotlib, and say what it shows. The functional loop must lower
the loss and classify the test set well.
Timings are printed by the examples but never asserted: the speed measurement runs only
with tiny sizes, to check that it runs. Everything runs on one thread (see test_examples.py).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from example_scripts import load_example, read_png

# ---------------------------------------------------------------- ensemble

@pytest.mark.parametrize("optimizer", ["adamw", "lamb", "lookahead(adamw)"])
def test_ensemble_equals_separate_runs(keep_threads, capsys, optimizer):
    ensemble = load_example("ensemble")
    result = ensemble.main(["--quick", "--dtype", "float64", "--optimizer", optimizer, "--threads", "1"])
    out = capsys.readouterr().out
    assert result.models == 4
    assert result.max_abs_diff is not None
    assert result.max_abs_diff <= 1e-12, result.max_abs_diff
    assert result.final_loss < result.initial_loss
    # The mean of the members' probabilities: never a worse log-loss than the mean member.
    assert result.scores.ensemble_nll <= result.mean_member_nll
    assert len(set(result.scores.member_nll)) == result.models  # independent members
    assert "max |batched - separate|" in out
    assert "ensemble" in out


def test_ensemble_members_are_independent(keep_threads):
    """Member i of the batched run is the run that starts from member i's weights and
    draws member i's batches, whatever the other members do."""
    ensemble = load_example("ensemble")
    torch.set_num_threads(1)
    task = ensemble.make_task(models=3, steps=5, hidden=8, dtype=torch.float64)
    tx = ensemble.make_optimizer("adamw", 1e-2)
    batched, _ = ensemble.train_batched(task, tx)
    task.params = {k: v[1:2] for k, v in task.params.items()}
    task.batches = task.batches[:, 1:2]
    alone = ensemble.train_separately(task, tx)
    assert max(float((batched[k][1] - alone[k][0]).abs().max()) for k in alone) <= 1e-12


def test_ensemble_rejects_unknown_optimizer(keep_threads):
    ensemble = load_example("ensemble")
    with pytest.raises(SystemExit):
        ensemble.main(["--quick", "--optimizer", "lookahead(nosuch)"])


# ---------------------------------------------------------------- sweep

def test_sweep_equals_separate_runs_and_plots(keep_threads, capsys, tmp_path):
    sweep = load_example("sweep")
    png = tmp_path / "curves.png"
    result = sweep.main(["--quick", "--dtype", "float64", "--lr-range", "1e-3", "3e-2", "--plot", str(png),
                         "--threads", "1"])
    out = capsys.readouterr().out
    assert len(result.lrs) == 4
    assert result.max_abs_diff is not None
    assert max(result.max_abs_diff) <= 1e-12, result.max_abs_diff
    assert result.lrs[0] == pytest.approx(1e-3)
    assert result.lrs[-1] == pytest.approx(3e-2)
    # Training lowered the loss, and the best configuration is the one printed.
    assert float(result.curves[-1].min()) < float(result.curves[0].max())
    assert result.test_loss[result.best] == min(result.test_loss)
    match = re.search(r"^best configuration: lr=(\S+),", out, flags=re.MULTILINE)
    assert match, out
    assert float(match.group(1)) == pytest.approx(result.lrs[result.best], rel=1e-2)
    assert " <- best" in out
    width, height, colors = read_png(png.read_bytes())
    assert (width, height) == (800, 480)
    assert len(colors) >= 4 + 3  # white, black, grey and one colour per learning rate (at least)
    assert f"loss curves written to {png}" in out


def test_sweep_init_gives_each_configuration_its_lr(keep_threads):
    sweep = load_example("sweep")
    torch.set_num_threads(1)
    task = sweep.make_task(steps=2, hidden=4, dtype=torch.float64)
    lrs = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)
    params, _, _ = sweep.sweep_batched(task, lrs, 0.0)
    reference = sweep.sweep_sequential(task, lrs, 0.0)
    for j in range(3):
        assert max(float((params[k][j] - reference[k][j]).abs().max()) for k in params) <= 1e-12
    assert not torch.equal(params["0.weight"][0], params["0.weight"][2])


def test_sweep_timing_and_fallback_run_tiny(keep_threads, capsys):
    """Only that the measurements run; what they measure is not checked."""
    sweep = load_example("sweep")
    result = sweep.main(["--lrs", "2", "--steps", "2", "--hidden", "4", "--no-check", "--plot", "", "--time",
                         "--rounds", "1", "--fallback-cost", "--threads", "1"])
    out = capsys.readouterr().out
    assert result.plot is None
    assert result.batched_seconds > 0
    assert result.sequential_seconds > 0
    assert set(result.fallback_us) >= {"vmapped (per-leaf ops)", "stacked tensors, foreach, no vmap"}
    assert "faster batched" in out


def test_sweep_plot_reads_on_its_own(tmp_path):
    """The plot says what it shows: axis labels with units, a title, one legend entry per
    learning rate, the best one and a diverged one marked."""
    sweep = load_example("sweep")
    curves = torch.tensor([[0.7, 0.7, 0.7], [0.5, 0.3, 2.0], [0.4, 0.1, math.nan]], dtype=torch.float64)
    fig = sweep.plot_curves(tmp_path / "p.png", [0, 5, 10], curves, [1e-3, 1e-2, 1.0], best=1,
                            about="a test")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "training step"
    assert "loss" in ax.get_ylabel()
    assert "nats" in ax.get_ylabel()
    assert ax.get_yscale() == "log"
    assert "learning-rate sweep" in ax.get_title()
    assert "a test" in ax.get_title()
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "learning rate"
    assert [t.get_text() for t in legend.get_texts()] == ["1.0e-03", "1.0e-02 (best test loss)",
                                                          "1.0e+00 (diverged)"]
    width, height, _ = read_png((tmp_path / "p.png").read_bytes())
    assert (width, height) == (800, 480)


# ---------------------------------------------------------------- functional loop

def test_functional_loop_learns(keep_threads, capsys):
    loop = load_example("functional_loop")
    result = loop.main(["--quick", "--lr", "0.1", "--threads", "1"])
    out = capsys.readouterr().out
    assert math.isfinite(result.train_loss)
    assert result.train_loss < 0.5 * result.initial_loss
    assert result.test_accuracy > 0.85
    assert result.test_loss < result.initial_loss
    assert [h[0] for h in result.history][-1] == 300
    assert "test acc" in out


def test_functional_loop_float64_is_deterministic(keep_threads):
    loop = load_example("functional_loop")
    argv = ["--steps", "12", "--dtype", "float64", "--threads", "1"]
    assert loop.main(argv).train_loss == loop.main(argv).train_loss


@pytest.mark.slow
def test_functional_loop_compiled_matches_eager(keep_threads, fresh_dynamo):
    """The compiled step (about 10 s to compile) gives the eager numbers to rounding."""
    loop = load_example("functional_loop")
    argv = ["--steps", "30", "--dtype", "float64", "--threads", "1"]
    eager, compiled = loop.main(argv), loop.main([*argv, "--compile"])
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-9)
