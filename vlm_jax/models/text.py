"""Text transformer (CLIP's text tower): token + learned position embeddings, causal pre-norm
blocks, a final LayerNorm, and the features at the first end-of-text token of each row.

Param tree: token_embedding/embedding [V, E], pos_embed/pos_embedding [context_length, E],
encoder/layers_i (or encoder/layers, scanned), ln_final/{scale,bias}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.embeddings import PositionEmbedding, token_embedding
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import Encoder, mlp_dim_from


def eos_positions(tokens: jax.Array, eos_id: int) -> jax.Array:
    """tokens [B, L] -> int32 [B]: index of the first eos_id in each row, or L-1 if it has none."""
    is_eos = tokens == eos_id
    first = jnp.argmax(is_eos, axis=-1)
    # A row cut off before its eos would otherwise read position 0 (the first word, blind to the
    # rest under the causal mask); its last position has seen the whole row.
    return jnp.where(jnp.any(is_eos, axis=-1), first, tokens.shape[-1] - 1).astype(jnp.int32)


class TextTransformer(nn.Module):
    """tokens int [B, L] -> dict(hidden=[B, L, E], pooled=[B, E] at the first eos)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    eos_id: int = 49407
    causal: bool = True
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        self.token_embedding = token_embedding(self.vocab_size, self.width, dtype=self.dtype)
        self.pos_embed = PositionEmbedding(self.context_length, stddev=0.01, dtype=self.dtype)
        self.encoder = Encoder(
            self.depth,
            self.heads,
            self.mlp_dim,
            act=self.act,
            ln_eps=self.ln_eps,
            causal=self.causal,
            dtype=self.dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
        )
        self.ln_final = LayerNorm(self.ln_eps, self.dtype)

    def __call__(self, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """tokens int [B, L] (L <= context_length) -> hidden [B, L, E], pooled [B, E]."""
        del train  # No dropout in this tower.
        x = self.pos_embed(self.token_embedding(tokens))
        x = self.ln_final(self.encoder(x))
        pos = eos_positions(tokens, self.eos_id)
        pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return dict(hidden=x, pooled=pooled)


def from_config(cfg: ml_collections.ConfigDict, **overrides: Any) -> TextTransformer:
    """TextTransformer from a text section (CLIP's model.text); `overrides` win over its keys."""
    get = lambda key, default: overrides.get(key, cfg.get(key, default))  # noqa: E731
    return TextTransformer(
        vocab_size=get("vocab_size", 49408),
        context_length=get("context_length", 77),
        width=get("width", 512),
        depth=get("depth", 12),
        heads=get("heads", 8),
        mlp_dim=overrides.get("mlp_dim", mlp_dim_from(cfg)),
        act=get("act", "quick_gelu"),
        ln_eps=get("ln_eps", 1e-5),
        eos_id=get("eos_id", 49407),
        causal=get("causal", True),
        dtype=jnp.dtype(get("dtype", "float32")),
        scan_layers=get("scan_layers", False),
        remat=get("remat", "none"),
    )


TEXT_KINDS = ("transformer", "char_cnn_rnn")


def tower_from_config(cfg: ml_collections.ConfigDict, **overrides: Any) -> nn.Module:
    """The text tower a text section's `kind` names: "transformer" (default, TextTransformer) or
    "char_cnn_rnn" (models.char_cnn_rnn, Reed et al. 2016's character-level encoder)."""
    kind = str(cfg.get("kind", "transformer"))
    if kind == "transformer":
        return from_config(cfg, **overrides)
    if kind == "char_cnn_rnn":
        from vlm_jax.models import char_cnn_rnn

        return char_cnn_rnn.from_config(cfg, dtype=overrides.get("dtype", cfg.get("dtype", "float32")))
    raise ValueError(f"model.text.kind {kind!r}: choose one of {TEXT_KINDS}")
