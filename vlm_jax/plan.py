"""`vlm-jax plan`: will a config train on a given mesh of a given accelerator? Answered without it.

    vlm-jax plan --config configs/llama.py:llama2_70b --mesh data=1,fsdp=64,tensor=4 --device h100
    python -m vlm_jax.plan --config configs/clip.py:b16 --mesh data=8,fsdp=32 --device v5p --json plan.json

The real train step (vlm_jax.train.trainer's state_initializer + jit_train_step, the task's loss and
the optimiser of config.optim) is traced with abstract inputs (jax.ShapeDtypeStruct with the run's
shardings) and compiled ahead of time on a fake set of as many CPU devices as the mesh has. No
parameter, optimiser or batch array is ever allocated.

What comes out, per device:
* params, optimiser state, gradients and batch bytes: exact, from each array's shape, dtype and
  sharding (`sharding.shard_shape(shape)`);
* the compiler's temp bytes (gradients, activations, workspace) from `compiled.memory_analysis()`.
  The compiler is XLA's CPU compiler (unless the process already runs on enough devices of the
  target's kind), so this is an estimate for the target: fusion, layouts and scheduling differ
  between backends. One CPU-only artefact is removed: CPU computes bf16 matmuls in f32, and its
  loop-invariant code motion would hoist f32 copies of every stacked bf16 activation out of the
  layer loop, so the CPU compiles run without that pass (CPU_COMPILER_OPTIONS);
* the peak estimate = arguments + outputs - donated aliases + temp, against the device's HBM less a
  headroom (default 10%: runtime, fragmentation, compiler differences);
* FLOPs per step: counted on the step's jaxpr (every matmul and convolution executed, backward pass
  and remat recomputation included, scan bodies times their length), the analytic 6*N*tokens (+
  attention) for language models, and XLA's cost_analysis (per device; XLA counts a loop body once,
  so it undercounts scanned layers);
* the largest per-device batch that fits: the step is compiled at the requested batch and at half
  (or twice) of it, the peak is taken as linear in the rows per device (a + b * rows) through two
  compiled points (those bracketing the budget, else the two nearest it), and the predicted largest
  batch is compiled to check it; this repeats until a batch that fits and the next one that does
  not have both been compiled ("verified"), or `max_compiles` is spent (the result says which).
  A compile at a large batch costs no more than at a small one: nothing is allocated.

Attention: on the target the dispatcher (vlm_jax.kernels.attention.choose_impl) picks a flash
kernel for long sequences (cuDNN or Pallas on GPU, Pallas on TPU) that keeps only q, k, v, the
output and the row logsumexp for the backward pass. The CPU compiler cannot compile those kernels,
and the XLA reference would materialise [B, H, T, T] scores, so wherever the target would run a
flash kernel the plan compiles a stand-in with the same residuals (blockwise attention with an
online softmax, custom_vjp; see `flash_attention_standin`). `attention="xla"` compiles as is.
The stand-in computes masked causal blocks that the kernels skip, so the jaxpr FLOPs count full
(unmasked) attention, as the analytic attention term does.

Fake devices: a mesh of N devices needs N devices in the process, and XLA's CPU backend makes N
only when XLA_FLAGS=--xla_force_host_platform_device_count=N is set before jax starts its
backends. So `plan()` runs in-process when the process already has enough devices (the tests set
8), else in a fresh `python -m vlm_jax.plan` child with that flag; the command line always starts
the child.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

GiB = 1024**3
MiB = 1024**2
GB = 10**9
_CHILD_ENV = "VLM_JAX_PLAN_CHILD"


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


# --------------------------------------------------------------------------------------------
# A flash-attention stand-in: what the target's kernel keeps in memory, compilable on any backend.


def _mask(q_pos, kv_pos, q_ids, kv_ids, kv_len, causal):
    """[B, 1, 1, bq, bk] bool from positions [bq], [bk] and segment ids [B, bq], [B, bk]."""
    import jax.numpy as jnp

    valid = jnp.broadcast_to((kv_pos < kv_len)[None, :], (q_pos.shape[0], kv_pos.shape[0]))
    if causal:
        valid = valid & (kv_pos[None, :] <= q_pos[:, None])
    same = q_ids[:, :, None] == kv_ids[:, None, :]
    return (valid[None] & same)[:, None, None]


def _blocks(x, n):
    """[B, n*b, ...] -> [n, B, b, ...]."""
    import jax.numpy as jnp

    return jnp.moveaxis(x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, b, ...] -> [B, n*b, ...]."""
    import jax.numpy as jnp

    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _flash_fwd(q, k, v, q_ids, kv_ids, causal, scale, block, kv_len):
    """q [B, T, Hkv, G, D], k/v [B, T, Hkv, D], ids [B, T] (T whole blocks; keys from kv_len on are
    padding) -> (out [B, T, Hkv, G, D], residuals)."""
    import jax
    import jax.numpy as jnp

    b, t, hkv, g, d = q.shape
    n = t // block
    neg = jnp.finfo(jnp.float32).min
    kv = (jnp.arange(n), _blocks(k, n), _blocks(v, n), _blocks(kv_ids, n))

    def q_block(args):
        qi, q_blk, qid = args
        q_pos = qi * block + jnp.arange(block)

        def kv_step(carry, xs):
            m, denom, acc = carry
            kj, k_blk, v_blk, kid = xs
            s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            s = jnp.where(_mask(q_pos, kj * block + jnp.arange(block), qid, kid, kv_len, causal), s, neg)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(-1)
            pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
            return (m_new, denom, acc), None

        init = (
            jnp.full((b, hkv, g, block), neg, jnp.float32),
            jnp.zeros((b, hkv, g, block), jnp.float32),
            jnp.zeros((b, block, hkv, g, d), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(kv_step, init, kv)
        out = acc / jnp.moveaxis(denom, -1, 1)[..., None]
        return out.astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(q_block, (jnp.arange(n), _blocks(q, n), _blocks(q_ids, n)))
    out = _unblocks(out)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, g, t)  # [n, B, Hkv, G, bq] -> [B, Hkv, G, T]
    return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(causal, scale, block, kv_len, res, dout):
    import jax
    import jax.numpy as jnp

    q, k, v, q_ids, kv_ids, out, lse = res
    b, t, hkv, g, d = q.shape
    n = t // block
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", dout.astype(jnp.float32), out.astype(jnp.float32))
    per_q = (
        jnp.arange(n), _blocks(q, n), _blocks(dout, n), _blocks(q_ids, n),
        jnp.moveaxis(lse.reshape(b, hkv, g, n, block), 3, 0),
        jnp.moveaxis(delta.reshape(b, hkv, g, n, block), 3, 0),
    )

    def kv_block(dq, xs):
        kj, k_blk, v_blk, kid = xs
        kv_pos = kj * block + jnp.arange(block)

        def q_step(carry, ys):
            dk, dv = carry
            qi, q_blk, do_blk, qid, lse_i, delta_i = ys
            q_pos = qi * block + jnp.arange(block)
            s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            mask = _mask(q_pos, kv_pos, qid, kid, kv_len, causal)
            p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do_blk.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq_i = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k_blk.dtype), k_blk,
                              preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q_blk.dtype), q_blk,
                                 preferred_element_type=jnp.float32)
            return (dk, dv), dq_i

        zeros = jnp.zeros((b, block, hkv, d), jnp.float32)
        (dk, dv), dq_parts = jax.lax.scan(q_step, (zeros, zeros), per_q)
        return dq + _unblocks(dq_parts), (dk, dv)

    kv = (jnp.arange(n), _blocks(k, n), _blocks(v, n), _blocks(kv_ids, n))
    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32), kv)
    return dq.astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype), None, None


