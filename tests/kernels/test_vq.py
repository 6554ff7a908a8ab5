"""vq_nearest: the Pallas kernels (interpret mode on CPU) against the XLA reference; lowering for GPU/TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from vlm_jax import kernels
from vlm_jax.kernels import vq as vq_lib
from vlm_jax.kernels.vq import pallas_gpu, pallas_tpu, reference

PALLAS = ("pallas_gpu", "pallas_tpu")
# Small blocks so that small problems still span several grid steps and several codebook tiles.
SMALL_BLOCKS = {"pallas_gpu": dict(block_n=32, block_k=32), "pallas_tpu": dict(block_n=128, block_k=128)}
BENCH_SHAPES = [(65536, 256, 8192), (262144, 64, 1024)]  # (N, d, K)


@functools.cache
def _jitted(impl, interpret, block_n, block_k):
    fn = functools.partial(kernels.vq_nearest, impl=impl, interpret=interpret, block_n=block_n, block_k=block_k)
    return jax.jit(fn)


def _run(impl, x, c, *, interpret=True, **blocks):
    blocks = {**SMALL_BLOCKS.get(impl, {}), **blocks}
    return _jitted(impl, interpret, blocks.get("block_n"), blocks.get("block_k"))(x, c)


_reference = jax.jit(reference.vq_nearest)  # Compiled once per shape; eager dispatch is slow on CPU.


def _ints(rng, shape, dtype, lo=-2, hi=3):
    # Small integers: every product and sum is exact in bf16 x bf16 -> f32 and in f32, so the kernels
    # must agree with the reference bit for bit, ties (frequent at this range) included.
    return jnp.asarray(rng.integers(lo, hi, size=shape), dtype)


def _brute_force(x, c):
    """float64 numpy: (first argmin index, min squared distance)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(c, np.float64)
    dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return dist.argmin(1), dist.min(1), dist


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize(
    "n,k,d,dtype",
    [
        (77, 50, 20, jnp.float32),  # N, K below one block; d padded.
        (300, 300, 64, jnp.bfloat16),  # Several N blocks and K tiles, both with tails.
        (130, 1000, 3, jnp.float32),  # Many K tiles, tiny d; N tail of 2 rows past a block.
    ],
)
def test_exact_against_reference(impl, n, k, d, dtype):
    rng = np.random.default_rng(n * 7 + k)  # Fresh inputs per case.
    x, c = _ints(rng, (n, d), dtype), _ints(rng, (k, d), dtype)
    idx, dist = _run(impl, x, c)
    ref_idx, ref_dist = _reference(x, c)
    bf_idx, bf_dist, _ = _brute_force(x, c)
    assert idx.shape == (n,) and idx.dtype == jnp.int32
    assert dist.shape == (n,) and dist.dtype == jnp.float32
    # Every element is checked: an unwritten one holds the interpreter's poison (INT_MIN / NaN).
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(idx), bf_idx)
    np.testing.assert_array_equal(np.asarray(dist), np.asarray(ref_dist))
    np.testing.assert_array_equal(np.asarray(dist), bf_dist)


@pytest.mark.parametrize("impl,dtype", [("pallas_gpu", jnp.bfloat16), ("pallas_tpu", jnp.float32)])
def test_random_normal_close_to_reference(impl, dtype):
    rng = np.random.default_rng(11)
    n, k, d = 200, 150, 40
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    c = jnp.asarray(rng.normal(size=(k, d)), dtype)
    idx, dist = _run(impl, x, c)
    ref_idx, ref_dist = _reference(x, c)
    np.testing.assert_allclose(np.asarray(dist), np.asarray(ref_dist), rtol=1e-4, atol=1e-3)
    _, bf_dist, full = _brute_force(x.astype(jnp.float32), c.astype(jnp.float32))
    # The chosen code is (one of) the nearest: its exact distance is the minimum up to rounding.
    chosen = full[np.arange(n), np.asarray(idx)]
    np.testing.assert_allclose(chosen, bf_dist, rtol=1e-4, atol=1e-3)
    # Where the best two codes are well separated the indices must agree exactly.
    part = np.sort(full, axis=1)
    clear = (part[:, 1] - part[:, 0]) > 1e-2
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(idx)[clear], np.asarray(ref_idx)[clear])


