"""``python -m decollapse ...``: the same command line as the ``decollapse`` script."""

import sys

from .cli import main

sys.exit(main())
