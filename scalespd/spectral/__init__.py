"""Spectral clustering of the k-NN graph into cross-layer mechanisms (DESIGN §4 "Spectral").

Public: `cluster_graph(W, labels, cfg, ...) -> labels`, `cluster_graph_detailed` (labels plus
per-component spectra), `cluster_piece` (one connected component), `smallest_eigenpairs`.
The pipeline stage is `scalespd.spectral.stage.run`.
"""

from scalespd.spectral.core import cluster_piece, eigengap_k
from scalespd.spectral.eigen import smallest_eigenpairs
from scalespd.spectral.tasks import ClusteringResult, cluster_graph, cluster_graph_detailed

__all__ = [
    "ClusteringResult",
    "cluster_graph",
    "cluster_graph_detailed",
    "cluster_piece",
    "eigengap_k",
    "smallest_eigenpairs",
]
