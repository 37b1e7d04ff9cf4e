"""Gradient clipping, as a building block."""

from __future__ import annotations

import torch

from holotx import _validate, ops, tree
from holotx.base import EmptyState, GradientTransformation, own_transform
from holotx.executor import multi_tensor_update
from holotx.ops import Scalar

__all__ = ["clip_by_global_norm", "global_norm"]


def global_norm(updates) -> torch.Tensor:
    """The L2 norm of all leaves together, a 0-d tensor (float64 if any leaf is float64,
    else float32), computed without a host sync."""
    leaves = [x for x in tree.flatten(updates)[0] if x is not None]
    if not leaves:
        return torch.zeros(())
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    device = leaves[0].device
    norms = [n.to(device=device, dtype=dtype) for n in ops.norms(leaves)]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_by_global_norm(max_norm: Scalar) -> GradientTransformation:
    r"""Scale all updates together so that their global L2 norm is at most ``max_norm``.

    .. math:: u \leftarrow u \cdot \frac{c}{\max(\lVert u \rVert_2, c)}

    Updates already within the bound are multiplied by exactly 1. No host sync: the
    factor stays a 0-d tensor. (``torch.nn.utils.clip_grad_norm_`` adds 1e-6 to the norm;
    this does not.)
    """
    _validate.positive("max_norm", max_norm, finite=False)  # inf: no clipping

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        # One norm over every value: a flat buffer is as good as its tensors.
        tree.check_whole_tensors(params, "clip_by_global_norm", flat_ok=True)
        norm = global_norm(updates)
        factor = max_norm / torch.maximum(norm, torch.as_tensor(max_norm, dtype=norm.dtype))

        def kernel(g, _p):
            return (ops.mul_(g, factor),)

        return multi_tensor_update(kernel, updates)[0], state

    return own_transform(init, update)
