"""`python -m seedvr.weights`: see seedvr/tools/weights.py."""

import sys

from seedvr.tools.weights import main

if __name__ == "__main__":
    sys.exit(main())
