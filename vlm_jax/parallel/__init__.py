"""Meshes, logical-axis sharding rules and multi-host helpers."""

from vlm_jax.parallel.mesh import MESH_AXES, make_mesh
from vlm_jax.parallel.rules import batch_sharding, mesh_shardings

__all__ = ["MESH_AXES", "make_mesh", "mesh_shardings", "batch_sharding"]
