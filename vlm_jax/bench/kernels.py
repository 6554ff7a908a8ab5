"""Kernel benchmark: our Pallas attention and VQ lookup beside XLA, cuDNN and JAX's Pallas `mha`.

    python -m vlm_jax.bench.kernels [--small] [--interpret] [--only attention|vq] [--repeats N]
        [--warmup N] [--ours auto|pallas_gpu|pallas_tpu] [--vq-dtype float32|bfloat16|both]
        [--json PATH]

Attention (bf16 inputs, layout [B, S, H, D]): TFLOP/s of the forward and of forward + backward,
FLOPs counted as 4*B*S^2*H*D for the forward (halved when causal) and 3.5x that for forward +
backward (backward = 2.5x forward). Forward + backward is `jax.grad` of sum(out * cotangent) with
respect to q, k, v. Every cell also shows the max abs error against the float32 reference
(`vlm_jax.kernels.attention.reference`, full float32 matmuls) run on the same inputs cast to
float32: of the output, and for forward + backward of the output / of the worst gradient.

Columns: "xla" = `vlm_jax.kernels.attention(impl="xla")`; "cudnn" =
`jax.nn.dot_product_attention(implementation="cudnn")`; "jax mha" = JAX's own Pallas Triton kernel
`jax.experimental.pallas.ops.gpu.attention.mha`; "ours" = `vlm_jax.kernels.attention` with
impl "pallas_gpu" on a GPU, "pallas_tpu" on a TPU (and "pallas_gpu" on CPU, where only
`--interpret` can run it); "ours, 1 head/program" = the same kernel's `mha` with `block_h=1`
(and `block_hkv=1` on a TPU), for sequences of at most SHORT_SEQUENCE tokens, where "ours" runs
several heads per program: the comparison that tells whether that pays.

VQ lookup (`vlm_jax.kernels.vq_nearest`): median time, the compiled executable's temp bytes
(`memory_analysis()`, every backend), the device's peak-bytes rise over the run (GPU/TPU, where
`memory_stats()` exists; an upper bound "<=" when the run did not beat an earlier peak), and the
fraction of indices equal to a float32 (Precision.HIGHEST) matmul + argmin reference. "xla" is
`vq_nearest(impl="xla")` (this module's own matmul + argmin of the same semantics while the
dispatcher does not exist).

A cell reads "n/a (reason)" where an implementation does not exist yet, cannot run on this
backend, or refuses the shape (ValueError / NotImplementedError); "FAILED (...)" marks any other
error in our code. Neither stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The three shapes and CLIP's text tower (ViT-B/16 CLIP: width 512, 8 heads, context 77).
ATTENTION_SHAPES = ((4, 4096, 16, 128), (16, 1024, 16, 64), (256, 197, 12, 64), (256, 77, 8, 64))
SMALL_ATTENTION_SHAPES = ((1, 128, 2, 64), (2, 37, 2, 32))  # Aligned, and a length no block divides.
VQ_SHAPES = ((65536, 256, 8192), (262144, 64, 1024))
SMALL_VQ_SHAPES = ((512, 32, 128),)
ATTENTION_IMPLS = ("xla", "cudnn", "jax_mha", "ours", "ours_h1")
# Sequences up to this long get several heads per program from our kernels' defaults; the
# "ours_h1" column forces one head per program there (for the comparison), and is n/a above it.
SHORT_SEQUENCE = 256
VQ_IMPLS = ("xla", "ours")
COLUMN_TITLES = {"xla": "xla", "cudnn": "cudnn", "jax_mha": "jax pallas mha", "ours": "ours",
                 "ours_h1": "ours, 1 head/program"}
# A timed sample repeats the call until it lasts this long, so dispatch overhead does not dominate
# the sub-millisecond kernels; the median is taken over --repeats such samples.
MIN_SAMPLE_S = 0.01
MAX_INNER_CALLS = 100
REASON_WIDTH = 56


class Unavailable(Exception):
    """The implementation cannot run this call here; the message says why (shown as n/a)."""


@dataclasses.dataclass
class Measurement:
    """One timed call: median seconds per call, its outputs (from the last call), compile stats."""

    median_s: float
    samples: int
    inner_calls: int
    outputs: Any
    temp_bytes: int | None
    peak_bytes: int | None = None
    peak_is_bound: bool = False


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def compiled_temp_bytes(compiled: Any) -> int | None:
    """Temp (scratch) bytes of a compiled executable per `memory_analysis()`; None if unknown."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # Some backends do not implement it.
        return None
    value = getattr(stats, "temp_size_in_bytes", None) if stats is not None else None
    return int(value) if value is not None else None


