"""Built-in probe plugins, one module each. ``BUILTIN`` maps probe name -> probe object."""

from .training_drift import PROBE as _training_drift
from .weight_change import PROBE as _weight_change

BUILTIN = {p.name: p for p in [_weight_change, _training_drift]}
