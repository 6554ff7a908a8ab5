"""DALL-E static attention masks (`kernels.attention.masks`) and the kernels that skip their tiles.

The dense masks are checked against a direct transcription of their definitions (2-D grid
coordinates, not the module's raster arithmetic), block maps against the dense masks, and both
Pallas kernels (interpret mode) against the reference, forward and backward. That empty tiles are
really skipped is shown with NaN: values in a tile the mask empties may be NaN without reaching the
outputs that tile would feed. The broader sweep is under `-m slow`.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import kernels
from vlm_jax.kernels.attention import choose_impl, pallas_gpu, pallas_tpu, reference, unsupported_reason
from vlm_jax.kernels.attention.masks import EMPTY, FULL, PARTIAL, DalleMask, kv_schedule, tpu_tables

KINDS = ("row", "column", "conv", "causal")
# Interpreted kernels are big XLA programs: compile them without LLVM optimisation (as the other
# kernel tests do).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _by_definition(mask: DalleMask) -> np.ndarray:
    """The mask written out from its definition (masks.py docstring), one pair at a time."""
    t, g, n = mask.text_len, mask.grid, mask.seq_len
    half = mask.conv_kernel // 2
    out = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(q + 1):  # causal
            if k < t:  # text keys: seen by every later token
                out[q, k] = True
                continue
            rq, rk = q - t, k - t
            (yq, xq), (yk, xk) = divmod(rq, g), divmod(rk, g)
            out[q, k] = {
                "causal": True,
                "row": rq - rk <= g,  # itself and the g image tokens before it
                "column": xq == xk,
                "conv": abs(yq - yk) <= half and abs(xq - xk) <= half,
            }[mask.kind]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_dense_mask_matches_its_definition(kind):
    for text_len, grid, conv in ((6, 4, 3), (0, 5, 3), (3, 6, 5)):
        mask = DalleMask(kind, text_len, grid, conv_kernel=conv)
        dense = mask.dense()
        assert dense.shape == (mask.seq_len,) * 2 and dense.dtype == bool
        np.testing.assert_array_equal(dense, _by_definition(mask))
        assert not np.triu(dense, 1).any() and np.diag(dense).all()  # causal; every token sees itself
        np.testing.assert_array_equal(dense[:text_len, :text_len], np.tril(np.ones((text_len,) * 2, bool)))
        assert dense[text_len:, :text_len].all()  # image tokens see all text
        # Decode: the last rows of the full mask.
        np.testing.assert_array_equal(mask.dense(5, mask.seq_len), dense[-5:])


def test_neighbourhoods_on_a_small_grid():
    """Figure 11's layout: 6 text tokens, a 4x4 image; image token 8 (row 2, column 0)."""
    q = 6 + 8

    def seen(kind: str) -> list[int]:
        return [k - 6 for k in np.flatnonzero(DalleMask(kind, 6, 4, conv_kernel=3).dense()[q]) if k >= 6]

    assert seen("row") == [4, 5, 6, 7, 8]  # itself and the 4 image tokens before it
    assert seen("column") == [0, 4, 8]
    assert seen("conv") == [4, 5, 8]  # 3x3 around (2, 0), before it in raster order
    assert seen("causal") == list(range(9))
    assert DalleMask("row", 256, 32).seq_len == 1280


