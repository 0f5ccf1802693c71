"""``nfsd-nerf report``: a self-contained HTML page of a run, several runs or a batch.

``collect`` reads the folders (files only), ``plots`` draws inline SVG, ``page`` and ``compare``
write the HTML, ``build`` stages the report folder and swaps it into place (docs/design.md,
"Report page").
"""

from .build import MakeMissing, build_report

__all__ = ["MakeMissing", "build_report"]
