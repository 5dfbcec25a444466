"""Sphinx configuration for certbound-wsgi.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``tox -e docs``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The package from this checkout, whatever is installed, and the local extension.
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

import certbound_wsgi  # noqa: E402

project = "certbound-wsgi"
author = "certbound-wsgi contributors"
copyright = "certbound-wsgi contributors"
version = release = certbound_wsgi.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    # docs/_ext/options.py: the configuration table, generated from certbound_wsgi.settings.
    "options",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]

# Links such as [deploying](deploying.md#the-header-is-always-overwritten).
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types only for the parameters a docstring describes: a Settings field is described in the table.
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
# The Flask integration is documented even where the docs environment lacks Flask
# (the "docs" extra does not pull it in): without it, its import is mocked.
autodoc_mock_imports = [] if importlib.util.find_spec("flask") else ["flask"]

html_theme = "alabaster"
# alabaster's 940 px page left the options table a 660 px column; 1180 px still fits a
# 1280 px screen with its scroll bar, and gives the table's five columns room.
html_theme_options = {"page_width": "1180px", "sidebar_width": "230px"}
html_title = f"certbound-wsgi {release}"
html_static_path = ["_static"]
# Keeps the options table inside the page at 1280 px (fixed layout, long names wrap).
html_css_files = ["certbound.css"]
