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

import logging

from cap_dist.config import Recipe, RecipeError, load_recipe
from cap_dist.core.records import LayerRecord, PruneResult
from cap_dist.output import prepare_output

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")

__all__ = ["ENGINES", "PruneResult", "prune"]


def prune(recipe: Recipe | str, overrides: list[str] | None = None, *, write: bool = True) -> PruneResult:
    """Prune the model a recipe describes with the recipe's engine and write the output to ``recipe.output``.

    Args:
        recipe: a :class:`~cap_dist.config.Recipe`, or the path/URI of a YAML recipe.
        overrides: ``key=value`` overrides for a recipe path (e.g. ``prune.sparsity=0.75``).
        write: write the output (the local engine can skip it and keep the model in ``result.model``; the Ray
            engine always writes, since its actors write their layers as they solve them).

    Before any work the output location is checked (:func:`cap_dist.output.prepare_output`): a finished output of
    the same recipe there is reused (and the result says so in the log); one of another recipe is refused unless
    ``overwrite``; and the weights file is checked against the model (:meth:`ModelSource.check_weights`).
    """
    if isinstance(recipe, str):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise RecipeError("overrides apply to a recipe path; pass a Recipe already overridden")
    if recipe.schedule.steps > 1:
        raise RecipeError(f"the recipe's schedule has {recipe.schedule.steps} steps: gradual pruning (prune, "
                          "finetune, repeat) runs with `cap-dist run`; a prune goes once to prune.sparsity")
    from cap_dist import storage
    from cap_dist.models.source import ModelSource

    storage.configure(recipe.storage)
    if recipe.structured is not None:
        return _prune_structured_first(recipe, write)
    if write:
        finished = prepare_output(recipe)
        if finished is not None:
            log.info("%s already holds this recipe's finished output (written %s by the %s engine): reusing it; "
                     "delete it or choose another output to prune again", recipe.output,
                     finished.get("written_at", "earlier"), finished.get("engine", "local"))
            return _reused(recipe, finished)
    source = ModelSource.of(recipe.model)
    source.check_weights()                   # a bad weights file is one clear error, before any engine starts
    if recipe.engine == "local":
        from cap_dist.engines.local import prune_local

        return prune_local(recipe, source, write=write)
    from cap_dist.engines.distributed.local_ray import connect

    connect(recipe)                          # before the driver imports Ray: a local Ray of ours stays on 127.0.0.1
    from cap_dist.engines.distributed.driver import prune_distributed

    return prune_distributed(recipe, source, write=write)


def _prune_structured_first(recipe: Recipe, write: bool) -> PruneResult:
    """Structures first (in this process, :mod:`cap_dist.structured.run`), then the recipe's engine on what remains
    (the structured output as its model source); without further work the structured output is the result."""
    from cap_dist.structured.run import (follow_up_recipe, prune_structured_output, remaining_work,
                                         structured_recipe)

    first = structured_recipe(recipe)
    if remaining_work(recipe) and not write:
        raise RecipeError("structured pruning followed by prune.sparsity / pattern / quantize writes the structured "
                          "model first (it is the next step's model source); run it with write=True")
    finished = prepare_output(first) if write else None
    if finished is not None:
        log.info("%s already holds this recipe's structured output: reusing it", first.output)
        result = _reused(first, finished)
    else:
        result = prune_structured_output(first, write=write)
    if not remaining_work(recipe):
        return result
    return prune(follow_up_recipe(recipe), write=write)


def _reused(recipe: Recipe, manifest: dict) -> PruneResult:
    return PruneResult(recipe=recipe, engine=manifest.get("engine", "local"),
                       layers=[LayerRecord(**row) for row in manifest.get("layers", [])],
                       timings=dict(manifest.get("timings", {})), input_spec=dict(manifest.get("input", {})),
                       manifest=manifest)
