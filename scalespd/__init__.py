"""scalespd: Stochastic Parameter Decomposition and cross-layer mechanism clustering at scale."""

__version__ = "0.1.0"
