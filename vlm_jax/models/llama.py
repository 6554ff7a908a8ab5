"""LLaMA 1/2/3 decoder (Touvron et al. 2023; Meta 2024): token embedding, pre-norm RMSNorm blocks
with rotary grouped-query attention and a SwiGLU MLP, a final RMSNorm and an output head (untied,
or tied to the embedding).

Param tree: embed/embedding [V, E]; layers_i (or layers, scanned with a leading [depth] axis) with
attn_norm/scale [E], attn/{query [E, H, D], key [E, Hkv, D], value [E, Hkv, D], out [H, D, E]},
mlp_norm/scale [E], mlp/{gate [E, F], up [E, F], down [F, E]}; final_norm/scale [E];
lm_head/kernel [E, V] (untied only).

Decoding: `decode=True` keeps a KV cache in the flax "cache" collection, per layer
attn/{cached_key, cached_value [B, max_len, Hkv, D], cached_segment [B, max_len], cache_index []}.
Each call appends its T tokens (a whole prompt for prefill, or one token per step) and attends
over the cache; segment_ids under decode mark padding (0: never attended; see vlm_jax.sampling):

    cache = init_cache(model, batch_size)
    logits, vars = model.apply({"params": p, "cache": cache}, prompt, decode=True, mutable=["cache"])
    logits, vars = model.apply({"params": p, "cache": vars["cache"]}, next_tok, decode=True, ...)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import kernels
from vlm_jax.layers.embeddings import rope, token_embedding
from vlm_jax.layers.linear import DenseGeneral
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.transformer import REMAT_POLICIES

_ACT_AXES = ("batch", "length", "embed")
PROJECTIONS = ("query", "key", "value", "out", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the named projections (rank 0: none); see layers.linear.DenseGeneral."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        unknown = set(self.targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"lora targets {sorted(unknown)} are not projections of {PROJECTIONS}")

    def dense_kwargs(self, name: str) -> dict:
        """DenseGeneral's lora_rank / lora_alpha for the projection `name`."""
        if self.rank > 0 and name in self.targets:
            return dict(lora_rank=self.rank, lora_alpha=self.alpha)
        return {}


def _cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: jax.Array,
    q_segment: jax.Array | None = None,
    kv_segment: jax.Array | None = None,
) -> jax.Array:
    """q [B, T, H, D] at cache slots index..index+T-1 over k/v [B, S, Hkv, D] -> [B, T, H, D].

    Query i sees cache slots j <= index + i (the earlier tokens and its own); slots past the
    ones written so far are masked. With q_segment int [B, T] and kv_segment int [B, S] (the
    segment ids cached per slot) a query also sees only the slots of its own segment, so the
    padding slots of a left-padded batch (segment 0) are never attended by real tokens. The
    mask depends on a traced index, which the kernels' static causal mask cannot express, so
    this small einsum does it (decode is memory-bound).
    """
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    mask = (jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None])[None]  # [1, T, S]
    if q_segment is not None:
        mask = mask & (q_segment[:, :, None] == kv_segment[:, None, :])  # [B, T, S]
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", weights, v).reshape(b, t, h, d)


