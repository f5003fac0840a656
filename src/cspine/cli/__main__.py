"""``python -m cspine.cli``: the same as the ``cspine`` console script (tests and torchrun start it this way)."""

import sys

from cspine.cli import main

sys.exit(main())
