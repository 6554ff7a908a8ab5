"""Pallas GPU flash attention (interpret mode on CPU) against the reference, and the dispatcher.

Every kernel output starts as NaN (`poison_outputs=True` aliases NaN buffers to the outputs), so an
element a kernel forgets to write fails the finiteness checks. Values and gradients (dq, dk, dv of a
random-cotangent-weighted sum) are compared with the float32 reference on fresh random inputs.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import kernels
from vlm_jax.kernels.attention import pallas_gpu, reference

BLOCK = 16
TILES = dict(
    block_q=BLOCK, block_k=BLOCK, block_q_dkv=BLOCK, block_k_dkv=BLOCK, block_q_dq=BLOCK, block_k_dq=BLOCK
)
# Max error relative to the largest reference magnitude, per input dtype (bf16 keeps 8 bits).
# Observed on CPU: f32 ~6e-7, f16 ~7e-4, bf16 ~6e-3 (grads); gradients get twice these.
TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tq: int
    tk: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: type
    causal: bool = False
    segments: str | None = None  # None, "shared" (same ids for q and kv), "cross" (own kv ids)
    sm_scale: float | None = None
    batch: int = 1
    block_h: int | None = None  # query heads per forward/dq program (None: the kernel's choice)
    whole_rows: bool = False  # the kernel's own short-sequence tiles instead of 16x16 ones


def _slow(case: Case) -> Any:
    """A case that only `pytest -m slow` runs: the default suite keeps one case per feature (each of
    these combines features that the default cases cover)."""
    return pytest.param(case, marks=pytest.mark.slow, id=case.name)


CASES = [
    _slow(Case("plain_cross_odd37x50_f32", 37, 50, 2, 2, 64, jnp.float32)),  # no mask but the padded-key tail
    Case("causal_gqa2_bf16", 48, 48, 4, 2, 64, jnp.bfloat16, causal=True),
    _slow(Case("segments_f16_d32", 32, 32, 2, 2, 32, jnp.float16, segments="shared", batch=2)),
    Case("causal_segments_odd37_gqa2_d40_f32", 37, 37, 4, 2, 40, jnp.float32, causal=True, segments="shared"),
    Case("mqa_segments_odd50_scale_bf16", 50, 50, 4, 1, 64, jnp.bfloat16, segments="shared", sm_scale=0.3),
    _slow(Case("decode_causal_mqa_bf16", 5, 50, 4, 1, 64, jnp.bfloat16, causal=True)),
    Case("decode_causal_segments_gqa2_f32", 37, 50, 4, 2, 64, jnp.float32, causal=True, segments="cross"),
    # Non-causal cross attention with own kv ids, some queries of a segment absent from kv (rows that
    # attend to nothing: the reference gives them the mean of v), head_dim 80 padded to 128.
    Case("cross_kvseg_dead_rows_d80_f16", 37, 50, 2, 2, 80, jnp.float16, segments="cross"),
    # One head per program (the long-sequence layout), and head blocks smaller than, equal to and
    # larger than the kv groups. Above, the kernel picks 2 or 4 heads per program for these lengths.
    Case("one_head_causal_gqa2_odd37_bf16", 37, 37, 4, 2, 64, jnp.bfloat16, causal=True, block_h=1),
    _slow(Case("one_head_segments_f32", 32, 32, 2, 2, 32, jnp.float32, segments="shared", block_h=1)),
    Case("heads2_of_gqa4_causal_f32", 40, 40, 8, 2, 64, jnp.float32, causal=True, block_h=2),
    _slow(Case("heads2_eq_gqa2_segments_bf16", 33, 33, 4, 2, 64, jnp.bfloat16, segments="shared", block_h=2)),
    # The short-sequence tiles themselves: whole rows (ViT-like 70 tokens, CLIP-text-like causal 77).
    Case("whole_rows_vit_like_bf16", 70, 70, 4, 4, 64, jnp.bfloat16, batch=2, whole_rows=True),
    _slow(Case("whole_rows_text_causal_gqa2_f32", 77, 77, 4, 2, 32, jnp.float32, causal=True, whole_rows=True)),
]


def _segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Packed rows: 1-3 segments with ids 1.., then a padding tail that is its own segment (id 0)."""
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = int(length * rng.uniform(0.6, 0.9))
        cuts = np.sort(rng.choice(np.arange(1, used), size=rng.integers(0, 3), replace=False))
        for seg, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            ids[b, lo:hi] = seg
    return ids