def device_memory() -> tuple[int, int] | None:
    """(bytes_in_use, peak_bytes_in_use) of the first device, or None where the backend has none."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats.get("bytes_in_use", 0)), int(stats["peak_bytes_in_use"])


def measure(
    fn: Callable[..., Any], args: Sequence[Any], *, repeats: int, warmup: int, track_peak: bool = False
) -> Measurement:
    """Compiles `jax.jit(fn)` for `args`, warms up, times `repeats` samples; median per call.

    With `track_peak`, also reports how far the device's peak bytes rose above the bytes in use
    before the first run (exact when the peak rose; otherwise only a bound, flagged). Compilation
    (whose autotuning may allocate) happens before the "before" reading.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    temp_bytes = compiled_temp_bytes(compiled)
    before = device_memory() if track_peak else None
    out = None
    estimate = 0.0
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        estimate = time.perf_counter() - start
    inner = max(1, min(MAX_INNER_CALLS, math.ceil(MIN_SAMPLE_S / max(estimate, 1e-9))))
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    result = Measurement(statistics.median(samples), len(samples), inner, out, temp_bytes)
    after = device_memory() if track_peak else None
    if before is not None and after is not None:
        in_use_before, peak_before = before
        rose = after[1] > peak_before
        result.peak_bytes = (after[1] if rose else peak_before) - in_use_before
        result.peak_is_bound = not rose
    return result


