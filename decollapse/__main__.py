"""``python -m decollapse ...``: the ``decollapse`` command without the installed script."""

import sys

from .cli import main

sys.exit(main())
