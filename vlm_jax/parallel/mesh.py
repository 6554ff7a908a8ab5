"""The device mesh: axes `data`, `fsdp`, `tensor`, sized from `config.mesh`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor); one axis may be -1 and takes the remaining devices."""
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(mesh_cfg)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(mesh_cfg)}")
    if free:
        if num_devices % fixed:
            raise ValueError(f"{num_devices} devices cannot be split as {dict(mesh_cfg)}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are present"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over all (or the given) devices with named axes data, fsdp, tensor."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        # Topology-aware placement on TPU/GPU (keeps `tensor` on the fastest links).
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
