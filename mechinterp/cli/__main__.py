"""``python -m mechinterp.cli`` = the ``mechinterp`` command."""

import sys

from .app import main

sys.exit(main())
