"""The accelerators a plan targets (HBM per chip as published, and the backend whose attention
kernels the target's dispatcher picks) and the mesh argument of `vlm-jax plan`."""

from __future__ import annotations

import dataclasses
import re

GiB = 1024**3
MiB = 1024**2
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Device:
    """An accelerator: its HBM per chip (as published) and the backend its kernels target."""

    name: str
    hbm_bytes: int
    backend: str  # "gpu" | "tpu" | "cpu": which attention kernels the target's dispatcher picks
    source: str


# Published HBM per chip. Google quotes TPU HBM in GiB (the runtime reports the same size); NVIDIA
# quotes decimal GB (nvidia-smi shows 81559 MiB = 85.5e9 bytes for the H100 SXM 80GB), so the GB
# figures here are a little conservative.
DEVICES = {
    "v4": Device("TPU v4", 32 * GiB, "tpu", "cloud.google.com/tpu/docs/v4: 32 GiB HBM2 per chip"),
    "v5e": Device("TPU v5e", 16 * GiB, "tpu", "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2 per chip"),
    "v5p": Device("TPU v5p", 95 * GiB, "tpu", "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e per chip"),
    "v6e": Device("TPU v6e", 32 * GiB, "tpu", "cloud.google.com/tpu/docs/v6e: 32 GiB HBM per chip"),
    "h100": Device("NVIDIA H100 SXM", 80 * GB, "gpu", "NVIDIA H100 datasheet: 80 GB HBM3"),
    "h200": Device("NVIDIA H200 SXM", 141 * GB, "gpu", "NVIDIA H200 datasheet: 141 GB HBM3e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


def get_device(spec: str | Device, hbm_bytes: int | None = None) -> Device:
    """'h100', 'TPU v5p', 'tpu-v4', ... or a bare size ('16GiB', '80GB', '1e9') -> Device."""
    if isinstance(spec, Device):
        device = spec
    else:
        text = str(spec).strip()
        size = re.fullmatch(r"([0-9.e+]+)\s*(gib|gb|mib|mb|b)?", text.lower())
        if size:
            unit = {"gib": GiB, "gb": GB, "mib": 1024**2, "mb": 10**6, "b": 1, None: 1}[size.group(2)]
            device = Device(text, int(float(size.group(1)) * unit), "cpu", "given on the command line")
        else:
            key = re.sub(r"[\s_\-]|^tpu|^nvidia", "", text.lower())
            key = re.sub(r"^tpu", "", key)
            key = _ALIASES.get(key, key)
            if key not in DEVICES:
                raise ValueError(
                    f"unknown device {spec!r}; choose one of {', '.join(DEVICES)} or give a size such as 24GiB"
                )
            device = DEVICES[key]
    if hbm_bytes is not None:
        device = dataclasses.replace(device, hbm_bytes=int(hbm_bytes), source="hbm_bytes given")
    return device


def parse_mesh(text: str | dict) -> dict[str, int]:
    """'data=1,fsdp=64,tensor=4' (or a dict) -> {'data': 1, 'fsdp': 64, 'tensor': 4}."""
    from vlm_jax.parallel.mesh import MESH_AXES

    if isinstance(text, dict):
        items = dict(text)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"mesh {text!r}: write axis=size pairs, e.g. data=1,fsdp=8,tensor=1")
            items[name.strip()] = int(value)
    unknown = set(items) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    mesh = {axis: int(items.get(axis, 1)) for axis in MESH_AXES}
    if any(size < 1 for size in mesh.values()):
        raise ValueError(f"plan needs every mesh axis size explicitly (>= 1), got {mesh}")
    return mesh
