"""The ``mechinterp`` command. Thin: parse options, call the library, show progress.

One module per command group: :mod:`.probes` (``run``, ``figures``, ``probes``), :mod:`.study`
(``compare``, ``demo``), :mod:`.train`, :mod:`.eval`, :mod:`.models`; :mod:`.app` wires them into
one app. Any :class:`~mechinterp.errors.UserError` becomes one line on stderr and exit code 2
(:mod:`.entry`).
"""

from .app import app, main

__all__ = ["app", "main"]