def _inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    b, tq, tk = case.batch, case.tq, case.tk

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    q = normal(b, tq, case.heads, case.head_dim).astype(case.dtype)
    k = normal(b, tk, case.kv_heads, case.head_dim).astype(case.dtype)
    v = normal(b, tk, case.kv_heads, case.head_dim).astype(case.dtype)
    cot = normal(b, tq, case.heads, case.head_dim)
    seg = kv_seg = None
    if case.segments == "shared":
        seg = jnp.asarray(_segments(rng, b, tq))
    elif case.segments == "cross":
        kv_ids = _segments(rng, b, tk)
        if case.causal:  # queries are the last tq positions of the packed kv row
            q_ids = kv_ids[:, tk - tq :].copy()
        else:  # own ids; id 9 never occurs in kv: those queries see no key at all
            q_ids = _segments(rng, b, tq)
            q_ids[:, :3] = 9
        seg, kv_seg = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    return q, k, v, cot, seg, kv_seg


# The interpreted kernels are big XLA programs: on the CPU, compile them without LLVM optimisation
# (a third less time; tests/kernels/test_attention_tpu.py does the same).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _value_and_grads(fn, q, k, v, cot):
    """(out, (dq, dk, dv)) of sum(fn(q, k, v) * cot), in one jitted function."""

    def run(q, k, v, cot):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot.astype(out.dtype))

    options = FAST_COMPILE if jax.devices()[0].platform == "cpu" else None
    return jax.jit(run).lower(q, k, v, cot).compile(compiler_options=options)(q, k, v, cot)


def _assert_close(name: str, got: jax.Array, want: jax.Array, tol: float) -> None:
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(want).all(), f"{name}: reference not finite"
    assert np.isfinite(got).all(), f"{name}: {np.sum(~np.isfinite(got))} non-finite (unwritten?) elements"
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
    assert err <= tol, f"{name}: relative max error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pallas_gpu_matches_reference(case: Case):
    q, k, v, cot, seg, kv_seg = _inputs(case, seed=zlib.crc32(case.name.encode()))
    assert pallas_gpu.unsupported_reason(q, k, v, causal=case.causal, segment_ids=seg, kv_segment_ids=kv_seg) is None

    tiles = {} if case.whole_rows else dict(TILES)
    if case.block_h is not None:
        tiles["block_h"] = case.block_h

    def kernel(q, k, v):
        return pallas_gpu.mha(
            q, k, v, causal=case.causal, segment_ids=seg, kv_segment_ids=kv_seg, sm_scale=case.sm_scale,
            interpret=True, poison_outputs=True, **tiles,
        )

    def ref(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return reference.attention(
            *f32, causal=case.causal, segment_ids=seg, kv_segment_ids=kv_seg, sm_scale=case.sm_scale
        )

    out, grads = _value_and_grads(kernel, q, k, v, cot)
    ref_out, ref_grads = _value_and_grads(ref, q, k, v, cot)
    assert out.dtype == q.dtype and all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
    tol = TOLERANCE[case.dtype]
    _assert_close("out", out, ref_out, tol)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, rg, 2 * tol)