def _classify(error: Exception, *, peer: bool) -> tuple[str, str]:
    """(status, reason) of a failed cell: "n/a" for refusals and for any peer error, else "failed"."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, Unavailable):
        return "n/a", text
    if isinstance(error, (ValueError, NotImplementedError)):  # The contract's way to refuse a call.
        return "n/a", text
    if peer or isinstance(error, ImportError):
        return "n/a", f"{type(error).__name__}: {text}"
    return "failed", f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# Implementations.


def platform() -> str:
    """'gpu', 'tpu' or 'cpu' for the default backend."""
    return jax.devices()[0].platform


def ours_impl(requested: str) -> str:
    """The impl name of our column: `requested`, or for 'auto' the Pallas kernel of this backend."""
    if requested != "auto":
        return requested
    return "pallas_tpu" if platform() == "tpu" else "pallas_gpu"


def _check_pallas_backend(impl: str, interpret: bool) -> None:
    """Raises Unavailable when a Pallas impl cannot compile for this backend (interpret runs anywhere)."""
    if interpret:
        return
    wanted = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(impl)
    if wanted is not None and platform() != wanted:
        raise Unavailable(f"{impl} needs a {wanted.upper()}, not {platform()} (try --interpret)")


def _kernels_module() -> Any:
    try:
        return importlib.import_module("vlm_jax.kernels")
    except ImportError as e:  # Other workers are writing it: report, do not crash.
        raise Unavailable(f"vlm_jax.kernels does not import: {e}")


def attention_fn(impl: str, *, causal: bool, sm_scale: float, interpret: bool, ours: str) -> Callable:
    """fn(q, k, v) -> out for one column; raises Unavailable where the column cannot run here."""
    if impl == "xla":
        kernels_attention = _kernels_module().attention
        return lambda q, k, v: kernels_attention(q, k, v, causal=causal, sm_scale=sm_scale, impl="xla")
    if impl == "cudnn":
        if platform() != "gpu":
            raise Unavailable(f"cuDNN needs an NVIDIA GPU, not {platform()}")
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn"
        )
    if impl == "jax_mha":
        if platform() != "gpu" and not interpret:
            raise Unavailable(f"Triton needs a GPU, not {platform()} (try --interpret)")
        try:
            from jax.experimental.pallas.ops.gpu import attention as jax_pallas_attention
        except ImportError as e:
            raise Unavailable(f"jax.experimental.pallas.ops.gpu.attention does not import: {e}")
        mha = jax_pallas_attention.mha
        return lambda q, k, v: mha(q, k, v, None, sm_scale=sm_scale, causal=causal, interpret=interpret)
    if impl == "ours":
        name = ours_impl(ours)
        _check_pallas_backend(name, interpret)
        kernels_attention = _kernels_module().attention
        return lambda q, k, v: kernels_attention(
            q, k, v, causal=causal, sm_scale=sm_scale, impl=name, interpret=interpret
        )
    if impl == "ours_h1":
        name = ours_impl(ours)
        _check_pallas_backend(name, interpret)
        module = importlib.import_module(f"vlm_jax.kernels.attention.{name}")
        one_head = dict(block_h=1, block_hkv=1) if name == "pallas_tpu" else dict(block_h=1)
        return lambda q, k, v: module.mha(
            q, k, v, causal=causal, sm_scale=sm_scale, interpret=interpret, **one_head
        )
    raise ValueError(f"unknown attention column {impl!r}")


def vq_matmul_argmin(x: jax.Array, codebook: jax.Array, *, highest: bool = False) -> tuple[jax.Array, jax.Array]:
    """Plain XLA nearest code: argmin_k ||c_k||^2 - 2 x.c_k (float32 accumulation) -> (idx, dist).

    `highest`: full float32 matmul precision whatever the input dtype (the reference); otherwise
    float32 inputs get Precision.HIGHEST and bf16 products are exact in float32 anyway, which is
    the semantics `vlm_jax.kernels.vq` documents for every implementation.
    """
    dtype = jnp.float32 if highest else jnp.result_type(x.dtype, codebook.dtype)
    xc, cc = x.astype(dtype), codebook.astype(dtype)
    precision = jax.lax.Precision.HIGHEST if highest or jnp.dtype(dtype).itemsize >= 4 else None
    scores = jax.lax.dot_general(
        xc, cc, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    cf = cc.astype(jnp.float32)
    partial = jnp.sum(cf * cf, axis=1)[None, :] - 2.0 * scores
    idx = jnp.argmin(partial, axis=1).astype(jnp.int32)
    best = jnp.take_along_axis(partial, idx[:, None], axis=1)[:, 0]
    xf = xc.astype(jnp.float32)
    return idx, jnp.maximum(jnp.sum(xf * xf, axis=1) + best, 0.0)


def vq_fn(impl: str, *, interpret: bool, ours: str) -> tuple[Callable, str]:
    """(fn(x, codebook) -> (idx, dist), description) of one VQ column."""
    if impl == "xla":
        try:
            vq_nearest = _kernels_module().vq_nearest
        except (Unavailable, AttributeError):
            return vq_matmul_argmin, "vlm_jax.bench.kernels.vq_matmul_argmin (no vq_nearest dispatcher yet)"
        return (lambda x, c: vq_nearest(x, c, impl="xla")), 'vq_nearest(impl="xla")'
    if impl == "ours":
        name = ours_impl(ours)
        _check_pallas_backend(name, interpret)
        try:
            vq_nearest = _kernels_module().vq_nearest
        except AttributeError:
            raise Unavailable("vlm_jax.kernels.vq_nearest does not exist yet")
        return (lambda x, c: vq_nearest(x, c, impl=name, interpret=interpret)), f'vq_nearest(impl="{name}")'
    raise ValueError(f"unknown VQ column {impl!r}")


# ---------------------------------------------------------------------------------------------
# Benchmarks.


def attention_flops(b: int, s: int, h: int, d: int, causal: bool) -> float:
    """Forward FLOPs as the issue counts them: 4*B*S^2*H*D, halved when causal."""
    flops = 4.0 * b * s * s * h * d
    return flops / 2 if causal else flops


def _loss_grad(fn: Callable) -> Callable:
    """(q, k, v, ct) -> (dq, dk, dv) of sum(fn(q, k, v) * ct), summed in float32."""

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array) -> jax.Array:
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _highest_precision() -> Any:
    """Context in which float32 matmuls run at full precision (no TF32), for the references."""
    context = getattr(jax, "default_matmul_precision", None)
    return context("highest") if context is not None else contextlib.nullcontext()


@jax.jit
def _max_abs_err_device(got: Any, want: Any) -> jax.Array:
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        diff = jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))
        errs.append(jnp.max(jnp.where(jnp.isnan(diff), jnp.inf, diff)))
    return jnp.max(jnp.stack(errs))


def max_abs_err(got: Any, want: Any) -> float:
    """Max over the leaves of max |got - want| in float32; NaN counts as inf.

    Small arrays are compared on the host (no compile per shape), large ones on the device.
    """
    if sum(leaf.size for leaf in jax.tree.leaves(got)) > 2**20:
        return float(_max_abs_err_device(got, want))
    err = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        diff = np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))
        err = max(err, float(np.max(np.where(np.isnan(diff), np.inf, diff), initial=0.0)))
    return err


def bench_attention(
    shapes: Sequence[tuple[int, int, int, int]], *, repeats: int, warmup: int, interpret: bool, ours: str,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (shape, causal, pass) and column; see the module docstring."""
    from vlm_jax.kernels.attention import reference

    rows = []
    for b, s, h, d in shapes:
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        q, k, v, ct = (jax.random.normal(key, (b, s, h, d), jnp.float32).astype(jnp.bfloat16) for key in keys)
        q32, k32, v32, ct32 = (t.astype(jnp.float32) for t in (q, k, v, ct))
        sm_scale = d**-0.5
        for causal in (False, True):

            def ref_fn(q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array, causal: bool = causal) -> Any:
                """(out, (dq, dk, dv)) of the float32 reference; the vjp of ct = grad of sum(out * ct)."""
                out, vjp = jax.vjp(
                    lambda q, k, v: reference.attention(q, k, v, causal=causal, sm_scale=sm_scale), q, k, v)
                return out, vjp(ct)

            with _highest_precision():
                ref_out, ref_grads = jax.jit(ref_fn)(q32, k32, v32, ct32)
            flops = attention_flops(b, s, h, d, causal)
            base = dict(section="attention", B=b, S=s, H=h, D=d, causal=causal, dtype="bfloat16")
            for impl in ATTENTION_IMPLS:
                fwd_row = dict(base, impl=impl, **{"pass": "fwd"}, flops=flops)
                bwd_row = dict(base, impl=impl, **{"pass": "fwd+bwd"}, flops=3.5 * flops)
                if impl in ("ours", "ours_h1"):
                    fwd_row["impl_name"] = bwd_row["impl_name"] = ours_impl(ours)
                try:
                    if impl == "ours_h1" and s > SHORT_SEQUENCE:
                        raise Unavailable("long sequences: ours runs one head per program already")
                    fn = attention_fn(impl, causal=causal, sm_scale=sm_scale, interpret=interpret, ours=ours)
                except Exception as e:  # Unavailable here: both passes say so.
                    status, reason = _classify(e, peer=impl in ("cudnn", "jax_mha"))
                    rows += [dict(fwd_row, status=status, reason=reason), dict(bwd_row, status=status, reason=reason)]
                    continue
                err_out = None
                for row, pass_fn, args in ((fwd_row, fn, (q, k, v)), (bwd_row, _loss_grad(fn), (q, k, v, ct))):
                    try:
                        m = measure(pass_fn, args, repeats=repeats, warmup=warmup)
                        if row is fwd_row:
                            err_out = max_abs_err(m.outputs, ref_out)
                            row.update(err_out=err_out)
                        else:
                            row.update(err_out=err_out, err_grad=max_abs_err(m.outputs, ref_grads))
                        row.update(status="ok", median_s=m.median_s, tflops=row["flops"] / m.median_s / 1e12,
                                   samples=m.samples, inner_calls=m.inner_calls, temp_bytes=m.temp_bytes)
                        del m
                    except Exception as e:
                        status, reason = _classify(e, peer=impl in ("cudnn", "jax_mha"))
                        row.update(status=status, reason=reason)
                    rows.append(row)
            del ref_out, ref_grads
    return rows


