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
    r"""LARS (You et al., 2017) as ``holocron.optim.LARS``; the math is :func:`holotx.lars`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        momentum: the momentum factor (default ``0``).
        dampening: the dampening (default ``0``).
        weight_decay: :math:`\lambda` (default ``0``).
        nesterov: Nesterov momentum (default ``False``).
        scale_clip: the clamp of the weight norm in the trust ratio (default ``None``: ``(0, 10)``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import LARS
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = LARS([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.8472, -2.1528,  3.3055], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['inner.trace']

    References:
        You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
        https://arxiv.org/abs/1708.03888.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 scale_clip: tuple[float, float] | None = None, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.lars, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, scale_clip=scale_clip, compat=compat,
                         maximize=maximize, state_dtype=state_dtype, **options)


class LAMB(TransformOptimizer):
    r"""LAMB (You et al., 2020) as ``holocron.optim.LAMB``; the math is :func:`holotx.lamb`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``).
        scale_clip: the clamp of the weight norm in the trust ratio (default ``None``: ``(0, 10)``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import LAMB
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = LAMB([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.7840, -2.2160,  3.2160], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'nu']

    References:
        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
        minutes", ICLR 2020, https://arxiv.org/abs/1904.00962.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, scale_clip: tuple[float, float] | None = None,
                 *, compat: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.lamb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         scale_clip=scale_clip, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)


class RaLars(TransformOptimizer):
    r"""RAdam with LARS trust ratios, as ``holocron.optim.RaLars``; the math is
    :func:`holotx.ralars`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``).
        force_adaptive_momentum: the adaptive step without rectifier before rectification starts
            (default ``False``).
        scale_clip: the clamp of the weight norm in the trust ratio (default ``None``: ``(0, 10)``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import RaLars
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = RaLars([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.8472, -2.1528,  3.3055], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'nu']

    References:
        Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020,
        https://arxiv.org/abs/1908.03265.

        You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
        minutes", ICLR 2020, https://arxiv.org/abs/1904.00962.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, force_adaptive_momentum: bool = False,
                 scale_clip: tuple[float, float] | None = None, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.ralars, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         force_adaptive_momentum=force_adaptive_momentum, scale_clip=scale_clip,
                         compat=compat, maximize=maximize, state_dtype=state_dtype, **options)


class TAdam(TransformOptimizer):
    r"""TAdam (Ilboudo et al., 2020) as ``holocron.optim.TAdam``; the math is
    :func:`holotx.tadam`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``).
        amsgrad: the running maximum of the second moment (default ``False``).
        dof: the Student-t degrees of freedom (default ``None``: each tensor's number of elements).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import TAdam
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = TAdam([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w  # TAdam's first step is tiny (v_0 = 0)
        Parameter containing:
        tensor([ 1., -2.,  3.], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'nu', 'weight_sum']

    References:
        Ilboudo, Kobayashi & Sugimoto, "TAdam: A Robust Stochastic Gradient Optimizer", 2020,
        https://arxiv.org/abs/2003.00179.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 dof: float | None = None, *, compat: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.tadam, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, dof=dof, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)


class AdaBelief(TransformOptimizer):
    r"""AdaBelief (Zhuang et al., 2020) as ``holocron.optim.AdaBelief``, whose signature is
    ``torch.optim.Adam``'s; the math is :func:`holotx.adabelief`'s.

    ``foreach`` is accepted and ignored (holotx picks its kernels); ``fused=True`` is
    :class:`~holotx.adapters.TransformOptimizer`'s (flat buffers, one compiled step);
    ``capturable`` and ``differentiable`` are accepted at their defaults only (Holocron
    ignores them silently; holotx says so): to differentiate through steps, use the
    functional API. Unlike Holocron, ``maximize=True`` ascends.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``).
        amsgrad: the running maximum of the second moment (default ``False``).
        foreach: accepted and ignored (holotx picks its kernels).
        maximize: ascend instead of descend (default ``False``).
        capturable: accepted at ``False`` only.
        differentiable: accepted at ``False`` only.
        fused: flat buffers and one compiled step, as :class:`TransformOptimizer`'s (default ``None``:
            ``False``).
        decoupled_weight_decay: decoupled instead of coupled L2 decay (default ``False``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).

    Example:
        >>> import torch
        >>> from holotx.adapters import AdaBelief
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = AdaBelief([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.8889, -2.1111,  3.1111], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'nu']

    References:
        Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
        Gradients", NeurIPS 2020, https://arxiv.org/abs/2010.07468.
    """

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
    r"""AdamP (Heo et al., 2021) as ``holocron.optim.AdamP``; the math is :func:`holotx.adamp`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``).
        amsgrad: the running maximum of the second moment (default ``False``).
        delta: the cosine threshold :math:`\delta` (default ``0.1``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import AdamP
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = AdamP([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.9000, -2.1000,  3.1000], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'nu']

    References:
        Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
        Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, delta: float = 0.1,
                 *, compat: str | None = None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.adamp, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, delta=delta, compat=compat, maximize=maximize,
                         state_dtype=state_dtype, **options)


class Adan(TransformOptimizer):
    r"""Adan (Xie et al., 2022) as ``holocron.optim.Adan``; the math is :func:`holotx.adan`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2, \beta_3)` (default ``(0.98, 0.92, 0.99)``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda`, the proximal weight decay (default ``0``).
        amsgrad: the running maximum of the second moment (default ``False``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import Adan
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = Adan([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.9000, -2.1000,  3.1000], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'diff_avg', 'mu', 'nu', 'prev_grad']

    References:
        Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
        Models", 2022, https://arxiv.org/abs/2208.06677.
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.adan, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)


class AdEMAMix(TransformOptimizer):
    r"""AdEMAMix (Pagliardini et al., 2024) as ``holocron.optim.AdEMAMix``; the math is
    :func:`holotx.ademamix`'s.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts.
        lr: the learning rate (default ``1e-3``); a scheduler may change it between steps.
        betas: :math:`(\beta_1, \beta_2, \beta_3)` (default ``(0.9, 0.999, 0.9999)``).
        alpha: the slow EMA's weight :math:`\alpha` (default ``5``).
        eps: :math:`\epsilon` (default ``1e-8``).
        weight_decay: :math:`\lambda` (default ``0``).
        compat: ``None`` (default) for the paper's math, ``"holocron"`` for Holocron 0.3.0's numerics.
        maximize: ascend instead of descend (default ``False``).
        state_dtype: keep the state of lower-precision params in this dtype (default ``None``: the
            params' own).
        **options: the factory's keyword-only options (``trust_ratio_mask``, ...) and
            :class:`TransformOptimizer`'s (``donate_grads``, ``fused``, ``max_grad_norm``).

    Example:
        >>> import torch
        >>> from holotx.adapters import AdEMAMix
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        >>> opt = AdEMAMix([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, 0.5, -1.0])
        >>> opt.step()
        >>> w
        Parameter containing:
        tensor([ 0.9000, -2.1000,  3.1000], requires_grad=True)
        >>> sorted(opt.state_dict()["state"][0])
        ['count', 'mu', 'mu_slow', 'nu']

    References:
        Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older",
        2024, https://arxiv.org/abs/2409.03137.
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 eps: float = 1e-8, weight_decay: float = 0.0, *, compat: str | None = None,
                 maximize: bool = False, state_dtype: torch.dtype | None = None, **options: Any) -> None:
        super().__init__(params, holotx.ademamix, lr=lr, betas=betas, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, compat=compat, maximize=maximize, state_dtype=state_dtype,
                         **options)
