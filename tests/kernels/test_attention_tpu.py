"""Pallas TPU flash attention (`vlm_jax.kernels.attention.pallas_tpu`) against the pure-JAX reference.

On CPU the kernels run in the Pallas interpreter with small blocks, so that every case spans several
q and kv blocks (and padding). The interpreter fills unallocated memory (outputs, VMEM scratch) with
NaN, checked by `test_interpreter_poisons_unwritten_output`; every kernel result is then required
to be finite, so an output element that a kernel never writes (or a scratch it never initialises)
fails the tests rather than reading as a plausible zero.

The Mosaic lowering (block-shape rules, supported ops) is checked without a TPU by lowering for
the "tpu" platform on CPU; `-m tpu` runs the kernels on a real TPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.attention import pallas_tpu, reference, tpu_common

# Max abs error relative to the reference's largest magnitude, per input dtype (the reference runs
# in float32 on the same, rounded, inputs).
TOLERANCE = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 3e-2}
# The interpreted kernels are big XLA programs: compile them without optimisation (half the time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _segments(batch: int, length: int, rng: np.random.Generator, pad: int) -> jax.Array:
    """[batch, length] packed-sequence ids 1..n, with `pad` trailing padding tokens as segment 0."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - pad), size=2, replace=False))
        ids = np.zeros(length, np.int32)
        ids[: cuts[0]] = 1
        ids[cuts[0] : cuts[1]] = 2
        ids[cuts[1] : length - pad] = 3
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def _value_and_grads(fn: Any, q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> Any:
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _run(fn: Any, *args: jax.Array) -> Any:
    """jit, compile with FAST_COMPILE on CPU, and call."""
    compiler_options = FAST_COMPILE if jax.devices()[0].platform == "cpu" else None
    return jax.jit(fn).lower(*args).compile(compiler_options=compiler_options)(*args)


def _check(
    *,
    batch: int = 1,
    q_len: int = 40,
    kv_len: int | None = None,
    heads: int = 2,
    kv_heads: int | None = None,
    head_dim: int = 64,
    dtype: Any = jnp.float32,
    causal: bool = False,
    segments: str | None = None,  # None, "self" (q and kv share ids) or "cross" (kv_segment_ids)
    sm_scale: float | None = None,
    block_q: int = 16,
    block_k: int = 16,
    block_h: int | None = None,
    block_hkv: int | None = None,
    interpret: Any = True,
    seed: int = 0,
    tolerance: float | None = None,
) -> None:
    """Kernel output and dq/dk/dv vs the reference, on fresh random inputs."""
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
    rng = np.random.default_rng(seed)
    seg = kv_seg = None
    if segments == "self":
        seg = _segments(batch, q_len, rng, pad=5)
    elif segments == "cross":
        seg = _segments(batch, q_len, rng, pad=0)
        kv_seg = _segments(batch, kv_len, rng, pad=3)

    kernel = functools.partial(
        _value_and_grads,
        functools.partial(
            pallas_tpu.mha, causal=causal, segment_ids=seg, kv_segment_ids=kv_seg,
            sm_scale=sm_scale, block_q=block_q, block_k=block_k, block_h=block_h,
            block_hkv=block_hkv, interpret=interpret,
        ),
    )
    ref = functools.partial(
        _value_and_grads,
        functools.partial(
            reference.attention, causal=causal, segment_ids=seg, kv_segment_ids=kv_seg,
            sm_scale=sm_scale,
        ),
    )
    got = _run(kernel, q, k, v, do)
    with jax.default_matmul_precision("highest"):  # On a TPU the default f32 matmul is bf16 passes.
        want = _run(ref, *(x.astype(jnp.float32) for x in (q, k, v, do)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, (name, g.shape, g.dtype)
        g = np.asarray(g.astype(jnp.float32))
        w = np.asarray(w)
        assert np.isfinite(g).all(), f"{name}: non-finite values (an unwritten or poisoned element)"
        tol = TOLERANCE[dtype] if tolerance is None else tolerance
        err = np.abs(g - w).max() / max(np.abs(w).max(), 1e-6)
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def test_interpreter_poisons_unwritten_output():
    """The harness premise: in interpret mode an output block that no grid step writes is NaN."""

    def write_first_block_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((16, 128), jnp.float32)
    out = pl.pallas_call(
        write_first_block_only,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=True,
    )(x)
    assert np.all(np.asarray(out[:8]) == 1.0)
    assert np.all(np.isnan(np.asarray(out[8:])))


def _slow(case: dict) -> Any:
    """A case that only `pytest -m slow` runs: the default suite keeps one case per feature (each of
    these combines features that other default cases cover one or two at a time)."""
    return pytest.param(case, marks=pytest.mark.slow)


@pytest.mark.parametrize(
    "case",
    [
        _slow(dict()),
        _slow(dict(batch=2, causal=True)),
        _slow(dict(batch=2, segments="self")),
        # Random order of the "parallel" grid axes: no kernel may depend on it.
        dict(causal=True, segments="self", interpret=pltpu.InterpretParams(random_seed=1)),
        _slow(dict(heads=4, kv_heads=2, causal=True)),
        dict(heads=4, kv_heads=1, segments="self", sm_scale=0.3),
        dict(q_len=24, kv_len=56, heads=4, kv_heads=2, causal=True),
        dict(q_len=24, kv_len=56, segments="cross", block_q=8, block_k=24),
        _slow(dict(q_len=37, head_dim=80)),  # odd length (padded, masked), non-power-of-two head_dim
        dict(q_len=37, head_dim=48, causal=True, block_q=32, block_k=8),
        dict(dtype=jnp.bfloat16, causal=True, heads=4, kv_heads=2),
        _slow(dict(dtype=jnp.float16, segments="self", q_len=33)),
    ],
    ids=[
        "plain", "causal", "segments", "causal_segments_shuffled", "gqa_causal", "mqa_segments",
        "causal_q_shorter", "cross_kv_segments", "odd_len_d80", "odd_causal_d48", "bf16_gqa",
        "fp16_segments",
    ],
)
def test_matches_reference(case):
    _check(**case)


@pytest.mark.parametrize(
    "case",
    [
        # Several heads per program (block_h for forward / dq, block_hkv for dk/dv), explicit small
        # blocks so that the programs still walk several q and kv blocks.
        _slow(dict(heads=4, block_h=2, block_hkv=2, causal=True)),
        dict(heads=4, block_h=4, block_hkv=4, q_len=37, segments="self"),
        dict(heads=8, kv_heads=2, block_h=2, block_hkv=2, causal=True),  # block_h < groups
        _slow(dict(heads=4, kv_heads=2, block_h=2, block_hkv=2, segments="self")),  # block_h == groups
        dict(heads=8, kv_heads=4, block_h=4, block_hkv=2, q_len=37, causal=True),  # block_h > groups
        _slow(dict(q_len=24, kv_len=56, heads=4, kv_heads=2, block_h=4, segments="cross", dtype=jnp.bfloat16)),
        # Default blocks and head blocks at short lengths: one tile per sequence, so several heads
        # per program (4 and 4; 8 and 2).
        _slow(dict(q_len=77, heads=4, causal=True, block_q=None, block_k=None)),
        dict(q_len=37, heads=8, kv_heads=2, segments="self", block_q=None, block_k=None),
    ],
    ids=[
        "h2_causal", "h4_odd_segments", "gqa_h_lt_groups", "gqa_h_eq_groups", "gqa_h_gt_groups_odd",
        "gqa_h_gt_groups_cross_bf16", "default_short_causal", "default_short_gqa_segments",
    ],
)
def test_head_blocks_match_reference(case):
    _check(**case)


def _config_of(monkeypatch: Any, *, q_len: int, heads: int, kv_heads: int, head_dim: int = 64,
               dtype: Any = jnp.bfloat16, **kwargs: Any) -> Any:
    """The `_Config` that `mha` builds for this call (traced abstractly, no kernel runs)."""
    seen = []
    flash = pallas_tpu._flash

    def spy(*args):
        seen.append(args[-1])
        return flash(*args)

    monkeypatch.setattr(pallas_tpu, "_flash", spy)
    q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, q_len, kv_heads, head_dim), dtype)
    jax.eval_shape(functools.partial(pallas_tpu.mha, **kwargs), q, kv, kv)
    return seen[-1]


@pytest.mark.parametrize(
    "case,block,block_h,block_hkv",
    [
        (dict(q_len=197, heads=12, kv_heads=12), 256, 6, 6),  # ViT-B/16: 6 heads use the 8 MiB budget
        (dict(q_len=77, heads=8, kv_heads=8, causal=True), 128, 8, 8),  # CLIP text
        (dict(q_len=77, heads=8, kv_heads=2), 128, 8, 2),  # GQA: block_h spans kv heads
        (dict(q_len=77, heads=12, kv_heads=4), 128, 6, 4),  # 6: two whole groups of 3 query heads
        (dict(q_len=257, heads=16, kv_heads=16), 384, 2, 4),  # ViT-L/14: the VMEM budget decides
        (dict(q_len=1024, heads=8, kv_heads=8), 512, 1, 1),  # long: several tiles, one head
        (dict(q_len=197, heads=12, kv_heads=12, block_q=128), 256, 1, 1),  # two q tiles
    ],
    ids=["vit_b", "clip_text", "gqa", "gqa_groups_3", "vit_l_budget", "long", "two_tiles"],
)
def test_default_head_blocks(monkeypatch, case, block, block_h, block_hkv):
    cfg = _config_of(monkeypatch, **case)
    assert (cfg.block_k, cfg.block_h, cfg.block_hkv) == (block, block_h, block_hkv)


def test_head_blocks_rejected():
    q = jnp.zeros((1, 16, 6, 64), jnp.float32)
    kv = jnp.zeros((1, 16, 2, 64), jnp.float32)
    mha = functools.partial(pallas_tpu.mha, interpret=True)
    with pytest.raises(ValueError, match="block_h=4 must divide the 6 query heads"):
        mha(q, q, q, block_h=4)
    with pytest.raises(ValueError, match="block_h=0"):
        mha(q, q, q, block_h=0)
    with pytest.raises(ValueError, match="block_h=2 .* multiple of the 3 query heads per kv head"):
        mha(q, kv, kv, block_h=2)  # divides the 6 heads but would straddle two kv heads
    with pytest.raises(ValueError, match="block_hkv=4 must divide the 2 kv heads"):
        mha(q, kv, kv, block_hkv=4)
    out = jax.eval_shape(functools.partial(mha, block_h=6, block_hkv=2), q, kv, kv)  # 2 kv heads
    assert out.shape == q.shape


def test_row_without_visible_key_is_zero():
    """A query whose segment has no key gets output 0 (the reference averages v) and finite grads."""
    q = jax.random.normal(jax.random.key(0), (1, 16, 1, 64))
    kv = jax.random.normal(jax.random.key(1), (1, 24, 1, 64))
    seg = jnp.asarray([[1] * 8 + [7] * 8], jnp.int32)
    kv_seg = jnp.asarray([[1] * 24], jnp.int32)
    f = functools.partial(
        pallas_tpu.mha, segment_ids=seg, kv_segment_ids=kv_seg, block_q=8, block_k=8, interpret=True
    )
    out, *grads = _run(functools.partial(_value_and_grads, f), q, kv, kv, jnp.ones_like(q))
    assert np.all(np.asarray(out[:, 8:]) == 0.0)
    want = reference.attention(q[:, :8], kv, kv, segment_ids=seg[:, :8], kv_segment_ids=kv_seg)
    np.testing.assert_allclose(out[:, :8], want, atol=2e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("q_len,kv_len", [(40, 40), (24, 56), (37, 37), (128, 1000)])
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (8, 24), (32, 8)])
def test_causal_block_skipping(q_len, kv_len, block_q, block_k):
    """The block predicates agree with the element mask: skip iff nothing visible, mask-free iff all
    visible, and the DMA-eliding index clamps land on the last/first visible block."""
    cfg = pallas_tpu._Config(
        causal=True, sm_scale=1.0, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len,
        groups=1, interpret=True,
    )
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    rows = np.arange(nq * block_q)[:, None] + (kv_len - q_len)
    cols = np.arange(nk * block_k)[None, :]
    visible = cols <= rows
    for i in range(nq):
        tiles = [visible[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k] for j in range(nk)]
        for j, tile in enumerate(tiles):
            assert bool(tpu_common._block_visible(i, j, cfg)) == tile.any(), (i, j)
            assert bool(tpu_common._block_fully_visible(i, j, cfg)) == tile.all(), (i, j)
        last = max(j for j, tile in enumerate(tiles) if tile.any())
        assert int(tpu_common._last_visible_kv_block(i, cfg, nk)) == last
    for j in range(nk):
        first = min(
            i for i in range(nq)
            if visible[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
        )
        assert int(tpu_common._first_visible_q_block(j, cfg, nq)) == first


def test_unsupported_reason():
    q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((2, 32, 2, 64), jnp.bfloat16)
    seg = jnp.zeros((2, 16), jnp.int32)
    reason = pallas_tpu.unsupported_reason
    assert reason(q, kv, kv, causal=True, segment_ids=None) is None
    assert reason(q, kv, kv, causal=False, segment_ids=seg, kv_segment_ids=jnp.zeros((2, 32), jnp.int32)) is None
    assert "kv_segment_ids" in reason(q, kv, kv, causal=False, segment_ids=seg)
    assert "q_len" in reason(kv.repeat(2, 2), q[:, :8], q[:, :8], causal=True, segment_ids=None)
    assert "multiple" in reason(q, kv[:, :, :1].repeat(3, 2), kv[:, :, :1].repeat(3, 2), causal=False, segment_ids=None)
    assert "dtype" in reason(q, kv.astype(jnp.float32), kv, causal=False, segment_ids=None)
    assert "dtype" in reason(*(x.astype(jnp.int8) for x in (q, kv, kv)), causal=False, segment_ids=None)
    assert "[batch, q_len]" in reason(q, kv, kv, causal=False, segment_ids=seg[:, :8])
    with pytest.raises(ValueError, match="cannot do"):
        pallas_tpu.mha(kv.repeat(2, 2), q[:, :8], q[:, :8], causal=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        pallas_tpu.mha(q, kv, kv, block_q=64)  # On the TPU (not interpret) blocks need 128 lanes.


def _lower_for_tpu(
    *, causal: bool, segments: str | None = None, batch: int = 2, q_len: int = 1024, kv_len: int = 1024,
    heads: int = 8, kv_heads: int = 8, head_dim: int = 128, dtype: Any = jnp.bfloat16, grad: bool,
) -> str:
    """StableHLO text of the jitted call (forward, or value and grads) lowered for the TPU platform."""
    q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((batch, q_len), jnp.int32)
    kv_seg = jax.ShapeDtypeStruct((batch, kv_len), jnp.int32)

    def loss(q, k, v, seg, kv_seg):
        out = pallas_tpu.mha(
            q, k, v, causal=causal, segment_ids=seg if segments else None,
            kv_segment_ids=kv_seg if segments == "cross" else None,
        )
        return out.astype(jnp.float32).sum()

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2)) if grad else loss
    return jax.jit(fn).trace(q, kv, kv, seg, kv_seg).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize(
    "case",
    [
        dict(causal=False),
        dict(causal=True),
        dict(causal=True, segments="self", kv_heads=2),
        dict(causal=False, segments="self", kv_heads=1),
        # Odd lengths (padded to the 128-multiple blocks), padded head_dim, fp16 computed in fp32.
        dict(causal=True, segments="cross", q_len=300, kv_len=777, kv_heads=2, head_dim=80, dtype=jnp.float16),
        dict(causal=False, q_len=77, heads=4, kv_heads=4, head_dim=64, dtype=jnp.float32),
        # Short sequences, one tile each: several heads per program (ViT-B/16: block_h 4; CLIP
        # text: 8; GQA: a block of query heads spanning two kv heads).
        dict(causal=False, q_len=197, kv_len=197, heads=12, kv_heads=12, head_dim=64),
        dict(causal=True, q_len=77, kv_len=77, heads=8, kv_heads=8, head_dim=64),
        dict(causal=True, segments="self", q_len=77, kv_len=77, heads=8, kv_heads=2, head_dim=64),
    ],
    ids=[
        "plain", "causal", "causal_segments_gqa", "segments_mqa", "odd_cross_d80_fp16", "short_d64_fp32",
        "vit_b16", "clip_text", "short_gqa_segments",
    ],
)
def test_lowers_for_tpu(case):
    """Mosaic lowering of forward and backward, default blocks, realistic shapes (B2 S1024 H8 D128
    bf16), no TPU needed: catches block shapes Mosaic rejects and ops it cannot lower (not its
    layout passes, which run in libtpu at compile time)."""
    assert _lower_for_tpu(**case, grad=False).count("tpu_custom_call") == 1
    assert _lower_for_tpu(**case, grad=True).count("tpu_custom_call") == 3