def test_short_sequences_get_whole_row_tiles_and_head_blocks():
    vit = pallas_gpu.short_tiles(64, jnp.bfloat16, 197, 197, heads=12, groups=1)
    assert (vit.block_q, vit.block_k, vit.block_h) == (64, 256, 4)  # one step over every key
    assert (vit.block_q_dkv, vit.block_k_dkv) == (256, 64)  # dk/dv: every query in one step
    text = pallas_gpu.short_tiles(64, jnp.float32, 77, 77, heads=8, groups=8)
    assert (text.block_q, text.block_k, text.block_h) == (32, 128, 4)
    assert pallas_gpu.short_tiles(64, jnp.bfloat16, 300, 300, heads=12, groups=1) is None
    assert pallas_gpu.short_tiles(64, jnp.bfloat16, 64, 64, heads=6, groups=3).block_h == 1  # 2 fits neither
    q = jnp.zeros((1, 16, 6, 64), jnp.float32)
    kv = jnp.zeros((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_h 2 must divide"):  # 3 query heads per kv head
        pallas_gpu.mha(q, kv, kv, block_h=2, interpret=True)


def test_poisoned_outputs_expose_unwritten_blocks():
    """The poisoning the tests rely on works: a kernel that skips a block leaves NaN there."""
    from jax.experimental import pallas as pl

    st = pallas_gpu._Static(
        causal=False, sm_scale=1.0, q_len=32, kv_len=32, groups=1,
        tiles=pallas_gpu.default_tiles(64, jnp.float32), interpret=True, poison=True,
    )

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((32, 16), jnp.float32)
    spec = pl.BlockSpec((16, 16), lambda i: (i, 0))
    (out,) = pallas_gpu._pallas(
        kernel, grid=(2,), in_specs=[spec], out_specs=[spec], out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
        args=[x], st=st, num_warps=4, num_stages=1, name="poison_check",
    )
    out = np.asarray(out)
    assert (out[:16] == 1).all() and np.isnan(out[16:]).all()


def test_unsupported_reasons():
    q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    assert pallas_gpu.unsupported_reason(q, k, k, causal=True) is None
    assert "multiple" in pallas_gpu.unsupported_reason(q, k[:, :, :1].repeat(3, 2), k[:, :, :1].repeat(3, 2))
    assert "more queries" in pallas_gpu.unsupported_reason(k.repeat(2, 2), q[:, :, :2], q[:, :, :2], causal=True)
    seg = jnp.zeros((1, 8), jnp.int32)
    assert "kv_segment_ids" in pallas_gpu.unsupported_reason(q, k, k, segment_ids=seg)
    assert "dtype" in pallas_gpu.unsupported_reason(q.astype(jnp.int8), k.astype(jnp.int8), k.astype(jnp.int8))
    with pytest.raises(ValueError, match="cannot do this call"):
        pallas_gpu.mha(q, k, k, segment_ids=seg, interpret=True)


# ---------------------------------------------------------------------------------------------
# Dispatcher.


def _qkv(t=8, dtype=jnp.bfloat16):
    x = jnp.ones((1, t, 2, 64), dtype)
    return x, x, x


def test_auto_on_cpu_is_xla():
    q, k, v = _qkv()
    assert jax.default_backend() == "cpu"
    assert kernels.attention.__module__ == "vlm_jax.kernels.attention"
    from vlm_jax.kernels.attention import choose_impl

    assert choose_impl(q, k, v) == "xla"
    assert choose_impl(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32)) == "xla"
    np.testing.assert_array_equal(
        kernels.attention(q, k, v, causal=True, impl="auto"), reference.attention(q, k, v, causal=True)
    )


def test_auto_rule_on_other_backends():
    from vlm_jax.kernels.attention import choose_impl

    long = jnp.zeros((1, 1024, 2, 64), jnp.bfloat16)
    assert choose_impl(*_qkv(), backend="gpu") == "xla"  # tiny
    seg = jnp.zeros((1, 1024), jnp.int32)
    assert choose_impl(long, long, long, segment_ids=seg, backend="gpu") == "pallas_gpu"
    f32 = long.astype(jnp.float32)
    assert choose_impl(f32, f32, f32, backend="gpu") == "pallas_gpu"  # cuDNN needs 16-bit
    odd = jnp.zeros((1, 1000, 2, 64), jnp.bfloat16)
    assert choose_impl(odd, odd, odd, causal=True, backend="gpu") == "pallas_gpu"
    assert choose_impl(long, long, long, backend="gpu") == "cudnn"  # aligned bf16, no segment ids
    try:
        from vlm_jax.kernels.attention import pallas_tpu
    except ModuleNotFoundError:
        expected_tpu = "xla"
    else:
        reason = pallas_tpu.unsupported_reason(long, long, long, causal=False, segment_ids=None)
        expected_tpu = "xla" if reason else "pallas_tpu"
    assert choose_impl(long, long, long, backend="tpu") == expected_tpu


def test_cudnn_on_cpu_raises_clearly():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="cudnn.*CUDA GPU"):
        kernels.attention(q, k, v, impl="cudnn")


