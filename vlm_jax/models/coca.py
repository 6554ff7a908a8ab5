"""CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

A ViT image encoder (vlm_jax.models.vit, no class token) whose tokens feed two attentional
poolers: a contrastive pooler (1 learned query) giving the image embedding, and a captioning
pooler (N learned queries) giving the tokens the text decoder cross-attends to. The text decoder
is split in two: unimodal layers (causal self-attention only) over the tokens plus a learned
[CLS] token appended at the end of the sequence, whose output is the text embedding; then
multimodal layers (causal self-attention + cross-attention to the captioning tokens) over the
token positions, ending in a next-token head. A learned log temperature scales the contrastive
logits (clipped like CLIP's). The losses live in tasks/coca.py.

Padding (pad_id, right-padded rows): real tokens never attend to it (causal mask), and the [CLS]
token attends to the real tokens only (segment ids: pad 0, real and [CLS] 1).

open_clip's CoCa (open_clip.CoCa, "the original OpenCLIP CoCa setup, does not match paper"; the
converter is vlm_jax.convert.open_clip_coca) is two options away, each "paper" by default:
- pooling="open_clip" (model.pooling): the ViT keeps its class token and has no norm before
  pooling (open_clip's ln_pre and bias-free patch conv are image.pre_norm=True and
  image.patch_bias=False, which the converter sets); ONE pooler `pooler` of 1 + caption_queries
  queries of width embed_dim, with layer-normed queries (ln_queries) and context (ln_context), then
  ln_out (open_clip's ln_post): its first output, through image_projection [E, E], is the image
  embedding, the others are the captioning tokens.
- text_layout="open_clip" (model.text.layout): a multimodal layer is a whole self-attention block (ln1, attn, ln2, mlp)
  then a whole cross-attention block (ln_cross; ln_context on the image tokens; cross_attn;
  ln_cross_mlp, cross_mlp); lm_head has no bias; the multimodal layers are causal only (no padding
  mask: only the padding positions' logits see it); and the unimodal layers use open_clip's
  (legacy) [CLS]/padding mask: every query sees key 0 and key j + 1 iff token j is not pad_id,
  within the causal mask, so a padded row's [CLS] sees the tokens and the first padding position
  but not itself (TextTransformer.correct_cls_mask False, which open_clip's CoCa always builds).

Param tree: image/... (ViT), contrastive_pooler/{queries [1, Ei], ln_context, attn, ln_out},
caption_pooler/{queries [N, Et], ln_context, attn, ln_out}, image_projection/kernel [Ei, E],
token_embedding/embedding [V, Et], text_pos_embedding [context_length + 1, Et], cls_token [Et],
unimodal/layers_i (or unimodal/layers, scanned) with ln1, attn/{query,key,value,out}, ln2,
mlp/{fc1,fc2}; ln_cls, text_projection/kernel [Et, E]; multimodal/layers_i (or layers) with
the same plus ln_cross, cross_attn/{query,key,value,out}; ln_final, lm_head/{kernel,bias};
logit_scale [].
pooling="open_clip": pooler/{queries [1 + N, E], ln_queries, ln_context, attn, ln_out} replaces
the two poolers, image_projection/kernel [E, E]. text_layout="open_clip": multimodal layers have
ln1, attn, ln2, mlp, ln_cross, ln_context, cross_attn, ln_cross_mlp, cross_mlp; lm_head/kernel only.

Decoding: `model.make_decoder()` is the vlm_jax.sampling.decode `Decoder` of the captioner:
its cache holds the captioning pooler's tokens of the context images (computed once in
init_cache) and a KV cache per text layer's self-attention ("cache" collection of the model
cloned with decode=True: attn/{cached_key, cached_value [B, max_len, H, D], cached_segment
[B, max_len], cache_index []}); invalid (padding) slots are cached with segment 0 and never
attended, as in vlm_jax.models.llama.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax import kernels
from vlm_jax.layers.attention import MultiHeadAttention
from vlm_jax.layers.embeddings import token_embedding
from vlm_jax.layers.linear import DenseGeneral, dense
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import REMAT_POLICIES, mlp_dim_from
from vlm_jax.models import vit
from vlm_jax.models.clip import l2_normalize
from vlm_jax.models.llama import _cached_attention

_ACT_AXES = ("batch", "length", "embed")


class AttentionalPooler(nn.Module):
    """`num_queries` learned queries attend to tokens: [B, N, Ein] -> [B, num_queries, width]."""

    num_queries: int
    width: int
    num_heads: int
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    impl: str = "auto"
    query_norm: bool = False  # ln_queries on the learned queries (open_clip's ln_q)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, N, Ein] -> [B, num_queries, width] (layer-normed)."""
        queries = self.param(
            "queries",
            nn.with_logical_partitioning(nn.initializers.normal(self.width**-0.5), ("length", "embed")),
            (self.num_queries, self.width),
            jnp.float32,
        )
        queries = queries.astype(self.dtype)
        if self.query_norm:
            queries = LayerNorm(self.ln_eps, self.dtype, name="ln_queries")(queries)
        q = jnp.broadcast_to(queries, (x.shape[0],) + queries.shape)
        kv = LayerNorm(self.ln_eps, self.dtype, name="ln_context")(x)
        y = MultiHeadAttention(self.num_heads, dtype=self.dtype, impl=self.impl, name="attn")(q, kv)
        return LayerNorm(self.ln_eps, self.dtype, name="ln_out")(y)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with segment ids and an optional KV cache: [B, T, E] -> [B, T, E].

    Params as layers.attention.MultiHeadAttention: query/key/value [E, H, D] (+ bias), out.
    Not decoding: segment_ids [B, T] restrict each query to keys of its own segment (the keys'
    segments are kv_segment_ids [B, T] where given, else segment_ids). Decoding:
    each call appends its T tokens to the cache with their segment ids (0: padding) and attends
    over the slots written so far of its own segment (vlm_jax.models.llama's scheme).
    """

    num_heads: int
    max_len: int
    qkv_bias: bool = True
    decode: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None = None
    ) -> jax.Array:
        b, t, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads

        def project(name: str) -> jax.Array:
            y = DenseGeneral(
                (self.num_heads, head_dim), (-1,), ("embed", "heads", "kv"),
                use_bias=self.qkv_bias, dtype=self.dtype, name=name,
            )(x)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        q, k, v = project("query"), project("key"), project("value")
        if self.decode:
            shape = (b, self.max_len, self.num_heads, head_dim)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
            cs = self.variable("cache", "cached_segment", jnp.zeros, (b, self.max_len), jnp.int32)
            ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if self.is_initializing():
                # init(decode=True) only creates the (empty) cache.
                y = kernels.attention(q, k, v, causal=True, impl=self.impl)
            else:
                index, zero = ci.value, jnp.zeros((), jnp.int32)
                cache_axes = ("batch", "length", "heads", "kv")
                ck.value = nn.with_logical_constraint(
                    jax.lax.dynamic_update_slice(ck.value, k.astype(self.dtype), (zero, index, zero, zero)),
                    cache_axes,
                )
                cv.value = nn.with_logical_constraint(
                    jax.lax.dynamic_update_slice(cv.value, v.astype(self.dtype), (zero, index, zero, zero)),
                    cache_axes,
                )
                seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
                cs.value = jax.lax.dynamic_update_slice(cs.value, seg, (zero, index))
                ci.value = index + t
                y = _cached_attention(q, ck.value, cv.value, index, seg, cs.value)
        else:
            y = kernels.attention(
                q, k, v, causal=True, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, impl=self.impl
            )
        return DenseGeneral(
            (width,), (-2, -1), ("heads", "kv", "embed"), use_bias=True, dtype=self.dtype, name="out"
        )(y.astype(self.dtype))


TEXT_LAYOUTS = ("paper", "open_clip")
POOLINGS = ("paper", "open_clip")


class TextBlock(nn.Module):
    """x + attn(ln1(x)) [+ cross_attn(ln_cross(x), context)], then x + mlp(ln2(x)).

    layout "open_clip" (cross only): x + attn(ln1(x)), x + mlp(ln2(x)), then
    x + cross_attn(ln_cross(x), ln_context(context)), x + cross_mlp(ln_cross_mlp(x)).
    """

    num_heads: int
    mlp_dim: int
    max_len: int
    cross: bool = False
    act: str = "gelu"
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    decode: bool = False
    dtype: Any = jnp.float32
    impl: str = "auto"
    layout: str = "paper"
    scanned: bool = False  # under nn.scan the body maps (carry, *broadcast) -> (carry, None)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None,
        context: jax.Array | None,
        kv_segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, None]:
        """x [B, T, E], segment_ids int [B, T] (kv_segment_ids [B, T]: the keys', when they differ),
        context [B, N, Ec] (cross only) -> [B, T, E]."""
        x = nn.with_logical_constraint(x, _ACT_AXES)
        y = LayerNorm(self.ln_eps, self.dtype, name="ln1")(x)
        x = x + CausalSelfAttention(
            self.num_heads, self.max_len, self.qkv_bias, self.decode, self.dtype, self.impl, name="attn"
        )(y, segment_ids, kv_segment_ids)
        open_clip = self.cross and self.layout == "open_clip"
        if open_clip:
            y = LayerNorm(self.ln_eps, self.dtype, name="ln2")(x)
            x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
        if self.cross:
            y = LayerNorm(self.ln_eps, self.dtype, name="ln_cross")(x)
            context = context.astype(self.dtype)
            if open_clip:
                context = LayerNorm(self.ln_eps, self.dtype, name="ln_context")(context)
            x = x + MultiHeadAttention(
                self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, impl=self.impl, name="cross_attn"
            )(y, context)
        if open_clip:
            y = LayerNorm(self.ln_eps, self.dtype, name="ln_cross_mlp")(x)
            x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="cross_mlp")(y)
        else:
            y = LayerNorm(self.ln_eps, self.dtype, name="ln2")(x)
            x = x + Mlp(self.mlp_dim, self.act, self.dtype, name="mlp")(y)
        x = nn.with_logical_constraint(x, _ACT_AXES)
        return (x, None) if self.scanned else x


class TextStack(nn.Module):
    """`depth` TextBlocks (python loop or nn.scan, optional remat); no final norm."""

    depth: int
    num_heads: int
    mlp_dim: int
    max_len: int
    cross: bool = False
    act: str = "gelu"
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    decode: bool = False
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    impl: str = "auto"
    layout: str = "paper"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None,
        context: jax.Array | None = None,
        kv_segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        block = TextBlock
        if self.remat != "none":
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"remat {self.remat!r}: choose none, {', '.join(REMAT_POLICIES)}")
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        kwargs = dict(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, max_len=self.max_len, cross=self.cross,
            act=self.act, ln_eps=self.ln_eps, qkv_bias=self.qkv_bias, decode=self.decode,
            dtype=self.dtype, impl=self.impl, layout=self.layout,
        )
        if self.scan_layers:
            stack = nn.scan(
                block,
                # intermediates: what capture_intermediates records per layer (attention maps).
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = stack(**kwargs, scanned=True, name="layers")(x, segment_ids, context, kv_segment_ids)
            return x
        for i in range(self.depth):
            x = block(**kwargs, name=f"layers_{i}")(x, segment_ids, context, kv_segment_ids)
        return x


class CoCa(nn.Module):
    """(images [B, H, W, C], tokens int [B, L]) -> embeddings, temperature, caption logits."""

    image: nn.Module  # a vit.ViT without head (its encode gives the tokens); class token: open_clip pooling
    embed_dim: int = 512
    vocab_size: int = 64000
    context_length: int = 64
    text_width: int = 768
    unimodal_depth: int = 12
    multimodal_depth: int = 12
    text_heads: int = 12
    text_mlp_dim: int = 3072
    text_act: str = "gelu"
    text_ln_eps: float = 1e-6
    pad_id: int = 0
    caption_queries: int = 256
    pooler_heads: int = 12
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    attn_impl: str = "auto"
    decode: bool = False  # the captioner's KV cache (make_decoder clones the model with True)
    pooling: str = "paper"  # paper | open_clip (see the module docstring)
    text_layout: str = "paper"  # paper | open_clip (see the module docstring)

    def setup(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"CoCa pooling {self.pooling!r}: choose one of {POOLINGS}")
        if self.text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"CoCa text_layout {self.text_layout!r}: choose one of {TEXT_LAYOUTS}")
        image_width = self.image.width
        if self.pooling == "open_clip":
            # One pooler: query 0 gives the image embedding, the others the captioning tokens.
            self.pooler = AttentionalPooler(
                1 + self.caption_queries, self.embed_dim, self.pooler_heads, self.image.ln_eps, self.dtype,
                self.attn_impl, query_norm=True,
            )
            projection_in = self.embed_dim
        else:
            self.contrastive_pooler = AttentionalPooler(
                1, image_width, self.pooler_heads, self.image.ln_eps, self.dtype, self.attn_impl
            )
            self.caption_pooler = AttentionalPooler(
                self.caption_queries, self.text_width, self.pooler_heads, self.image.ln_eps, self.dtype,
                self.attn_impl,
            )
            projection_in = image_width
        self.image_projection = dense(
            self.embed_dim, ("embed", "mlp"), dtype=self.dtype, use_bias=False,
            kernel_init=nn.initializers.normal(projection_in**-0.5),
        )
        self.token_embedding = token_embedding(self.vocab_size, self.text_width, dtype=self.dtype)
        # One more position than tokens: the [CLS] token sits after the last one.
        self.text_pos_embedding = self.param(
            "text_pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
            (self.context_length + 1, self.text_width),
            jnp.float32,
        )
        self.cls_token = self.param(
            "cls_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (self.text_width,),
            jnp.float32,
        )
        stack = dict(
            num_heads=self.text_heads, mlp_dim=self.text_mlp_dim, max_len=self.context_length,
            act=self.text_act, ln_eps=self.text_ln_eps, decode=self.decode, dtype=self.dtype,
            scan_layers=self.scan_layers, remat=self.remat, impl=self.attn_impl,
        )
        self.unimodal = TextStack(self.unimodal_depth, cross=False, **stack)
        self.multimodal = TextStack(self.multimodal_depth, cross=True, layout=self.text_layout, **stack)
        self.ln_cls = LayerNorm(self.text_ln_eps, self.dtype)
        self.text_projection = dense(
            self.embed_dim, ("embed", "mlp"), dtype=self.dtype, use_bias=False,
            kernel_init=nn.initializers.normal(self.text_width**-0.5),
        )
        self.ln_final = LayerNorm(self.text_ln_eps, self.dtype)
        self.lm_head = dense(
            self.vocab_size, ("embed", "vocab"), dtype=self.dtype, use_bias=self.text_layout == "paper"
        )
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
            (),
            jnp.float32,
        )

    # ------------------------------------------------------------------ image side

    def image_tokens(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> the ViT's (final-normed) tokens [B, N, Ei]."""
        return self.image.encode(images, train=train)["hidden"]

    def _image_embed(self, tokens: jax.Array) -> jax.Array:
        pooled = self.pooler(tokens) if self.pooling == "open_clip" else self.contrastive_pooler(tokens)
        return self.image_projection(pooled[:, 0]).astype(jnp.float32)

    def _caption_tokens(self, tokens: jax.Array) -> jax.Array:
        if self.pooling == "open_clip":
            return self.pooler(tokens)[:, 1:]
        return self.caption_pooler(tokens)

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> projected, unnormalised float32 features [B, E]."""
        return self._image_embed(self.image_tokens(images, train=train))

    def caption_context(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> the captioning pooler's tokens [B, caption_queries, Et]."""
        return self._caption_tokens(self.image_tokens(images, train=train))

    def poolers(self, images: jax.Array) -> dict[str, jax.Array]:
        """images -> contrastive [B, 1, Ei] and caption [B, caption_queries, Et] pooler outputs
        (open_clip pooling: [B, 1, E] and [B, caption_queries, E], the one pooler's split)."""
        tokens = self.image_tokens(images)
        if self.pooling == "open_clip":
            pooled = self.pooler(tokens)
            return dict(contrastive=pooled[:, :1], caption=pooled[:, 1:])
        return dict(contrastive=self.contrastive_pooler(tokens), caption=self.caption_pooler(tokens))

    # ------------------------------------------------------------------ text side

    def _embed_tokens(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens int [B, T], positions int [B, T] (None: 0..T-1) -> [B, T, Et]."""
        t = tokens.shape[-1]
        if t > self.context_length:
            raise ValueError(f"{t} tokens are more than the {self.context_length} of the text decoder")
        pos = self.text_pos_embedding[:t][None] if positions is None else self.text_pos_embedding[positions]
        return self.token_embedding(tokens) + pos.astype(self.dtype)

    def _unimodal_with_cls(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, L] -> (unimodal outputs at the tokens [B, L, Et], text features [B, Et])."""
        b, t = tokens.shape
        x = self._embed_tokens(tokens)
        cls = (self.cls_token + self.text_pos_embedding[t]).astype(self.dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(cls, (b, 1, self.text_width))], axis=1)
        real = (tokens != self.pad_id).astype(jnp.int32)
        ones = jnp.ones((b, 1), jnp.int32)
        if self.text_layout == "open_clip":
            # open_clip's legacy mask: key 0 always, key j + 1 iff token j is real, for every query.
            h = self.unimodal(x, jnp.ones((b, t + 1), jnp.int32), kv_segment_ids=jnp.concatenate([ones, real], 1))
        else:
            # Pad 0, the rest 1: [CLS] sees every real token and no padding.
            h = self.unimodal(x, jnp.concatenate([real, ones], axis=1))
        return h[:, :t], self.ln_cls(h[:, t])

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, L] -> projected, unnormalised float32 features [B, E] (the [CLS] output)."""
        return self.text_projection(self._unimodal_with_cls(tokens)[1]).astype(jnp.float32)

    def _caption_head(self, h: jax.Array, segment_ids: jax.Array | None, context: jax.Array) -> jax.Array:
        x = self.ln_final(self.multimodal(h, segment_ids, context))
        logits = nn.with_logical_constraint(self.lm_head(x), ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)

    def caption_logits(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """Teacher forcing: logits f32 [B, L, V], position t predicting tokens[t + 1]."""
        return self(images, tokens)["logits"]

    def decode_logits(
        self, tokens: jax.Array, positions: jax.Array, valid: jax.Array, context: jax.Array
    ) -> jax.Array:
        """One decoding call (decode=True): tokens/positions int [B, T], valid bool [B, T] (False:
        padding, cached and never attended), context [B, N, Et] -> logits f32 [B, T, V]."""
        segment_ids = valid.astype(jnp.int32)
        h = self.unimodal(self._embed_tokens(tokens, positions), segment_ids)
        return self._caption_head(h, segment_ids, context)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """-> image_embeds, text_embeds [B, E] (unit norm, f32), logit_scale [], logits f32 [B, L, V]."""
        if self.decode:
            raise ValueError("a decode=True CoCa only runs decode_logits (see make_decoder)")
        image_tokens = self.image_tokens(images, train=train)
        image_embeds = l2_normalize(self._image_embed(image_tokens))
        h, text_features = self._unimodal_with_cls(tokens)
        text_embeds = l2_normalize(self.text_projection(text_features))
        # open_clip's multimodal layers are causal only (the padding positions see the padding).
        segment_ids = None if self.text_layout == "open_clip" else (tokens != self.pad_id).astype(jnp.int32)
        logits = self._caption_head(h, segment_ids, self._caption_tokens(image_tokens))
        logit_scale = jnp.exp(jnp.minimum(self.logit_scale, self.logit_scale_max))
        return dict(image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=logit_scale, logits=logits)

    def make_decoder(self) -> CocaDecoder:
        """The vlm_jax.sampling.decode `Decoder` of the captioner (context: images [B, H, W, C])."""
        return CocaDecoder(self.clone(parent=None, decode=False))


@dataclasses.dataclass(frozen=True)
class CocaDecoder:
    """decode.Decoder of a CoCa captioner: cache = dict(context=caption pooler tokens [B, N, Et],
    kv=the text layers' KV caches); max_len = the text context length."""

    model: CoCa  # decode=False; the decoding twin is model.clone(decode=True) (same params)

    @property
    def max_len(self) -> int:
        return int(self.model.context_length)

    @property
    def _decoding(self) -> CoCa:
        return self.model.clone(decode=True)

    def init_cache(self, params: Any, batch_size: int, context: Any = None) -> dict:
        if context is None:
            raise ValueError("a CoCa decoder needs the images as context")
        if context.shape[0] != batch_size:
            raise ValueError(f"{context.shape[0]} context images for {batch_size} rows")
        ctx = self.model.apply({"params": params}, context, method=CoCa.caption_context)
        dec = self._decoding
        shapes = jax.eval_shape(
            lambda: dec.init(
                jax.random.key(0),
                jnp.zeros((batch_size, 1), jnp.int32),
                jnp.zeros((batch_size, 1), jnp.int32),
                jnp.ones((batch_size, 1), bool),
                ctx,
                method=CoCa.decode_logits,
            )["cache"]
        )
        kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return dict(context=ctx, kv=kv)

    def step(self, params, cache, tokens, positions, valid):
        logits, variables = self._decoding.apply(
            {"params": params, "cache": cache["kv"]}, tokens, positions, valid, cache["context"],
            method=CoCa.decode_logits, mutable=["cache"],
        )
        return logits, dict(context=cache["context"], kv=variables["cache"])

    def select(self, cache: dict, rows: jax.Array) -> dict:
        # Scanned layers stack the KV cache over depth: [depth, B, ...]; cache_index has no batch axis.
        axis = 1 if self.model.scan_layers else 0

        def gather(path, x):
            name = getattr(path[-1], "key", None)
            return x if name == "cache_index" else jnp.take(x, rows, axis=axis)

        return dict(
            context=jnp.take(cache["context"], rows, axis=0),
            kv=jax.tree_util.tree_map_with_path(gather, cache["kv"]),
        )


def from_config(cfg: ml_collections.ConfigDict) -> CoCa:
    """CoCa from the model section of configs/coca.py (model.image, model.text and the top keys)."""
    common = dict(
        dtype=cfg.get("dtype", "float32"),
        scan_layers=cfg.get("scan_layers", False),
        remat=cfg.get("remat", "none"),
    )
    pooling = cfg.get("pooling", "paper")
    # The poolers read every ViT token, no pre-logits or head.
    if pooling == "open_clip":  # open_clip's ViT keeps its class token; its norm comes after the pooler
        extra = dict(pool="cls", class_token=True, final_norm=False)
    else:  # the paper's has no class token
        extra = dict(pool="gap", class_token=False)
    image = vit.from_config(cfg.image, num_classes=0, representation_size=0, **extra, **common)
    t = cfg.text
    return CoCa(
        image=image,
        embed_dim=cfg.embed_dim,
        vocab_size=t.get("vocab_size", 64000),
        context_length=t.get("context_length", 64),
        text_width=t.get("width", 768),
        unimodal_depth=t.get("unimodal_depth", 12),
        multimodal_depth=t.get("multimodal_depth", 12),
        text_heads=t.get("heads", 12),
        text_mlp_dim=mlp_dim_from(t),
        text_act=t.get("act", "gelu"),
        text_ln_eps=t.get("ln_eps", 1e-6),
        pad_id=t.get("pad_id", 0),
        caption_queries=cfg.get("caption_queries", 256),
        pooler_heads=cfg.get("pooler_heads", cfg.image.get("heads", 12)),
        logit_scale_init=cfg.get("logit_scale_init", math.log(1 / 0.07)),
        logit_scale_max=cfg.get("logit_scale_max", math.log(100.0)),
        dtype=jnp.dtype(common["dtype"]),
        scan_layers=common["scan_layers"],
        remat=common["remat"],
        attn_impl=cfg.get("attn_impl", "auto"),
        pooling=pooling,
        text_layout=t.get("layout", "paper"),
    )
