#!/usr/bin/env python
"""Run PyTorch's generic optimizer tests (``TestOptimRenewed``) on holotx's classes.

Opt-in, never part of ``make test``: it needs torch's ``test/test_optim.py``, which the
torch wheel does not ship. Take it from a pytorch checkout at the tag of the installed
torch (``git checkout v2.13.0``; the file imports helpers from ``test/optim/``, which this
runner stands in for, so the file alone is enough)::

    make torch-suite TORCH_TEST_OPTIM=/path/to/pytorch/test/test_optim.py
    .venv/bin/python .ci/torch_optim_suite.py /path/to/test_optim.py [-k EXPR] [-x] [--inductor]
    .venv/bin/python .ci/torch_optim_suite.py --list-expected

Before the file is imported, ``torch.testing._internal.common_optimizers.optim_db`` is
emptied and filled with holotx's entries (``tests/torch_optim_infos.py``), so every test
decorated with ``@optims(optim_db, ...)`` is instantiated for holotx's classes instead of
torch's; only the CPU variants are generated. Tests of that class that are not about the
entries (torch's own AdamW and LBFGS) are left out. Where holotx differs from torch.optim
on purpose, the test is marked as an expected failure with the reason (``EXPECTED``
below, printed in the summary); such a test that starts passing fails the run, so the
list stays true. The summary gives passed/failed/expected/skipped per test and per
class; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import types
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STATELESS = ("a holotx state is one tree over a group's params, so every param of a stepped group gets an "
              "entry, empty for a rule that keeps no state ({rule}); torch.optim makes none, and the test "
              "asks every entry to be non-empty")
_FOUND_INF = ("holotx's fused step does not take part in GradScaler's fused protocol (it reads no found_inf "
              "or grad_scale attribute, and does not set _step_supports_amp_scaling, so GradScaler unscales "
              "the grads and skips inf steps itself, as for any optimizer)")
_META = ("holotx does not refuse meta params: fused=True falls back to the unfused step for them, with a "
         "RuntimeWarning saying why, and stepping meta tensors computes nothing; torch's fused kernels "
         "raise RuntimeError")
_ADAMW_DECAY = ("holotx.adamw's default weight_decay is 0.01, as torch.optim.AdamW's, so zero grads still "
                "decay the params; torch's test exempts its AdamW by the class name 'AdamW'")

EXPECTED: dict[tuple[str, str], str] = {
    ("test_non_empty_state", "HolotxSGD"): _STATELESS.format(rule="SGD without momentum"),
    ("test_non_empty_state", "LARS"): _STATELESS.format(rule="LARS without momentum"),
    ("test_param_groups_weight_decay", "HolotxChain"):
        "a TransformOptimizer built from a transform reads only lr and maximize from its groups, and "
        "refuses a group that sets weight_decay (ValueError) rather than ignore it: per-group "
        "hyperparameters need a factory",
    ("test_step_is_noop_for_zero_grads", "HolotxAdamW"): _ADAMW_DECAY,
    ("test_step_is_noop_for_zero_grads", "LookaheadAdamW"): _ADAMW_DECAY,
    ("test_fused_does_not_step_if_foundinf", "*"): _FOUND_INF,
    ("test_fused_error_on_params_on_meta", "*"): _META,
}
"""(test, class) -> why holotx differs from torch.optim there on purpose. ``*`` as the
class matches every class. Also documented in docs/torch_optim.rst ("torch's own optimizer
tests") and in the docstring of TransformOptimizer."""

EXCLUDED_TESTS = {
    "test_adamw_serialization": "torch's AdamW and Adam only; no OptimizerInfo",
    "test_step_iteration": "torch's LBFGS only; no OptimizerInfo",
}
"""Tests of TestOptimRenewed that do not run holotx's entries."""


def _stub_torch_test_helpers() -> None:
    """test_optim.py imports three test classes from ``test/optim/`` (other suites, which
    it re-exports); empty ones stand in for them, so that the file runs on its own."""
    package = types.ModuleType("optim")
    package.__path__ = []
    sys.modules["optim"] = package
    for module, name in (("test_lrscheduler", "TestLRScheduler"),
                         ("test_optim", "TestDifferentiableOptimizer"),
                         ("test_swa_utils", "TestSWAUtils")):
        stub = types.ModuleType(f"optim.{module}")
        setattr(stub, name, type(name, (unittest.TestCase,), {}))
        sys.modules[f"optim.{module}"] = stub
        setattr(package, module, stub)


def _install_entries() -> list[str]:
    """Put holotx's entries in torch's optim_db (the same list object, emptied and
    refilled, so every ``from ... import optim_db`` sees them); their class names."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch.testing._internal import common_optimizers
    from torch_optim_infos import HOLOTX_OPTIM_DB

    common_optimizers.optim_db[:] = HOLOTX_OPTIM_DB
    return [info.name for info in HOLOTX_OPTIM_DB]


class _Collector:
    """A pytest plugin: marks expected failures, leaves out excluded tests, and keeps the
    outcome of every test."""

    def __init__(self, classes: list[str], test_names: set[str]) -> None:
        self.classes = classes
        self.test_names = test_names
        self.outcomes: dict[str, str] = {}
        self.keys: dict[str, tuple[str, str]] = {}
        self.marked: dict[tuple[str, str], str] = {}
        self.excluded: list[tuple[str, str]] = []
        self.failures: dict[str, str] = {}

    def _key(self, item) -> tuple[str, str] | None:
        base = item.name.split("[")[0]
        for test in sorted(self.test_names, key=len, reverse=True):
            if base == test or base.startswith(test + "_"):
                for cls in sorted(self.classes, key=len, reverse=True):
                    if re.search(rf"_{re.escape(cls)}_cpu(_|$)", base):
                        return test, cls
                return test, ""
        return None

    def pytest_collection_modifyitems(self, session, config, items):
        import pytest

        kept = []
        for item in items:
            key = self._key(item)
            test = key[0] if key else item.name
            self.keys[item.nodeid] = key or (item.name, "-")
            if test in EXCLUDED_TESTS:
                self.excluded.append((item.name, EXCLUDED_TESTS[test]))
                continue
            if key:
                reason = EXPECTED.get(key) or EXPECTED.get((key[0], "*"))
                if reason:
                    item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
                    self.marked[key] = reason
            kept.append(item)
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            if hasattr(report, "wasxfail"):
                outcome = "expected" if report.outcome == "skipped" else "failed"  # strict XPASS fails
            else:
                outcome = report.outcome
            self.outcomes[report.nodeid] = outcome
            if outcome == "failed":
                self.failures[report.nodeid] = _first_line(report)


def _first_line(report) -> str:
    text = str(report.longrepr) if report.longrepr is not None else ""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ") and line[1:].strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Warning)\b", line)]
    return ((errors or lines or text.splitlines() or [""])[0])[:240]


def _summary(collector: _Collector) -> None:
    by_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    for nodeid, outcome in collector.outcomes.items():
        test, cls = collector.keys.get(nodeid, (nodeid.rsplit("::", 1)[-1], "-"))
        by_test[test][outcome] += 1
        by_class[cls][outcome] += 1
        total[outcome] += 1
    cols = ("passed", "failed", "expected", "skipped")

    def table(title: str, rows: dict[str, collections.Counter]) -> None:
        width = max([len(title), *map(len, rows)])
        print(f"\n{title:<{width}}  " + "  ".join(f"{c:>8}" for c in cols))
        for name in sorted(rows):
            print(f"{name:<{width}}  " + "  ".join(f"{rows[name][c]:>8}" for c in cols))

    table("test", by_test)
    table("class", by_class)
    if collector.excluded:
        print(f"\nexcluded ({len(collector.excluded)}):")
        for name, why in sorted(set(collector.excluded)):
            print(f"  {name}: {why}")
    if collector.marked:
        print("\nexpected failures (deliberate differences from torch.optim):")
        for test, cls in sorted(collector.marked):
            print(f"  {test} [{cls}]: {collector.marked[(test, cls)]}")
    if collector.failures:
        print(f"\nfailed ({len(collector.failures)}):")
        for nodeid, line in sorted(collector.failures.items()):
            print(f"  {nodeid.rsplit('::', 1)[-1]}: {line}")
    print("\n" + ", ".join(f"{total[c]} {c}" for c in cols) + f", {len(collector.excluded)} excluded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", nargs="?",
                        help="torch's test/test_optim.py (a pytorch checkout at the installed tag)")
    parser.add_argument("-k", default=None, help="pytest -k expression, to run some tests only")
    parser.add_argument("-x", action="store_true", help="stop at the first failure")
    parser.add_argument("--list-expected", action="store_true", help="print the expected failures and exit")
    parser.add_argument("--inductor", action="store_true",
                        help="compile fused steps with inductor (default: dynamo's eager backend, see below)")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest, after -- (--durations=20)")
    args = parser.parse_args(argv)
    if args.list_expected:
        for (test, cls), why in sorted(EXPECTED.items()):
            print(f"{test} [{cls}]: {why}")
        return 0
    if args.test_file is None:
        parser.error("the path of torch's test/test_optim.py is needed")
    path = os.path.abspath(args.test_file)
    if not os.path.isfile(path):
        parser.error(f"no such file: {path}")

    os.environ["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"
    os.environ["PYTORCH_PRINT_REPRO_ON_FAILURE"] = "0"
    import pytest

    _stub_torch_test_helpers()
    classes = _install_entries()
    if not args.inductor:
        # Every fused optimizer the tests make compiles its own step: with inductor, 5 to 15 s
        # each on a 2-core CPU, which makes the run take 25 minutes. Dynamo's eager backend
        # traces the same graph (fullgraph, flat buffers, views) and runs it op by op; the
        # generated code is tested by tests/test_fused.py.
        from holotx.adapters import _fused

        _fused.BACKEND = "eager"
        print("fused steps: dynamo's eager backend (--inductor to compile them)")
    with open(path) as f:
        test_names = set(re.findall(r"^    def (test_\w+)\(", f.read(), flags=re.M))
    collector = _Collector(classes, test_names)
    pytest_args = [f"{path}::TestOptimRenewedCPU", "-q", "-p", "no:cacheprovider", "--rootdir",
                   os.path.dirname(path), "-o", "addopts=", "-W", "ignore::DeprecationWarning",
                   "--tb=short", *args.pytest_args]
    if args.k:
        pytest_args += ["-k", args.k]
    if args.x:
        pytest_args.append("-x")
    code = pytest.main(pytest_args, plugins=[collector])
    _summary(collector)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
