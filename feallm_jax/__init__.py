"""FEALLM in JAX/Flax NNX: facial expressions, action units and the reasoning between them."""

__version__ = "0.1.0"
