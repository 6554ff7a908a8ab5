"""Collectives read from compiled HLO, and XLA's native log captured while compiling."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlm_jax.plan import collectives

HLO = """
  %all-gather.3 = f32[64,32]{1,0} all-gather(f32[16,32]{1,0} %p), channel_id=1, dimensions={0}
  %all-reduce.7 = (f32[8,128]{1,0}, bf16[4]{0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %reduce-scatter = bf16[2,8]{1,0} reduce-scatter(bf16[8,8]{1,0} %c), dimensions={0}
  %ags = (f32[16]{0}, f32[64]{0}) all-gather-start(f32[16]{0} %d), dimensions={0}
  %agd = f32[64]{0} all-gather-done(%ags)
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(%e, %f), to_apply=%add
  %ard = (f32[8]{0}, f32[8]{0}) all-reduce-done(%ars)
  %add.1 = f32[8,128]{1,0} add(%x, %y), metadata={op_name="all-reduce(" }
"""


def test_collective_stats_counts_result_bytes():
    stats = collectives.collective_stats(HLO)
    assert stats["all-gather"] == {"count": 2, "bytes": 64 * 32 * 4 + 64 * 4}  # the -start's output only
    # Both arrays of a combined all-reduce (its async form returns only the outputs).
    assert stats["all-reduce"] == {"count": 2, "bytes": 8 * 128 * 4 + 4 * 2 + 2 * 8 * 4}
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 2 * 8 * 2}
    assert set(stats) == {"all-gather", "all-reduce", "reduce-scatter"}


def test_collective_stats_of_a_real_sharded_matmul():
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    a = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x")))
    b = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x", None)))
    out = NamedSharding(mesh, PartitionSpec())
    text = jax.jit(jnp.matmul, out_shardings=out).lower(a, b).compile().as_text()
    stats = collectives.collective_stats(text)
    # Each device multiplies its 16-wide slices; the [8, 16] partial products are summed.
    assert stats["all-reduce"]["bytes"] == 8 * 16 * 4, stats


def test_capture_native_stderr_reads_file_descriptor_2(capfd):
    with collectives.capture_native_stderr() as log:
        os.write(2, b"W1127 spmd_partitioner.cc] [SPMD] Involuntary full rematerialization. x\n")
    assert collectives.spmd_full_rematerializations(log.text) == 1
    assert capfd.readouterr().err == ""  # nothing leaked past the capture
    with collectives.capture_native_stderr(passthrough=True) as log:
        os.write(2, b"native line\n")
    assert log.text == "native line\n" and "native line" in capfd.readouterr().err
