"""The probe core: the protocol (probe.py), option checking and help (options.py), the registry
(registry.py) and the one runner (runner.py)."""
