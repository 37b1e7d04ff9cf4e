"""Drop-in classes for ``holocron.optim``: Holocron's constructor signatures (same names,
order and defaults), holotx's algorithms, plus ``compat`` (``"holocron"`` reproduces
Holocron 0.3.0's numerics; see each factory's docstring for the differences).

Every class is a :class:`~holotx.adapters.TransformOptimizer` over the matching factory,
so every hyperparameter lives in the param groups and may differ per group or change
between steps. Keyword-only options beyond Holocron's (``maximize``, ``state_dtype``,
the factory's own such as ``trust_ratio_mask``) follow ``compat``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import holotx

from .optimizer import TransformOptimizer

__all__ = ["LAMB", "LARS", "AdEMAMix", "AdaBelief", "AdamP", "Adan", "RaLars", "TAdam"]

Params = Iterable[Any]


class LARS(TransformOptimizer):
    """LARS (You et al., 2017) as ``holocron.optim.LARS``; the math is :func:`holotx.lars`'s."""

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 scale_clip: tuple[float, float] | None = None, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.lars, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, scale_clip=scale_clip, compat=compat,
                         maximize=maximize, state_dtype=state_dtype, **options)


class LAMB(TransformOptimizer):
    """LAMB (You et al., 2020) as ``holocron.optim.LAMB``; the math is :func:`holotx.lamb`'s."""

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, scale_clip: tuple[float, float] | None = None,
                 *, compat: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.lamb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         scale_clip=scale_clip, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)


class RaLars(TransformOptimizer):
    """RAdam with LARS trust ratios, as ``holocron.optim.RaLars``; the math is
    :func:`holotx.ralars`'s."""

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, force_adaptive_momentum: bool = False,
                 scale_clip: tuple[float, float] | None = None, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.ralars, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         force_adaptive_momentum=force_adaptive_momentum, scale_clip=scale_clip,
                         compat=compat, maximize=maximize, state_dtype=state_dtype, **options)


class TAdam(TransformOptimizer):
    """TAdam (Ilboudo et al., 2020) as ``holocron.optim.TAdam``; the math is
    :func:`holotx.tadam`'s."""

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 dof: float | None = None, *, compat: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.tadam, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, dof=dof, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)


class AdaBelief(TransformOptimizer):
    """AdaBelief (Zhuang et al., 2020) as ``holocron.optim.AdaBelief``, whose signature is
    ``torch.optim.Adam``'s; the math is :func:`holotx.adabelief`'s.

    ``foreach`` is accepted and ignored (holotx picks its kernels); ``fused=True`` is
    :class:`~holotx.adapters.TransformOptimizer`'s (flat buffers, one compiled step);
    ``capturable`` and ``differentiable`` are accepted at their defaults only (Holocron
    ignores them silently; holotx says so): to differentiate through steps, use the
    functional API. Unlike Holocron, ``maximize=True`` ascends."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, compat: str | None = None,
                 state_dtype: torch.dtype | None = None) -> None:
        del foreach
        for name, value in (("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise ValueError(f"AdaBelief does not support {name}=True (holotx's functional API "
                                 "differentiates through steps and compiles them)")
        super().__init__(params, holotx.adabelief, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay, compat=compat,
                         maximize=maximize, state_dtype=state_dtype, fused=False if fused is None else fused)


class AdamP(TransformOptimizer):
    """AdamP (Heo et al., 2021) as ``holocron.optim.AdamP``; the math is :func:`holotx.adamp`'s."""

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, delta: float = 0.1,
                 *, compat: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.adamp, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, delta=delta, compat=compat, maximize=maximize,
                         state_dtype=state_dtype, **options)


class Adan(TransformOptimizer):
    """Adan (Xie et al., 2022) as ``holocron.optim.Adan``; the math is :func:`holotx.adan`'s."""

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.adan, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)


class AdEMAMix(TransformOptimizer):
    """AdEMAMix (Pagliardini et al., 2024) as ``holocron.optim.AdEMAMix``; the math is
    :func:`holotx.ademamix`'s."""

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 eps: float = 1e-8, weight_decay: float = 0.0, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.ademamix, lr=lr, betas=betas, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)
