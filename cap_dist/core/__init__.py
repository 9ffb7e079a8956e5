"""The engine-neutral pruning core: every step of a prune that does not depend on where it runs.

How data flows through a prune (either engine)::

    recipe (cap_dist.config)                      validated once; prune.pattern parsed once
      -> ModelSource (cap_dist.models.source)     model folder / timm / PyPI, parsed once: skeleton, weights,
                                                  input spec
      -> stages (core.stages)                     prefix -> blocks -> suffix; each prunable layer in its stage
      -> Hessians (core.hessians)                 forward pre-hooks fold each layer's input into H = 2/N Σ x xᵀ
                                                  (or per-sample gradients into a block Fisher)
      -> allocate (core.allocate)                 uniform, or global from every layer's loss curve
      -> solve (core.solve, core.sequential)      prune_layer per layer -> LayerRecord, weights set in place;
                                                  sequential mode: calibrate + solve stage after stage
      -> output (cap_dist.output)                 model.safetensors, report.parquet, model.json, sparsity.json
      => PruneResult (core.records)

The engines (:mod:`cap_dist.engines`) only orchestrate: the local engine runs these steps in one process; the
Ray engine runs the stages' Hessians and solves on actors that each hold a shard, and allocates on the driver.
"""

from cap_dist.core.allocate import curve_depth, global_levels, layer_levels, needs_loss_curves, uniform_levels
from cap_dist.core.hessians import (Accumulator, Batch, collect_fisher, collect_hessians, dense_curvature,
                                    peek_curvature, take_curvature)
from cap_dist.core.records import LayerRecord, PruneResult, layer_table, overall_sparsity
from cap_dist.core.solve import (estimated_solve_flops, level_with_prior, loss_curve, prior_mask_of,
                                 solve_layer)
from cap_dist.core.sequential import solve_stage
from cap_dist.core.stages import (Stage, check_layers_fit, device_of, model_stages, run_stage_over, run_stages,
                                  select_layers)

__all__ = ["Accumulator", "Batch", "LayerRecord", "PruneResult", "Stage", "check_layers_fit", "collect_fisher",
           "collect_hessians", "curve_depth", "dense_curvature", "device_of", "estimated_solve_flops", "global_levels",
           "layer_levels", "layer_table", "level_with_prior", "loss_curve", "model_stages", "needs_loss_curves",
           "overall_sparsity", "peek_curvature", "prior_mask_of", "run_stage_over", "run_stages", "select_layers", "solve_layer", "solve_stage",
           "take_curvature", "uniform_levels"]
