"""Sphinx configuration: MyST Markdown pages, the furo theme, API pages from the docstrings.

Built strictly by tests/test_docs.py (`sphinx-build -W --keep-going`): a warning (a broken
cross-reference, a missing page, a docstring that does not render) fails the tests.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("KERAS_BACKEND", "jax")  # jaxembed.interop.keras's docstrings import it

import jaxembed

project = "jaxembed"
author = "the jaxembed developers"
copyright = "2026, the jaxembed developers"
release = version = jaxembed.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings (Args:, Returns:, Raises:, Example:) as written in jaxembed.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
default_role = "literal"  # `x` in a docstring is code, as in Markdown

html_theme = "furo"
html_title = f"jaxembed {release}"
