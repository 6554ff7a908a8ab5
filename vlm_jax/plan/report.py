"""The plan as the text `vlm-jax plan` prints (format_plan)."""

from __future__ import annotations

from typing import Any

from vlm_jax.plan.devices import GB, GiB, MiB


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