@pytest.mark.parametrize("kind", KINDS)
def test_block_map_agrees_with_dense_mask(kind):
    mask = DalleMask(kind, 8, 6, conv_kernel=3)  # 44 tokens
    for bq, bk in ((4, 4), (11, 4), (4, 22), (44, 44), (2, 11)):
        dense = mask.dense()
        bmap = mask.block_map(bq, bk)
        tiles = dense.reshape(44 // bq, bq, 44 // bk, bk)
        np.testing.assert_array_equal(bmap == EMPTY, ~tiles.any(axis=(1, 3)))
        np.testing.assert_array_equal(bmap == FULL, tiles.all(axis=(1, 3)))
    # Decode rows and tiles that do not divide the lengths: the real part decides, padded keys are
    # never FULL, padded query rows see key 0 only.
    bmap = mask.block_map(8, 8, q_len=20, kv_len=44)
    dense = mask.dense(20, 44)
    assert bmap.shape == (3, 6)
    for i in range(3):
        for j in range(6):
            real = dense[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8]
            padded_rows = i == 2
            want = PARTIAL if real.any() or (padded_rows and j == 0) else EMPTY
            if real.all() and real.size == 64:
                want = FULL
            assert bmap[i, j] == want, (i, j)


def test_skipped_fractions_and_kernel_tables():
    causal = DalleMask("causal", 256, 32).skipped_fraction(128, 64)
    assert causal["vs_causal"] == 0 and causal["vs_dense"] == pytest.approx(90 / 200)
    for kind in ("row", "conv"):
        s = DalleMask(kind, 256, 32).skipped_fraction(128, 64)
        assert s["empty"] + s["partial"] + s["full"] == s["tiles"] == 200
        assert s["vs_dense"] > causal["vs_dense"] and 0 < s["vs_causal"] < 1
    bmap = np.array([[FULL, EMPTY, PARTIAL], [EMPTY, EMPTY, PARTIAL]], np.int8)
    sched = kv_schedule(bmap, all_masked=False)
    assert sched.shape == (2, 8)  # 2 counts + 3 tiles, rounded up to a power of two
    np.testing.assert_array_equal(sched[0, :4], [1, 2, 0, 2])  # FULL tile 0 first, then PARTIAL 2
    np.testing.assert_array_equal(sched[1, :3], [0, 1, 2])
    np.testing.assert_array_equal(kv_schedule(bmap, all_masked=True)[0, :4], [0, 2, 0, 2])
    kind, kv_fetch, q_fetch = tpu_tables(bmap)
    np.testing.assert_array_equal(kind, bmap.reshape(-1))
    np.testing.assert_array_equal(kv_fetch, [0, 0, 2, 2, 2, 2])  # skipped steps keep the last block
    np.testing.assert_array_equal(q_fetch, [0, 0, 0, 0, 0, 1])


def test_12b_table_at_the_kernels_default_tiles(capsys):
    """`python -m vlm_jax.bench.dalle_masks`: the 12B layout at the kernels' default tiles."""
    from vlm_jax.bench import dalle_masks

    blocks = dalle_masks.default_blocks(1280, 64, jnp.bfloat16)
    assert blocks == {"gpu fwd": (128, 64), "gpu dkv": (32, 128), "gpu dq": (128, 32), "tpu": (256, 256)}
    table = dalle_masks.main([])
    assert capsys.readouterr().out.strip() == table
    rows = {(line[:8].strip(), line[8:20].strip()): line.split() for line in table.splitlines()[2:]}
    assert len(rows) == 16 and rows[("row", "gpu fwd")][-2:] == ["69.5%", "44.5%"]
    assert rows[("causal", "tpu")][-2:] == ["40.0%", "0.0%"]
    # Short sequences: pallas_gpu's whole-row tiles.
    assert dalle_masks.default_blocks(80, 64, jnp.bfloat16)["gpu fwd"] == (64, 128)


def test_bad_masks_are_clear_errors():
    with pytest.raises(ValueError, match="unknown DALL-E mask kind 'diagonal'"):
        DalleMask("diagonal", 8, 4)
    with pytest.raises(ValueError, match="odd"):
        DalleMask("conv", 8, 4, conv_kernel=4)
    mask = DalleMask("row", 8, 4)
    with pytest.raises(ValueError, match=r"kv_len = text_len \+ grid\*\*2 = 8 \+ 4\*\*2 = 24, got 20"):
        mask.dense(20, 20)
    q = jnp.zeros((1, 20, 2, 16), jnp.float32)
    for impl in ("xla", "pallas_gpu", "pallas_tpu"):
        with pytest.raises(ValueError, match="= 24, got 20"):
            kernels.attention(q, q, q, static_mask=mask, impl=impl, interpret=True)
    with pytest.raises(ValueError, match="= 24, got 20"):
        kernels.attention(q, q, q, static_mask=mask)  # auto (xla on this CPU)
    with pytest.raises(ValueError, match="must be a DalleMask"):
        kernels.attention(q, q, q, static_mask=np.ones((20, 20), bool), impl="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match="= 24, got 20"):
        pallas_gpu.mha(q, q, q, static_mask=mask, interpret=True)
    with pytest.raises(ValueError, match="= 24, got 20"):
        pallas_tpu.mha(q, q, q, static_mask=mask, interpret=True)


def test_dispatch_never_sends_static_masks_to_cudnn():
    mask = DalleMask("conv", 256, 32)
    q = jax.ShapeDtypeStruct((1, 1280, 4, 64), jnp.bfloat16)
    assert "static" in unsupported_reason("cudnn", q, q, q, static_mask=mask, backend="gpu")
    assert choose_impl(q, q, q, backend="gpu") == "cudnn"  # the same call without the mask
    assert choose_impl(q, q, q, static_mask=mask, backend="gpu") == "pallas_gpu"
    assert choose_impl(q, q, q, static_mask=mask, backend="tpu") == "pallas_tpu"
    assert choose_impl(q, q, q, static_mask=mask, backend="cpu") == "xla"


# ---------------------------------------------------------------------------------------------
# Kernels against the reference.


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    kernel: str  # "gpu" or "tpu"
    text_len: int = 16
    grid: int = 8
    q_len: int | None = None  # None: the whole sequence; else its last q_len positions
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    dtype: type = jnp.float32
    block: int = 16
    segments: bool = False
    causal: bool = False  # passed along: the static mask is causal anyway

    @property
    def name(self) -> str:
        extra = "".join(
            f"-{x}" for x, on in (("seg", self.segments), (f"q{self.q_len}", self.q_len), ("causal", self.causal)) if on
        )
        dtype = jnp.dtype(self.dtype).name
        return f"{self.kernel}-{self.kind}-t{self.text_len}g{self.grid}-b{self.block}-{dtype}{extra}"


def _mha(case: Case, mask: DalleMask, seg: jax.Array | None, kv_seg: jax.Array | None):
    tiles = dict(block_q=case.block, block_k=case.block)
    if case.kernel == "gpu":
        return lambda q, k, v: pallas_gpu.mha(
            q, k, v, static_mask=mask, causal=case.causal, segment_ids=seg, kv_segment_ids=kv_seg,
            interpret=True, poison_outputs=True, **tiles,
        )
    return lambda q, k, v: pallas_tpu.mha(
        q, k, v, static_mask=mask, causal=case.causal, segment_ids=seg, kv_segment_ids=kv_seg,
        interpret=True, **tiles,
    )


def _value_and_grads(fn, q, k, v, cot):
    def run(q, k, v, cot):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cot.astype(out.dtype))

    return jax.jit(run).lower(q, k, v, cot).compile(compiler_options=FAST_COMPILE)(q, k, v, cot)


def _inputs(case: Case, n: int):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    tq = n if case.q_len is None else case.q_len

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    q = normal(1, tq, case.heads, case.head_dim).astype(case.dtype)
    k = normal(1, n, case.kv_heads, case.head_dim).astype(case.dtype)
    v = normal(1, n, case.kv_heads, case.head_dim).astype(case.dtype)
    cot = normal(1, tq, case.heads, case.head_dim)
    seg = kv_seg = None
    if case.segments:  # two packed examples, the cut inside the image
        ids = np.ones((1, n), np.int32)
        ids[:, n - n // 3 :] = 2
        kv_seg = jnp.asarray(ids)
        seg = jnp.asarray(ids[:, n - tq :])
    return q, k, v, cot, seg, kv_seg


def _check(case: Case) -> None:
    mask = DalleMask(case.kind, case.text_len, case.grid, conv_kernel=3)
    q, k, v, cot, seg, kv_seg = _inputs(case, mask.seq_len)
    out, grads = _value_and_grads(_mha(case, mask, seg, kv_seg), q, k, v, cot)

    def ref(q, k, v):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return reference.attention(*f32, static_mask=mask, segment_ids=seg, kv_segment_ids=kv_seg)

    ref_out, ref_grads = _value_and_grads(ref, q, k, v, cot)
    tol = TOLERANCE[case.dtype]
    for name, got, want, t in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (1, 2, 2, 2)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape and np.isfinite(got).all(), name
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err <= t * tol, f"{name}: relative max error {err:.2e}"


# Default: each kind once per kernel over 16x16 tiles of 16 text + 8x8 image tokens (5 x 5 tiles:
# empty, partial and full ones), GQA, with decode rows, segment ids, padding and bfloat16 spread over them.
DEFAULT_CASES = [
    Case("row", "gpu"),
    Case("column", "gpu", q_len=40, segments=True),
    Case("conv", "gpu", block=32, dtype=jnp.bfloat16),  # 80 tokens in 32-tiles: padded keys and rows
    Case("row", "tpu", segments=True, causal=True),
    Case("conv", "tpu", q_len=24, block=8),
    Case("causal", "tpu", text_len=13, grid=5, block=16),  # 38 tokens: padded
]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.name)
def test_kernels_match_reference(case):
    _check(case)


SLOW_CASES = [
    Case(kind, kernel, text_len=t, grid=g, block=b, dtype=dtype, q_len=q_len, segments=seg, heads=4, kv_heads=kvh)
    for kernel in ("gpu", "tpu")
    for kind in KINDS
    for (t, g, b, q_len, seg, dtype, kvh) in (
        (16, 8, 16, None, False, jnp.float32, 4),
        (7, 9, 16, 50, True, jnp.bfloat16, 2),
        (32, 6, 32 if kernel == "gpu" else 24, None, True, jnp.float32, 1),
    )
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.name)
def test_kernels_match_reference_sweep(case):
    _check(case)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_empty_tiles_are_never_read(kernel):
    """Row mask, 16 text + 8x8 image, 16-tiles: query tile 4 (image rows 6-7) and key tile 1 (image
    rows 0-1) share no pair. NaN in k/v of key tile 1 must not reach query tile 4's outputs or dq;
    NaN in q/dout of query tile 4 must not reach key tile 1's dk/dv. A masked (not skipped) tile
    would spread the NaN: 0 * NaN is NaN."""
    case = Case("row", kernel)
    mask = DalleMask("row", 16, 8)
    assert mask.block_map(16, 16)[4, 1] == EMPTY
    q, k, v, cot, _, _ = _inputs(case, mask.seq_len)
    nan_kv = jnp.zeros(k.shape).at[:, 16:32].set(jnp.nan)
    nan_q = jnp.zeros(q.shape).at[:, 64:80].set(jnp.nan)
    out, (dq, dk, dv) = _value_and_grads(_mha(case, mask, None, None), q, k + nan_kv, v + nan_kv, cot)
    assert np.isfinite(np.asarray(out[:, 64:80])).all() and np.isfinite(np.asarray(dq[:, 64:80])).all()
    assert np.isnan(np.asarray(out[:, 32:48])).any()  # query tile 2 does read key tile 1
    out, (dq, dk, dv) = _value_and_grads(_mha(case, mask, None, None), q + nan_q, k, v, cot + nan_q)
    assert np.isfinite(np.asarray(dk[:, 16:32])).all() and np.isfinite(np.asarray(dv[:, 16:32])).all()
    assert np.isnan(np.asarray(dk[:, 48:64])).any()  # key tile 3 is read by query tile 4


def test_dispatcher_runs_the_kernels():
    mask = DalleMask("conv", 16, 8, conv_kernel=3)
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 80, 2, 32), np.float32)) for _ in range(3))
    want = reference.attention(q, k, v, static_mask=mask)
    assert not np.allclose(want, reference.attention(q, k, v, causal=True), atol=1e-3)  # the mask matters
    got = kernels.attention(q, k, v, static_mask=mask, impl="pallas_gpu", interpret=True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(kernels.attention(q, k, v, static_mask=mask), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_lowers_for_the_12b_layout(kernel, monkeypatch):
    """Forward and backward with the conv mask at the 12B layout (1280 tokens, head_dim 64, GQA,
    default tiles) lower for CUDA (Triton modules verified where jax allows the hook) and for TPU
    (Mosaic, with the block map as scalar prefetch), without the hardware."""
    verified: list[bool] = []
    if kernel == "gpu":
        try:
            from jax._src.pallas.triton import lowering as triton_lowering

            lower_module = triton_lowering.lower_jaxpr_to_triton_module
        except (ImportError, AttributeError):  # pragma: no cover
            verified = [True] * 3
        else:

            def lower_and_verify(*args, **kwargs):
                result = lower_module(*args, **kwargs)
                verified.append(result.module.operation.verify())
                return result

            monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    mask = DalleMask("conv", 256, 32)
    mha = pallas_gpu.mha if kernel == "gpu" else pallas_tpu.mha
    q = jax.ShapeDtypeStruct((2, 1280, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1280, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return mha(q, k, v, static_mask=mask).astype(jnp.float32).sum()

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv).lower(lowering_platforms=("cuda" if kernel == "gpu" else "tpu",)).as_text()
    if kernel == "gpu":
        assert text.count("triton") >= 3 and verified == [True, True, True]
    else:
        assert text.count("tpu_custom_call") == 3
