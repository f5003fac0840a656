"""``python -m cspine.cli``: the same as the ``cspine`` console script (tests and torchrun start it this way)."""

import sys

from cspine.cli import main

if __name__ == "__main__":  # a spawned worker process imports this module again
    sys.exit(main())
