"""plan(): the plan's numbers in this process, the fit verdict and the search for the largest batch.

* the fit: the compiled peak against the device's HBM less a headroom (default 10%: runtime,
  fragmentation, compiler differences);
* the largest per-device batch that fits: the step is compiled at the requested batch and at half
  (or twice) of it, the peak is taken as linear in the rows per device (a + b * rows) through two
  compiled points (those bracketing the budget, else the two nearest it), and the predicted largest
  batch is compiled to check it; this repeats until a batch that fits and the next one that does
  not have both been compiled ("verified"), or `max_compiles` is spent (the result says which).
  A compile at a large batch costs no more than at a small one: nothing is allocated.

`plan()` runs in-process when the process already has enough devices (the tests set 8), else in a
child process (vlm_jax.plan.child).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Any

from vlm_jax.plan.accounting import analytic_lm_flops
from vlm_jax.plan.child import plan_in_subprocess
from vlm_jax.plan.collectives import show_xla_logs
from vlm_jax.plan.devices import Device, GiB, get_device, parse_mesh
from vlm_jax.plan.step import CPU_COMPILER_OPTIONS, IMAGE_TEXT_TASKS, compile_step, setup, state_summary


def in_process(config, mesh_cfg, device: Device, *, batch, length, headroom, attention,
               max_batch, max_compiles, verbose) -> dict[str, Any]:
    """plan() here: this process has the mesh's devices (or is the child process)."""
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
            if r["xla_log_lines"] and not show_xla_logs():
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
        "analytic_flops": analytic_lm_flops(config, summary["parameters"], rows, length or 0),
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


def check_batch(config, mesh_cfg: dict[str, int], batch: int | None) -> None:
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
    """The plan's numbers for training `config` on `mesh` of `device` (see vlm_jax.plan's docstring).

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
    check_batch(config, mesh_cfg, batch)
    kwargs = dict(batch=batch, length=length, headroom=headroom, attention=attention,
                  max_batch=max_batch, max_compiles=max_compiles, verbose=verbose)
    import jax

    if len(jax.devices()) >= math.prod(mesh_cfg.values()):
        return in_process(config, mesh_cfg, device, **kwargs)
    if not subprocess_ok:
        raise RuntimeError(f"the mesh needs {math.prod(mesh_cfg.values())} devices; this process has "
                           f"{len(jax.devices())}")
    return plan_in_subprocess(config, mesh_cfg, device, **kwargs)
