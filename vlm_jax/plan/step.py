"""The train step, abstractly: the example batch, the abstract sharded state, and the step traced
and compiled ahead of time with its memory and FLOPs.

The real train step (vlm_jax.train.trainer's state_initializer + jit_train_step, the task's loss and
the optimiser of config.optim) is traced with abstract inputs (jax.ShapeDtypeStruct with the run's
shardings); no parameter, optimiser or batch array is ever allocated. The compiler's temp bytes
(gradients, activations, workspace) come from `compiled.memory_analysis()`, and the peak estimate
= arguments + outputs - donated aliases + temp. The compiler is XLA's CPU compiler (unless the
process already runs on enough devices of the target's kind), so this is an estimate for the
target: fusion, layouts and scheduling differ between backends. One CPU-only artefact is removed:
CPU computes bf16 matmuls in f32, and its loop-invariant code motion would hoist f32 copies of every
stacked bf16 activation out of the layer loop, so the CPU compiles run without that pass
(CPU_COMPILER_OPTIONS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from vlm_jax.plan.accounting import compiler_flops, count_params, jaxpr_flops, per_device_bytes, total_bytes
from vlm_jax.plan.collectives import (
    capture_native_stderr,
    collective_stats,
    show_xla_logs,
    spmd_full_rematerializations,
)
from vlm_jax.plan.standin import target_attention

# Tasks whose batches are images and their tokenized captions (vlm_jax.data.pipeline).
IMAGE_TEXT_TASKS = ("contrastive", "coca", "caption", "gan_int_cls", "dalle", "diffusion", "diffusion_prior",
                    "unclip_decoder", "diffusion_upsample")
# Tasks whose batches are images alone.
IMAGE_TASKS = ("image_tokenizer", "autoencoder_kl")


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
    elif task not in IMAGE_TASKS:
        known = ", ".join(("lm", *IMAGE_TEXT_TASKS, *IMAGE_TASKS, "classification"))
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
        with capture_native_stderr(passthrough=show_xla_logs()) as xla_log:
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
        "compiler_flops_per_device": compiler_flops(compiled),
        "attention": sorted({impl for impl, _ in calls}),
        "collectives": collective_stats(compiled.as_text()),
        "spmd_full_rematerializations": spmd_full_rematerializations(xla_log.text),
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
