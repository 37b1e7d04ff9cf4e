"""Shared pytest setup: the tests folder on the import path (for ``tests/harness.py``),
the ``--runslow`` option declared by the ``slow`` marker, ``cuda`` skips, a fresh
dynamo cache for compile checks, the thread count kept around the examples, and the
vector width inductor generates code for (``HOLOTX_INDUCTOR_SIMDLEN``).

CI machines differ in CPU (AVX-512, AVX2, ...), and inductor's generated loops, so the
order of a fused reduction's sums, differ with the vector width. To see a run as another
machine would, set ``HOLOTX_INDUCTOR_SIMDLEN=256`` (AVX2) or ``=0`` (scalar code) for
inductor, and ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) for torch's eager kernels."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("HOLOTX_INDUCTOR_SIMDLEN"):
    import torch._inductor.config

    torch._inductor.config.cpp.simdlen = int(os.environ["HOLOTX_INDUCTOR_SIMDLEN"])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def keep_threads():
    """The examples set torch's thread count; put it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_dynamo():
    """Reset dynamo's caches and counters around a compile check, so that one case's
    compiled code (transforms share code objects, e.g. ``chain``'s ``update``) is never
    reused for, or counted against, another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_process_mesh():
    """A one-process gloo group and a CPU ``DeviceMesh`` over it, for the module's tests:
    DTensors whose single shard is the whole tensor. Torn down with the module, so that
    no other test runs with a default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        try:
            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()
