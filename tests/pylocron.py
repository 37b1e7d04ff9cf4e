"""Holocron's ``holocron.optim`` (pylocron 0.3.0, a test-only dependency) for the parity
tests, imported without running ``holocron/__init__.py`` (which imports torchvision)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

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
