"""Gradient clipping, as a building block."""

from __future__ import annotations

from collections.abc import Callable

import torch

from holotx import _validate, ops, tree
from holotx.base import EmptyState, GradientTransformation, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar

__all__ = ["clip_by_global_norm", "clip_factor", "global_norm"]


def global_norm(updates) -> torch.Tensor:
    """The L2 norm of all leaves together, a 0-d tensor (float64 if any leaf is float64,
    else float32), computed without a host sync.

    Args:
        updates: a pytree of tensors (``None`` leaves are left out).

    Returns:
        The norm, a 0-d tensor (float64 if any leaf is float64, else float32; 0 for a tree
        with no tensor).

    Example:
        >>> import torch
        >>> import holotx
        >>> holotx.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "c": None})
        tensor(5.)
    """
    leaves = [x for x in tree.leaves(updates) if x is not None]
    if not leaves:
        return torch.zeros(())
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    device = leaves[0].device
    norms = [n.to(device=device, dtype=dtype) for n in ops.norms(leaves)]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_factor(norm: torch.Tensor, max_norm: Scalar) -> torch.Tensor:
    r""":math:`c / \max(\lVert u \rVert_2, c)`: the factor :func:`clip_by_global_norm`
    multiplies the updates by, exactly 1 where ``norm <= max_norm``."""
    return max_norm / torch.maximum(norm, torch.as_tensor(max_norm, dtype=norm.dtype))


def clip_by_global_norm(max_norm: Scalar, *,
                        norm: Callable[[], torch.Tensor] | None = None) -> GradientTransformation:
    r"""Scale all updates together so that their global L2 norm is at most ``max_norm``.

    .. math:: u \leftarrow u \cdot \frac{c}{\max(\lVert u \rVert_2, c)}

    Updates already within the bound are multiplied by exactly 1. No host sync: the
    factor stays a 0-d tensor. (``torch.nn.utils.clip_grad_norm_`` adds 1e-6 to the norm;
    this does not.)

    Args:
        max_norm: :math:`c`, positive (``inf``: no clipping).
        norm: a function returning the norm to clip by, when it is not the updates' own:
            the :class:`~holotx.adapters.TransformOptimizer`'s ``max_grad_norm`` gives each
            param group the norm over every group, so that the groups are clipped together
            as one.

    Returns:
        A :class:`~holotx.GradientTransformation` that keeps no state.

    Example:
        >>> import torch
        >>> import holotx
        >>> tx = holotx.clip_by_global_norm(1.0)
        >>> grads = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}  # norm 5
        >>> updates, _ = tx.update(grads, tx.init(grads))
        >>> updates
        {'a': tensor([0.6000]), 'b': tensor([0.8000])}
        >>> tx = holotx.chain(holotx.clip_by_global_norm(1.0), holotx.adamw(1e-3))

    References:
        Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
        networks", ICML 2013, https://arxiv.org/abs/1211.5063 (clipping by the norm).
    """
    _validate.positive("max_norm", max_norm, finite=False)  # inf: no clipping
    if norm is not None and not callable(norm):
        raise ValueError(f"norm must be a function returning the norm to clip by, got {norm!r}")

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        if norm is None:
            # One norm over every value: a flat buffer is as good as its tensors.
            tree.check_whole_tensors(params, "clip_by_global_norm", flat_ok=True)
            factor = clip_factor(global_norm(updates), max_norm)
        else:
            factor = clip_factor(norm(), max_norm)

        def kernel(g, _p):
            # (The kernel sees one device at a time; the norm is on the first leaf's.)
            here = factor if factor.device == g[0].device else factor.to(g[0].device)
            return (ops.mul_(g, here),)

        return multi_tensor_update(kernel, updates)[0], state

    return own_transform(init, update)
