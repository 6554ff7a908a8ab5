"""CLIP-style contrastive learning: symmetric InfoNCE (softmax) or the SigLIP sigmoid loss."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.tasks.base import apply_train


def softmax_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    scale: jax.Array,
    negative_embeds: jax.Array | None = None,
) -> jax.Array:
    """Symmetric InfoNCE over a batch of matched pairs; embeds [B, E] L2-normalised -> scalar.

    negative_embeds [N, E] are extra texts that match no image: they join the image->text
    softmax as wrong answers (NegCLIP); the text->image direction is over the B pairs only.
    """
    logits = scale * image_embeds @ text_embeds.T
    labels = jnp.arange(logits.shape[0])
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    if negative_embeds is not None:
        logits = jnp.concatenate([logits, scale * image_embeds @ negative_embeds.T], axis=1)
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return 0.5 * (i2t.mean() + t2i.mean())


def sigmoid_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    negative_embeds: jax.Array | None = None,
) -> jax.Array:
    """SigLIP: every pair is a binary problem (+1 on the diagonal); summed per image, averaged.

    negative_embeds [N, E] add N more -1 pairs per image.
    """
    if negative_embeds is not None:
        text_embeds = jnp.concatenate([text_embeds, negative_embeds], axis=0)
    logits = scale * image_embeds @ text_embeds.T + bias
    signs = 2.0 * jnp.eye(*logits.shape) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: images [B,H,W,3] and tokens [B,L], or [2B,L] with the
    batch's negative_tokens appended (one text-tower call for both)."""
    tokens = batch["tokens"]
    if "negative_tokens" in batch:
        tokens = jnp.concatenate([tokens, batch["negative_tokens"]], axis=0)
    return (batch["image"], tokens)


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """Contrastive loss of a batch {'image' [B,H,W,3], 'tokens' [B,L]} and its metrics."""
    out, model_state = apply_train(model, params, model_state, *model_inputs(batch), rng=rng)
    img = out["image_embeds"].astype(jnp.float32)
    txt = out["text_embeds"].astype(jnp.float32)
    txt, neg = txt[: img.shape[0]], (txt[img.shape[0]:] if "negative_tokens" in batch else None)
    if config.model.loss == "sigmoid":
        loss = sigmoid_loss(img, txt, out["logit_scale"], out["logit_bias"], neg)
    elif config.model.loss == "softmax":
        loss = softmax_loss(img, txt, out["logit_scale"], neg)
    else:
        raise ValueError(f"unknown contrastive loss {config.model.loss!r}; use softmax or sigmoid")
    sims = img @ txt.T
    metrics = {
        "loss": loss,
        "logit_scale": out["logit_scale"],
        "batch_i2t_top1": jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0])),
    }
    if neg is not None:
        # How often the true caption beats the image's own wrongly bound one.
        metrics["batch_beats_negative"] = jnp.mean(jnp.sum(img * txt, -1) > jnp.sum(img * neg, -1))
    return loss, {"metrics": metrics, "model_state": model_state}