@pytest.mark.parametrize("impl", PALLAS)
def test_ties_resolve_to_lowest_index(impl):
    rng = np.random.default_rng(5)
    d = 24
    tile = SMALL_BLOCKS[impl]["block_k"]
    k = 3 * tile + 17  # Four tiles, the last one partial.
    c = rng.integers(-3, 4, size=(k, d)).astype(np.float32)  # Integers: exact arithmetic, exact ties.
    # Duplicates inside one tile and across tiles (first copy in a later tile than 0 for some).
    groups = [
        [3, 5, tile + 1, 3 * tile + 2],
        [tile + 7, 2 * tile + 7, 3 * tile + 16],
        [2 * tile + 1, 2 * tile + 2],
        [0, k - 1],
    ]
    for g in groups:
        c[g[1:]] = c[g[0]]
    targets = [g[0] for g in groups]
    # Queries: the duplicated rows themselves (distance 0, tied), copies one unit away (tied at 1),
    # and random integer rows.
    shifted = c[targets].copy()
    shifted[:, 0] += 1
    x = np.concatenate([c[targets], shifted, rng.integers(-3, 4, size=(40, d))]).astype(np.float32)
    bf_idx, _, _ = _brute_force(x, c)
    for dtype in (jnp.float32, jnp.bfloat16):
        xj, cj = jnp.asarray(x, dtype), jnp.asarray(c, dtype)
        idx, _ = _run(impl, xj, cj)
        ref_idx, _ = _reference(xj, cj)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
        np.testing.assert_array_equal(np.asarray(idx), bf_idx)
        np.testing.assert_array_equal(np.asarray(idx)[: len(targets)], targets)


@pytest.mark.parametrize("impl", PALLAS)
def test_constant_codebook_gives_index_zero(impl):
    # Every code identical: every tile ties with the first; only strict improvements may replace it.
    x = jnp.asarray(np.random.default_rng(2).normal(size=(50, 8)), jnp.float32)
    c = jnp.ones((300, 8), jnp.float32)
    idx, dist = _run(impl, x, c)
    np.testing.assert_array_equal(np.asarray(idx), 0)
    np.testing.assert_allclose(np.asarray(dist), np.asarray(jnp.sum((x - 1.0) ** 2, axis=1)), rtol=1e-5)


