"""`attention(q, k, v, ...)`: layout [batch, length, heads, head_dim], as jax.nn.dot_product_attention.

Implementations (`impl=`):

* "xla": the pure-JAX reference (`reference.py`), any backend, any shape. Materialises the
  [B, H, Tq, Tk] logits.
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, CUDA GPUs only, for the calls
  `cudnn_unsupported_reason` accepts (fp16/bf16, no segment ids, aligned lengths, ...).
* "pallas_gpu": our flash-attention kernels in Pallas/Triton (`pallas_gpu.py`), forward and
  backward; everything the reference does except causal with more queries than keys.
* "pallas_tpu": our flash-attention kernels for TPU (`pallas_tpu.py`, imported lazily; reported as
  unavailable while that module does not exist).
* "auto": picked per call and backend, see `choose_impl`.

Forcing an implementation that cannot do the call raises ValueError with the reason; nothing falls
back silently. `interpret=True` runs a Pallas implementation in the Pallas interpreter on any
backend (how the tests run the kernels on CPU); the other implementations ignore it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from vlm_jax.kernels.attention import reference
from vlm_jax.kernels.attention.masks import DalleMask

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_gpu", "pallas_tpu")

# "auto" on GPU: below these lengths the [B, H, Tq, Tk] logits are small, XLA's fused softmax is as
# fast as a flash kernel and pays no padding or extra launches (decode: one query row per step).
AUTO_GPU_MIN_KV_LEN = 512
AUTO_GPU_MIN_Q_LEN = 16

# cuDNN refused sequence length 197 (ViT-B/16 + class token) on our H100. Until other lengths are
# verified, only multiples of this are sent to cuDNN; the rest go to pallas_gpu or XLA.
CUDNN_LENGTH_MULTIPLE = 64
CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _pallas_gpu() -> ModuleType:
    from vlm_jax.kernels.attention import pallas_gpu

    return pallas_gpu


def _pallas_tpu() -> tuple[ModuleType | None, str | None]:
    """(module, None), or (None, why it is unavailable)."""
    name = f"{__name__}.pallas_tpu"
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name != name:
            raise  # the module exists but one of its imports is missing: a real error
        return None, f"the pallas_tpu kernel ({name}) is not available in this checkout"


def _is_cuda(backend: str) -> bool:
    if backend != "gpu":
        return False
    try:
        return "rocm" not in jax.devices("gpu")[0].client.platform_version.lower()
    except Exception:  # best effort: assume CUDA when the version is unreadable
        return True


def _compute_capability() -> tuple[int, ...] | None:
    try:
        return tuple(int(x) for x in jax.devices("gpu")[0].compute_capability.split("."))
    except Exception:  # no GPU, or no compute_capability attribute
        return None


def cudnn_unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    backend: str | None = None,
    static_mask: DalleMask | None = None,
) -> str | None:
    """Why impl="cudnn" cannot (or must not) do this call, or None.

    The conditions are the ones we know of: cuDNN flash attention needs fp16/bf16 and a head_dim that
    is a multiple of 8 and <= 128 (256 on Hopper); jax's cuDNN causal mask is aligned top-left while
    ours puts the queries at the end of the kv sequence, so they only agree when Tq == Tk; segment
    ids are never sent to cuDNN (packed sequences go to pallas_gpu); and cuDNN refused length 197 on
    our H100, so only lengths that are multiples of CUDNN_LENGTH_MULTIPLE are sent; static
    (DALL-E) masks have no cuDNN form here.
    """
    backend = jax.default_backend() if backend is None else backend
    if not _is_cuda(backend):
        return f"cuDNN attention needs a CUDA GPU; the backend is {backend!r}"
    if static_mask is not None:
        return "static (DALL-E) masks are not sent to cuDNN: use pallas_gpu or xla"
    if segment_ids is not None or kv_segment_ids is not None:
        return "segment ids are not sent to cuDNN (packed sequences: use pallas_gpu or xla)"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return "q, k, v must be [batch, length, heads, head_dim]"
    if not all(jnp.dtype(x.dtype) == jnp.dtype(q.dtype) for x in (k, v)):
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if jnp.dtype(q.dtype) not in CUDNN_DTYPES:
        return f"cuDNN attention needs float16 or bfloat16, got {q.dtype}"
    d = q.shape[-1]
    cc = _compute_capability()
    max_d = 256 if cc is not None and cc >= (9, 0) else 128
    if d % 8 or d > max_d or k.shape[-1] != d or v.shape[-1] != d:
        return f"cuDNN needs one head_dim that is a multiple of 8 and <= {max_d}, got q {d}, k/v {k.shape[-1]}"
    if q.shape[2] % k.shape[2]:
        return f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}"
    tq, tk = q.shape[1], k.shape[1]
    if causal and tq != tk:
        return "causal with q_len != kv_len: jax's cuDNN causal mask is top-left aligned, ours bottom-right"
    if tq % CUDNN_LENGTH_MULTIPLE or tk % CUDNN_LENGTH_MULTIPLE:
        return (
            f"lengths q {tq} / kv {tk} are not multiples of {CUDNN_LENGTH_MULTIPLE} "
            "(cuDNN refused 197 on our H100; other unaligned lengths are unverified)"
        )
    return None


def unsupported_reason(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    backend: str | None = None,
    interpret: bool = False,
    static_mask: DalleMask | None = None,
) -> str | None:
    """Why `impl` (not "auto") cannot do this call on `backend` (default: jax's default), or None."""
    backend = jax.default_backend() if backend is None else backend
    if static_mask is not None and not isinstance(static_mask, DalleMask):
        return f"static_mask must be a DalleMask, got {type(static_mask).__name__}"
    if impl == "xla":
        # The reference raises its own errors for malformed inputs; a mask's lengths are checked here.
        return None if static_mask is None else static_mask.length_error(q.shape[1], k.shape[1])
    kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, static_mask=static_mask)
    if impl == "cudnn":
        return cudnn_unsupported_reason(q, k, v, backend=backend, **kw)
    if impl == "pallas_gpu":
        if backend != "gpu" and not interpret:
            return f"the Pallas GPU kernel needs a GPU (backend {backend!r}); interpret=True runs it anywhere"
        return _pallas_gpu().unsupported_reason(q, k, v, **kw)
    if impl == "pallas_tpu":
        if backend != "tpu" and not interpret:
            return f"the Pallas TPU kernel needs a TPU (backend {backend!r}); interpret=True runs it anywhere"
        module, why = _pallas_tpu()
        if module is None:
            return why
        return module.unsupported_reason(q, k, v, **kw)
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")