@functools.lru_cache(maxsize=None)
def _flash():
    """The custom_vjp (built on first use, so importing this module does not import jax)."""
    import jax

    fn = jax.custom_vjp(lambda *args: _flash_fwd(*args)[0], nondiff_argnums=(5, 6, 7, 8))
    fn.defvjp(_flash_fwd, _flash_bwd)
    return fn


def flash_attention_standin(
    q, k, v, *, causal: bool = False, segment_ids=None, kv_segment_ids=None, sm_scale=None, block: int = 128
):
    """Attention with a flash kernel's memory profile on any backend; the contract of
    vlm_jax.kernels.attention (q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]).

    Blockwise over query and key blocks with an online softmax; a custom_vjp keeps only q, k, v,
    the output and the row logsumexp for the backward pass, which recomputes the scores block by
    block (FlashAttention-2's algorithm, as the cuDNN and Pallas kernels do). Sequences up to
    4 * block are one block; longer ones are padded to whole blocks (padded keys masked, padded
    queries dropped). Calls with fewer queries than keys (decode) go to the XLA reference. The
    values and gradients are exact; `plan` compiles this where the target runs a flash kernel.
    """
    import jax.numpy as jnp

    from vlm_jax.kernels.attention import reference

    bsz, t, h, d = q.shape
    hkv = k.shape[2]
    if k.shape[1] != t:
        return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                   kv_segment_ids=kv_segment_ids, sm_scale=sm_scale)
    if h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of kv heads {hkv}")
    scale = float(d**-0.5 if sm_scale is None else sm_scale)
    if segment_ids is None:
        q_ids = kv_ids = jnp.zeros((bsz, t), jnp.int32)
    else:
        q_ids = segment_ids.astype(jnp.int32)
        kv_ids = (segment_ids if kv_segment_ids is None else kv_segment_ids).astype(jnp.int32)
    size = t if t <= 4 * block else block
    pad = -t % size
    qg = q.reshape(bsz, t, hkv, h // hkv, d)
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        q_ids, kv_ids = (jnp.pad(x, ((0, 0), (0, pad))) for x in (q_ids, kv_ids))
    out = _flash()(qg, k, v, q_ids, kv_ids, bool(causal), scale, size, t)
    return out[:, :t].reshape(bsz, t, h, d)


@contextlib.contextmanager
def target_attention(backend: str, mode: str = "target"):
    """Inside: vlm_jax.kernels.attention does what `backend`'s dispatcher would, compilable here.

    Calls the target would send to a flash kernel (cudnn, pallas_gpu, pallas_tpu, by
    kernels.attention.choose_impl for `backend`) run the stand-in; the others the XLA reference.
    mode "xla": every call runs the reference. Yields a list collecting (impl, q shape) per call.
    """
    import importlib

    from vlm_jax import kernels

    dispatcher = importlib.import_module("vlm_jax.kernels.attention")
    original = kernels.attention
    seen: list[tuple[str, tuple]] = []

    def attention(q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, sm_scale=None,
                  impl="auto", interpret=False):
        del interpret
        kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
        chosen = impl
        if mode == "xla":
            chosen = "xla"
        elif impl == "auto":
            chosen = dispatcher.choose_impl(q, k, v, backend=backend, **kw)
        seen.append((chosen, tuple(q.shape)))
        if chosen == "xla":
            return dispatcher.reference.attention(q, k, v, sm_scale=sm_scale, **kw)
        return flash_attention_standin(q, k, v, sm_scale=sm_scale, **kw)

    kernels.attention = attention
    try:
        yield seen
    finally:
        kernels.attention = original


# --------------------------------------------------------------------------------------------
# Byte and FLOP accounting.


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays / ShapeDtypeStructs with shardings (the largest
    shard where shards differ: NamedShardings of equal-size shards on every device)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def total_bytes(tree: Any) -> int:
    """Bytes of a tree of arrays / ShapeDtypeStructs, unsharded."""
    import jax

    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def count_params(tree: Any) -> int:
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _sub_jaxprs(value):
    from jax.extend import core as jex_core

    jaxpr_types = (jex_core.Jaxpr, jex_core.ClosedJaxpr)
    if isinstance(value, jaxpr_types):
        yield value.jaxpr if isinstance(value, jex_core.ClosedJaxpr) else value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr: Any) -> tuple[float, bool]:
    """(matmul + convolution FLOPs the jaxpr executes, whether a while loop of unknown trip count
    was counted once). Global (unsharded) shapes; scan bodies count `length` times, cond the
    costliest branch, remat and custom_vjp bodies as they appear (the recomputation is explicit)."""
    from jax.extend import core as jex_core

    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total, unknown_loops = 0.0, False
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
            continue
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            per_output = math.prod(rhs[i] for i in rhs_spec[1:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
            continue
        subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
        if not subs:
            continue
        counted = [jaxpr_flops(s) for s in subs]
        unknown_loops |= any(u for _, u in counted)
        if name == "cond":
            total += max(f for f, _ in counted)
        elif name == "scan":
            total += eqn.params["length"] * sum(f for f, _ in counted)
        elif name == "while":
            unknown_loops = True
            total += sum(f for f, _ in counted)
        else:
            total += sum(f for f, _ in counted)
    return total, unknown_loops


def _compiler_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


# --------------------------------------------------------------------------------------------
# The step, abstractly.


# Tasks whose batches are images and their tokenized captions (vlm_jax.data.pipeline).
IMAGE_TEXT_TASKS = ("contrastive", "coca", "caption")


def example_batch(config, rows: int, length: int | None = None) -> dict[str, tuple[tuple, Any]]:
    """{name: (shape, dtype)} of a training batch of `rows` for config.task.name, as the input
    pipelines make it (vlm_jax.data.pipeline / vlm_jax.data.text)."""
    import numpy as np

    task = config.task.name
    if task == "lm":
        length = int(length or config.data.text_length)
        shape = (rows, length)
        batch = {k: (shape, np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        batch["loss_mask"] = (shape, np.float32)
        return batch
    size = int(config.data.image_size)
    batch = {"image": ((rows, size, size, 3), np.float32)}
    if task in IMAGE_TEXT_TASKS:
        text = int(length or config.data.text_length)
        batch["tokens"] = ((rows, text), np.int32)
        if config.data.get("hard_negatives", False):
            batch["negative_tokens"] = ((rows, text), np.int32)
    elif task == "classification":
        batch["label"] = ((rows,), np.int32)
    else:
        known = ", ".join(("lm", *IMAGE_TEXT_TASKS, "classification"))
        raise ValueError(f"plan knows no batch for task {task!r} ({known})")
    return batch


@dataclasses.dataclass
class Setup:
    """The pieces of the train step for one config and mesh (all abstract)."""

    config: Any
    mesh: Any
    model: Any
    task: Any
    tx: Any
    state_shardings: Any
    abstract_state: Any
    batch_shards: int


def setup(config, mesh_cfg: dict[str, int], devices: Sequence[Any] | None = None) -> Setup:
    """Model, task, optimiser and the abstract sharded state on a mesh, as the trainer builds them.

    Nothing large is allocated: the state comes from jax.eval_shape (state_initializer gets a
    one-row example batch, which fixes no state shape)."""
    import jax
    import numpy as np

    from vlm_jax import models, tasks
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.parallel.rules import batch_sharding, spec_axes
    from vlm_jax.train import optim
    from vlm_jax.train.trainer import state_initializer

    n = math.prod(mesh_cfg.values())
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise RuntimeError(f"the mesh {mesh_cfg} needs {n} devices; this process has {len(devices)}")
    mesh = make_mesh(mesh_cfg, devices[:n])
    model = models.build(config)
    task = tasks.get(config.task.name)
    tx = optim.make_optimizer(config.optim, int(config.train.steps), optim.trainable_fn(config))
    one_row = {k: np.zeros(shape, dtype) for k, (shape, dtype) in example_batch(config, 1).items()}
    _, shardings, abstract = state_initializer(model, task, tx, one_row, mesh, config.sharding_rules)
    spec = batch_sharding(mesh, config.sharding_rules, 1).spec
    axes = spec_axes(spec[0] if len(spec) else None)
    batch_shards = math.prod(mesh.shape[a] for a in axes)
    return Setup(config, mesh, model, task, tx, shardings, abstract, batch_shards)


def state_summary(s: Setup) -> dict[str, Any]:
    """Exact counts and per-device bytes of params, optimiser state and gradients."""
    import jax

    from vlm_jax.layers import lora
    from vlm_jax.train import optim

    params = s.abstract_state["params"]
    trainable = optim.trainable_fn(s.config)
    if trainable is None:
        trained = params
    else:
        trained = lora.subset(params, trainable(params))
    grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), trained)
    rest = {k: v for k, v in s.abstract_state.items() if k not in ("params", "opt_state")}
    return {
        "parameters": count_params(params),
        "trainable_parameters": count_params(trained),
        "param_dtypes": sorted({str(leaf.dtype) for leaf in jax.tree.leaves(params)}),
        "params_bytes": total_bytes(params),
        "params_bytes_per_device": per_device_bytes(params),
        "opt_state_bytes": total_bytes(s.abstract_state["opt_state"]),
        "opt_state_bytes_per_device": per_device_bytes(s.abstract_state["opt_state"]),
        "grads_bytes_per_device": per_device_bytes(grads),
        "other_state_bytes_per_device": per_device_bytes(rest),
    }


# XLA's CPU compiler computes bf16 matmuls in f32; its loop-invariant code motion then hoists the
# bf16 -> f32 converts of the layer loop's stacked activations out of the backward loop, keeping an
# f32 copy of every saved activation that no GPU or TPU compile has (2-3x the activation memory).
# The plan's CPU compiles turn that one pass off (see the README's plan section for the check).
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compile_step(s: Setup, rows: int, length: int | None, attention: tuple[str, str] | None = None,
                 compiler_options: dict | None = None) -> dict:
    """Traces and compiles the train step for a global batch of `rows`; its memory and FLOPs.

    attention: (target backend, "target" | "xla") for `target_attention`, or None (as is).
    compiler_options: XLA options for this compile (e.g. CPU_COMPILER_OPTIONS)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from vlm_jax.parallel import compiled as compiled_lib
    from vlm_jax.parallel import hosts
    from vlm_jax.train.trainer import jit_train_step, sharding_context

    rules = s.config.sharding_rules
    shapes = example_batch(s.config, rows, length)
    one_row = {k: np.zeros((1,) + shape[1:], dtype) for k, (shape, dtype) in shapes.items()}
    batch_shardings = hosts.batch_shardings(one_row, s.mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shardings[k]) for k, (shape, dtype) in shapes.items()}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=NamedSharding(s.mesh, PartitionSpec()))
    step = jit_train_step(s.model, s.task, s.tx, s.config, s.mesh, s.state_shardings, batch_shardings)
    start = time.perf_counter()
    patch = target_attention(*attention) if attention else contextlib.nullcontext([])
    with sharding_context(s.mesh, rules):
        with patch as calls:
            traced = step.trace(s.abstract_state, batch, rng)
            lowered = traced.lower()
        traced_s = time.perf_counter() - start
        # XLA's partitioner warnings go to the native stderr: read them (and pass them on only
        # with VLM_JAX_PLAN_XLA_LOGS=1, as the child process's are).
        with compiled_lib.capture_native_stderr(passthrough=_show_xla_logs()) as xla_log:
            compiled = lowered.compile(compiler_options=compiler_options or None)
        compile_s = time.perf_counter() - start - traced_s
    flops, unknown_loops = jaxpr_flops(traced.jaxpr)
    mem = compiled.memory_analysis()
    out = {
        "rows": rows,
        "batch_bytes_per_device": per_device_bytes(batch),
        "trace_s": round(traced_s, 2),
        "compile_s": round(compile_s, 2),
        "jaxpr_flops": flops,
        "jaxpr_flops_has_while_loops": unknown_loops,
        "compiler_flops_per_device": _compiler_flops(compiled),
        "attention": sorted({impl for impl, _ in calls}),
        "collectives": compiled_lib.collective_stats(compiled.as_text()),
        "spmd_full_rematerializations": compiled_lib.spmd_full_rematerializations(xla_log.text),
        "xla_log_lines": len(xla_log.text.splitlines()),
    }
    if mem is not None:
        out.update(
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
        )
        out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _analytic_lm_flops(config, params: int, rows: int, length: int) -> dict[str, float] | None:
    """6 * N * tokens (+ the attention term 12 * layers * T * width per token, PaLM's appendix B)."""
    if config.task.name != "lm":
        return None
    model = config.model
    tokens = rows * length
    dense = 6.0 * params * tokens
    heads = int(model.heads)
    head_dim = int(model.get("head_dim", 0) or int(model.width) // heads)
    attn = 12.0 * int(model.depth) * length * heads * head_dim * tokens
    return {"six_n_tokens": dense, "attention": attn, "total": dense + attn, "tokens": tokens}


# --------------------------------------------------------------------------------------------
# plan()


def _in_process(config, mesh_cfg, device: Device, *, batch, length, headroom, attention,
                max_batch, max_compiles, verbose) -> dict[str, Any]:
    import jax

    def say(msg):
        if verbose:
            print(f"[plan] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    config = copy.deepcopy(config)
    with config.unlocked():
        config.mesh.update(mesh_cfg)
        if batch is not None:
            config.data.batch_size = int(batch)
        if length is not None:
            config.data.text_length = int(length)
    rows = int(config.data.batch_size)
    length = int(config.data.text_length) if config.task.name in ("lm", *IMAGE_TEXT_TASKS) else None
    s = setup(config, mesh_cfg)
    accum = int(config.optim.get("accum_steps", 1))
    step_rows = s.batch_shards * accum  # the global batch moves in these steps
    if rows % step_rows:
        raise ValueError(
            f"global batch {rows} is not divisible by the {s.batch_shards} batch shards (data*fsdp)"
            + (f" times accum_steps {accum}" if accum > 1 else "")
        )
    summary = state_summary(s)
    state_bytes = summary["params_bytes_per_device"] + summary["opt_state_bytes_per_device"]
    state_bytes += summary["other_state_bytes_per_device"]
    usable = int(device.hbm_bytes * (1.0 - headroom))
    compile_backend = jax.default_backend()
    target_backend = device.backend if device.backend != "cpu" else compile_backend
    if attention == "target" and target_backend == compile_backend:
        attention_mode, patch = "as_is", None  # the target's own compiler: its kernels compile
    else:
        attention_mode, patch = attention, (target_backend, attention)
    options = CPU_COMPILER_OPTIONS if compile_backend == "cpu" and target_backend != "cpu" else None

    compiles: dict[int, dict] = {}

    def at(per_device: int) -> dict:
        if per_device not in compiles:
            say(f"compiling at {per_device} rows per device (global {per_device * s.batch_shards})")
            r = compile_step(s, per_device * s.batch_shards, length, patch, options)
            compiles[per_device] = r
            say(f"  compiled in {r['compile_s']:.1f} s (traced in {r['trace_s']:.1f} s); "
                f"peak {r.get('peak_bytes', 0) / GiB:.2f} GiB per device")
            if r["xla_log_lines"] and not _show_xla_logs():
                say(f"  {r['xla_log_lines']} lines of XLA's log hidden (VLM_JAX_PLAN_XLA_LOGS=1 shows them)")
        return compiles[per_device]

    per_device = rows // s.batch_shards
    main = at(per_device)
    fits = main.get("peak_bytes", 0) <= usable
    result: dict[str, Any] = {
        "config": config.get("config_spec", ""),
        "model": config.model.get("name", ""),
        "task": config.task.name,
        "mesh": dict(mesh_cfg),
        "num_devices": math.prod(mesh_cfg.values()),
        "device": dataclasses.asdict(device),
        "headroom": headroom,
        "usable_bytes": usable,
        "compiled_on": f"{compile_backend} ({len(jax.devices())} devices in the process)",
        "attention_mode": attention_mode,
        "compiler_options": options or {},
        "global_batch": rows,
        "batch_shards": s.batch_shards,
        "per_device_batch": per_device,
        "accum_steps": accum,
        "length": length,
        "compute_dtype": str(config.model.get("dtype", "")),
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "remat": str(config.model.get("remat", "")),
        **summary,
        "state_bytes_per_device": state_bytes,
        "step": main,
        "temp_bytes": main.get("temp_bytes"),
        "activation_bytes_estimate": (
            max(main["temp_bytes"] - summary["grads_bytes_per_device"], 0) if "temp_bytes" in main else None
        ),
        "peak_bytes": main.get("peak_bytes"),
        "fits": fits,
        "flops_per_step": main["jaxpr_flops"],
        "flops_per_step_per_device": main["jaxpr_flops"] / math.prod(mesh_cfg.values()),
        "compiler_flops_per_device": main["compiler_flops_per_device"],
        "analytic_flops": _analytic_lm_flops(config, summary["parameters"], rows, length or 0),
    }
    if max_batch and "peak_bytes" in main:
        result["max_batch"] = _search_max_batch(at, per_device, accum, usable, max_compiles)
    result["compiles"] = [dict(rows_per_shard=k, **{f: v[f] for f in ("compile_s", "trace_s", "peak_bytes")
                                                     if f in v}) for k, v in sorted(compiles.items())]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _search_max_batch(at, start: int, step: int, usable: int, max_compiles: int) -> dict:
    """Largest rows per device (a multiple of `step`) whose compiled peak fits `usable`.

    The peak is taken as linear in the rows through two compiled points (those bracketing the
    budget, else the two nearest it); the predicted largest batch is compiled, and so on, until a
    batch that fits and the next one that does not have both been compiled (verified) or
    max_compiles more compiles are spent (unverified: the bracket says how far it got)."""
    method = "peak linear in rows between two compiles, prediction checked by compiling"
    points = {start: at(start)["peak_bytes"]}
    budget = max_compiles
    second = start // 2 if start >= 2 * step else start * 2
    second -= second % step
    if second >= step and second != start and budget > 0:
        points[second] = at(second)["peak_bytes"]
        budget -= 1
    while True:
        fit = sorted(b for b, p in points.items() if p <= usable)
        over = sorted(b for b, p in points.items() if p > usable)
        lo, hi = (fit[-1] if fit else 0), (over[0] if over else None)
        result = dict(rows_per_shard=lo, verified=False, bracket=[lo, hi], method=method,
                      points={int(b): int(p) for b, p in sorted(points.items())})
        if hi is not None and hi - lo <= step:
            return dict(result, verified=True)
        if budget <= 0 or len(points) < 2:
            return result
        if lo and hi is not None:
            b1, b2 = lo, hi
        elif hi is None:
            b1, b2 = fit[-2], fit[-1]
        else:
            b1, b2 = over[0], over[1]
        p1, p2 = points[b1], points[b2]
        slope = (p2 - p1) / (b2 - b1)
        guess = int(b1 + (usable - p1) // slope) if slope > 0 else 2 * max(points)
        guess -= guess % step
        guess = max(guess, lo + step)
        if hi is not None:
            guess = min(guess, hi - step)
        points[guess] = at(guess)["peak_bytes"]
        budget -= 1


def _check_batch(config, mesh_cfg: dict[str, int], batch: int | None) -> None:
    """The global batch splits over the mesh axes of logical 'batch' (and accum_steps): checked
    before any compile or child process."""
    from vlm_jax.parallel.rules import spec_axes

    rows = int(batch if batch is not None else config.data.batch_size)
    axes = spec_axes(next((a for name, a in config.sharding_rules if name == "batch"), None))
    shards = math.prod(mesh_cfg.get(a, 1) for a in axes)
    accum = int(config.optim.get("accum_steps", 1))
    if rows % (shards * accum):
        raise ValueError(
            f"global batch {rows} is not divisible by the {shards} batch shards ({'*'.join(axes)})"
            + (f" times accum_steps {accum}" if accum > 1 else "")
        )


def plan(
    config,
    mesh: dict | str,
    device: str | Device,
    *,
    batch: int | None = None,
    length: int | None = None,
    hbm_bytes: int | None = None,
    headroom: float = 0.1,
    attention: str = "target",
    max_batch: bool = True,
    max_compiles: int = 4,
    subprocess_ok: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """The plan's numbers for training `config` on `mesh` of `device` (see the module docstring).

    batch: global batch (default config.data.batch_size); length: sequence length (language and
    contrastive models; default config.data.text_length); hbm_bytes: overrides the device's HBM;
    headroom: fraction of HBM kept free; attention: "target" (flash stand-in where the target's
    dispatcher would run a flash kernel) or "xla" (compile as is); max_batch: search the largest
    per-device batch (up to max_compiles more compiles). Runs in a child process with fake CPU
    devices when this process has fewer devices than the mesh (subprocess_ok=False: raise).
    """
    mesh_cfg = parse_mesh(mesh)
    device = get_device(device, hbm_bytes)
    if attention not in ("target", "xla"):
        raise ValueError(f"attention {attention!r}: use target or xla")
    _check_batch(config, mesh_cfg, batch)
    kwargs = dict(batch=batch, length=length, headroom=headroom, attention=attention,
                  max_batch=max_batch, max_compiles=max_compiles, verbose=verbose)
    import jax

    if len(jax.devices()) >= math.prod(mesh_cfg.values()):
        return _in_process(config, mesh_cfg, device, **kwargs)
    if not subprocess_ok:
        raise RuntimeError(f"the mesh needs {math.prod(mesh_cfg.values())} devices; this process has "
                           f"{len(jax.devices())}")
    return plan_in_subprocess(config, mesh_cfg, device, **kwargs)


def _child_env(num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    return env


def _show_xla_logs() -> bool:
    return bool(os.environ.get("VLM_JAX_PLAN_XLA_LOGS"))


def plan_in_subprocess(config, mesh_cfg: dict[str, int], device: Device, **kwargs) -> dict[str, Any]:
    """plan() in a fresh `python -m vlm_jax.plan` with as many fake CPU devices as the mesh has."""
    with tempfile.TemporaryDirectory(prefix="vlm_jax_plan_") as tmp:
        job = os.path.join(tmp, "job.pkl")
        out = os.path.join(tmp, "plan.json")
        with open(job, "wb") as f:
            pickle.dump(dict(config=config, mesh=mesh_cfg, device=device, kwargs=kwargs), f)
        cmd = [sys.executable, "-m", "vlm_jax.plan", "--job", job, "--json", out]
        proc = subprocess.Popen(cmd, env=_child_env(math.prod(mesh_cfg.values())), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        # The child's progress lines pass through; XLA's own log lines (the SPMD partitioner's
        # warnings, say) only with VLM_JAX_PLAN_XLA_LOGS=1, else they are counted.
        show_all = _show_xla_logs()
        tail: collections.deque[str] = collections.deque(maxlen=200)
        hidden = 0
        for line in proc.stderr:
            tail.append(line)
            if kwargs.get("verbose") and (show_all or line.startswith("[plan]")):
                sys.stderr.write(line)
                sys.stderr.flush()
            elif not line.startswith("[plan]"):
                hidden += 1
        code = proc.wait()
        if code != 0 or not os.path.exists(out):
            raise RuntimeError(f"plan child failed (exit {code}):\n{''.join(tail)[-6000:]}")
        if hidden and kwargs.get("verbose"):
            print(f"[plan] {hidden} lines of XLA's log hidden (VLM_JAX_PLAN_XLA_LOGS=1 shows them)",
                  file=sys.stderr, flush=True)
        with open(out) as f:
            return json.load(f)


# --------------------------------------------------------------------------------------------
# Output.


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:,.2f} GiB"


def _flops(x: float | None) -> str:
    if x is None:
        return "?"
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def format_plan(r: dict[str, Any]) -> str:
    """The plan as the text `vlm-jax plan` prints."""
    dev = r["device"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    hbm = dev["hbm_bytes"]
    hbm_text = f"{hbm / GiB:.0f} GiB" if hbm % GiB == 0 else f"{hbm / GB:.0f} GB"
    lines = [
        f"plan: {r['config'] or r['model']} on {r['num_devices']} x {dev['name']} ({hbm_text} HBM each), "
        f"mesh {mesh}",
        f"  parameters        {r['parameters']:,} ({r['parameters'] / 1e9:.2f} B)"
        + (f", {r['trainable_parameters']:,} trained" if r["trainable_parameters"] != r["parameters"] else "")
        + f"; params {'/'.join(r['param_dtypes'])}, compute {r['compute_dtype']}, "
        f"remat {r['remat'] or 'none'}, scan_layers {r['scan_layers']}",
    ]
    batch = f"  batch             {r['global_batch']:,} global = {r['per_device_batch']} per device x " \
            f"{r['batch_shards']} batch shards (data*fsdp)"
    if r.get("length"):
        batch += f", length {r['length']}"
    if r.get("accum_steps", 1) > 1:
        batch += f", {r['accum_steps']} accumulation steps"
    lines.append(batch)
    step = r["step"]
    lines += [
        "  per device, exact (shapes x shardings):",
        f"    params          {_gib(r['params_bytes_per_device'])}   (all devices: {_gib(r['params_bytes'])})",
        f"    optimizer state {_gib(r['opt_state_bytes_per_device'])}   (all devices: {_gib(r['opt_state_bytes'])})",
        f"    gradients       {_gib(r['grads_bytes_per_device'])}   (live during the step: part of temp below)",
        f"    batch           {_gib(step['batch_bytes_per_device'])}",
        f"  per device, compiler estimate ({r['compiled_on']} compiler; an estimate for the target):",
        f"    temp            {_gib(r['temp_bytes'])}   (gradients + activations + workspace)",
        f"    activations ~   {_gib(r['activation_bytes_estimate'])}   (temp less gradients)",
        f"    peak            {_gib(r['peak_bytes'])}   (arguments + outputs - donated + temp)",
    ]
    usable = r["usable_bytes"]
    verdict = "YES" if r["fits"] else "NO"
    lines.append(
        f"  fits {dev['name']}?  {verdict}: peak {_gib(r['peak_bytes'])} vs {_gib(usable)} usable "
        f"({hbm_text} less {r['headroom']:.0%} headroom)"
    )
    mb = r.get("max_batch")
    if mb:
        n = mb["rows_per_shard"]
        glob = n * r["batch_shards"]
        if n == 0:
            text = "none: even the smallest batch does not fit"
            if r["state_bytes_per_device"] > usable:
                text += f" (the state alone is {_gib(r['state_bytes_per_device'])})"
        else:
            text = f"{n} per device = {glob:,} global"
            if r.get("length"):
                text += f" ({glob * r['length']:,} tokens)"
            text += (f"; verified: {mb['bracket'][0]} fits, {mb['bracket'][1]} does not" if mb["verified"]
                     else f"; unverified bracket {mb['bracket']}")
        lines.append(f"  largest batch     {text}")
        lines.append(f"                    ({mb['method']}; compiled at {sorted(int(b) for b in mb['points'])})")
    flops_line = (f"  FLOPs per step    {_flops(r['flops_per_step'])} "
                  f"({_flops(r['flops_per_step_per_device'])} per device): matmuls and convolutions of the "
                  "step's jaxpr, backward and remat recomputation included")
    lines.append(flops_line)
    if r.get("analytic_flops"):
        a = r["analytic_flops"]
        lines.append(f"                    analytic 6*N*tokens {_flops(a['six_n_tokens'])} + attention "
                     f"{_flops(a['attention'])} = {_flops(a['total'])} ({a['tokens']:,} tokens)")
    if r.get("compiler_flops_per_device") is not None:
        lines.append(f"                    XLA cost_analysis {_flops(r['compiler_flops_per_device'])} per device "
                     "(counts each loop body once: low for scanned layers)")
    lines += _communication_lines(step)
    impls = ", ".join(step.get("attention") or []) or "none"
    mode = r["attention_mode"]
    if mode == "target":
        att = (f"  attention         target kernels: {impls}; flash kernels compiled as a stand-in with their "
               "memory profile (blockwise, residuals q/k/v/out/logsumexp)")
    elif mode == "xla":
        att = "  attention         XLA reference everywhere (--attention xla): [B, H, T, T] scores materialised"
    else:
        att = f"  attention         {impls} (compiled by the target's own backend)"
    lines.append(att)
    times = ", ".join(f"{c['rows_per_shard']}: {c['compile_s']:.0f} s" for c in r["compiles"])
    lines.append(f"  compiles          {len(r['compiles'])} (rows per device: seconds) {times}; "
                 f"total {r['wall_s']:.0f} s")
    if dev["backend"] == "gpu":
        lines.append("  note              JAX on GPU preallocates 75% of memory by default; "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 lets a run use the rest")
    return "\n".join(lines)


def _communication_lines(step: dict[str, Any]) -> list[str]:
    """The collectives of the compiled step and the partitioner's full rematerializations."""
    stats = step.get("collectives")
    if stats is None:
        return []
    parts = [f"{op} {v['bytes'] / MiB:,.2f} MiB ({v['count']})" for op, v in sorted(stats.items())]
    lines = [f"  collectives       {', '.join(parts) or 'none'}",
             "                    (per device, from the compiled step: op result bytes (ops); loop bodies once)"]
    n = step.get("spmd_full_rematerializations", 0)
    if n:
        lines.append(f"  SPMD warnings     {n} involuntary full rematerialization(s): XLA replicates an array to "
                     "reshard it; check the sharding rules (VLM_JAX_PLAN_XLA_LOGS=1 shows them)")
    return lines


# --------------------------------------------------------------------------------------------
# Command line.


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="path.py[:variant]; --config.x=y overrides as for train")
    p.add_argument("--mesh", help="data=D,fsdp=F,tensor=T (missing axes are 1)")
    p.add_argument("--device", help=f"one of {', '.join(DEVICES)}, or a size such as 24GiB")
    p.add_argument("--batch", type=int, default=None, help="global batch (default config.data.batch_size)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default config.data.text_length)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of HBM kept free (default 0.1)")
    p.add_argument("--attention", choices=["target", "xla"], default="target",
                   help="target: flash stand-in where the target runs a flash kernel; xla: as compiled on CPU")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                   help="skip the search for the largest batch (one compile only)")
    p.add_argument("--max-compiles", type=int, default=4, help="extra compiles for the batch search")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # the child's pickled job


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Registers `plan` on vlm_jax.cli's subparsers (handler: cmd_plan)."""
    p = subparsers.add_parser("plan", help="memory and FLOPs of a config's train step on a device mesh, "
                                           "compiled ahead of time without the hardware")
    _add_arguments(p)
    p.set_defaults(fn=cmd_plan)
    return p


def _write_json(path: str, result: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def cmd_plan(args, overrides) -> int:
    """`vlm-jax plan ...`: prints the plan (and writes --json). Compiles in a child process with
    fake CPU devices unless this already is that child."""
    from vlm_jax import config as config_lib

    if args.job:
        with open(args.job, "rb") as f:
            job = pickle.load(f)
        result = _in_process(job["config"], job["mesh"], job["device"], **job["kwargs"])
        _write_json(args.json, result)
        return 0
    if not (args.config and args.mesh and args.device):
        raise config_lib.ConfigError("plan needs --config, --mesh and --device")
    config = config_lib.load(args.config, overrides)
    try:
        mesh_cfg = parse_mesh(args.mesh)
        device = get_device(args.device)
        _check_batch(config, mesh_cfg, args.batch)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    kwargs = dict(batch=args.batch, length=args.length, headroom=args.headroom, attention=args.attention,
                  max_batch=args.max_batch, max_compiles=args.max_compiles, verbose=not args.quiet)
    try:
        if os.environ.get(_CHILD_ENV):
            result = _in_process(config, mesh_cfg, device, **kwargs)
        else:
            result = plan_in_subprocess(config, mesh_cfg, device, **kwargs)
    except RuntimeError as e:
        print(f"vlm-jax plan: {e}", file=sys.stderr)
        return 1
    print(format_plan(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlm_jax.plan --config ... --mesh ... --device ...`."""
    from vlm_jax import config as config_lib

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.plan", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    try:
        rest, overrides = config_lib.split_overrides(argv)
        return cmd_plan(parser.parse_args(rest), overrides)
    except config_lib.ConfigError as e:
        print(f"vlm-jax plan: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
