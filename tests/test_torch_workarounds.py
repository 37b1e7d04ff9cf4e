"""The torch 2.13 gaps holotx works around for DTensors, each pinned by a test that fails
once torch fills it, saying which fallback can go.

* ``torch._foreach_copy_`` has no DTensor sharding rule: :func:`holotx.ops.copy` copies
  DTensors one by one.
* ``torch._foreach_addcmul`` with a list of scalars has no DTensor sharding rule:
  :func:`holotx.ops.addcmul` takes its per-leaf path for DTensors with per-tensor values.

(The other 2.13 workarounds are documented where they live, in ``holotx/ops.py``.)
"""

from __future__ import annotations

import pytest
import torch

from holotx import ops


def _dtensors(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    return [distribute_tensor(torch.arange(6.0).reshape(3, 2) + k, mesh, [Shard(0)]) for k in range(2)]


def test_foreach_copy_has_no_dtensor_rule(one_process_mesh):
    """When this fails, drop the one-by-one DTensor branch of ``ops.copy``."""
    dst, src = _dtensors(one_process_mesh), _dtensors(one_process_mesh)
    with pytest.raises(NotImplementedError, match="_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    out = ops.copy(dst, [s * 2 for s in src])
    assert all(torch.equal(o.full_tensor(), 2 * s.full_tensor()) for o, s in zip(out, src))


def test_foreach_addcmul_scalarlist_has_no_dtensor_rule(one_process_mesh):
    """When this fails, drop the DTensor condition on the foreach path of ``ops.addcmul``."""
    xs, a = _dtensors(one_process_mesh), _dtensors(one_process_mesh)
    with pytest.raises(NotImplementedError, match="_foreach_addcmul"):
        torch._foreach_addcmul(xs, a, a, [0.5, 0.25])
    out = ops.addcmul(xs, a, a, [0.5, 0.25])
    for o, x, y, v in zip(out, xs, a, [0.5, 0.25]):
        assert torch.equal(o.full_tensor(), x.full_tensor() + v * y.full_tensor() ** 2)