def test_cudnn_refuses_segment_ids_and_known_bad_shapes():
    from vlm_jax.kernels.attention import cudnn_unsupported_reason

    q, k, v = _qkv(t=128)
    seg = jnp.zeros((1, 128), jnp.int32)
    # Conditions below are checked as if on a CUDA GPU (the backend check passes on "gpu").
    assert "segment ids" in cudnn_unsupported_reason(q, k, v, segment_ids=seg, backend="gpu")
    assert cudnn_unsupported_reason(q, k, v, causal=True, backend="gpu") is None
    vit = jnp.zeros((1, 197, 2, 64), jnp.bfloat16)
    assert "197" in cudnn_unsupported_reason(vit, vit, vit, backend="gpu")
    assert "float16" in cudnn_unsupported_reason(*(x.astype(jnp.float32) for x in (q, k, v)), backend="gpu")
    assert "aligned" in cudnn_unsupported_reason(q[:, :64], k, v, causal=True, backend="gpu")
    odd_d = jnp.zeros((1, 128, 2, 36), jnp.bfloat16)
    assert "head_dim" in cudnn_unsupported_reason(odd_d, odd_d, odd_d, backend="gpu")
    with pytest.raises(ValueError, match="segment ids|CUDA"):
        kernels.attention(q, k, v, segment_ids=seg, impl="cudnn")


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="not available"):
        kernels.attention(*_qkv(), impl="flash")


def test_forced_pallas_needs_device_or_interpret():
    q, k, v = _qkv(t=16)
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.attention(q, k, v, impl="pallas_gpu")
    with pytest.raises(ValueError, match="needs a TPU"):
        kernels.attention(q, k, v, impl="pallas_tpu")
    # A call the kernel cannot do is refused with the kernel's reason, even in interpret mode.
    with pytest.raises(ValueError, match="more queries"):
        kernels.attention(q, k[:, :8], v[:, :8], causal=True, impl="pallas_gpu", interpret=True)


def test_dispatch_pallas_gpu_interpret():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, 2, 32), np.float32)) for _ in range(3))
    out = kernels.attention(q, k, v, impl="pallas_gpu", interpret=True)  # aligned, no mask at all
    np.testing.assert_allclose(out, reference.attention(q, k, v), atol=2e-5, rtol=2e-5)


def test_pallas_tpu_missing_module_is_reported(monkeypatch):
    """While pallas_tpu.py does not exist (simulated here), asking for it is a clear error."""
    from vlm_jax.kernels.attention import choose_impl, unsupported_reason

    monkeypatch.setitem(sys.modules, "vlm_jax.kernels.attention.pallas_tpu", None)
    reason = unsupported_reason("pallas_tpu", *_qkv(), interpret=True)
    assert reason is not None and "not available" in reason
    with pytest.raises(ValueError, match="not available"):
        kernels.attention(*_qkv(), impl="pallas_tpu", interpret=True)
    assert choose_impl(*_qkv(t=1024), backend="tpu") == "xla"


# ---------------------------------------------------------------------------------------------
# Triton lowering without a GPU.

