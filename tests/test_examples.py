"""The examples run, and every ```python block of README.md runs as written.

The demo runs in its quick mode (30 steps per optimizer) and must lower the training loss
with every optimizer, and give the same numbers through the pure and the in-place way (the
same math; float32 rounding may differ by the order of a few ulps, hence the tolerance). The
benchmark runs on its small set with one optimizer, one timed step and no compile: this checks
that it runs, not what it measures. Both run on one thread: with two, the tiny ops that torch
parallelises wait milliseconds for a core whenever other processes keep the cores busy.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from example_scripts import load_example, read_png

ROOT = Path(__file__).resolve().parent.parent


def test_demo_quick_lowers_the_loss_with_every_optimizer(keep_threads, capsys):
    demo = load_example("demo")
    results = demo.main(["--quick", "--ways", "functional", "inplace", "--threads", "1", "--plot", ""])
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
    argv = ["--steps", "5", "--optimizers", "adamw", "--threads", "1", "--plot", ""]
    first, second = demo.main(argv), demo.main(argv)
    assert [r.train_loss for r in first] == [r.train_loss for r in second]


def test_demo_quick_plots_the_loss_curves(keep_threads, capsys, tmp_path):
    """The demo ends with a PNG of the loss curves (matplotlib), named in its output; each
    run's curve starts at the initial loss and ends at the final one in the table."""
    demo = load_example("demo")
    png = tmp_path / "curves.png"
    results = demo.main(["--quick", "--optimizers", "adamw", "lars", "lookahead", "--threads", "1",
                         "--plot", str(png)])
    out = capsys.readouterr().out
    assert f"loss curves written to {png}" in out
    width, height, colors = read_png(png.read_bytes())
    assert (width, height) == (3 * 500 + 50, 520)  # three panels: torch's, Holocron's, wrappers
    assert len(colors) >= 3 + 3  # white, black, grey and a colour per optimizer (at least)
    for r in results:
        assert r.steps == list(range(31))  # every step of the 30 (60 points at most)
        assert r.losses[0] == r.initial_loss
        assert r.losses[-1] == r.train_loss


def test_demo_plot_reads_on_its_own(tmp_path):
    """Panels titled by family, axes labelled with units, one legend entry per optimizer
    (and plain AdamW beside the wrappers; a curve drawn over a matching one says so), the
    ways and the data said in the title."""
    demo = load_example("demo")

    def result(name: str, way: str, losses: list[float]):
        return demo.Result(name, way, losses[0], losses[-1], 0.5, 1.0, [0, 10, 20], losses)

    results = [result(n, w, [0.7, 0.4, 0.2]) for n in ("adamw", "lamb", "lookahead(adamw)", "new one")
               for w in ("functional", "inplace")]
    results += [result("adam", "functional", [0.7, 0.44, 0.2]),  # adamw's within 12%
                result("radam", "functional", [0.7, 0.5, 0.3])]
    fig = demo.plot_curves(tmp_path / "p.png", results, about="a test")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["torch.optim's rules, and a chain", "Holocron's eight",
                      "Holocron's wrappers, around AdamW", "new one"]
    assert all(ax.get_xlabel() == "training step" for ax in fig.axes)
    assert "nats" in fig.axes[0].get_ylabel()
    assert fig.axes[0].get_yscale() == "log"
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["adam", "adamw (\u2248 adam, over it)", "radam"], ["lamb"],
                       ["adamw alone", "lookahead(adamw)"], ["new one"]]
    title = fig.get_suptitle()
    assert "a test" in title
    assert "functional way solid, inplace dashed" in title
    assert read_png((tmp_path / "p.png").read_bytes())[:2] == (4 * 500 + 50, 520)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_redrawn_line_on_a_terminal():
    demo = load_example("demo")
    stream = Terminal()
    progress = demo.Progress(20, stream=stream, redraw=0.0)
    progress.update(5, "run a step 5")
    progress.update(10, "run a step 10", end_of_run=True)
    progress.update(20, "run b step 10", end_of_run=True)
    assert "\n" not in stream.getvalue()  # one line, redrawn
    assert stream.getvalue().count("\r") == 3
    assert stream.getvalue().endswith("run b step 10")
    assert "100% [" + "#" * 20 + "]" in stream.getvalue()
    progress.update(20, "long text", end_of_run=True, short="short text")  # the terminal's line takes short
    # What is left of the longer line before it is blanked with spaces.
    assert stream.getvalue().endswith("short text   ")
    progress.close()
    assert stream.getvalue().endswith("short text   \n")
    # Redrawn at most every `redraw` seconds, and as each run ends.
    stream = Terminal()
    progress = demo.Progress(20, stream=stream, redraw=3600.0)
    progress.update(5, "run a step 5")
    progress.update(10, "run a step 10", end_of_run=True)
    assert stream.getvalue().count("\r") == 1
    assert "run a step 5" not in stream.getvalue()


