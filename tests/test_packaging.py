"""The package metadata ships every subpackage: an editable install finds them on disk
whatever ``pyproject.toml`` lists, a wheel only ships what it lists."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts)
               for init in (ROOT / "holotx").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"
    adapters_dir = config["package-dir"]["holotx.adapters"]
    assert (ROOT / adapters_dir / "__init__.py").exists()
    assert "holotx.adapters" in listed