def bench_vq(
    shapes: Sequence[tuple[int, int, int]], dtypes: Sequence[str], *, repeats: int, warmup: int, interpret: bool,
    ours: str, seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (shape, dtype) and column.

    The device's peak can only rise, so the runs go in the order that keeps the most peaks exact:
    all of ours first (no [N, K] matrix, small peaks), then XLA by growing N*K, the float32
    references (another [N, K] matrix each) last.
    """
    cases = []
    for n, d, kk in shapes:
        kx, kc = jax.random.split(jax.random.PRNGKey(seed + 1))
        x32 = jax.random.normal(kx, (n, d), jnp.float32)
        c32 = jax.random.normal(kc, (kk, d), jnp.float32)
        for dtype in dtypes:
            base = dict(section="vq", N=n, d=d, K=kk, dtype=dtype, flops=2.0 * n * kk * d)
            cases.append((base, x32.astype(dtype), c32.astype(dtype)))
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    outputs: dict[tuple[int, str], Any] = {}
    order = [(i, "ours") for i in range(len(cases))]
    order += [(i, "xla") for i in sorted(range(len(cases)), key=lambda i: cases[i][0]["N"] * cases[i][0]["K"])]
    for i, impl in order:
        base, x, c = cases[i]
        row = rows[i, impl] = dict(base, impl=impl)
        if impl == "ours":
            row["impl_name"] = ours_impl(ours)
        try:
            fn, row["detail"] = vq_fn(impl, interpret=interpret, ours=ours)
            m = measure(fn, (x, c), repeats=repeats, warmup=warmup, track_peak=True)
            row.update(status="ok", median_s=m.median_s, tflops=row["flops"] / m.median_s / 1e12,
                       samples=m.samples, inner_calls=m.inner_calls, temp_bytes=m.temp_bytes,
                       peak_bytes=m.peak_bytes, peak_is_bound=m.peak_is_bound)
            outputs[i, impl] = m.outputs
            del m
        except Exception as e:
            status, reason = _classify(e, peer=False)
            row.update(status=status, reason=reason)
    reference = jax.jit(lambda x, c: vq_matmul_argmin(x, c, highest=True))
    for i, (base, x, c) in enumerate(cases):
        ref_idx, ref_dist = reference(x, c)
        for impl in VQ_IMPLS:
            if (i, impl) in outputs:
                idx, dist = outputs.pop((i, impl))
                rows[i, impl]["index_agreement"] = float(jnp.mean((idx == ref_idx).astype(jnp.float32)))
                rows[i, impl]["err_dist"] = max_abs_err(dist, ref_dist)
        del ref_idx, ref_dist
    return [rows[i, impl] for i in range(len(cases)) for impl in VQ_IMPLS]  # Table order: xla, ours.


# ---------------------------------------------------------------------------------------------
# Report.


def header() -> dict[str, Any]:
    """Device kind, versions and date of this run."""
    dev = jax.devices()[0]
    info = dict(device_kind=dev.device_kind, platform=dev.platform, device_count=jax.device_count(),
                jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except (ImportError, AttributeError):
        pass
    return info


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _reason(row: dict[str, Any]) -> str:
    reason = row.get("reason", "")
    short = reason if len(reason) <= REASON_WIDTH else reason[: REASON_WIDTH - 3] + "..."
    return f"{row['status'].replace('failed', 'FAILED')} ({short})"


def format_cell(row: dict[str, Any] | None) -> str:
    """One table cell: the measurement, or 'n/a (reason)' / 'FAILED (reason)'; '-' for no row."""
    if row is None:
        return "-"
    if row["status"] != "ok":
        return _reason(row)
    if row["section"] == "attention":
        cell = f"{row['tflops']:.3g} TF/s, err {_err(row.get('err_out'))}"
        return cell + (f"/{_err(row.get('err_grad'))}" if row["pass"] == "fwd+bwd" else "")
    peak = "n/a" if row.get("peak_bytes") is None else ("<=" if row["peak_is_bound"] else "") + _bytes(
        row["peak_bytes"])
    agree = row.get("index_agreement")
    agree_text = "n/a" if agree is None else f"{100 * agree:.2f}%"
    return (f"{1e3 * row['median_s']:.3g} ms, tmp {_bytes(row['temp_bytes'])}, peak {peak}, "
            f"idx {agree_text}")


def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratios(rows: Sequence[dict[str, Any]], target: tuple[int, int, int, int] | None) -> dict[str, float | None]:
    """The issue's targets: ours/jax mha and ours/cuDNN TFLOP/s at `target`; xla/ours VQ time."""
    out: dict[str, float | None] = {}

    def ratio(num: dict | None, den: dict | None, key: str, invert: bool = False) -> float | None:
        if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
            return None
        return den[key] / num[key] if invert else num[key] / den[key]

    if target is not None:
        b, s, h, d = target
        at = dict(section="attention", B=b, S=s, H=h, D=d)
        for peer, pass_ in (("jax_mha", "fwd+bwd"), ("cudnn", "fwd"), ("cudnn", "fwd+bwd")):
            for causal in (False, True):
                ours = _find(rows, impl="ours", causal=causal, **{"pass": pass_}, **at)
                other = _find(rows, impl=peer, causal=causal, **{"pass": pass_}, **at)
                out[f"ours/{peer} {pass_} {'causal' if causal else 'full'}"] = ratio(ours, other, "tflops")
    for row in rows:  # Short sequences: what several heads per program bring, and ours against xla
        # (which impl="auto" picks there on a GPU until this table says otherwise).
        if row["section"] == "attention" and row["impl"] == "ours" and row["S"] <= SHORT_SEQUENCE:
            at = {k: row[k] for k in ("section", "B", "S", "H", "D", "causal", "pass")}
            name = f"B{row['B']} S{row['S']} {row['pass']} {'causal' if row['causal'] else 'full'}"
            for peer in ("ours_h1", "xla"):
                out[f"ours/{peer} {name}"] = ratio(row, _find(rows, impl=peer, **at), "tflops")
    for row in rows:
        if row["section"] == "vq" and row["impl"] == "ours":
            xla = _find(rows, section="vq", impl="xla", N=row["N"], d=row["d"], K=row["K"], dtype=row["dtype"])
            out[f"vq speedup (xla time / ours) N{row['N']} d{row['d']} K{row['K']} {row['dtype']}"] = ratio(
                row, xla, "median_s", invert=True)
    return out


def format_table(result: dict[str, Any]) -> str:
    """The whole report: header line, one markdown table, notes, the targets line."""
    info = result["header"]
    rows = result["rows"]
    lines = [
        f"# kernels on {info['device_kind']} ({info['platform']} x{info['device_count']}), jax {info['jax']}"
        + (f" / jaxlib {info['jaxlib']}" if "jaxlib" in info else "") + f", {info['date']}; "
        f"median of {result['repeats']} samples after {result['warmup']} warmup"
        + (", Pallas in interpret mode" if result["interpret"] else ""),
    ]
    titles = ["kernel", "shape", "mask/dtype", "pass"] + [
        COLUMN_TITLES[c] + (f" ({result['ours_impl']})" if c == "ours" else "") for c in ATTENTION_IMPLS]
    table = []
    seen = set()
    for row in rows:
        if row["section"] == "attention":
            key = ("attention", row["B"], row["S"], row["H"], row["D"], row["causal"], row["pass"])
            shape = f"B{row['B']} S{row['S']} H{row['H']} D{row['D']}"
            first = ["attention bf16", shape, "causal" if row["causal"] else "full", row["pass"]]
            match = dict(section="attention", B=row["B"], S=row["S"], H=row["H"], D=row["D"], causal=row["causal"],
                         **{"pass": row["pass"]})
        else:
            key = ("vq", row["N"], row["d"], row["K"], row["dtype"])
            first = ["vq lookup", f"N{row['N']} d{row['d']} K{row['K']}", row["dtype"], "fwd"]
            match = dict(section="vq", N=row["N"], d=row["d"], K=row["K"], dtype=row["dtype"])
        if key in seen:
            continue
        seen.add(key)
        impls = ATTENTION_IMPLS if row["section"] == "attention" else VQ_IMPLS
        table.append(first + [format_cell(_find(rows, impl=c, **match)) if c in impls else "-"
                              for c in ATTENTION_IMPLS])
    widths = [max(len(r[i]) for r in [titles] + table) for i in range(len(titles))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines += [line(titles), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(r) for r in table]
    sections = {r["section"] for r in rows}
    if "attention" in sections:
        lines.append("attention cells: TFLOP/s (fwd 4*B*S^2*H*D, /2 causal; fwd+bwd 3.5x fwd), err = max |out - "
                     "f32 ref| [/ max |grad - f32 ref grad| over q, k, v]")
    if "vq" in sections:
        lines.append("vq cells: median time, compiled temp bytes (memory_analysis), device peak-bytes rise over "
                     "the run (<=: a bound), indices equal to a float32 HIGHEST matmul+argmin reference")
    notes = sorted({f"{r['impl']}: {r['status']} ({r['reason']})" for r in rows
                    if r["status"] != "ok" and len(r["reason"]) > REASON_WIDTH})
    lines += [f"note: {n}" for n in notes]
    vq_details = sorted({r["detail"] for r in rows if r["section"] == "vq" and r.get("detail")})
    if vq_details:
        lines.append("vq columns: " + "; ".join(vq_details))
    target = result["target_shape"]
    parts = []
    for name, value in result["ratios"].items():
        parts.append(f"{name} {'n/a' if value is None else f'{value:.2f}x'}")
    where = f" at B{target[0]} S{target[1]} H{target[2]} D{target[3]}" if target else ""
    lines.append(f"targets{where}: " + ("; ".join(parts) if parts else "nothing measured"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m vlm_jax.bench.kernels`."""
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.bench.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, tests)")
    parser.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode")
    parser.add_argument("--only", choices=["attention", "vq"], default=None, help="one section only")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling (at least 1)")
    parser.add_argument("--ours", choices=["auto", "pallas_gpu", "pallas_tpu"], default="auto",
                        help="impl of our column (auto: this backend's Pallas kernel)")
    parser.add_argument("--vq-dtype", choices=["float32", "bfloat16", "both"], default="both",
                        help="VQ input dtype (x and codebook)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write header, rows, ratios as JSON")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the selected sections; VQ first, so its peak-memory readings are not hidden by attention."""
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    attention_shapes = SMALL_ATTENTION_SHAPES if args.small else ATTENTION_SHAPES
    vq_shapes = SMALL_VQ_SHAPES if args.small else VQ_SHAPES
    dtypes = ["float32", "bfloat16"] if args.vq_dtype == "both" else [args.vq_dtype]
    common = dict(repeats=args.repeats, warmup=args.warmup, interpret=args.interpret, ours=args.ours,
                  seed=args.seed)
    rows: list[dict[str, Any]] = []
    if args.only in (None, "vq"):
        rows += bench_vq(vq_shapes, dtypes, **common)
    if args.only in (None, "attention"):
        rows = bench_attention(attention_shapes, **common) + rows
    target = attention_shapes[0] if args.only in (None, "attention") else None
    return dict(header=header(), repeats=args.repeats, warmup=max(1, args.warmup), interpret=args.interpret,
                ours_impl=ours_impl(args.ours), target_shape=list(target) if target else None, rows=rows,
                ratios=ratios(rows, target))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": strict JSON has no such numbers.
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses argv, runs the benchmark, prints the table (and writes --json); returns the result."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    print(format_table(result), flush=True)
    if args.json:
        payload = dict(result, rows=[{k: _jsonable(v) for k, v in r.items()} for r in result["rows"]],
                       ratios={k: _jsonable(v) for k, v in result["ratios"].items()})
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return result


if __name__ == "__main__":
    main()
