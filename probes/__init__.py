"""Built-in probe plugins, one module each. ``BUILTIN`` maps probe name -> probe object."""

from .attention_shift import PROBE as _attention_shift
from .causal_trace import PROBE as _causal_trace
from .kl_drift import PROBE as _kl_drift
from .mlp_patching import PROBE as _mlp_patching
from .training_drift import PROBE as _training_drift
from .weight_change import PROBE as _weight_change

BUILTIN = {p.name: p for p in [_weight_change, _kl_drift, _attention_shift, _causal_trace,
                               _mlp_patching, _training_drift]}
