"""cap-dist: Correlation-Aware Pruning (CAP) of large vision models, distributed on Ray.

The layer solvers live in :mod:`cap_dist.solvers` (pure torch); :func:`prune_layer` is their stable
entry point. :func:`prune` runs a whole recipe with the engine it names (``local``: one process; ``ray``: actors
that each hold a shard) and returns a :class:`PruneResult` either way; the steps both engines share are in
:mod:`cap_dist.core`. :func:`load_sparse` rebuilds an output; :func:`finetune` recovers a pruned model's accuracy
on Ray Train (FSDP2, masks kept, distillation from the dense model).
"""

from __future__ import annotations

from typing import Any

from cap_dist.solvers import LayerResult, prune_layer
from cap_dist.version import __version__

__all__ = ["LayerResult", "PruneResult", "__version__", "finetune", "load_sparse", "prune", "prune_layer"]


def __getattr__(name: str) -> Any:
    # The engines pull in timm, pyarrow and the data readers: import them only when asked for.
    if name == "prune":
        from cap_dist.engines import prune

        return prune
    if name == "PruneResult":
        from cap_dist.core.records import PruneResult

        return PruneResult
    if name == "finetune":
        from cap_dist.finetune.trainer import finetune

        return finetune
    if name == "load_sparse":
        from cap_dist.output import load_sparse

        return load_sparse
    raise AttributeError(f"module 'cap_dist' has no attribute {name!r}")
