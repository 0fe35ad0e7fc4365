"""``python -m mechinterp`` = the ``mechinterp`` command."""

import sys

from .cli import main

sys.exit(main())
