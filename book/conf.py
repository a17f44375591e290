"""Sphinx configuration of the neurolm_nb book (`make book`; see tools/build_book.py).

tools/build_book.py stages the executed notebooks of a `make demo` run (and the source notebooks that are
not pipeline stages) into _book/src/ and runs `sphinx-build -c book _book/src _book/html`. It passes what
the run is (profile, commit, run folder) through the NEUROLM_BOOK_META file; nothing here executes code.
"""
import json
import os
from pathlib import Path

_meta_file = os.environ.get("NEUROLM_BOOK_META")
meta = json.loads(Path(_meta_file).read_text(encoding="utf-8")) if _meta_file else {}

project = "neurolm_nb"
author = "neurolm_nb developers"
copyright = "2026 onwards, neurolm_nb developers"
html_title = meta.get("title", "neurolm_nb")

extensions = ["myst_nb"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
root_doc = "index"

# The notebooks were executed by `make demo` (papermill); the book only renders them.
nb_execution_mode = "off"
nb_merge_streams = True            # one block per stream, not one per print()
nb_scroll_outputs = True           # long outputs scroll inside a box (longer ones are also collapsed, see build_book)
nb_output_stderr = "show"
nb_render_markdown_format = "myst"
nb_ipywidgets_js = {}              # never load widget JavaScript from a CDN: the book is offline
nb_mime_priority_overrides = [     # a progress-bar widget shows as its text, never as a (CDN) widget
    ("html", "application/vnd.jupyter.widget-view+json", None),
    ("html", "application/vnd.jupyter.widget-state+json", None),
]
myst_heading_anchors = 3           # [text](#a-heading) links inside notebooks and README resolve
myst_enable_extensions = ["colon_fence"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["book.css"]
html_copy_source = False           # no second copy of every notebook (with its images) under _sources/
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "announcement": meta.get("announcement", ""),
    "show_toc_level": 2,
    "use_download_button": False,  # it would link to _sources/, which is not copied
    "use_fullscreen_button": True,
    "use_repository_button": False,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
    "extra_footer": meta.get("footer", ""),
}
html_context = {"default_mode": "light"}
