"""A recipe with a ``structured`` section: remove structures first, then prune / quantize what remains.

The structured step runs in this process (one calibration pass through the dense model, then one greedy per
structure) and writes an ordinary output whose ``model.json`` records the smaller shapes, so the output is itself a
model source. When the recipe also asks for unstructured or N:M sparsity or quantization, that output lands in
``<output>/structured`` and the recipe's engine (local or Ray) prunes it like any model folder into ``<output>``:

    recipe: structured: {target: 0.6}, prune: {sparsity: 0}          -> <output> is the smaller dense model
    recipe: structured: {target: 0.6}, prune: {pattern: "2:4"}       -> <output>/structured, then <output> (2:4)
"""

from __future__ import annotations

import logging
import time

from cap_dist.config import ModelConfig, Recipe
from cap_dist.core.records import PruneResult
from cap_dist.models.source import ModelSource, state_dict_for_save
from cap_dist.structured.prune import prune_structured

log = logging.getLogger(__name__)

STRUCTURED_DIR = "structured"


def remaining_work(recipe: Recipe) -> bool:
    """Whether the recipe prunes or quantizes the structured model further."""
    cfg = recipe.prune
    return cfg.sparsity > 0 or cfg.pattern.structured or bool(cfg.quantize.bits)


def structured_recipe(recipe: Recipe) -> Recipe:
    """The recipe of the structured step: the user's, written to ``<output>/structured`` when more follows."""
    if not remaining_work(recipe):
        return recipe
    return recipe.model_copy(update={"output": f"{recipe.output.rstrip('/')}/{STRUCTURED_DIR}"})


def follow_up_recipe(recipe: Recipe) -> Recipe:
    """The recipe that prunes the structured output: the user's with the structured output as its model."""
    model = ModelConfig(source=structured_recipe(recipe).output, targets=recipe.model.targets,
                        ignore=recipe.model.ignore)
    return recipe.model_copy(update={"model": model, "structured": None})


def prune_structured_output(recipe: Recipe, source: ModelSource | None = None, write: bool = True) -> PruneResult:
    """Run the structured step of ``recipe`` in this process and write its output (to ``recipe.output``)."""
    from cap_dist.engines.local import calibration_batches, load_on_device
    from cap_dist.output import write_output

    if recipe.structured is None:
        raise ValueError("the recipe has no structured section; add structured: {target: 0.6} (see cap_dist/config.py)")
    total = time.perf_counter()
    source = source if source is not None else ModelSource.of(recipe.model)
    model, input_spec, device = load_on_device(recipe, source)
    inputs = [x for x, _ in calibration_batches(recipe, input_spec, device)]
    start = time.perf_counter()
    records = prune_structured(model, inputs, recipe.structured)
    timings = {"structured": time.perf_counter() - start, "total": time.perf_counter() - total}
    model = model.cpu()
    result = PruneResult(recipe=recipe, engine="local", layers=[], timings=timings, input_spec=input_spec, model=model)
    if write:
        result.manifest = write_output(recipe, state_dict_for_save(model), [], input_spec, timings,
                                       extra={"engine": "local", "structured": [r.row() for r in records]},
                                       source=source)
    for r in records:
        log.info("%-28s %-8s %4d -> %4d  rel. error %.4f", r.name, r.kind, r.groups, r.kept, r.rel_error)
    return result
