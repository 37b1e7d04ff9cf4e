"""The examples run, and every ```python block of README.md runs as written.

The demo runs in its quick mode (30 steps per optimizer) and must lower the training loss
with every optimizer, and give the same numbers through the pure and the in-place way (the
same math; float32 rounding may differ by the order of a few ulps, hence the tolerance). The
benchmark runs on its small set with one optimizer, one timed step and no compile: this checks
that it runs, not what it measures. Both run on one thread: with two, the tiny ops that torch
parallelises wait milliseconds for a core whenever other processes keep the cores busy.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from example_scripts import load_example

ROOT = Path(__file__).resolve().parent.parent


def test_demo_quick_lowers_the_loss_with_every_optimizer(keep_threads, capsys):
    demo = load_example("demo")
    results = demo.main(["--quick", "--ways", "functional", "inplace", "--threads", "1"])
    out = capsys.readouterr().out
    names = list(demo.optimizers(30))
    ways = ("functional", "inplace")
    assert {(r.optimizer, r.way) for r in results} == {(n, w) for n in names for w in ways}
    for r in results:
        assert math.isfinite(r.train_loss), r
        assert r.train_loss < r.initial_loss, r
        assert 0.0 <= r.test_accuracy <= 1.0
        assert r.ms_per_step > 0
    by_key = {(r.optimizer, r.way): r for r in results}
    for n in names:
        pure, inplace = by_key[n, "functional"], by_key[n, "inplace"]
        assert inplace.train_loss == pytest.approx(pure.train_loss, rel=1e-4), n
    assert "step    30" in out  # progress lines
    assert "ms/step" in out  # the results table


def test_demo_is_deterministic(keep_threads):
    demo = load_example("demo")
    argv = ["--steps", "5", "--optimizers", "adamw", "--threads", "1"]
    first, second = demo.main(argv), demo.main(argv)
    assert [r.train_loss for r in first] == [r.train_loss for r in second]


def test_benchmark_runs_tiny(keep_threads, capsys):
    benchmark = load_example("benchmark")
    benchmark.main(["--sets", "small", "--optimizers", "adamw", "--steps", "1", "--warmup", "0",
                    "--no-compile", "--threads", "1"])
    out = capsys.readouterr().out
    for label in ("torch fused", "holotx pure", "holotx donated", "holotx adapter", "donate_grads",
                  "memory floor"):
        assert label in out


def test_benchmark_times_the_adapter_at_several_batch_sizes(keep_threads, capsys):
    """``--batch-bytes``: one adapter row per size, the executor's own size restored after."""
    from holotx import executor

    before = executor.CACHE_BATCH_BYTES
    benchmark = load_example("benchmark")
    benchmark.main(["--sets", "tiny", "--optimizers", "adamw", "--steps", "1", "--warmup", "0",
                    "--rounds", "1", "--no-compile", "--threads", "1", "--batch-bytes", "0", "4096"])
    out = capsys.readouterr().out
    assert "holotx adapter, no batches" in out
    assert "holotx adapter, batches 4 KiB" in out
    assert before == executor.CACHE_BATCH_BYTES


def test_benchmark_runs_holocron_side_by_side(keep_threads, capsys):
    """Holocron's own class (pylocron) and kozistr's pytorch-optimizer (both test
    dependencies) are timed beside holotx's paths."""
    benchmark = load_example("benchmark")
    benchmark.main(["--sets", "small", "--optimizers", "lamb", "adan", "lookahead_adamw", "--steps", "1",
                    "--warmup", "0", "--rounds", "1", "--no-compile", "--threads", "1"])
    out = capsys.readouterr().out
    for name in ("LAMB", "Adan", r"Lookahead\(AdamW\)"):
        assert re.search(rf"^{name} +Holocron \(pylocron\) ", out, flags=re.MULTILINE), name
        assert re.search(rf"^{name} +pytorch-optimizer ", out, flags=re.MULTILINE), name
        assert re.search(rf"^{name} +holotx donated ", out, flags=re.MULTILINE), name
        assert re.search(rf"^{name} +holotx adapter ", out, flags=re.MULTILINE), name
    for floor in ("(40 B/param)", "(44 B/param)", "(29.3 B/param)"):
        assert floor in out


def test_benchmark_floor_kernels_move_the_stated_bytes():
    """Each floor pass reads ``r`` buffers once and writes ``w`` of them (the others are
    left alone), and the passes add up to the bytes per param the table prints."""
    benchmark = load_example("benchmark")
    xs = [torch.full((5,), float(i + 1)) for i in range(4)]
    benchmark._traffic_kernel(4, 3)(*xs)
    assert [x[0].item() for x in xs] == [5.0, 6.0, 7.0, 4.0]
    xs = [torch.full((5,), 2.0) for _ in range(2)]
    assert benchmark._traffic_kernel(2, 0)(*xs).item() == 20.0
    assert all(torch.equal(x, torch.full((5,), 2.0)) for x in xs)
    benchmark._traffic_kernel(2, 2)(*xs)
    assert all(torch.equal(x, torch.full((5,), 3.0)) for x in xs)
    algos = benchmark.ALGORITHMS
    stated = {"adamw": 28, "sgd": 20, "lars": 28, "lamb": 40, "tadam": 40, "adamp": 40, "adan": 44,
              "ademamix": 36, "lookahead_adamw": 28 + 8 / 6, "scout_adamw": (5 * 60 + 76) / 6}
    assert {k: algos[k].bytes_per_param for k in stated} == pytest.approx(stated)
    assert algos["scout_adamw"].period == algos["lookahead_adamw"].period == 6


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_python_blocks():
    assert len(readme_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_block_runs(index, capsys):
    torch._dynamo.reset()
    code = readme_blocks()[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    torch._dynamo.reset()
