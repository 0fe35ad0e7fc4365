"""Models: spec resolution, the zoo, loading with three views, naming, ModelSet."""

from .loaded import LoadedModel, load
from .modelset import BASE, ModelSet, parse_variant_args
from .specs import ResolvedSpec, resolve
from .zoo import DEFAULT_MODEL, ZOO, fetch

__all__ = ["BASE", "DEFAULT_MODEL", "LoadedModel", "ModelSet", "ResolvedSpec", "ZOO", "fetch",
           "load", "parse_variant_args", "resolve"]
