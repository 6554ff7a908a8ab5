"""Show, Attend and Tell (Xu et al. 2015): an LSTM that attends over an L x D grid of annotation
vectors a_i (a conv feature map: 14x14x512 from VGG-16's conv5_3 in the published config).

    h_0 = tanh(f_init_h(mean_i a_i)),  c_0 = tanh(f_init_c(mean_i a_i))
    e_ti = w^T tanh(W_a a_i + W_h h_{t-1}),  alpha_t = softmax_i(e_t)          (MLP attention)
    beta_t = sigmoid(f_beta(h_{t-1}))                                           (gating scalar)
    z_t = beta_t * sum_i alpha_ti a_i          (soft)   or   beta_t * a_{s_t}, s_t ~ alpha_t (hard)
    (c_t, h_t) = LSTM([E y_{t-1}; z_t], (c_{t-1}, h_{t-1}))
    p(y_t) = softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))                          (deep output)

Teacher forcing as in show_tell: at position t the input is tokens[:, t] (y_{t-1}) and
logits[:, t] predict tokens[:, t + 1]. `__call__` returns a dict:
    logits f32 [B, T, V], alphas f32 [B, T, L] (each row sums to 1 over the L locations),
    and with attention="hard": loc_logprob f32 [B, T] (log alpha of the sampled location),
    attention_entropy f32 [B, T].
The doubly stochastic penalty and the REINFORCE terms live in tasks/caption.py.

init_from "pooled" (not the paper's) feeds f_init_h/f_init_c the encoder's own image vector
instead of the mean annotation: for a VGG grid the two are the same; for a SmallCNN or ViT tower
pretrained contrastively it is the vector the tower was trained to make (CLIP's image embedding),
so the captioner starts from what Show and Tell reads and attends for the rest.

Encoders (show_tell.encode_images): "vgg" (its last conv stage, as conv5_3), "cnn" (a SmallCNN
stage before its pool, `grid_stage`) or "vit" (the patch tokens); "resnet" has no grid.

Hard attention: with train=True a location is sampled per step (Gumbel-max on log alpha, noise
from the "attention" rng if given, else "dropout"); with train=False the argmax location is used.
The task's REINFORCE baseline is kept in the "reinforce" collection (model_state), made at init.

Decoding: `make_decoder(keep_attention=N)` -> ShowAttendTellDecoder; cache = the LSTM state plus
the encoded grid (and its projection W_a a); with keep_attention > 0 also alphas [B, N, L], where
slot p holds the attention used after the input token at position p (for a [bos] prompt: the
attention of generated token p). `attention_maps` recomputes them from finished captions.

Param tree: encoder/..., embed/embedding, init_h, init_c, att_proj (W_a), core/{att_h (W_h),
att_v (w), f_beta, cell}, out_h (L_h), out_z (L_z), out (L_o).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.embeddings import token_embedding
from vlm_jax.layers.linear import dense
from vlm_jax.layers.lstm import LSTMCell
from vlm_jax.models.show_tell import build_encoder, encode_images, variables_of

ATTENTION = ("soft", "hard")
INIT_FROM = ("mean", "pooled")


class _AttendStep(nn.Module):
    """One step: attend with h_{t-1}, gate, LSTM. Rows with valid False keep their state."""

    hidden: int
    attn_dim: int
    attention: str = "soft"
    selector: bool = True

    @nn.compact
    def __call__(self, carry, inputs, feats, proj):
        x, valid, noise = inputs  # [B, E], [B], [B, L]
        c, h = carry
        att = dense(self.attn_dim, ("mlp", "embed"), use_bias=False, name="att_h")(h)
        e = dense(1, ("embed", None), name="att_v")(jnp.tanh(proj + att[:, None]))[..., 0]
        logp = jax.nn.log_softmax(e.astype(jnp.float32), axis=-1)
        alpha = jnp.exp(logp)
        if self.attention == "soft":
            z = jnp.einsum("bl,bld->bd", alpha, feats)
            loc_logp = jnp.zeros(alpha.shape[:1], jnp.float32)
        else:
            loc = jnp.argmax(logp + noise, axis=-1)
            z = jnp.einsum("bl,bld->bd", jax.nn.one_hot(loc, alpha.shape[-1], dtype=feats.dtype), feats)
            loc_logp = jnp.take_along_axis(logp, loc[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(alpha * logp, axis=-1)
        if self.selector:
            z = jax.nn.sigmoid(dense(1, ("mlp", None), name="f_beta")(h).astype(jnp.float32)) * z
        new, _ = LSTMCell(self.hidden, name="cell")(carry, jnp.concatenate([x, z], axis=-1))
        new = tuple(jnp.where(valid[:, None], n, o) for n, o in zip(new, carry))
        return new, (new[1], z, alpha, loc_logp, entropy)


_ScanAttend = nn.scan(
    _AttendStep, variable_broadcast="params", split_rngs={"params": False},
    in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1,
)


class ShowAttendTell(nn.Module):
    """(images, tokens [B, T]) -> {"logits" [B,T,V], "alphas" [B,T,L], (hard) "loc_logprob", ...}."""

    encoder: nn.Module
    encoder_kind: str = "vgg"
    freeze_encoder: bool = False
    vocab_size: int = 512
    embed_dim: int = 512
    hidden: int = 512
    attn_dim: int = 512
    attention: str = "soft"
    selector: bool = True
    init_from: str = "mean"  # h0/c0 from: mean (of the annotations, the paper) | pooled (the encoder's image vector)
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.init_from not in INIT_FROM:
            raise ValueError(f"init_from {self.init_from!r}: choose one of {INIT_FROM}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r}: choose one of {ATTENTION}")
        self.embed = token_embedding(self.vocab_size, self.embed_dim, dtype=self.dtype)
        self.init_h = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype)
        self.init_c = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype)
        self.att_proj = dense(self.attn_dim, ("embed", "mlp"), dtype=self.dtype)
        self.core = _ScanAttend(self.hidden, self.attn_dim, self.attention, self.selector)
        self.out_h = dense(self.embed_dim, ("mlp", "embed"), use_bias=False, dtype=self.dtype)
        self.out_z = dense(self.embed_dim, ("mlp", "embed"), use_bias=False, dtype=self.dtype)
        self.out = dense(self.vocab_size, ("embed", "vocab"), dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout)
        if self.attention == "hard" and (self.is_initializing() or self.has_variable("reinforce", "baseline")):
            # The task's moving-average REINFORCE baseline (updated by tasks/caption.py).
            self.baseline = self.variable("reinforce", "baseline", lambda: jnp.zeros((), jnp.float32))
            self.baseline_updates = self.variable("reinforce", "updates", lambda: jnp.zeros((), jnp.int32))

    def init_state(self, images: jax.Array, train: bool = False) -> dict:
        """images -> {"c", "h"} f32 [B, hidden], "feats" f32 [B, L, D], "proj" f32 [B, L, attn_dim]."""
        pooled, feats = encode_images(self.encoder, self.encoder_kind, images, train)
        if feats is None:
            raise ValueError(f"encoder kind {self.encoder_kind!r} gives no feature grid; use vgg, cnn or vit")
        if self.freeze_encoder:
            feats, pooled = jax.lax.stop_gradient((feats, pooled))
        summary = feats.mean(axis=1) if self.init_from == "mean" else pooled
        return {
            "c": jnp.tanh(self.init_c(summary).astype(jnp.float32)),
            "h": jnp.tanh(self.init_h(summary).astype(jnp.float32)),
            "feats": feats,
            "proj": self.att_proj(feats).astype(jnp.float32),
        }

    def decode_step(self, state: dict, tokens: jax.Array, valid: jax.Array, noise: jax.Array | None = None,
                    train: bool = False) -> tuple[dict, dict]:
        """Feeds tokens [B, T] -> (outputs as in __call__, state). noise [B, T, L]: Gumbel noise
        for hard attention (None: argmax location)."""
        b, t = tokens.shape
        emb = self.embed(tokens).astype(jnp.float32)
        if noise is None:
            noise = jnp.zeros((b, t, state["feats"].shape[1]), jnp.float32)
        x = self.drop(emb, deterministic=not train)
        (c, h), (hs, zs, alphas, loc_logp, entropy) = self.core(
            (state["c"], state["h"]), (x, valid, noise), state["feats"], state["proj"]
        )
        deep = emb + self.out_h(hs).astype(jnp.float32) + self.out_z(zs).astype(jnp.float32)
        logits = self.out(self.drop(deep, deterministic=not train)).astype(jnp.float32)
        out = {"logits": logits, "alphas": alphas}
        if self.attention == "hard":
            out.update(loc_logprob=loc_logp, attention_entropy=entropy)
        return out, dict(state, c=c, h=h)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict:
        state = self.init_state(images, train)
        noise = None
        if self.attention == "hard":
            if train:
                rng = self.make_rng("attention" if self.has_rng("attention") else "dropout")
                shape = tokens.shape + (state["feats"].shape[1],)
                noise = jax.random.gumbel(rng, shape, jnp.float32)
        out, _ = self.decode_step(state, tokens, jnp.ones(tokens.shape, bool), noise, train)
        return out

    def make_decoder(self, keep_attention: int = 0) -> "ShowAttendTellDecoder":
        return ShowAttendTellDecoder(self, keep_attention)


@dataclasses.dataclass(frozen=True)
class ShowAttendTellDecoder:
    """vlm_jax.sampling.decode's `Decoder` for ShowAttendTell: cache = the state of init_state
    (c, h, feats, proj) and, with keep_attention = N > 0, "alphas" f32 [B, N, L] (slot p: the
    attention after the input token at position p; positions >= N are not kept). Hard attention
    decodes with the argmax location."""

    model: Any
    keep_attention: int = 0
    max_len: int | None = None

    def init_cache(self, params: Any, batch_size: int, context: Any = None) -> dict:
        if context is None:
            raise ValueError("a captioning decoder needs the images as context")
        if context.shape[0] != batch_size:
            raise ValueError(f"{context.shape[0]} images for {batch_size} prompts")
        cache = self.model.apply(variables_of(params), context, method="init_state")
        if self.keep_attention:
            cache["alphas"] = jnp.zeros((batch_size, self.keep_attention, cache["feats"].shape[1]), jnp.float32)
        return cache

    def step(self, params, cache, tokens, positions, valid):
        state = {k: cache[k] for k in ("c", "h", "feats", "proj")}
        out, state = self.model.apply(variables_of(params), state, tokens, valid, method="decode_step")
        if self.keep_attention:
            slot = jax.nn.one_hot(positions, self.keep_attention, dtype=jnp.float32) * valid[..., None]  # [B,T,N]
            kept = cache["alphas"] * (1.0 - slot.sum(axis=1))[..., None]
            state["alphas"] = kept + jnp.einsum("btn,btl->bnl", slot, out["alphas"])
        return out["logits"], state

    def select(self, cache: dict, rows: jax.Array) -> dict:
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


def attention_maps(model: ShowAttendTell, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """alphas f32 [B, T, L] of captions tokens [B, T] ([bos] + generated): row t is the attention
    with which token t + 1 was predicted (reshape L to the grid's h x w for a figure)."""
    return model.apply(variables_of(params), images, tokens)["alphas"]


def from_config(cfg: ml_collections.ConfigDict) -> ShowAttendTell:
    """ShowAttendTell from a model section (vocab_size, embed_dim, hidden, attn_dim, attention,
    selector, dropout, encoder)."""
    dtype = cfg.get("dtype", "float32")
    encoder, kind = build_encoder(cfg.encoder, dtype)
    return ShowAttendTell(
        encoder=encoder,
        encoder_kind=kind,
        freeze_encoder=bool(cfg.encoder.get("freeze", False)),
        vocab_size=cfg.vocab_size,
        embed_dim=cfg.embed_dim,
        hidden=cfg.hidden,
        attn_dim=cfg.attn_dim,
        attention=cfg.get("attention", "soft"),
        selector=cfg.get("selector", True),
        init_from=cfg.get("init_from", "mean"),
        dropout=cfg.get("dropout", 0.0),
        dtype=jnp.dtype(dtype),
    )
