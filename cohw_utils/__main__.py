"""``python -m cohw_utils``: see :mod:`cohw_utils.cli`."""
import sys

from cohw_utils.cli import main

sys.exit(main())
