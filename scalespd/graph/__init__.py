"""Graph stage: Pearson correlation of the alive profile columns with a running top-k — tiled
dense GEMMs, or exact sparse co-activation products for profiles that are mostly zeros
(graph.correlation; `scalespd.graph.sparse`) — a noise-aware edge threshold, a k-NN graph
(relative-strength edges by default, GraphConfig.neighbours) and its connected components
(DESIGN §4)."""

from scalespd.graph.build import GraphResult, build_graph

__all__ = ["GraphResult", "build_graph"]
