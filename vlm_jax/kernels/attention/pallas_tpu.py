"""Flash attention for TPU in Pallas (Mosaic): forward and backward kernels with online softmax.

`mha(q, k, v, ...)` takes the layout of `jax.nn.dot_product_attention` (q [B, Tq, H, D], k/v
[B, Tk, Hkv, D]) and matches `reference.attention` (values and gradients), with:

* grouped / multi-query KV heads (H % Hkv == 0): the dk/dv kernel sums over the query heads of a
  group in its VMEM accumulator, so no [B, Tk, H, D] intermediate is ever written;
* causal masks where the queries are the LAST Tq positions of the kv sequence (decode with a
  cache); kv blocks entirely in the future are skipped (and their DMA elided by pointing the
  index map at a block that is already resident);
* packed sequences through `segment_ids` [B, T] (and `kv_segment_ids` when Tq != Tk);
* any lengths (padded internally to the block size, the padding masked) and any head dim (padded
  to a multiple of 128 on the TPU unless it is 64 or already a multiple of 128);
* bf16 / fp32 inputs natively, fp16 computed in fp32 (TPU MXUs have no fp16 path).

Kernels (FlashAttention-2 style, all accumulation in fp32 VMEM scratch):

* forward: grid (B, H, q blocks, kv blocks); running max / sum / output in scratch, writes the
  output and the per-row logsumexp (the only softmax residual kept for the backward pass);
* dq: grid (B, H, q blocks, kv blocks), recomputes the probabilities from the logsumexp;
* dk/dv: grid (B, Hkv, kv blocks, group, q blocks), works on the transposed scores
  [block_k, block_q] so that the per-query logsumexp and `di = rowsum(o * do)` broadcast along
  sublanes without relayouts.

Internally the kernels use the [B, heads, T, D] layout (one transpose each way in XLA) so that every
block is a dense (rows, head_dim) tile. Rows with no visible key at all (possible only with segment
ids that appear in q but not in kv) give a zero output here, while the reference averages all of v.

Interpret mode (`interpret=True` or a `pltpu.InterpretParams`) runs the same kernels on CPU; there
block sizes only need to be multiples of 8, on a TPU multiples of 128.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlm_jax.kernels.attention import reference

NUM_LANES = 128
NUM_SUBLANES = 8
# Block-size candidates for the default choice, largest first; 512 suits v4/v5 at head_dim <= 256.
_DEFAULT_BLOCKS = (512, 384, 256, 128)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b

Interpret = Any  # bool or pltpu.InterpretParams


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None = None,
) -> str | None:
    """None when `mha` can compute this call, else a short reason (shapes and dtypes only)."""
    return reference.kernel_unsupported_reason(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
    )


def mha(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: Interpret = False,
) -> jax.Array:
    """Flash attention, q [B, Tq, H, D], k/v [B, Tk, Hkv, D] -> [B, Tq, H, D] (differentiable).

    Args:
      q, k, v: queries, keys, values; one of bfloat16, float16, float32, all the same.
      causal: mask out keys after each query, the queries being the last Tq kv positions.
      segment_ids: [B, Tq] integers; queries attend only to keys of the same segment.
      kv_segment_ids: [B, Tk] segment ids of the keys; defaults to `segment_ids` (needs Tq == Tk).
      sm_scale: logit scale, default head_dim ** -0.5.
      block_q, block_k: tile sizes along the q and kv sequence (forward and backward kernels).
        On a TPU multiples of 128; in interpret mode multiples of 8. Default: the largest of
        512, 384, 256, 128 (256 and less for head_dim > 256) that divides the length rounded up
        to 128.
      interpret: run the kernels in the Pallas interpreter (True, or a `pltpu.InterpretParams`).

    Raises:
      ValueError: when `unsupported_reason` gives a reason, or for bad block sizes.
    """
    reason = unsupported_reason(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
    )
    if reason is not None:
        raise ValueError(f"pallas_tpu.mha cannot do this call: {reason}")
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = float(d**-0.5 if sm_scale is None else sm_scale)
    out_dtype = q.dtype
    compute_dtype = jnp.float32 if q.dtype == jnp.float16 else q.dtype
    align = NUM_SUBLANES if interpret else NUM_LANES
    dp = _padded_head_dim(d)
    bq = _block_size(tq, block_q, align, d, "block_q")
    bk = _block_size(tk, block_k, align, d, "block_k")
    tqp, tkp = _round_up(tq, bq), _round_up(tk, bk)

    def to_kernel_layout(x: jax.Array, length: int) -> jax.Array:
        x = jnp.swapaxes(x.astype(compute_dtype), 1, 2)  # [B, heads, T, D]
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dp - d)))

    qt, kt, vt = to_kernel_layout(q, tqp), to_kernel_layout(k, tkp), to_kernel_layout(v, tkp)
    q_seg = kv_seg = None
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tqp - tq)))
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, tkp - tk)))
    cfg = _Config(
        causal=bool(causal),
        sm_scale=scale,
        block_q=bq,
        block_k=bk,
        q_len=tq,
        kv_len=tk,
        groups=h // hkv,
        interpret=interpret,
    )
    out = _flash(qt, kt, vt, q_seg, kv_seg, cfg)  # [B, H, tqp, dp]
    return jnp.swapaxes(out[:, :, :tq, :d], 1, 2).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# Shapes and configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one attention call (hashable: a nondiff argument of custom_vjp)."""

    causal: bool
    sm_scale: float
    block_q: int
    block_k: int
    q_len: int  # unpadded lengths: the causal offset and the kv padding mask need them
    kv_len: int
    groups: int  # query heads per kv head
    interpret: Interpret

    @property
    def offset(self) -> int:
        """Position of query row 0 in the kv sequence (queries are the last q_len positions)."""
        return self.kv_len - self.q_len


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _padded_head_dim(d: int) -> int:
    """Head dim the kernels run at: multiples of 128 fill the MXU, 64 is handled natively too."""
    return d if d % NUM_LANES == 0 or d == 64 else _round_up(d, NUM_LANES)


