"""The data the examples share: two noisy interleaved spirals, generated from a seed
(nothing is downloaded). Imported by the example scripts, which put this folder on the
import path when run as ``python examples/<name>.py``."""

from __future__ import annotations

import math

import torch


def spirals(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on two interleaved spirals (two turns each, radius up to about 4),
    with Gaussian noise of standard deviation ``noise``; labels 0 and 1."""
    labels = torch.arange(n) % 2
    t = torch.rand(n, generator=generator) * 4 * math.pi + 0.5
    angle = t + labels * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / math.pi
    return x + noise * torch.randn(n, 2, generator=generator), labels
