"""What the spirals examples share (demo, ensemble, sweep, functional_loop): the data, two
noisy interleaved spirals generated from a seed (nothing is downloaded), the MLP that
classifies them, one pure training step, and the figure the plots are drawn on. Imported
from this folder, which Python puts on the import path when it runs
``python examples/<name>.py``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

import holotx

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Params = dict[str, torch.Tensor]
Step = Callable[[Params, Any, torch.Tensor, torch.Tensor], tuple[Params, Any, torch.Tensor]]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def spirals(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on two interleaved spirals (two turns each, radius up to about 4),
    with Gaussian noise of standard deviation ``noise``; labels 0 and 1."""
    labels = torch.arange(n) % 2
    t = torch.rand(n, generator=generator) * 4 * math.pi + 0.5
    angle = t + labels * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / math.pi
    return x + noise * torch.randn(n, 2, generator=generator), labels


def make_model(hidden: int = 64) -> nn.Module:
    """A 2 -> hidden -> hidden -> 2 MLP with tanh (4,482 parameters at ``hidden=64``)."""
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 2))


def make_step(model: nn.Module, tx: holotx.GradientTransformation) -> Step:
    """``step(params, state, x, y) -> (params, state, loss)``: one pure training step
    (cross-entropy through ``functional_call``), so that ``vmap`` can batch it and
    ``torch.compile`` can compile it."""

    def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    grad_fn = grad_and_value(loss_fn)

    def step(params, state, x, y):
        grads, loss = grad_fn(params, x, y)
        updates, state = tx.update(grads, state, params)
        return holotx.apply_updates(params, updates), state, loss

    return step


def figure(width: float, height: float) -> Figure:
    """A matplotlib figure of ``width`` x ``height`` inches at 100 dpi (800 x 480 pixels for
    8 x 4.8), with constrained layout, drawn by the non-interactive Agg backend: it is
    saved to a file (``fig.savefig(path)``) and never opens a window. matplotlib (the
    ``examples`` extra; holotx itself never imports it) is imported here, on first use, so
    an example run without a plot does not need it. No pyplot: no global figure state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the plot needs matplotlib, the examples extra: pip install -c constraints.txt "
            "-e '.[examples]' (make venv installs it), or pass --plot '' for no plot") from e
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def log_y(ax: Axes) -> None:
    """A log y-axis labelled in plain numbers (0.01, 0.2, 1), as many as fit: the decades
    when it spans more than two, also 2 and 5 times them down to 0.6 decade, every tick of
    a narrower span (matplotlib's default labels only the decades, in 1e-02 notation)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")

    def label(v: float, _pos: int | None) -> str:
        lo, hi = sorted(ax.yaxis.get_view_interval())
        decades = math.log10(hi / lo) if lo > 0 else math.inf
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9)) if v > 0 else 0
        keep = {1} if decades > 2 else {1, 2, 5} if decades > 0.6 else set(range(1, 10))
        return f"{v:g}" if mantissa in keep else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))
