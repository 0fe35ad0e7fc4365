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

from .core.options import describe, make_config
from .core.probe import Probe
from .core.registry import get_probe, registry
from .core.runner import run, run_probe
from .data import DataSource
from .errors import UserError
from .models import DEFAULT_MODEL, LoadedModel, ModelSet, load, resolve
from .store.results import Result, load_results, read_result
from .study.demo import ensure_demo

__version__ = "0.1.0"


def probe(name: str) -> Probe:
    """An installed probe, by name: ``help(mi.probe("causal-trace"))`` shows what it measures and
    every option.

    Args:
        name: the probe's name (``mechinterp probes list``).

    Returns:
        The probe object (``run``, ``plot``, ``Config``, ``frames``, ``summary``, ...).

    Raises:
        UserError: no probe of that name is installed.
    """
    return get_probe(name)


__all__ = ["DEFAULT_MODEL", "DataSource", "LoadedModel", "ModelSet", "Probe", "Result", "UserError",
           "describe", "ensure_demo", "get_probe", "load", "load_results", "make_config", "probe",
           "read_result", "registry", "resolve", "run", "run_probe"]
