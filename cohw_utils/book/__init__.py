"""Layer ``book``: what the chapters need to teach, on top of everything else.

- :mod:`~cohw_utils.book.exercises`: ``check_*`` self-checks returning a ``Verdict`` for each
  chapter's exercises.
- :mod:`~cohw_utils.book.explore`: a static figure in the book, ipywidgets controls live.
- :mod:`~cohw_utils.book.plotting`: shared figure styling.

Only ``cli`` and the notebooks import this layer.
"""
