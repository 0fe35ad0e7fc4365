"""mechinterp: where and how post-training (SFT, GRPO) changes a language model.

Quick start::

    from mechinterp import ModelSet, DataSource, get_probe, run_probe, make_config
    models = ModelSet("smollm2-135m-instruct", {"sft": "out/sft"})
    probe = get_probe("weight-change")
    result = run_probe(probe, models, DataSource.from_option(), make_config(probe), out="results")
"""

from .data import DataSource
from .errors import UserError
from .models import DEFAULT_MODEL, LoadedModel, ModelSet, load, resolve
from .probe import get_probe, make_config, registry, run_probe
from .results import Result, read_result

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "DataSource", "LoadedModel", "ModelSet", "Result", "UserError",
           "get_probe", "load", "make_config", "read_result", "registry", "resolve", "run_probe"]
