"""Layer ``book``: what the chapters need to teach, on top of everything else.

- :mod:`~cohw_utils.book.claims`: outcome claims asserted on a chapter's default parameters and
  reported, not asserted, on a reader's own (Chapters 4.2b and 5).
- :mod:`~cohw_utils.book.exercises`: ``check_*`` self-checks returning a ``Verdict`` for each
  chapter's exercises.
- :mod:`~cohw_utils.book.explore`: a static figure in the book, ipywidgets controls live.
- :mod:`~cohw_utils.book.plotting`: shared figure styling.

Only ``cli`` and the notebooks import this layer.
"""