def test_tpu_kernel_in_tpu_interpreter():
    """The Mosaic-specific interpreter: scratch starts as NaN (so a missing init of the running min would
    show), out-of-bounds block reads raise."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(9)
    x, c = _ints(rng, (200, 20), jnp.float32), _ints(rng, (300, 20), jnp.float32)
    params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
    idx, dist = pallas_tpu.vq_nearest(x, c, block_n=128, block_k=128, interpret=params)
    ref_idx, ref_dist = _reference(x, c)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(dist), np.asarray(ref_dist))


def test_interpreter_poisons_unwritten_outputs():
    """The exactness tests rely on this: an output element no program writes is INT_MIN / NaN."""

    def kernel(x_ref, i_ref, f_ref):
        @pl.when(pl.program_id(0) == 0)  # Only the first of two blocks is written.
        def _():
            i_ref[...] = jnp.zeros(i_ref.shape, jnp.int32)
            f_ref[...] = x_ref[...]

    out = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[pl.BlockSpec((8,), lambda i: (i,))],
        out_specs=[pl.BlockSpec((8,), lambda i: (i,)), pl.BlockSpec((8,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.float32)],
        interpret=True,
    )(jnp.zeros((16,), jnp.float32))
    ints, floats = map(np.asarray, out)
    assert (ints[:8] == 0).all() and (ints[8:] == np.iinfo(np.int32).min).all()
    assert (floats[:8] == 0).all() and np.isnan(floats[8:]).all()


def test_dispatch_and_errors(monkeypatch):
    rng = np.random.default_rng(0)
    x, c = _ints(rng, (10, 4), jnp.float32), _ints(rng, (6, 4), jnp.float32)
    # auto on CPU is the reference.
    for got, want in zip(kernels.vq_nearest(x, c), reference.vq_nearest(x, c)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="not available"):
        kernels.vq_nearest(x, c, impl="cuda")
    with pytest.raises(ValueError, match="needs a GPU"):
        kernels.vq_nearest(x, c, impl="pallas_gpu")
    with pytest.raises(ValueError, match="needs a TPU"):
        kernels.vq_nearest(x, c, impl="pallas_tpu")
    with pytest.raises(ValueError, match="feature sizes"):
        kernels.vq_nearest(x, c[:, :3])
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        kernels.vq_nearest(x[0], c)
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu.vq_nearest(x, c, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        pallas_tpu.vq_nearest(x, c, block_k=64, interpret=True)
    # auto picks the backend's kernel only when the problem is big enough.
    for backend, impl in (("gpu", "pallas_gpu"), ("tpu", "pallas_tpu"), ("cpu", "xla")):
        monkeypatch.setattr(vq_lib, "_backend", lambda b=backend: b)
        assert vq_lib._auto_impl(65536, 8192, 256) == impl
        assert vq_lib._auto_impl(64, 64, 256) == "xla"
        assert vq_lib._auto_impl(65536, 8192, 4096) == "xla"


@pytest.mark.parametrize("impl", ["xla", *PALLAS])
def test_empty_input_and_no_gradient(impl):
    c = jnp.ones((5, 4), jnp.float32)
    idx, dist = kernels.vq_nearest(jnp.zeros((0, 4)), c, impl=impl, interpret=True)
    assert idx.shape == (0,) and dist.shape == (0,)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(kernels.vq_nearest(x, c, impl="xla")[1]))(x)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_default_blocks_for_benchmark_shapes():
    a = pallas_gpu.default_config(65536, 8192, 256, jnp.bfloat16)
    assert (a["block_n"], a["block_k"], a["num_stages"], a["num_warps"]) == (128, 64, 3, 8)
    b = pallas_gpu.default_config(262144, 1024, 64, jnp.bfloat16)
    assert (b["block_n"], b["block_k"], b["num_stages"], b["num_warps"]) == (128, 128, 3, 8)
    for n, d, k in BENCH_SHAPES:
        for dtype in (jnp.bfloat16, jnp.float32):
            cfg = pallas_gpu.default_config(n, k, d, dtype)
            smem = (cfg["block_n"] + cfg["num_stages"] * cfg["block_k"]) * cfg["d_pad"] * jnp.dtype(dtype).itemsize
            assert smem <= pallas_gpu.SMEM_BUDGET_BYTES
    assert pallas_tpu.default_config(65536, 8192) == dict(block_n=512, block_k=512)
    assert pallas_tpu.default_config(100, 10) == dict(block_n=128, block_k=128)


@pytest.mark.parametrize(
    "platform,module,marker", [("cuda", pallas_gpu, "triton"), ("tpu", pallas_tpu, "tpu_custom_call")]
)
@pytest.mark.parametrize("n,d,k", BENCH_SHAPES + [(1000, 48, 333)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_device_without_hardware(platform, module, marker, n, d, k, dtype):
    """Lowering to Triton / Mosaic IR runs in Python: it catches kernel-construction errors on a CPU box.

    (Triton's PTX compilation and Mosaic's layout passes still only run on the device.)
    """
    x = jax.ShapeDtypeStruct((n, d), dtype)
    c = jax.ShapeDtypeStruct((k, d), dtype)
    text = jax.jit(module.vq_nearest).trace(x, c).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
    assert f"{n}x{k}x" not in text  # No [N, K] intermediate outside the kernel.


def _device_check(impl, dtype, n, d, k):
    backend = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}[impl]
    if jax.default_backend() != backend:
        pytest.skip(f"needs a {backend} backend")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    c = jnp.asarray(rng.normal(size=(k, d)), dtype)
    idx, dist = jax.jit(functools.partial(kernels.vq_nearest, impl=impl))(x, c)
    ref_idx, ref_dist = jax.jit(reference.vq_nearest)(x, c)
    np.testing.assert_allclose(np.asarray(dist), np.asarray(ref_dist), rtol=1e-3, atol=1e-2)
    agree = float(jnp.mean((idx == ref_idx).astype(jnp.float32)))
    assert agree > 0.999, agree  # Disagreements only on near-ties (summation order differs).
    xi, ci = _ints(rng, (n, d), dtype), _ints(rng, (k, d), dtype)
    idx, dist = jax.jit(functools.partial(kernels.vq_nearest, impl=impl))(xi, ci)
    ref_idx, ref_dist = jax.jit(reference.vq_nearest)(xi, ci)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))  # Exact, ties included.
    np.testing.assert_array_equal(np.asarray(dist), np.asarray(ref_dist))


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,k", BENCH_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_kernel_on_device(n, d, k, dtype):
    _device_check("pallas_gpu", dtype, n, d, k)


@pytest.mark.tpu
@pytest.mark.parametrize("n,d,k", BENCH_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_on_device(n, d, k, dtype):
    _device_check("pallas_tpu", dtype, n, d, k)
