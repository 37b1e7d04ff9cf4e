"""What the pylocron parity tests share: Holocron's ``holocron.optim`` (pylocron 0.3.0, a
test-only dependency), imported without running ``holocron/__init__.py`` (which imports
torchvision), and the end-of-module report of the worst errors measured."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import pytest


def import_optim() -> types.ModuleType:
    """``holocron.optim``; skips the calling test module when pylocron is not installed."""
    if "holocron.optim" in sys.modules:
        return sys.modules["holocron.optim"]
    spec = importlib.util.find_spec("holocron")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("pylocron 0.3.0 is not installed", allow_module_level=True)
    if "holocron" not in sys.modules:
        package = types.ModuleType("holocron")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["holocron"] = package
    return importlib.import_module("holocron.optim")


def report_worst(config: Any, title: str, worst: dict[str, tuple[float, str]]) -> None:
    """Print ``worst`` (kind -> (worst error, where)) under ``title`` in pytest's terminal
    report, past output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not worst:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(title)
        for key in sorted(worst):
            err, where = worst[key]
            reporter.write_line(f"  {key:<20} {err:.3e}  ({where})")
