"""Layers: attention, embeddings, norms, MLPs, the transformer stack, vector quantisation."""

from vlm_jax.layers.quantizer import VectorQuantizer, restart_dead_codes

__all__ = ["VectorQuantizer", "restart_dead_codes"]
