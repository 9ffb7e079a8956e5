"""What a prune produces, whichever engine ran it: one :class:`LayerRecord` per pruned layer, and one
:class:`PruneResult` for the run (returned by :func:`cap_dist.engines.prune` for the local and the Ray engine)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from cap_dist.config import Recipe


@dataclass
class LayerRecord:
    """One pruned layer, as written to sparsity.json and report.parquet."""

    layer: str
    stage: str
    rows: int
    columns: int
    numel: int
    target_sparsity: float
    sparsity: float
    loss: float
    rel_error: float
    seconds: float
    damp_used: float | None
    escalations: int
    quant_bits: int | None = None          # prune.quantize: loss/rel_error then measure pruned + quantized vs dense
    quant_group_size: int | None = None
    quant_loss: float | None = None        # the quantization's own loss, over the pruned weights
    quant_zeroed: int | None = None        # kept weights whose code is 0 (now zero, though the mask keeps them)

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def overall_sparsity(layers: list[LayerRecord]) -> float:
    """Weighted by each layer's size: the fraction of all pruned layers' weights that are zero."""
    total = sum(r.numel for r in layers)
    return sum(r.sparsity * r.numel for r in layers) / total if total else 0.0


@dataclass
class PruneResult:
    """One finished prune.

    Attributes:
        recipe: the recipe that ran.
        engine: ``local`` or ``ray``.
        layers: one record per pruned layer, in model order.
        timings: seconds per stage (load, data, calibrate, allocate, solve, write, total).
        input_spec: the model's input preprocessing.
        manifest: the ``sparsity.json`` written (the commit record of the output); None when nothing was written.
        model: the pruned model, where the engine held it whole (the local engine); the Ray engine never
            assembles it in one process: ``cap_dist.load_sparse(result.output)`` reads it from the output.
    """

    recipe: Recipe
    engine: str
    layers: list[LayerRecord]
    timings: dict[str, float] = field(default_factory=dict)
    input_spec: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    model: nn.Module | None = None

    @property
    def output(self) -> str:
        return self.recipe.output

    @property
    def sparsity(self) -> float:
        return overall_sparsity(self.layers)


def layer_table(records: list[LayerRecord]) -> str:
    """The closing table: per-layer sparsity, relative error and time."""
    width = max((len(r.layer) for r in records), default=5)
    lines = [f"{'layer':<{width}}  {'shape':>12}  {'sparsity':>8}  {'rel.err':>9}  {'time':>7}"]
    for r in records:
        lines.append(f"{r.layer:<{width}}  {f'{r.rows}x{r.columns}':>12}  {r.sparsity:8.2%}  {r.rel_error:9.5f}  "
                     f"{r.seconds:6.2f}s")
    numel = sum(r.numel for r in records)
    if numel:
        lines.append(f"{'all pruned layers':<{width}}  {numel:>12,}  {overall_sparsity(records):8.2%}")
    return "\n".join(lines)
