"""Built-in probe plugins, one module each. ``BUILTIN`` maps probe name -> probe object."""

from .activation_diff import PROBE as _activation_diff
from .attention_shift import PROBE as _attention_shift
from .causal_trace import PROBE as _causal_trace
from .damage_attribution import PROBE as _damage_attribution
from .gsm8k import PROBE as _gsm8k
from .kl_drift import PROBE as _kl_drift
from .logit_lens import PROBE as _logit_lens
from .mlp_patching import PROBE as _mlp_patching
from .mmlu import PROBE as _mmlu
from .stitch import PROBE as _stitch
from .task_accuracy import PROBE as _task_accuracy
from .training_drift import PROBE as _training_drift
from .update_geometry import PROBE as _update_geometry
from .weight_change import PROBE as _weight_change

BUILTIN = {p.name: p for p in [_weight_change, _kl_drift, _attention_shift, _causal_trace,
                               _mlp_patching, _mmlu, _gsm8k, _damage_attribution,
                               _training_drift, _task_accuracy, _activation_diff,
                               _logit_lens, _stitch, _update_geometry]}
