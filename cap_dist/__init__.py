"""cap-dist: Correlation-Aware Pruning (CAP) of large vision models, distributed on Ray.

The layer solvers live in :mod:`cap_dist.solvers` (pure torch); :func:`prune_layer` is their stable
entry point.  :func:`prune` runs a whole recipe in one process, :func:`prune_distributed` on Ray (``cap-dist prune``
picks by the recipe's ``engine``); :func:`load_sparse` rebuilds either output; :func:`finetune` recovers a pruned
model's accuracy on Ray Train (FSDP2, masks kept, distillation from the dense model).
"""

from __future__ import annotations

from typing import Any

from cap_dist.solvers import LayerResult, prune_layer

__version__ = "0.1.0"
__all__ = ["LayerResult", "__version__", "finetune", "load_sparse", "prune", "prune_distributed", "prune_layer"]


def __getattr__(name: str) -> Any:
    # The pipeline pulls in timm, pyarrow and the data readers: import it only when asked for.
    if name == "prune":
        from cap_dist.pipeline import prune

        return prune
    if name == "prune_distributed":
        from cap_dist.distributed.driver import prune_distributed

        return prune_distributed
    if name == "finetune":
        from cap_dist.finetune.trainer import finetune

        return finetune
    if name == "load_sparse":
        from cap_dist.output import load_sparse

        return load_sparse
    raise AttributeError(f"module 'cap_dist' has no attribute {name!r}")
