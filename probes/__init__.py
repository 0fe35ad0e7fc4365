"""The built-in probes, one module each; each module's ``PROBE`` is its probe object.

The registry (:mod:`mechinterp.core.registry`) finds them through the ``mechinterp.probes``
entry-point group, as it finds other packages' probes: ``mi.probe(NAME)``, ``mi.registry()``.
"""
