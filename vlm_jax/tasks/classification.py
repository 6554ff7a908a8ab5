"""Image classification with softmax cross-entropy (ViT on labels)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.tasks.base import apply_train


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: images [B,H,W,3]."""
    return (batch["image"],)


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """Cross-entropy of logits [B, classes] against batch['label'] [B], with label smoothing."""
    logits, model_state = apply_train(model, params, model_state, *model_inputs(batch), rng=rng)
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    smoothing = config.task.get("label_smoothing", 0.0)
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return loss, {"metrics": metrics, "model_state": model_state}
