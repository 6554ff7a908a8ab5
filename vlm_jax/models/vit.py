"""Vision Transformer (Dosovitskiy et al.): patch embedding, optional class token, pre-norm blocks,
class-token or mean pooling, optional pre-logits (dense + tanh) and classifier head.

Param tree: patch_embed/{kernel,bias}, cls_token [E], pos_embed/pos_embedding [N(+1), E],
ln_pre (pre_norm only), encoder/layers_i (or encoder/layers, scanned), ln_final (final_norm),
pre_logits/{kernel,bias} (representation_size > 0), head/{kernel,bias} (num_classes > 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.embeddings import PatchEmbedding, PositionEmbedding
from vlm_jax.layers.linear import dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import Encoder, mlp_dim_from

POOLS = ("cls", "gap")


class ViT(nn.Module):
    """images [B, H, W, C] -> logits [B, num_classes] (pre-logits [B, R] if num_classes = 0)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: str = "cls"
    class_token: bool = True
    pre_norm: bool = False  # CLIP's ln_pre on the embedded tokens
    act: str = "gelu"
    ln_eps: float = 1e-6
    patch_bias: bool = True
    qkv_bias: bool = True
    final_norm: bool = True
    representation_size: int = 0  # > 0: dense + tanh pre-logits (HF ViTModel's pooler)
    num_classes: int = 0  # 0: no head
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"ViT pool {self.pool!r}: choose one of {POOLS}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("ViT pool 'cls' needs class_token=True")
        num_patches = (self.image_size // self.patch_size) ** 2
        self.patch_embed = PatchEmbedding(
            self.width, self.patch_size, use_bias=self.patch_bias, dtype=self.dtype
        )
        if self.class_token:
            self.cls_token = self.param(
                "cls_token",
                nn.with_logical_partitioning(nn.initializers.normal(self.width**-0.5), ("embed",)),
                (self.width,),
                jnp.float32,
            )
        self.pos_embed = PositionEmbedding(
            num_patches + int(self.class_token), stddev=0.02, dtype=self.dtype
        )
        if self.pre_norm:
            self.ln_pre = LayerNorm(self.ln_eps, self.dtype)
        self.encoder = Encoder(
            self.depth,
            self.heads,
            self.mlp_dim,
            act=self.act,
            ln_eps=self.ln_eps,
            qkv_bias=self.qkv_bias,
            dtype=self.dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
        )
        if self.final_norm:
            self.ln_final = LayerNorm(self.ln_eps, self.dtype)
        if self.representation_size:
            self.pre_logits = dense(self.representation_size, ("embed", "mlp"), dtype=self.dtype)
        if self.num_classes:
            # Zero init: the classifier starts at uniform predictions (big_vision does the same).
            self.head = dense(
                self.num_classes,
                ("embed", "classes"),
                dtype=self.dtype,
                kernel_init=nn.initializers.zeros,
            )

    def encode(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """images [B, H, W, C] -> hidden [B, N(+1), E], pooled [B, E], pre_logits [B, R or E]."""
        del train  # No dropout: the ViT/CLIP recipes here train without it.
        x = self.patch_embed(images)
        if self.class_token:
            cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        x = self.pos_embed(x)
        if self.pre_norm:
            x = self.ln_pre(x)
        x = self.encoder(x)
        # Norming every token then pooling equals pooling then norming for the class token (the
        # norm is per token), so HF ViT (norm, then pool) and CLIP (pool, then ln_post) both fit.
        if self.final_norm:
            x = self.ln_final(x)
        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            tokens = x[:, 1:] if self.class_token else x
            pooled = jnp.mean(tokens.astype(jnp.float32), axis=1).astype(x.dtype)
        pre = jnp.tanh(self.pre_logits(pooled)) if self.representation_size else pooled
        return dict(hidden=x, pooled=pooled, pre_logits=pre)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images [B, H, W, C] -> float32 logits [B, num_classes], or pre-logits [B, R or E]."""
        pre = self.encode(images, train=train)["pre_logits"]
        out = self.head(pre) if self.num_classes else pre
        return out.astype(jnp.float32)


def from_config(cfg: ml_collections.ConfigDict, **overrides: Any) -> ViT:
    """ViT from a model (or CLIP image) section; `overrides` win over the section's keys."""
    get = lambda key, default: overrides.get(key, cfg.get(key, default))  # noqa: E731
    pool = get("pool", "cls")
    return ViT(
        image_size=get("image_size", 224),
        patch_size=get("patch_size", 16),
        width=get("width", 768),
        depth=get("depth", 12),
        heads=get("heads", 12),
        mlp_dim=overrides.get("mlp_dim", mlp_dim_from(cfg)),
        pool=pool,
        class_token=get("class_token", pool == "cls"),
        pre_norm=get("pre_norm", False),
        act=get("act", "gelu"),
        ln_eps=get("ln_eps", 1e-6),
        patch_bias=get("patch_bias", True),
        qkv_bias=get("qkv_bias", True),
        final_norm=get("final_norm", True),
        representation_size=get("representation_size", 0) or 0,
        num_classes=get("num_classes", 0) or 0,
        dtype=jnp.dtype(get("dtype", "float32")),
        scan_layers=get("scan_layers", False),
        remat=get("remat", "none"),
    )
