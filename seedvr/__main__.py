"""`python -m seedvr restore INPUT... -o OUTDIR [options]`: see seedvr/tools/cli.py."""

import sys

from seedvr.tools.cli import main

sys.exit(main())
