"""Language modelling: next-token cross-entropy on the tokens the batch's loss_mask selects.

Batches come from vlm_jax.data.text: tokens, targets, positions, segment_ids int32 [B, L] and
loss_mask float32 [B, L] (1 where a target counts: every token for pretraining, the response for
instruction tuning, 0 on padding). The loss is the mean over all selected tokens of the batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.tasks.base import apply_train


def model_inputs(batch: dict) -> tuple:
    """The model's positional inputs: tokens [B, L], positions [B, L], segment_ids [B, L]."""
    return (batch["tokens"], batch["positions"], batch["segment_ids"])


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [B, L, V], targets int [B, L] -> negative log-likelihood float32 [B, L]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def loss_fn(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model_state: dict,
) -> tuple[jax.Array, dict]:
    """Mean NLL over the masked target tokens; metrics: loss, token accuracy, tokens counted."""
    del config
    logits, model_state = apply_train(model, params, model_state, *model_inputs(batch), rng=rng)
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (token_nll(logits, batch["targets"]) * mask).sum() / count
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    metrics = {"loss": loss, "token_accuracy": (correct * mask).sum() / count, "loss_tokens": mask.sum()}
    return loss, {"metrics": metrics, "model_state": model_state}
