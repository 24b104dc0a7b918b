"""``python -m cohw_utils``: see :mod:`cohw_utils.cli`.

The command line every chapter's reader can run (README).
"""
import sys

from cohw_utils.cli import main

sys.exit(main())
