"""The char-CNN-RNN text encoder (Reed et al. 2016, "Learning Deep Representations of Fine-Grained
Visual Descriptions"), the sentence embedding GAN-INT-CLS was conditioned on.

    one-hot characters [B, L, V] -> (temporal conv k, ReLU, max-pool p) x len(channels)
        -> LSTM over the pooled sequence -> hidden states averaged over time -> linear to `width`

Characters are the ids of a character-level tokenizer (config.tokenizer.model_type = "char": one
sentencepiece piece per character, pad 0, bos 2, eos 3). The paper trains it with a structured
joint embedding against image features; here it is a CLIP text tower (`model.text.kind =
"char_cnn_rnn"`) trained contrastively against the image tower in a CLIP stage, which is the same
idea with CLIP's softmax loss in place of the paper's hinge. Padding never reaches the output:
pads are zero vectors, every conv output at a pad position is zeroed before pooling, a pooled
step is valid when its window holds a valid character, and the average runs over valid steps
only, so a caption gives the same embedding whatever the padded length.

Interface of a text tower (models.text.TextTransformer's): `__call__(tokens [B, L]) ->
{"hidden" [B, L', H], "pooled" [B, width]}` and a `width` attribute.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.layers.lstm import LSTMCell


class CharCnnRnn(nn.Module):
    vocab_size: int = 64
    channels: tuple[int, ...] = (128, 128)
    kernel: int = 4
    pool: int = 3
    hidden: int = 128
    width: int = 128
    pad_id: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
        if tokens.ndim != 2:
            raise ValueError(f"char_cnn_rnn: tokens must be [B, L], got shape {tokens.shape}")
        valid = tokens != self.pad_id  # [B, L]
        x = jax.nn.one_hot(tokens, self.vocab_size, dtype=self.dtype) * valid[..., None]
        for i, channels in enumerate(self.channels):
            kernel = self.param(
                f"conv_{i}", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed", "mlp")),
                (self.kernel, x.shape[-1], channels), jnp.float32,
            )
            bias = self.param(f"conv_{i}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                              (channels,), jnp.float32)
            x = jax.lax.conv_general_dilated(
                x, kernel.astype(self.dtype), (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
            )
            x = nn.relu(x + bias.astype(self.dtype)) * valid[..., None]
            # Max-pool windows of `pool` (ReLU outputs are >= 0, so a zeroed pad never wins).
            length = -(-x.shape[1] // self.pool) * self.pool
            x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
            x = x.reshape(x.shape[0], -1, self.pool, x.shape[-1]).max(axis=2)
            valid = jnp.pad(valid, ((0, 0), (0, length - valid.shape[1])))
            valid = valid.reshape(valid.shape[0], -1, self.pool).any(axis=2)
        b = x.shape[0]
        scan = nn.scan(LSTMCell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1)
        carry = (jnp.zeros((b, self.hidden), jnp.float32), jnp.zeros((b, self.hidden), jnp.float32))
        _, hidden = scan(self.hidden, dtype=self.dtype, name="lstm")(carry, x)  # [B, L', H]
        weights = valid.astype(jnp.float32)[..., None]
        mean = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        out = nn.DenseGeneral(
            self.width, dtype=self.dtype, name="out",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(mean)
        return {"hidden": hidden, "pooled": out}


def from_config(cfg: ml_collections.ConfigDict, **overrides: Any) -> CharCnnRnn:
    """CharCnnRnn from a text section with kind "char_cnn_rnn": vocab_size, channels, kernel, pool,
    hidden, width, pad_id, dtype (`overrides` win over its keys)."""
    get = lambda key, default: overrides.get(key, cfg.get(key, default))  # noqa: E731
    return CharCnnRnn(
        vocab_size=int(get("vocab_size", 64)),
        channels=tuple(int(c) for c in get("channels", (128, 128))),
        kernel=int(get("kernel", 4)),
        pool=int(get("pool", 3)),
        hidden=int(get("hidden", 128)),
        width=int(get("width", 128)),
        pad_id=int(get("pad_id", 0)),
        dtype=jnp.dtype(get("dtype", "float32")),
    )
