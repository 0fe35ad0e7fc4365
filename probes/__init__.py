"""Built-in probe plugins, one module each. ``BUILTIN`` maps probe name -> probe object."""

from .causal_trace import PROBE as _causal_trace
from .mlp_patching import PROBE as _mlp_patching
from .weight_change import PROBE as _weight_change

BUILTIN = {p.name: p for p in [_weight_change, _causal_trace, _mlp_patching]}
