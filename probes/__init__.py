"""Built-in probe plugins, one module each. ``BUILTIN`` maps probe name -> probe object."""

from .damage_attribution import PROBE as _damage_attribution
from .gsm8k import PROBE as _gsm8k
from .mmlu import PROBE as _mmlu
from .weight_change import PROBE as _weight_change

BUILTIN = {p.name: p for p in [_weight_change, _mmlu, _gsm8k, _damage_attribution]}
