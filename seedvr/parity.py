"""`python -m seedvr.parity`: see seedvr/tools/parity.py."""

import sys

from seedvr.tools.parity import main

if __name__ == "__main__":
    sys.exit(main())
