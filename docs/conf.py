"""Sphinx configuration for holotx's documentation.

Built by ``tests/test_docs.py`` with warnings as errors (``-W --keep-going``) and without
network access: no intersphinx, no remote images; MathJax is only referenced by the HTML
pages, read by the browser. By hand::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import holotx  # installed (editable, by `make venv`): holotx.adapters lives in adapters/

project = "holotx"
author = "holotx developers"
copyright = "holotx developers"
release = version = holotx.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Google-style sections (Args, Returns, Example, Raises) only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"

# No intersphinx: the build must not reach the network (references to torch's names are
# left as plain text).
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

default_role = "literal"
primary_domain = "py"
exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "alabaster"
html_title = f"holotx {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
