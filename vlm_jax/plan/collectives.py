"""What a compiled step does across devices: its collectives (read from the compiled HLO text) and
the SPMD partitioner's complaints (read from XLA's native log while it compiles).

`vlm-jax plan` reports both: communication per device per step, and the arrays that XLA could only
reshard by replicating them first ("involuntary full rematerialization"), which is nearly always a
sharding annotation to fix (a logical axis mapped to the wrong mesh axis, a missing constraint).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
SPMD_FULL_REMAT = "Involuntary full rematerialization"

_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
# `%name = <result shape> <op>(` where op is a collective, or its async "-start" half (GPU, TPU).
_OP = re.compile(r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _array_bytes(shape_text: str) -> list[int]:
    """Bytes of each array in an HLO shape ("f32[8,128]{1,0}" or a tuple of them)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _BYTES:
            sizes.append(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return sizes


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} over the collectives of one device's compiled HLO.

    Bytes are each op's result arrays (what lands on the device: the gathered array of an
    all-gather, the reduced arrays of an all-reduce, the shard of a reduce-scatter). The async
    "-start" form of an all-gather or a permute returns (operands, outputs): only the outputs are
    counted. Ops inside a while loop (scanned layers, gradient accumulation) are counted once, not
    once per iteration.
    """
    stats: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        sizes = _array_bytes(m.group("shape"))
        if m.group("start") and m.group("op") != "all-reduce":
            sizes = sizes[len(sizes) // 2 :]  # (operands, outputs): the outputs
        entry = stats.setdefault(m.group("op"), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += sum(sizes)
    return stats


def spmd_full_rematerializations(log_text: str) -> int:
    """How many times the log says XLA replicated an array to reshard it."""
    return log_text.count(SPMD_FULL_REMAT)


class NativeLog:
    """The text that native code (XLA's C++ logging) wrote to file descriptor 2 inside `capture`."""

    text: str = ""


@contextlib.contextmanager
def capture_native_stderr(passthrough: bool = False) -> Iterator[NativeLog]:
    """Redirects fd 2 to a temporary file for the block (C++ logs bypass sys.stderr) and gives its
    text afterwards; with `passthrough` the text is also written back to stderr."""
    log = NativeLog()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log.text = tmp.read().decode("utf-8", "replace")
    if passthrough and log.text:
        sys.stderr.write(log.text)
        sys.stderr.flush()


def show_xla_logs() -> bool:
    """Whether XLA's own log lines are passed on (VLM_JAX_PLAN_XLA_LOGS=1) rather than counted."""
    return bool(os.environ.get("VLM_JAX_PLAN_XLA_LOGS"))


__all__ = [
    "COLLECTIVES",
    "NativeLog",
    "SPMD_FULL_REMAT",
    "capture_native_stderr",
    "collective_stats",
    "show_xla_logs",
    "spmd_full_rematerializations",
]