def test_progress_is_plain_lines_off_a_terminal(keep_threads, capsys):
    """Not a terminal (a pipe, a file, captured output): a plain line as each run ends
    (and one every ``every`` seconds of a long run), never a carriage return."""
    demo = load_example("demo")
    stream = io.StringIO()
    progress = demo.Progress(20, stream=stream, every=3600.0)
    progress.update(5, "run a step 5")
    progress.update(10, "run a step 10", end_of_run=True)
    progress.close()
    assert stream.getvalue() == "  run a step 10\n"
    progress = demo.Progress(20, stream=stream, every=0.0)
    progress.update(15, "run b step 5")
    assert stream.getvalue().endswith("  run b step 5\n")

    demo.main(["--steps", "12", "--optimizers", "radam", "lamb", "--threads", "1", "--plot", ""])
    out = capsys.readouterr().out
    assert "\r" not in out
    ends = [line for line in out.splitlines() if "step    12  train loss" in line]
    assert len(ends) == 4  # one as each run ends: two optimizers, two ways


def test_holotx_never_imports_matplotlib():
    """matplotlib is the examples' (an optional extra): importing every module of holotx and
    holotx.adapters, in a fresh interpreter, loads none of it."""
    code = """if True:
        import importlib, pkgutil, sys
        import holotx, holotx.adapters
        for pkg in (holotx, holotx.adapters):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(m.name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "PIL"))
        assert not loaded, loaded
        print("ok", len(sys.modules))
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok")


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


def test_the_benchmark_counts_the_fresh_tensors_a_step_keeps_alive_at_once():
    """``peak_fresh_bytes``: a new tensor counts for its storage while it lives; an
    in-place or ``out=`` result and a view count nothing."""
    benchmark = load_example("benchmark")
    x, out = torch.zeros(1 << 16), torch.empty(1 << 16)

    def two_at_once():
        a = x + 1  # 256 KiB
        b = a * 2  # another 256 KiB, while a lives
        del a
        c = b + 1  # a freed: still two at once
        return c.sum()

    assert benchmark.peak_fresh_bytes(two_at_once) == 2 * x.nbytes + 4
    assert benchmark.peak_fresh_bytes(lambda: (x.add_(1), torch.add(x, 1, out=out), x.view(2, -1))) == 0


def test_benchmark_gives_the_peak_memory_of_each_eager_row(keep_threads, capsys):
    benchmark = load_example("benchmark")
    benchmark.main(["--sets", "tiny", "--optimizers", "sgd", "--steps", "1", "--warmup", "0", "--rounds", "1",
                    "--no-compile", "--threads", "1", "--peak-memory"])
    out = capsys.readouterr().out
    assert "fresh MiB" in out
    rows = {line[17:48].strip(): line[48:].split() for line in out.splitlines() if line.startswith("SGD")}
    # (ms, x ref, x floor, fresh MiB): the pure step makes new params and a new momentum buffer
    # (80 KB), the donated one nothing
    assert float(rows["holotx pure"][3]) > 0.03
    assert float(rows["holotx donated"][3]) < 0.001


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


def test_readme_layout_lists_every_example():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert re.search(rf"^  {re.escape(script.name)} ", layout, flags=re.MULTILINE), script.name


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