def _block_size(length: int, requested: int | None, align: int, head_dim: int, name: str) -> int:
    """Tile size along a sequence: requested (checked) or the default for this length."""
    padded = _round_up(length, align)
    if requested is not None:
        if requested <= 0 or requested % align:
            raise ValueError(f"{name}={requested} must be a positive multiple of {align}")
        return min(requested, padded)  # Never pad a short sequence up to a big block.
    candidates = [c for c in _DEFAULT_BLOCKS if head_dim <= 256 or c <= 256]
    padded = _round_up(length, NUM_LANES)
    return next((c for c in candidates if padded % c == 0), NUM_LANES)


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """[rows, 128] with equal lanes -> [rows, n] (or [rows, 1] to broadcast when n is unusual)."""
    if n % NUM_LANES == 0:
        return x if n == NUM_LANES else jnp.tile(x, (1, n // NUM_LANES))
    if n < NUM_LANES:
        return x[:, :n]
    return x[:, :1]  # Interpret mode only: TPU blocks are multiples of 128.


def _dot(a: jax.Array, b: jax.Array, dims: Any) -> jax.Array:
    """MXU matmul with fp32 accumulation (and fp32 passes for fp32 operands)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _compiler_params(semantics: tuple[str, ...]) -> Any:
    return pltpu.CompilerParams(dimension_semantics=semantics)


# Causal block tests. Rows (queries) of q block i sit at kv positions [i*bq + off, (i+1)*bq + off);
# kv block j holds positions [j*bk, (j+1)*bk). With off >= 0 every q row sees key 0.


def _block_visible(i: Any, j: Any, cfg: _Config) -> Any:
    """Some key of kv block j is visible to some query of q block i."""
    return j * cfg.block_k <= (i + 1) * cfg.block_q - 1 + cfg.offset


def _block_fully_visible(i: Any, j: Any, cfg: _Config) -> Any:
    """Every key of kv block j is visible to every query of q block i (no causal mask needed)."""
    return (j + 1) * cfg.block_k - 1 <= i * cfg.block_q + cfg.offset


def _last_visible_kv_block(i: Any, cfg: _Config, num_kv_blocks: int) -> Any:
    last = lax.div((i + 1) * cfg.block_q - 1 + cfg.offset, cfg.block_k)
    return jnp.minimum(last, num_kv_blocks - 1)


def _first_visible_q_block(j: Any, cfg: _Config, num_q_blocks: int) -> Any:
    first = lax.div(jnp.maximum(j * cfg.block_k - cfg.offset, 0), cfg.block_q)
    return jnp.minimum(first, num_q_blocks - 1)


def _mask(
    rows: tuple[Any, int],
    cols: tuple[Any, int],
    q_axis: int,
    seg_rows: jax.Array | None,
    seg_cols: jax.Array | None,
    cfg: _Config,
    kv_bound: bool,
) -> jax.Array | None:
    """Boolean [rows, cols] visibility of a score tile.

    `rows`/`cols` are (first position, count) of the tile's axes; `q_axis` says which axis holds
    queries (0 in the forward and dq kernels, 1 in the transposed dk/dv kernel). `seg_rows` is a
    [rows, *] segment-id column and `seg_cols` a [1, cols] row (or None).
    """
    shape = (rows[1], cols[1])
    q_pos = lax.broadcasted_iota(jnp.int32, shape, q_axis) + (rows, cols)[q_axis][0]
    kv_pos = lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis) + (rows, cols)[1 - q_axis][0]
    mask = None

    def conj(a: jax.Array | None, b: jax.Array) -> jax.Array:
        return b if a is None else jnp.logical_and(a, b)

    if cfg.causal:
        mask = conj(mask, kv_pos <= q_pos + cfg.offset)
    if kv_bound:
        mask = conj(mask, kv_pos < cfg.kv_len)
    if seg_rows is not None:
        mask = conj(mask, _lanes(seg_rows, cols[1]) == seg_cols)
    return mask


def _run_blocks(
    i: Any, j: Any, cfg: _Config, segments: bool, kv_bound: bool, is_last_kv: Any, step: Any
) -> None:
    """Run `step(masked)` for tile (q block i, kv block j): skip invisible causal tiles and use the
    mask-free body where no mask can apply."""
    if not (cfg.causal or segments or kv_bound):
        step(False)
        return
    visible = _block_visible(i, j, cfg) if cfg.causal else True
    if segments:
        pl.when(visible)(lambda: step(True))
        return
    needs_mask = False
    if cfg.causal:
        needs_mask = jnp.logical_not(_block_fully_visible(i, j, cfg))
    if kv_bound:
        needs_mask = jnp.logical_or(needs_mask, is_last_kv)
    pl.when(jnp.logical_and(visible, needs_mask))(lambda: step(True))
    pl.when(jnp.logical_and(visible, jnp.logical_not(needs_mask)))(lambda: step(False))


def _lanes_ids(seg: jax.Array) -> jax.Array:
    """[B, T] -> [B, T, 128]: segment ids as a column tile (equal along lanes)."""
    return jnp.broadcast_to(seg[:, :, None], (*seg.shape, NUM_LANES))


def _sublanes_ids(seg: jax.Array) -> jax.Array:
    """[B, T] -> [B, 8, T]: segment ids as a row tile (equal along sublanes)."""
    return jnp.broadcast_to(seg[:, None, :], (seg.shape[0], NUM_SUBLANES, seg.shape[1]))


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs: Any, cfg: _Config, segments: bool, kv_bound: bool) -> None:
    if segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
        qs_ref = ks_ref = None
    bq, bk, dp = cfg.block_q, cfg.block_k, q_ref.shape[-1]
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init() -> None:
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(masked: bool) -> None:
        s = _dot(q_ref[...], k_ref[...], _NT) * cfg.sm_scale  # [bq, bk]
        if masked:
            mask = _mask(
                (i * bq, bq),
                (j * bk, bk),
                0,
                None if qs_ref is None else qs_ref[...],
                None if ks_ref is None else ks_ref[:1, :],
                cfg,
                kv_bound,
            )
            s = jnp.where(mask, s, -jnp.inf)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128], equal along lanes
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # A row with every key masked so far keeps m = -inf; subtract 0 there (p = exp(-inf) = 0).
        m_sub = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        p = jnp.exp(s - _lanes(m_sub, bk))
        alpha = jnp.exp(m_prev - m_sub)  # 0 on a row's first visible tile
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        pv = _dot(p.astype(v_ref.dtype), v_ref[...], _NN)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, dp) + pv

    _run_blocks(i, j, cfg, segments, kv_bound, j == nk - 1, step)

    @pl.when(j == nk - 1)
    def _finish() -> None:
        total = l_scr[...]
        empty = total == 0.0  # no visible key: output 0, logsumexp +inf (so the backward p is 0)
        inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, total))
        o_ref[...] = (acc_scr[...] * _lanes(inv, dp)).astype(o_ref.dtype)
        lse = m_scr[...] + jnp.log(jnp.where(empty, 1.0, total))
        lse_ref[...] = jnp.where(empty, jnp.inf, lse)


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    cfg: _Config,
) -> tuple[jax.Array, jax.Array]:
    """Kernel layout q [B, H, Tqp, D], k/v [B, Hkv, Tkp, D] -> (out like q, logsumexp [B, H, Tqp])."""
    b, h, tqp, dp = q.shape
    tkp = k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    nq, nk = tqp // bq, tkp // bk
    segments = q_seg is not None
    kv_bound = tkp > cfg.kv_len and not cfg.causal  # causal already hides the padded keys

    def kv_block(i: Any, j: Any) -> Any:
        # An invisible causal tile re-uses the last visible block: no new DMA for skipped steps.
        return jnp.minimum(j, _last_visible_kv_block(i, cfg, nk)) if cfg.causal else j

    q_spec = pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, dp), lambda b_, h_, i, j: (b_, lax.div(h_, g), kv_block(i, j), 0)
    )
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if segments:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda b_, h_, i, j: (b_, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j))),
        ]
        args += [_lanes_ids(q_seg), _sublanes_ids(kv_seg)]
    out_specs = [
        pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i, j: (b_, h_, i, 0)),
        pl.BlockSpec((None, None, bq, NUM_LANES), lambda b_, h_, i, j: (b_, h_, i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, tqp, NUM_LANES), jnp.float32),
    ]
    itemsize = jnp.dtype(q.dtype).itemsize
    visible_frac = 0.5 if cfg.causal else 1.0
    cost = pl.CostEstimate(
        flops=int(4 * b * h * tqp * tkp * dp * visible_frac),
        transcendentals=int(b * h * tqp * tkp * visible_frac),
        bytes_accessed=int(itemsize * (2 * q.size + nq * (k.size + v.size)) + 4 * b * h * tqp),
    )
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, segments=segments, kv_bound=kv_bound),
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running max
            pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running sum
            pltpu.VMEM((bq, dp), jnp.float32),  # output accumulator
        ],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return out, lse[..., 0]


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------


def _dq_kernel(*refs: Any, cfg: _Config, segments: bool, kv_bound: bool) -> None:
    if segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scr = refs
    else:
        q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scr = refs
        qs_ref = ks_ref = None
    bq, bk = cfg.block_q, cfg.block_k
    i, j, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init() -> None:
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(masked: bool) -> None:
        k = k_ref[...]
        s = _dot(q_ref[...], k, _NT) * cfg.sm_scale  # [bq, bk]
        if masked:
            mask = _mask(
                (i * bq, bq),
                (j * bk, bk),
                0,
                None if qs_ref is None else qs_ref[...],
                None if ks_ref is None else ks_ref[:1, :],
                cfg,
                kv_bound,
            )
            s = jnp.where(mask, s, -jnp.inf)
        lse = lse_ref[0][:, None]  # [bq, 1]: row -> column
        di = di_ref[0][:, None]
        p = jnp.exp(s - lse)
        dp_ = _dot(do_ref[...], v_ref[...], _NT)  # [bq, bk]
        ds = p * (dp_ - di)
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN)

    _run_blocks(i, j, cfg, segments, kv_bound, j == nk - 1, step)

    @pl.when(j == nk - 1)
    def _finish() -> None:
        dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs: Any, cfg: _Config, segments: bool, kv_bound: bool) -> None:
    if segments:
        (q_ref, k_ref, v_ref, qs_ref, ks_ref, lse_ref, di_ref, do_ref,
         dk_ref, dv_ref, dk_scr, dv_scr) = refs
    else:
        q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
        qs_ref = ks_ref = None
    bq, bk = cfg.block_q, cfg.block_k
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    ng, nq = pl.num_programs(3), pl.num_programs(4)

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init() -> None:
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked: bool) -> None:
        q, do = q_ref[...], do_ref[...]
        s = _dot(k_ref[...], q, _NT) * cfg.sm_scale  # transposed scores [bk, bq]
        if masked:
            mask = _mask(
                (j * bk, bk),
                (i * bq, bq),
                1,
                None if ks_ref is None else ks_ref[...],
                None if qs_ref is None else qs_ref[:1, :],
                cfg,
                kv_bound,
            )
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])  # lse row [1, bq] broadcasts over the kv rows
        dv_scr[...] += _dot(p.astype(do.dtype), do, _NN)
        dp_ = _dot(v_ref[...], do, _NT)  # [bk, bq]
        ds = p * (dp_ - di_ref[...])
        dk_scr[...] += _dot(ds.astype(q.dtype), q, _NN)

    _run_blocks(i, j, cfg, segments, kv_bound, j == pl.num_programs(2) - 1, step)

    @pl.when(jnp.logical_and(g == ng - 1, i == nq - 1))
    def _finish() -> None:
        dk_ref[...] = (dk_scr[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    out: jax.Array, lse: jax.Array, do: jax.Array, cfg: _Config,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) in kernel layout from the forward residuals and the cotangent `do`."""
    b, h, tqp, dp = q.shape
    hkv, tkp = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    nq, nk = tqp // bq, tkp // bk
    segments = q_seg is not None
    kv_bound = tkp > cfg.kv_len and not cfg.causal
    do = do.astype(q.dtype)
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, Tqp]
    lse_rows, di_rows = lse[:, :, None, :], di[:, :, None, :]  # [B, H, 1, Tqp]
    itemsize = jnp.dtype(q.dtype).itemsize
    visible_frac = 0.5 if cfg.causal else 1.0
    tile_flops = b * h * tqp * tkp * dp * visible_frac

    # ---- dq: grid (B, H, q blocks, kv blocks), reduce over kv blocks.
    def kv_block(i: Any, j: Any) -> Any:
        return jnp.minimum(j, _last_visible_kv_block(i, cfg, nk)) if cfg.causal else j

    q_spec = pl.BlockSpec((None, None, bq, dp), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, bk, dp), lambda b_, h_, i, j: (b_, lax.div(h_, g), kv_block(i, j), 0)
    )
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec]
    args = [q, k, v]
    if segments:
        in_specs += [
            pl.BlockSpec((None, bq, NUM_LANES), lambda b_, h_, i, j: (b_, i, 0)),
            pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b_, h_, i, j: (b_, 0, kv_block(i, j))),
        ]
        args += [_lanes_ids(q_seg), _sublanes_ids(kv_seg)]
    in_specs += [row_spec, row_spec, q_spec]
    args += [lse_rows, di_rows, do]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, segments=segments, kv_bound=kv_bound),
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=int(6 * tile_flops),
            transcendentals=int(tile_flops / dp),
            bytes_accessed=int(itemsize * (3 * q.size + nq * (k.size + v.size))),
        ),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*args)

    # ---- dk/dv: grid (B, Hkv, kv blocks, group, q blocks), reduce over the group's heads and q.
    def q_block(j: Any, i: Any) -> Any:
        # Invisible causal tiles re-use the first visible q block: no new DMA for skipped steps.
        return jnp.maximum(i, _first_visible_q_block(j, cfg, nq)) if cfg.causal else i

    def q_index(b_: Any, hk: Any, j: Any, g_: Any, i: Any) -> tuple[Any, ...]:
        return (b_, hk * g + g_, q_block(j, i), 0)

    qd_spec = pl.BlockSpec((None, None, bq, dp), q_index)
    kvd_spec = pl.BlockSpec((None, None, bk, dp), lambda b_, hk, j, g_, i: (b_, hk, j, 0))
    rowd_spec = pl.BlockSpec(
        (None, None, 1, bq), lambda b_, hk, j, g_, i: (b_, hk * g + g_, 0, q_block(j, i))
    )
    in_specs = [qd_spec, kvd_spec, kvd_spec]
    args = [q, k, v]
    if segments:
        in_specs += [
            pl.BlockSpec((None, NUM_SUBLANES, bq), lambda b_, hk, j, g_, i: (b_, 0, q_block(j, i))),
            pl.BlockSpec((None, bk, NUM_LANES), lambda b_, hk, j, g_, i: (b_, j, 0)),
        ]
        args += [_sublanes_ids(q_seg), _lanes_ids(kv_seg)]
    in_specs += [rowd_spec, rowd_spec, qd_spec]
    args += [lse_rows, di_rows, do]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, segments=segments, kv_bound=kv_bound),
        grid=(b, hkv, nk, g, nq),
        in_specs=in_specs,
        out_specs=[kvd_spec, kvd_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)],
        compiler_params=_compiler_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=int(8 * tile_flops),
            transcendentals=int(tile_flops / dp),
            bytes_accessed=int(itemsize * (2 * k.size + 2 * v.size + nk * 2 * q.size)),
        ),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom_vjp plumbing (kernel layout)
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    cfg: _Config,
) -> jax.Array:
    return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
    cfg: _Config,
) -> tuple[jax.Array, tuple[Any, ...]]:
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg: _Config, res: tuple[Any, ...], do: jax.Array) -> tuple[Any, ...]:
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


__all__ = ["mha", "unsupported_reason", "NUM_LANES", "NUM_SUBLANES"]