LOWERING_CASES = [
    # (q_len, kv_len, heads, kv_heads, head_dim, dtype, causal, segments)
    (1024, 1024, 8, 8, 128, jnp.bfloat16, True, False),
    (1000, 1000, 8, 2, 64, jnp.float16, False, True),
    (100, 300, 4, 1, 80, jnp.float32, True, False),
    (256, 256, 2, 2, 256, jnp.bfloat16, True, True),
    # Short sequences (whole-row tiles, several heads per program): ViT-B/16, CLIP text, GQA.
    (197, 197, 12, 12, 64, jnp.bfloat16, False, False),
    (77, 77, 8, 8, 64, jnp.float16, True, False),
    (128, 128, 8, 2, 128, jnp.bfloat16, True, True),
]


def _lowering_id(shape) -> str:
    return "-".join(map(str, shape[:5])) + f"-causal{int(shape[6])}-seg{int(shape[7])}"


@pytest.mark.parametrize("shape", LOWERING_CASES, ids=_lowering_id)
def test_lowers_to_triton_for_cuda(shape, monkeypatch):
    """Lower forward + backward for the CUDA platform on this CPU-only host with the default tiles.

    This runs Pallas' Triton lowering (unsupported primitives, non-power-of-two tensors) and MLIR
    verification of the Triton modules; only Triton's own compilation to PTX needs the GPU.
    """
    tq, tk, h, hkv, d, dtype, causal, segments = shape
    verified: list[bool] | None = None
    try:  # jax internals: verify the Triton modules where this jax version allows hooking in
        from jax._src.pallas.triton import lowering as triton_lowering

        lower_module = triton_lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    else:
        verified = []

        def lower_and_verify(*args, **kwargs):
            result = lower_module(*args, **kwargs)
            verified.append(result.module.operation.verify())
            return result

        monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    q = jax.ShapeDtypeStruct((2, tq, h, d), dtype)
    kv = jax.ShapeDtypeStruct((2, tk, hkv, d), dtype)
    seg = jax.ShapeDtypeStruct((2, tq), jnp.int32) if segments else None

    def f(q, k, v, cot, seg):
        out, vjp = jax.vjp(lambda q, k, v: pallas_gpu.mha(q, k, v, causal=causal, segment_ids=seg), q, k, v)
        return out, vjp(cot)

    try:
        lowered = jax.jit(f).trace(q, kv, kv, q, seg).lower(lowering_platforms=("cuda",))
    except Exception as e:  # pragma: no cover
        if "gpu" in str(e).lower() and "triton" not in str(e).lower():
            pytest.skip(f"CUDA lowering needs a GPU with this jaxlib: {e}")
        raise
    assert lowered.as_text().count("triton") >= 3  # forward, dq, dk/dv kernels
    assert verified is None or verified == [True, True, True]


# ---------------------------------------------------------------------------------------------
# Real GPU (excluded by default: pytest -m gpu).


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,kv_heads,causal",
    [
        ((2, 1024, 8, 128), 8, False),
        ((2, 1024, 8, 128), 8, True),
        ((8, 197, 12, 64), 12, False),  # ViT-B/16: whole-row tiles, several heads per program
        ((8, 77, 8, 64), 2, True),  # CLIP text length, causal, GQA
    ],
    ids=["s1024", "s1024_causal", "vit_s197", "text_s77_causal_gqa"],
)
def test_real_gpu_kernel_bf16(shape, kv_heads, causal):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (tests/conftest.py defaults JAX_PLATFORMS to cpu: set JAX_PLATFORMS=cuda)")
    rng = np.random.default_rng(1)
    kv_shape = shape[:2] + (kv_heads, shape[3])
    q = jnp.asarray(rng.standard_normal(shape, np.float32)).astype(jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal(kv_shape, np.float32)).astype(jnp.bfloat16) for _ in range(2))
    cot = jnp.asarray(rng.standard_normal(shape, np.float32))
    out, grads = _value_and_grads(lambda q, k, v: pallas_gpu.mha(q, k, v, causal=causal), q, k, v, cot)

    def ref(q, k, v):
        return reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=causal)

    with jax.default_matmul_precision("highest"):  # no TF32 in the float32 reference
        ref_out, ref_grads = _value_and_grads(ref, q, k, v, cot)
    _assert_close("out", out, ref_out, 2e-2)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, g, rg, 4e-2)