def choose_impl(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    backend: str | None = None,
    static_mask: DalleMask | None = None,
) -> str:
    """What impl="auto" runs for this call: the fastest implementation that is correct for it.

    * CPU (and anything that is neither GPU nor TPU): "xla"; the Pallas kernels only run there in
      the interpreter, which is for tests.
    * TPU: "pallas_tpu" when it is available and can do the call, else "xla".
    * GPU:
      - "xla" for tiny shapes (kv_len < AUTO_GPU_MIN_KV_LEN or q_len < AUTO_GPU_MIN_Q_LEN, e.g.
        77-token text, 197-token ViT, decode steps): the logits fit easily in memory and a flash
        kernel gains nothing over XLA's fusion while paying padding and extra launches;
      - "cudnn" where cuDNN can do the call (fp16/bf16, no segment ids, aligned lengths,
        causal only with Tq == Tk; see `cudnn_unsupported_reason`): cuDNN 9's Hopper flash
        attention is the faster kernel where it applies;
      - "pallas_gpu" for the other long-sequence calls (packed segment ids, float32, unaligned
        lengths, odd head dims, causal decode with Tq < Tk): memory O(T) instead of O(T^2);
      - "xla" for whatever neither kernel supports.
    A static (DALL-E) mask never goes to cuDNN; the Pallas kernels skip the tiles it empties.
    The thresholds are H100 estimates, to be revisited with the attention benchmark.
    """
    backend = jax.default_backend() if backend is None else backend
    kw = dict(
        causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, backend=backend,
        static_mask=static_mask,
    )
    if backend == "tpu":
        return "pallas_tpu" if unsupported_reason("pallas_tpu", q, k, v, **kw) is None else "xla"
    if backend != "gpu":
        return "xla"
    if k.ndim == 4 and q.ndim == 4 and (k.shape[1] < AUTO_GPU_MIN_KV_LEN or q.shape[1] < AUTO_GPU_MIN_Q_LEN):
        return "xla"
    for impl in ("cudnn", "pallas_gpu"):
        if unsupported_reason(impl, q, k, v, **kw) is None:
            return impl
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
    static_mask: DalleMask | None = None,
) -> jax.Array:
    """Multi-head attention, q [B, Tq, H, D], k/v [B, Tk, Hkv, D] (H % Hkv == 0) -> [B, Tq, H, D].

    Args:
      causal: queries are the last Tq positions of the kv sequence and see keys up to their own.
      segment_ids: [B, Tq] ints, packed sequences: a query sees only keys of its segment.
      kv_segment_ids: [B, Tk]; defaults to segment_ids (then Tq must equal Tk).
      sm_scale: logit scale, default head_dim ** -0.5.
      impl: one of IMPLEMENTATIONS; "auto" picks per call and backend (`choose_impl`).
      interpret: run a Pallas implementation in the Pallas interpreter (any backend).
      static_mask: a `DalleMask` (row / column / conv / causal DALL-E mask, `masks.py`), ANDed
        with causal and segment ids; kv_len must be its seq_len and queries are the last q_len
        positions. The Pallas kernels skip the tiles it empties (forward and backward).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
    backend = jax.default_backend()
    kw = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, static_mask=static_mask)
    if impl == "auto":
        impl = choose_impl(q, k, v, backend=backend, **kw)
    else:
        reason = unsupported_reason(impl, q, k, v, backend=backend, interpret=interpret, **kw)
        if reason is not None:
            raise ValueError(f"attention impl={impl!r} cannot do this call: {reason}")

    if impl == "xla":
        return reference.attention(q, k, v, sm_scale=sm_scale, **kw)
    if impl == "cudnn":
        assert static_mask is None  # checked by unsupported_reason / choose_impl
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn")
    if impl == "pallas_gpu":
        return _pallas_gpu().mha(q, k, v, sm_scale=sm_scale, interpret=interpret, **kw)
    module, _ = _pallas_tpu()
    assert module is not None  # checked by unsupported_reason / choose_impl
    return module.mha(q, k, v, sm_scale=sm_scale, interpret=interpret, **kw)


__all__ = [
    "DalleMask",
    "IMPLEMENTATIONS",
    "attention",
    "choose_impl",
    "cudnn_unsupported_reason",
    "unsupported_reason",
]
