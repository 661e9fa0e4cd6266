"""`python -m seedvr.tiny`: see seedvr/tools/tiny.py."""

import sys

from seedvr.tools.tiny import main

if __name__ == "__main__":
    sys.exit(main())
