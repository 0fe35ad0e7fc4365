"""``weight-change``: where fine-tuning moved the weights.

For each variant, layer and matrix (q k v o gate up down): ``||W_v - W_base||_F / ||W_base||_F``,
streamed from the checkpoints' safetensors files (no model is loaded). Result key:
``relative_change[<variant>][<matrix>]`` (a list indexed by layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mechinterp.analysis.weights import load_config, weight_change
from mechinterp.models.naming import family_for, n_layers
from mechinterp.plotting import heatmap_grid
from mechinterp.probe import BaseConfig
from mechinterp.progress import task
from mechinterp.results import Result


@dataclass
class Config(BaseConfig):
    pass


class WeightChange:
    name = "weight-change"
    version = "1"
    description = "relative Frobenius change ||W_v - W_base|| / ||W_base|| per layer and matrix"
    Config = Config

    def run(self, models, data, config: Config) -> Result:
        folders = {n: models.specs[n].path for n in models.variants}
        base = models.specs["base"].path
        cfg = load_config(base)
        total = n_layers(cfg) * len(family_for(cfg).matrices)
        with task("weight change", total) as advance:
            matrices, n_layer, rel = weight_change(base, folders, progress=advance)
        return Result(self.name, {
            "matrices": matrices,
            "n_layers": n_layer,
            "variants": list(folders),
            "runs": models.runs,
            "relative_change": rel,
        })

    def plot(self, result: Result) -> dict:
        data = result.data
        matrices = data["matrices"]
        panels = [(v, np.array([data["relative_change"][v][m] for m in matrices], float).T)
                  for v in data["variants"]]
        if not panels:
            return {}
        fig = heatmap_grid(panels, matrices, "layer", r"$\|W_v - W_{base}\|_F / \|W_{base}\|_F$",
                           title="Relative weight change per layer and matrix")
        return {"weight_change_heatmap": fig}


PROBE = WeightChange()
