"""A minimal functional CLIP in plain JAX (no flax): ViT image tower + causal text transformer +
InfoNCE, the GPU report's "what plain JAX does" peer for the CLIP train step.

Params are a nested dict with the keys and shapes of vlm_jax's scanned CLIP with a ViT tower
(image/{patch_embed/kernel, cls_token, pos_embed/pos_embedding, ln_pre, encoder/layers/...,
ln_final}, image_projection/kernel, text/{token_embedding/embedding, pos_embed/pos_embedding,
encoder/layers/..., ln_final}, text_projection/kernel, logit_scale), each encoder layer ln1,
attn/{query, key, value}/{kernel [L, E, H, D], bias [L, H, D]}, attn/out/{kernel [L, H, D, E],
bias [L, E]}, ln2, mlp/{fc1, fc2}/{kernel, bias}. So the parameter count is ours by construction
and our params run through this model unchanged (the tests compare the losses). Layers run under
`jax.lax.scan` and `jax.checkpoint` saving the projection matmuls; attention is
jax.nn.dot_product_attention with JAX's default implementation (cuDNN refuses the ViT's 197
tokens); float32 params, compute in `dtype`, LayerNorm statistics in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.bench.plain_common import REMAT_POLICY, attention, layer_norm, normal_params
from vlm_jax.layers.mlp import activation
from vlm_jax.layers.transformer import mlp_dim_from
from vlm_jax.models.clip import l2_normalize
from vlm_jax.models.text import eos_positions
from vlm_jax.tasks.contrastive import softmax_loss

# What our ViT CLIP config must say for this peer to be the same model (the published ViT CLIPs).
_REQUIRED_IMAGE = dict(kind="vit", pool="cls", class_token=True, qkv_bias=True, final_norm=True,
                       representation_size=0)


@dataclasses.dataclass(frozen=True)
class Tower:
    """One transformer stack."""

    width: int
    depth: int
    heads: int
    mlp: int
    act: str
    eps: float


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shape of a ViT CLIP (configs/clip.py's model section)."""

    image: Tower
    text: Tower
    image_size: int
    patch: int
    pre_norm: bool
    patch_bias: bool
    vocab: int
    context: int
    eos_id: int
    embed_dim: int
    logit_scale_init: float
    logit_scale_max: float

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Sizes:
        """From configs/clip.py's model section; ValueError for what this peer does not model."""
        image, text = cfg.image, cfg.text
        defaults = dict(class_token=True, qkv_bias=True, final_norm=True, representation_size=0)
        differ = {k: image.get(k, defaults.get(k)) for k, v in _REQUIRED_IMAGE.items()
                  if image.get(k, defaults.get(k)) != v}
        if differ or cfg.get("loss", "softmax") != "softmax":
            raise ValueError(f"the plain-JAX CLIP models ViT towers and the softmax loss; this config has "
                             f"{differ or {'loss': cfg.loss}}")

        def tower(section: ml_collections.ConfigDict, eps: float) -> Tower:
            return Tower(int(section.width), int(section.depth), int(section.heads), mlp_dim_from(section),
                         str(section.get("act", "gelu")), float(section.get("ln_eps", eps)))

        return cls(tower(image, 1e-6), tower(text, 1e-5), int(image.image_size), int(image.patch_size),
                   bool(image.get("pre_norm", False)), bool(image.get("patch_bias", True)),
                   int(text.vocab_size), int(text.context_length), int(text.eos_id), int(cfg.embed_dim),
                   float(cfg.get("logit_scale_init", math.log(1 / 0.07))),
                   float(cfg.get("logit_scale_max", math.log(100.0))))


def _encoder_shapes(t: Tower) -> dict[str, Any]:
    l, e, h, d, m = t.depth, t.width, t.heads, t.width // t.heads, t.mlp
    qkv = {"kernel": (l, e, h, d), "bias": (l, h, d)}
    norm = {"scale": (l, e), "bias": (l, e)}
    return {"layers": {
        "ln1": norm, "ln2": norm,
        "attn": {"query": qkv, "key": qkv, "value": qkv, "out": {"kernel": (l, h, d, e), "bias": (l, e)}},
        "mlp": {"fc1": {"kernel": (l, e, m), "bias": (l, m)}, "fc2": {"kernel": (l, m, e), "bias": (l, e)}},
    }}


