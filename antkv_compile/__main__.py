"""`python -m antkv_compile`: the `antkv` command line (antkv_compile/cli.py)."""

import sys

from .cli import main

sys.exit(main())
