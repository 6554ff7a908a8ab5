"""Logical axis names (in the models) -> mesh PartitionSpecs / NamedShardings (from the config)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]


def as_rules(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Config rules (lists, as ml_collections stores them) -> flax's tuple form."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def spec_axes(entry: Any) -> tuple[str, ...]:
    """One PartitionSpec entry (None, a mesh axis name or a tuple of them) as a tuple of names."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Any) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (tiny models on big meshes stay valid)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        kept = []
        for name in spec_axes(axes):
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[name]) == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def logical_specs(abstract_tree: Any) -> Any:
    """Tree of logical PartitionSpecs (names like 'embed') from boxed (nn.Partitioned) leaves.

    A box around an empty node (optax's MaskedNode where a frozen param has no optimiser state)
    gives that empty node, so the specs keep the structure of the unboxed tree.
    """

    def spec(x):
        if isinstance(x, nn.meta.AxisMetadata):
            value = x.unbox()
            return value if not jax.tree.leaves(value) else nn.get_partition_spec(x)
        return PartitionSpec()

    return jax.tree.map(spec, abstract_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def mesh_shardings(abstract_tree: Any, mesh: Mesh, rules: Any) -> Any:
    """NamedShardings for a tree that may hold nn.Partitioned boxes; unboxed leaves replicate."""
    specs = logical_specs(abstract_tree)
    unboxed = nn.meta.unbox(abstract_tree)
    rules = as_rules(rules)

    def to_sharding(spec, leaf):
        shape = getattr(leaf, "shape", ())
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else PartitionSpec()
        return NamedSharding(mesh, fit_spec(mesh_spec, shape, mesh))

    # Leaf by leaf: nn.logical_to_mesh on the whole tree would take empty tuple nodes (optax's
    # MaskedNode for frozen params) for specs.
    return jax.tree.map(to_sharding, specs, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Any, ndim: int) -> NamedSharding:
    """Sharding of an input batch array: leading dim over the axes of logical 'batch'."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), as_rules(rules))
    return NamedSharding(mesh, spec)
