"""`python -m seedvr restore INPUT... -o OUTDIR [options]`: see seedvr/cli.py."""

import sys

from seedvr.cli import main

sys.exit(main())
