"""``python -m cohw_utils``: see :mod:`cohw_utils.cli`."""
import sys

from .cli import main

sys.exit(main())