class Attention(nn.Module):
    """Rotary grouped-query causal self-attention: [B, T, E] -> [B, T, E], no biases."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int
    rope_theta: float = 10000.0
    decode: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"
    lora: LoraSpec = LoraSpec()

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None
    ) -> jax.Array:
        """x [B, T, E], positions int [B, T] (None: 0..T-1, or after the cache), segment_ids [B, T]."""
        b, t, width = x.shape

        def project(name: str, heads: int, axes: tuple[str, str, str]) -> jax.Array:
            y = DenseGeneral(
                (heads, self.head_dim), (-1,), axes, use_bias=False, dtype=self.dtype, name=name,
                **self.lora.dense_kwargs(name),
            )(x)
            return nn.with_logical_constraint(y, ("batch", "length", axes[1], "kv"))

        q = project("query", self.num_heads, ("embed", "heads", "kv"))
        k = project("key", self.num_kv_heads, ("embed", "kv_heads", "kv"))
        v = project("value", self.num_kv_heads, ("embed", "kv_heads", "kv"))

        if self.decode:
            # segment_ids [B, T] here mark padding: each token's id (None: all 1) is cached with
            # its k/v, and a token attends only to the cached slots of its own id. A batch of
            # prompts left-padded with id 0 then never attends its padding (vlm_jax.sampling).
            shape = (b, self.max_len, self.num_kv_heads, self.head_dim)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
            cs = self.variable("cache", "cached_segment", jnp.zeros, (b, self.max_len), jnp.int32)
            ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            index = ci.value
            if positions is None:
                positions = (index + jnp.arange(t))[None]
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
            if self.is_initializing():
                # init(decode=True) only creates the (empty) cache; nothing is written to it.
                y = kernels.attention(q, k, v, causal=True, impl=self.impl)
            else:
                zero = jnp.zeros((), jnp.int32)
                # The cache is laid out like the activations: rows over the batch axes, kv heads
                # over `tensor` (where the rules say so).
                cache_axes = ("batch", "length", "kv_heads", "kv")
                ck.value = nn.with_logical_constraint(
                    jax.lax.dynamic_update_slice(ck.value, k.astype(self.dtype), (zero, index, zero, zero)), cache_axes
                )
                cv.value = nn.with_logical_constraint(
                    jax.lax.dynamic_update_slice(cv.value, v.astype(self.dtype), (zero, index, zero, zero)), cache_axes
                )
                seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
                cs.value = jax.lax.dynamic_update_slice(cs.value, seg, (zero, index))
                ci.value = index + t
                y = _cached_attention(q, ck.value, cv.value, index, seg, cs.value)
        else:
            if positions is None:
                positions = jnp.arange(t)[None]
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
            y = kernels.attention(q, k, v, causal=True, segment_ids=segment_ids, impl=self.impl)
        return DenseGeneral(
            (width,), (-2, -1), ("heads", "kv", "embed"), use_bias=False, dtype=self.dtype, name="out",
            **self.lora.dense_kwargs("out"),
        )(y.astype(self.dtype))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): [B, T, E] -> [B, T, E], no biases."""

    mlp_dim: int
    dtype: Any = jnp.float32
    lora: LoraSpec = LoraSpec()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> [B, T, E]."""
        width = x.shape[-1]
        dense = lambda f, axes, name: DenseGeneral(  # noqa: E731
            (f,), (-1,), axes, use_bias=False, dtype=self.dtype, name=name, **self.lora.dense_kwargs(name)
        )
        h = nn.silu(dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)) * dense(
            self.mlp_dim, ("embed", "mlp"), "up"
        )(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(width, ("mlp", "embed"), "down")(h)


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): [B, T, E] -> [B, T, E]."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    decode: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"
    lora: LoraSpec = LoraSpec()
    # Under nn.scan the body maps (carry, *broadcast) -> (carry, None).
    scanned: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None
    ) -> jax.Array | tuple[jax.Array, None]:
        """x [B, T, E] -> [B, T, E] (or (x, None) when scanned)."""
        x = nn.with_logical_constraint(x, _ACT_AXES)
        y = RMSNorm(self.norm_eps, self.dtype, name="attn_norm")(x)
        x = x + Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.max_len,
            self.rope_theta,
            self.decode,
            self.dtype,
            self.impl,
            self.lora,
            name="attn",
        )(y, positions, segment_ids)
        y = RMSNorm(self.norm_eps, self.dtype, name="mlp_norm")(x)
        x = x + SwiGLU(self.mlp_dim, self.dtype, self.lora, name="mlp")(y)
        x = nn.with_logical_constraint(x, _ACT_AXES)
        return (x, None) if self.scanned else x


class Llama(nn.Module):
    """tokens int [B, T] -> logits float32 [B, T, vocab]."""

    vocab_size: int = 32000
    width: int = 4096
    depth: int = 32
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 0  # 0: width // heads
    mlp_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_len: int = 4096
    tie_embeddings: bool = False
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots
    attn_impl: str = "auto"
    lora: LoraSpec = LoraSpec()

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        train: bool = False,
    ) -> jax.Array:
        """tokens [B, T], positions [B, T] (None: 0..T-1, or after the cache), segment_ids [B, T]
        (packed rows: pass positions restarting per segment; under decode: 0 marks padding, which
        is cached and never attended) -> logits float32 [B, T, vocab].

        `train` is accepted for the trainer's common interface; LLaMA has no dropout.
        """
        del train
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        head_dim = self.head_dim or self.width // self.heads
        embed = token_embedding(self.vocab_size, self.width, dtype=self.dtype, name="embed")
        x = embed(tokens)

        block = DecoderBlock
        if self.remat != "none":
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"remat {self.remat!r}: choose none, {', '.join(REMAT_POLICIES)}")
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        kwargs = dict(
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=head_dim,
            mlp_dim=self.mlp_dim,
            max_len=self.max_len,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            decode=decode,
            dtype=self.dtype,
            impl=self.attn_impl,
            lora=self.lora,
        )
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**kwargs, scanned=True, name="layers")(x, positions, segment_ids)
        else:
            for i in range(self.depth):
                x = block(**kwargs, name=f"layers_{i}")(x, positions, segment_ids)

        x = RMSNorm(self.norm_eps, self.dtype, name="final_norm")(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(
                (self.vocab_size,), (-1,), ("embed", "vocab"), use_bias=False, dtype=self.dtype, name="lm_head"
            )(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


def init_cache(model: Llama, batch_size: int) -> Any:
    """An empty KV cache (the "cache" collection) for `batch_size` rows of up to model.max_len tokens."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), decode=True)["cache"]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def from_config(cfg: ml_collections.ConfigDict, **overrides: Any) -> Llama:
    """Llama from a model section (configs/llama.py's model); `overrides` win over its keys."""
    get = lambda key, default: overrides.get(key, cfg.get(key, default))  # noqa: E731
    return Llama(
        vocab_size=get("vocab_size", 32000),
        width=get("width", 4096),
        depth=get("depth", 32),
        heads=get("heads", 32),
        kv_heads=get("kv_heads", get("heads", 32)),
        head_dim=get("head_dim", 0),
        mlp_dim=get("mlp_dim", 11008),
        norm_eps=get("norm_eps", 1e-5),
        rope_theta=float(get("rope_theta", 10000.0)),
        max_len=get("max_len", 4096),
        tie_embeddings=get("tie_embeddings", False),
        dtype=jnp.dtype(get("dtype", "float32")),
        scan_layers=get("scan_layers", False),
        remat=get("remat", "none"),
        attn_impl=get("attn_impl", "auto"),
        lora=_lora_spec(get("lora", None)),
    )


def _lora_spec(cfg: Any) -> LoraSpec:
    """LoraSpec from a model.lora section {rank, alpha, targets} (None or rank 0: no adapters)."""
    if not cfg or not cfg.get("rank", 0):
        return LoraSpec()
    targets = cfg.get("targets", LoraSpec.targets)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return LoraSpec(int(cfg["rank"]), float(cfg.get("alpha", 16.0)), tuple(targets))
