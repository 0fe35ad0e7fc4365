"""mechinterp: where and how post-training (SFT, GRPO) changes a language model.

Quick start::

    import mechinterp as mi
    result = mi.run("weight-change", base="smollm2-135m-instruct", variants={"sft": "out/sft@all"},
                    out="results")
    result["relative_change"]["sft@step-10"]["q"]     # per layer
    result.to_frame().query("component == 'q'")         # the same numbers, one long table
    result.figures()                                    # matplotlib figures, inline in Jupyter
    mi.load_results("results")                          # every result of a folder, one table
"""

from .core import probe  # callable: mi.probe(NAME) is get_probe(NAME)
from .core.probe import describe, get_probe, make_config, registry
from .core.runner import run, run_probe
from .data import DataSource
from .errors import UserError
from .models import DEFAULT_MODEL, LoadedModel, ModelSet, load, resolve
from .store.results import Result, load_results, read_result
from .study.demo import ensure_demo

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "DataSource", "LoadedModel", "ModelSet", "Result", "UserError",
           "describe", "ensure_demo", "get_probe", "load", "load_results", "make_config", "probe",
           "read_result", "registry", "resolve", "run", "run_probe"]
