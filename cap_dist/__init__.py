"""cap-dist: Correlation-Aware Pruning (CAP) of large vision models, distributed on Ray.

The layer solvers live in :mod:`cap_dist.solvers` (pure torch); :func:`prune_layer` is the stable
entry point.  Models, data and the pipeline build on them.
"""

from cap_dist.solvers import LayerResult, prune_layer

__version__ = "0.1.0"
__all__ = ["LayerResult", "__version__", "prune_layer"]