def param_shapes(s: Sizes) -> dict[str, Any]:
    """The param tree's shapes (see the module docstring)."""
    e, p = s.image.width, s.patch
    image: dict[str, Any] = {
        "patch_embed": {"kernel": (p, p, 3, e), **({"bias": (e,)} if s.patch_bias else {})},
        "cls_token": (e,),
        "pos_embed": {"pos_embedding": ((s.image_size // p) ** 2 + 1, e)},
        "encoder": _encoder_shapes(s.image),
        "ln_final": {"scale": (e,), "bias": (e,)},
    }
    if s.pre_norm:
        image["ln_pre"] = {"scale": (e,), "bias": (e,)}
    t = s.text.width
    text = {
        "token_embedding": {"embedding": (s.vocab, t)},
        "pos_embed": {"pos_embedding": (s.context, t)},
        "encoder": _encoder_shapes(s.text),
        "ln_final": {"scale": (t,), "bias": (t,)},
    }
    return {"image": image, "image_projection": {"kernel": (e, s.embed_dim)}, "text": text,
            "text_projection": {"kernel": (t, s.embed_dim)}, "logit_scale": ()}


def init_params(s: Sizes, key: jax.Array) -> dict[str, Any]:
    """Random float32 params: normal(0.02) weights and embeddings, unit norms, CLIP's temperature."""
    params = normal_params(key, param_shapes(s), lambda shape: 0.02)
    params["logit_scale"] = jnp.asarray(s.logit_scale_init, jnp.float32)
    return params


def _block(t: Tower, causal: bool, dtype: Any, impl: str | None, x: jax.Array,
           p: dict[str, Any]) -> tuple[jax.Array, None]:
    """One pre-norm layer, x [B, T, E] -> ([B, T, E], None) (a scan body over the stacked params)."""
    w = jax.tree.map(lambda a: a.astype(dtype), p)
    a = w["attn"]
    h = layer_norm(x, p["ln1"]["scale"], p["ln1"]["bias"], t.eps)
    q, k, v = (jnp.einsum("bte,ehd->bthd", h, a[n]["kernel"]) + a[n]["bias"] for n in ("query", "key", "value"))
    o = attention(q, k, v, causal=causal, impl=impl)
    x = x + jnp.einsum("bthd,hde->bte", o, a["out"]["kernel"]) + a["out"]["bias"]
    h = layer_norm(x, p["ln2"]["scale"], p["ln2"]["bias"], t.eps)
    m = w["mlp"]
    h = activation(t.act)(h @ m["fc1"]["kernel"] + m["fc1"]["bias"])
    return x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"], None


def _encoder(t: Tower, causal: bool, x: jax.Array, layers: dict[str, Any], dtype: Any, impl: str | None,
             remat: bool) -> jax.Array:
    body = functools.partial(_block, t, causal, dtype, impl)
    if remat:
        body = jax.checkpoint(body, policy=REMAT_POLICY, prevent_cse=False)  # Under scan: no CSE to fear.
    return jax.lax.scan(body, x, layers)[0]


def encode_image(params: dict[str, Any], images: jax.Array, s: Sizes, *, dtype: Any = jnp.bfloat16,
                 impl: str | None = None, remat: bool = True) -> jax.Array:
    """images [B, S, S, 3] -> projected, unnormalised float32 features [B, embed_dim]."""
    p, b, n = params["image"], images.shape[0], s.image_size // s.patch
    patches = images.astype(dtype).reshape(b, n, s.patch, n, s.patch, 3)
    x = jnp.einsum("bhpwqc,pqce->bhwe", patches, p["patch_embed"]["kernel"].astype(dtype))
    x = x.reshape(b, n * n, s.image.width)
    if s.patch_bias:
        x = x + p["patch_embed"]["bias"].astype(dtype)
    cls = jnp.broadcast_to(p["cls_token"].astype(dtype), (b, 1, s.image.width))
    x = jnp.concatenate([cls, x], axis=1) + p["pos_embed"]["pos_embedding"].astype(dtype)
    if s.pre_norm:
        x = layer_norm(x, p["ln_pre"]["scale"], p["ln_pre"]["bias"], s.image.eps)
    x = _encoder(s.image, False, x, p["encoder"]["layers"], dtype, impl, remat)
    pooled = layer_norm(x[:, 0], p["ln_final"]["scale"], p["ln_final"]["bias"], s.image.eps)
    return (pooled @ params["image_projection"]["kernel"].astype(dtype)).astype(jnp.float32)


def encode_text(params: dict[str, Any], tokens: jax.Array, s: Sizes, *, dtype: Any = jnp.bfloat16,
                impl: str | None = None, remat: bool = True) -> jax.Array:
    """tokens int [B, L] -> projected, unnormalised float32 features [B, embed_dim] at the first eos."""
    p, length = params["text"], tokens.shape[1]
    x = jnp.take(p["token_embedding"]["embedding"].astype(dtype), tokens, axis=0)
    x = x + p["pos_embed"]["pos_embedding"][:length].astype(dtype)
    x = _encoder(s.text, True, x, p["encoder"]["layers"], dtype, impl, remat)
    x = jnp.take_along_axis(x, eos_positions(tokens, s.eos_id)[:, None, None], axis=1)[:, 0]
    pooled = layer_norm(x, p["ln_final"]["scale"], p["ln_final"]["bias"], s.text.eps)
    return (pooled @ params["text_projection"]["kernel"].astype(dtype)).astype(jnp.float32)


def loss(params: dict[str, Any], batch: dict[str, jax.Array], s: Sizes, *, dtype: Any = jnp.bfloat16,
         impl: str | None = None, remat: bool = True) -> jax.Array:
    """Symmetric InfoNCE of batch {'image' [B, S, S, 3], 'tokens' int [B, L]} (as vlm_jax.tasks.contrastive)."""
    kw = dict(dtype=dtype, impl=impl, remat=remat)
    image = l2_normalize(encode_image(params, batch["image"], s, **kw))
    text = l2_normalize(encode_text(params, batch["tokens"], s, **kw))
    scale = jnp.exp(jnp.minimum(params["logit_scale"], s.logit_scale_max))
    return softmax_loss(image, text, scale)
