"""The engines: where a prune runs and how its data moves. Both run the same core steps (:mod:`cap_dist.core`)
and return the same :class:`~cap_dist.core.PruneResult`; the recipe's ``engine`` picks one.

* ``local`` (:mod:`cap_dist.engines.local`): one process, the whole model in memory.
* ``ray`` (:mod:`cap_dist.engines.distributed`): a driver streams calibration through actors that each hold a
  contiguous shard of blocks, solve its layers, and write each solved layer; it reproduces the local result.

    from cap_dist import prune
    result = prune("jobs/vit4mnist.yaml", ["engine=local", "prune.sparsity=0.75"])
    result.sparsity, result.output, result.manifest["files"]
"""

from __future__ import annotations

from cap_dist.config import Recipe, RecipeError, load_recipe
from cap_dist.core.records import PruneResult

ENGINES = ("local", "ray")

__all__ = ["ENGINES", "PruneResult", "prune"]


def prune(recipe: Recipe | str, overrides: list[str] | None = None, *, write: bool = True) -> PruneResult:
    """Prune the model a recipe describes with the recipe's engine and write the output to ``recipe.output``.

    Args:
        recipe: a :class:`~cap_dist.config.Recipe`, or the path/URI of a YAML recipe.
        overrides: ``key=value`` overrides for a recipe path (e.g. ``prune.sparsity=0.75``).
        write: write the output (the local engine can skip it and keep the model in ``result.model``; the Ray
            engine always writes, since its actors write their layers as they solve them).
    """
    if isinstance(recipe, str):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise RecipeError("overrides apply to a recipe path; pass a Recipe already overridden")
    if recipe.schedule.steps > 1:
        raise RecipeError(f"the recipe's schedule has {recipe.schedule.steps} steps: gradual pruning (prune, "
                          "finetune, repeat) runs with `cap-dist run`; a prune goes once to prune.sparsity")
    from cap_dist import storage

    storage.configure(recipe.storage)
    if recipe.engine == "local":
        from cap_dist.engines.local import prune_local

        return prune_local(recipe, write=write)
    from cap_dist.engines.distributed.driver import prune_distributed

    return prune_distributed(recipe, write=write)
