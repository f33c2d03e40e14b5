"""Sphinx configuration: the Markdown pages through MyST-Parser, the API reference through autodoc."""

from __future__ import annotations

import celery_unique

project = "celery-unique"
author = "celery-unique developers"
copyright = "2026, celery-unique developers"
release = celery_unique.__version__
version = ".".join(release.split(".")[:2])

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

# Markdown: headings up to ### get anchors, so pages link to sections
# (semantics.md#running-markers) as they do on GitHub.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# The docs build has no network, so no intersphinx inventories: references to
# other projects' classes (Celery, kombu, redis-py, pytest) and to the
# standard library in signatures cannot resolve, and are not warned about.
# References to this package's own names must resolve.
# Names the package imports only for type checking stay unqualified.
nitpick_ignore_regex = [
    (r"py:.*", r"(celery|kombu|redis|billiard|click|django|pytest|_pytest)(\..+)?"),
    (r"py:.*", r"(collections\.abc|datetime|types|typing|contextlib|pathlib|subprocess)\..+"),
    (r"py:class", r"Celery|AsyncResult|timedelta|datetime"),
    # A type variable: it stands for the type a call returns.
    (r"py:class", r"celery_unique\.testing\.T"),
]

html_theme = "furo"
html_title = f"celery-unique {release}"
