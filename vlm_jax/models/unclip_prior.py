"""The unCLIP diffusion prior (DALL-E 2, Ramesh et al. 2022, section 2.2): a caption -> a CLIP image
embedding, by a causal transformer that denoises the embedding.

It holds a frozen world CLIP (`clip`, a models.clip.CLIP: loaded by train.init_from_map "clip:."
and frozen by optim.trainable "^(?!clip/)"; every output of it goes through stop_gradient). What
is diffused is CLIP's unit-norm image embedding scaled by sqrt(E) (`embed_image`, [B, E]), so its
entries have about unit variance, as the noise has.

The condition of a caption (`condition(tokens)`, also read by the unCLIP decoder):

    hidden     [B, L, W]  the CLIP text tower's last hidden states
    mask       [B, L]     bool, the non-pad tokens
    text_embed [B, E]     the CLIP text embedding, unit norm scaled by sqrt(E)

The network (`denoise(x_t, t, cond)`) is a decoder-only, pre-LayerNorm transformer with a causal
mask over the sequence, in this order (the paper's):

    [the L text tokens' hidden states (projected to the width); the text embedding (projected);
     the timestep embedding (sinusoidal, then dense-SiLU-dense); the noised embedding x_t
     (projected); a learned final query]

with learned position embeddings (the text tokens at 0 .. L-1, the four others at text_length ..
text_length + 3, so they keep their places whatever L <= text_length is). Pad text positions are
masked out as keys (segment ids: pad 0, the rest 1; a pad query sees only pad keys, and no real
position reads a pad one). The output at the final query, after a final LayerNorm and a dense to E,
is the prediction: the clean embedding x0 by default ("sample", the paper's), or eps / v as the
task's `prediction` says.

Param tree: clip/... (frozen), text_in, embed_in, x_in/{kernel, bias}, time_1, time_2/{kernel, bias},
query [W], pos_embedding [text_length + 4, W], blocks/layers_i/{ln1, attn, ln2, mlp} (or
blocks/layers, scanned), ln_final/{scale, bias}, out/{kernel, bias}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.linear import dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import Encoder, mlp_dim_from
from vlm_jax.models import clip as clip_lib
from vlm_jax.models.diffusion.blocks import timestep_embedding

NUM_EXTRA = 4  # positions after the text: text embedding, timestep, x_t, final query
_ACT_AXES = ("batch", "length", "embed")


def scaled_unit(x: jax.Array) -> jax.Array:
    """x [..., E] -> float32 [..., E] of norm sqrt(E) (unit variance entries), with no gradient."""
    unit = clip_lib.l2_normalize(x)
    return jax.lax.stop_gradient(unit * jnp.sqrt(jnp.float32(unit.shape[-1])))


class UnclipPrior(nn.Module):
    """caption -> CLIP image embedding by diffusion; `__call__(images, tokens)` runs every part once
    (for init). See the module docstring."""

    clip: nn.Module  # models.clip.CLIP, frozen
    embed_dim: int  # E: the CLIP embedding width
    text_length: int  # the most text tokens (learned positions for them)
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 512
    act: str = "gelu"
    ln_eps: float = 1e-5
    pad_id: int = 0
    dtype: Any = jnp.float32
    impl: str = "auto"
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"unclip_prior: width {self.width} is not divisible by {self.heads} heads")
        d = dict(dtype=self.dtype)
        self.text_in = dense(self.width, (None, "embed"), **d)
        self.embed_in = dense(self.width, (None, "embed"), **d)
        self.x_in = dense(self.width, (None, "embed"), **d)
        self.time_1 = dense(self.width, ("embed", "mlp"), **d)
        self.time_2 = dense(self.width, ("mlp", "embed"), **d)
        self.query = self.param("query", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                                (self.width,), jnp.float32)
        self.pos_embedding = self.param(
            "pos_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
            (self.text_length + NUM_EXTRA, self.width), jnp.float32)
        self.blocks = Encoder(self.depth, self.heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps, causal=True,
                              dtype=self.dtype, impl=self.impl, scan_layers=self.scan_layers, remat=self.remat)
        self.ln_final = LayerNorm(self.ln_eps, self.dtype)
        self.out = dense(self.embed_dim, ("embed", None), **d)

    def embed_image(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] (data-normalised) -> float32 [B, E]: the frozen CLIP's unit image
        embedding scaled by sqrt(E), no gradient."""
        return scaled_unit(self.clip.encode_image(images, train=False))

    def condition(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """tokens int [B, L] -> {"hidden": [B, L, W] the CLIP text tower's last hidden states,
        "mask": bool [B, L] the non-pad tokens, "text_embed": float32 [B, E] the unit CLIP text
        embedding scaled by sqrt(E)}; no gradient into CLIP. One pass of the text tower serves both."""
        features = self.clip.text(tokens)
        text_embed = scaled_unit(self.clip.text_projection(features["pooled"]))
        hidden = jax.lax.stop_gradient(features["hidden"])
        return {"hidden": hidden, "mask": tokens != self.pad_id, "text_embed": text_embed}

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, L] -> float32 [B, E]: condition(tokens)["text_embed"]."""
        return self.condition(tokens)["text_embed"]

    def sequence(self, x_t: jax.Array, t: jax.Array, cond: dict[str, jax.Array],
                 train: bool = False) -> jax.Array:
        """The transformer's output at every position, after the final LayerNorm: [B, L + 4, width]
        (positions 0 .. L-1 the text, then text embedding, timestep, x_t, final query).
        x_t [B, E], t int [B] (or a scalar), cond as `condition` gives it."""
        del train  # no dropout
        hidden, mask, text_embed = cond["hidden"], cond["mask"], cond["text_embed"]
        b, length = mask.shape
        if length > self.text_length:
            raise ValueError(f"unclip_prior: {length} text tokens, more than text_length {self.text_length}")
        if x_t.shape != (b, self.embed_dim):
            raise ValueError(f"unclip_prior: x_t must be [{b}, {self.embed_dim}], got {tuple(x_t.shape)}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = timestep_embedding(t, self.width).astype(self.dtype)
        temb = self.time_2(nn.silu(self.time_1(temb)))
        extras = jnp.stack([
            self.embed_in(text_embed.astype(self.dtype)), temb, self.x_in(x_t.astype(self.dtype)),
            jnp.broadcast_to(self.query.astype(self.dtype), (b, self.width)),
        ], axis=1)
        x = jnp.concatenate([self.text_in(hidden.astype(self.dtype)), extras.astype(self.dtype)], axis=1)
        pos = jnp.concatenate([self.pos_embedding[:length], self.pos_embedding[self.text_length:]], axis=0)
        x = nn.with_logical_constraint(x + pos.astype(self.dtype)[None], _ACT_AXES)
        segment_ids = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((b, NUM_EXTRA), jnp.int32)], axis=1)
        return self.ln_final(self.blocks(x, segment_ids))

    def denoise(self, x_t: jax.Array, t: jax.Array, cond: dict[str, jax.Array], train: bool = False) -> jax.Array:
        """The prediction (x0, eps or v, as the task trains it) float32 [B, E] at x_t [B, E], t int [B]."""
        h = self.sequence(x_t, t, cond, train=train)[:, -1]
        return self.out(h).astype(jnp.float32)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> jax.Array:
        """images [B, S, S, 3], tokens [B, L] -> the prediction [B, E] at the clean embedding, t = 0."""
        x0 = self.embed_image(images)
        t = jnp.zeros((images.shape[0],), jnp.int32)
        return self.denoise(x0, t, self.condition(tokens), train=train)


def from_config(cfg: ml_collections.ConfigDict) -> UnclipPrior:
    """The model of an `unclip_prior` section: clip (a models.clip model section, e.g.
    configs/clip.py:tiny's model), width, depth, heads, mlp_ratio or mlp_dim, act, ln_eps, dtype,
    scan_layers, remat, attn_impl, text_length (default: the CLIP text tower's context_length)."""
    if not cfg.get("clip"):
        raise ValueError("unclip_prior: model.clip (the CLIP model section) is missing")
    clip_cfg = cfg.clip
    width, heads = int(cfg.get("width", 128)), int(cfg.get("heads", 4))
    if width % heads:
        raise ValueError(f"unclip_prior: width {width} is not divisible by {heads} heads")
    return UnclipPrior(
        clip=clip_lib.from_config(clip_cfg),
        embed_dim=int(clip_cfg.embed_dim),
        text_length=int(cfg.get("text_length", 0) or clip_cfg.text.get("context_length", 77)),
        width=width,
        depth=int(cfg.get("depth", 4)),
        heads=heads,
        mlp_dim=mlp_dim_from({"width": width, "mlp_ratio": cfg.get("mlp_ratio", 4.0),
                              "mlp_dim": cfg.get("mlp_dim", 0)}),
        act=str(cfg.get("act", "gelu")),
        ln_eps=float(cfg.get("ln_eps", 1e-5)),
        pad_id=int(clip_cfg.text.get("pad_id", 0)),
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
        impl=str(cfg.get("attn_impl", "auto")),
        scan_layers=bool(cfg.get("scan_layers", False)),
        remat=str(cfg.get("remat", "none")),
    )