@pytest.mark.tpu
@pytest.mark.parametrize(
    "case",
    [
        dict(batch=2, q_len=1024, heads=8, head_dim=128, dtype=jnp.bfloat16),
        dict(batch=2, q_len=1024, heads=8, kv_heads=2, head_dim=128, dtype=jnp.bfloat16, causal=True),
        dict(batch=2, q_len=1000, heads=8, head_dim=64, dtype=jnp.bfloat16, causal=True, segments="self"),
        dict(batch=1, q_len=333, kv_len=777, heads=4, kv_heads=1, head_dim=80, causal=True, tolerance=1e-4),
        dict(batch=1, q_len=512, heads=4, head_dim=128, dtype=jnp.float16, segments="self"),
        # Short sequences: several heads per program by default (ViT-B/16; CLIP text, causal, GQA).
        dict(batch=4, q_len=197, heads=12, head_dim=64, dtype=jnp.bfloat16),
        dict(batch=4, q_len=77, heads=8, kv_heads=2, head_dim=64, dtype=jnp.bfloat16, causal=True),
    ],
)
def test_on_tpu(case):
    """The compiled kernels on a real TPU (default blocks) against the reference."""
    if jax.devices()[0].platform != "tpu":
        pytest.skip("needs a TPU")
    _check(block_q=None, block_k=None, interpret=False, **case)
